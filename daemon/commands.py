"""MQTT commands: parse and check them before anything changes (pure: no service state).

A command is a JSON object `{"id": <str or int>, "action": ..., <parameters>}`; what each
action does is the service's business (daemon.service), what it may carry is decided here, so a
malformed command is refused with a message naming the parameter and changes nothing.
"""

from __future__ import annotations

import dataclasses
import json

from daemon.config import ConfigError, build_section
from daemon.settings import PlanSettings

ACTIONS = {
    # action: {parameter: (type, required)}
    "start": {},
    "stop": {},
    "pause": {},
    "resume": {},
    "reset": {"stack": (str, False)},
    "restack": {"stack": (str, False)},
    "set_reference": {"path": (str, True)},
    # Every [plan] key (daemon.acquisition.PlanSettings); those left out come from the config's [plan],
    # so {"frame_type": "dark", "count": 20} takes darks matching the lights' exposure.
    "plan": None,
}
#: Calibration frame types; a plan of one of them ends in a master of that kind.
MASTER_KINDS = ("bias", "dark", "flat", "darkflat")


class CommandError(ValueError):
    """A command that is refused; the message says why."""


def validate_command(raw: bytes) -> dict:
    """Parse and check a command; raises CommandError with a specific message (id kept)."""
    try:
        cmd = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CommandError(f"not valid JSON: {exc}") from None
    if not isinstance(cmd, dict):
        raise CommandError("a command must be a JSON object")
    if "id" not in cmd or not isinstance(cmd["id"], (str, int)) or isinstance(cmd["id"], bool):
        raise CommandError("missing or invalid 'id' (string or integer)")
    action = cmd.get("action")
    if action not in ACTIONS:
        raise CommandError(f"unknown action {action!r} (known: {', '.join(ACTIONS)})")
    params = ACTIONS[action]
    if params is None:  # plan: checked against [plan]'s own keys by plan_from_command
        return cmd
    for key, value in cmd.items():
        if key in ("id", "action"):
            continue
        if key not in params:
            raise CommandError(f"{action}: unknown parameter {key!r}")
        if not isinstance(value, params[key][0]):
            raise CommandError(f"{action}: parameter {key!r} must be {params[key][0].__name__}")
    for key, (_, required) in params.items():
        if required and key not in cmd:
            raise CommandError(f"{action}: parameter {key!r} required")
    return cmd


def plan_from_command(cmd: dict, default: PlanSettings | None) -> PlanSettings:
    """The PlanSettings of a `plan` command: its keys over the config's [plan] (when there is one).
    Raises CommandError naming the key, as a config error would."""
    given = {k: v for k, v in cmd.items() if k not in ("id", "action")}
    base = dataclasses.asdict(default) if default is not None else {}
    if given.get("frame_type", "light") != "light":
        base.setdefault("target", "")
        base.update(count=10, until=None, dither_every=0)  # no slews, no dithers
    try:
        plan = build_section(PlanSettings, {**base, **given}, "plan", "plan command")
    except ConfigError as exc:
        raise CommandError(str(exc)) from None
    if plan.frame_type not in ("light", *MASTER_KINDS):
        raise CommandError(f"plan: frame_type {plan.frame_type!r}: expected light, {', '.join(MASTER_KINDS)}")
    return plan
