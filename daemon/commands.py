"""Commands (MQTT `cmd`, HTTP `POST /api/cmd`): parsed and checked completely before anything
changes. Pure: no service state.

A command is a JSON object `{"id": <str or int>, "action": ..., <parameters>}`. `COMMANDS` is
the table of what each action may carry; `parse_command` checks a command against it (types,
lengths, and for `plan` every [plan] value through `daemon.settings.PlanSettings`) and returns
a `Command`, or raises CommandError with a message naming the parameter. What each action does
is the service's handler of that name (daemon.control).

Replies and log lines echo what the sender sent only in part (`clip`): a 10 MB stack name is
refused in a line, not echoed back whole.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

from daemon.config import ConfigError, build_section
from daemon.settings import PlanSettings

#: Largest command accepted (bytes of JSON); a plan with every key is under 1 kB.
MAX_COMMAND_BYTES = 64 * 1024
#: Longest text a reply or log line echoes from a command (characters).
ECHO_CHARS = 120


@dataclass(frozen=True)
class Param:
    """One parameter of an action: its JSON type, whether it must be given, the longest text."""

    kind: type
    required: bool = False
    max_chars: int = 4096


#: action -> its parameters. `plan` and `queue` take every [plan] key (daemon.settings.PlanSettings);
#: those left out come from the config's [plan], so {"frame_type": "dark", "count": 20} takes darks
#: matching the lights' exposure. `plan` runs one plan now; `queue` appends one to the night's.
COMMANDS: Mapping[str, Mapping[str, Param] | None] = MappingProxyType({
    "start": {},
    "stop": {},
    "pause": {},
    "resume": {},
    "reset": {"stack": Param(str, max_chars=255)},
    "restack": {"stack": Param(str, max_chars=255)},
    "set_reference": {"path": Param(str, required=True)},
    "plan": None,
    "queue": None,
    "autofocus": {"start_offset_steps": Param(int)},
})


class CommandError(ValueError):
    """A command that is refused; the message says why."""


@dataclass(frozen=True)
class Command:
    """A checked command. params: its parameters (without id and action); plan: the
    PlanSettings of a `plan` command."""

    id: str | int
    action: str
    params: Mapping[str, Any]
    plan: PlanSettings | None = None


def clip(value: Any, limit: int = ECHO_CHARS) -> str:
    """`repr(value)` cut to `limit` characters, saying how long it was: for echoing input."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def command_id(raw: bytes | str) -> str | int | None:
    """The id of a command, even of one that is otherwise invalid (for the reply); None if none
    (or when the command is too large to be read at all)."""
    if len(raw) > MAX_COMMAND_BYTES:
        return None
    try:
        loose = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    if not isinstance(loose, dict):
        return None
    cid = loose.get("id")
    if isinstance(cid, bool) or not isinstance(cid, (str, int)):
        return None
    if isinstance(cid, str) and len(cid) > ECHO_CHARS:
        return None  # an id is echoed in every reply: a huge one is no id
    return cid


def validate_command(raw: bytes | str) -> dict:
    """Parse and check a command's shape: the JSON object with its id, action and parameters
    (not yet the plan's values: see `parse_command`). Raises CommandError naming the problem."""
    size = len(raw)
    if size > MAX_COMMAND_BYTES:
        raise CommandError(f"command too large: {size} bytes (at most {MAX_COMMAND_BYTES})")
    try:
        cmd = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CommandError(f"not valid JSON: {exc}") from None
    except RecursionError:
        raise CommandError("not valid JSON: nested too deeply") from None
    if not isinstance(cmd, dict):
        raise CommandError("a command must be a JSON object")
    cid = cmd.get("id")
    if isinstance(cid, bool) or not isinstance(cid, (str, int)) or (isinstance(cid, str) and len(cid) > ECHO_CHARS):
        raise CommandError(f"missing or invalid 'id' (a string of at most {ECHO_CHARS} characters, or an integer)")
    action = cmd.get("action")
    if not isinstance(action, str) or action not in COMMANDS:
        raise CommandError(f"unknown action {clip(action)} (known: {', '.join(COMMANDS)})")
    params = COMMANDS[action]
    if params is None:  # plan, queue: their values are checked by PlanSettings in parse_command
        return cmd
    for key, value in cmd.items():
        if key in ("id", "action"):
            continue
        if key not in params:
            raise CommandError(f"{action}: unknown parameter {clip(key)} (known: {', '.join(params) or 'none'})")
        spec = params[key]
        if isinstance(value, bool) or not isinstance(value, spec.kind):
            raise CommandError(f"{action}: parameter {key!r} must be {spec.kind.__name__}, got {clip(value)}")
        if isinstance(value, str) and len(value) > spec.max_chars:
            raise CommandError(f"{action}: parameter {key!r} is {len(value)} characters long "
                               f"(at most {spec.max_chars}): {clip(value)}")
    for key, spec in params.items():
        if spec.required and key not in cmd:
            raise CommandError(f"{action}: parameter {key!r} required")
    return cmd


def plan_from_command(cmd: dict, default: PlanSettings | None, now: datetime | None = None) -> PlanSettings:
    """The PlanSettings of a `plan` command: its keys over the config's [plan] (when there is
    one); every value checked as a config value is. Calibration frames take their own count
    (10), no end time and no dithers unless given. An `until` already past is refused.
    Raises CommandError naming the key."""
    given = {k: v for k, v in cmd.items() if k not in ("id", "action")}
    base = dataclasses.asdict(default) if default is not None else {}
    if given.get("frame_type", "light") != "light":
        base.setdefault("target", "")
        base.update(count=10, until=None, start=None, dither_every=0)  # no slews, no dithers, no wait
    try:
        plan = build_section(PlanSettings, {**base, **given}, "plan", "plan command")
    except ConfigError as exc:
        raise CommandError(clip_message(str(exc))) from None
    until = plan.until_time
    if until is not None and "until" in given and until <= (now or datetime.now(UTC)):
        raise CommandError(f"plan command: [plan] until = {clip(plan.until)}: that time has passed")
    return plan


def parse_command(raw: bytes | str, plan_default: PlanSettings | None = None) -> Command:
    """Check a command completely (shape, then a plan's values) and return it.

    Parameters
    ----------
    raw : bytes or str
        The JSON text as received.
    plan_default : PlanSettings or None
        The config's [plan], whose values a `plan` command's missing keys take.

    Raises
    ------
    CommandError
        With a message naming the parameter; nothing has changed.
    """
    cmd = validate_command(raw)
    params = MappingProxyType({k: v for k, v in cmd.items() if k not in ("id", "action")})
    plan = plan_from_command(cmd, plan_default) if cmd["action"] in ("plan", "queue") else None
    return Command(cmd["id"], cmd["action"], params, plan)


def clip_message(text: str, limit: int = 1000) -> str:
    """An error message cut to `limit` characters (a message quoting input stays bounded)."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"
