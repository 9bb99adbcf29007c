"""What each command does: the handler table of daemon.commands' actions.

`Controller.handle(raw)` answers every command with the `cmd/result` JSON (MQTT and HTTP
alike): `{"id", "ok": true, "action", ...what it did}` or `{"id", "ok": false, "error"}`. A
command is checked completely (daemon.commands) before its handler runs, so a refused one
changes nothing; the destructive ones (reset, set_reference) say in their reply what they
removed. Handlers run on the event loop; stack work goes to the worker through the service's
`job`. A handler's failure is an error reply, never the end of the command loop.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from daemon.commands import COMMANDS, Command, CommandError, clip_message, command_id, parse_command
from daemon.session import SessionError
from daemon.supervisor import INDI_EXTRA, indi_available

if TYPE_CHECKING:
    from daemon.service import Service

log = logging.getLogger("lightbucket")

Handler = Callable[[Command], Awaitable[dict | None]]


class Controller:
    """The command table of one service: action -> handler."""

    def __init__(self, service: Service):
        self.service = service
        self.handlers: dict[str, Handler] = {
            "start": self.start, "stop": self.stop, "pause": self.pause, "resume": self.resume,
            "reset": self.reset, "restack": self.restack, "set_reference": self.set_reference,
            "plan": self.plan, "queue": self.queue, "autofocus": self.autofocus,
        }
        missing = set(COMMANDS) ^ set(self.handlers)
        assert not missing, f"commands without handlers (or handlers without commands): {missing}"

    async def handle(self, raw: bytes | str) -> dict:
        """Check and run one command; returns its reply (never raises)."""
        cid = command_id(raw)
        try:
            cmd = parse_command(raw, self.service.config.plan)
            detail = await self.handlers[cmd.action](cmd)
        except (CommandError, SessionError) as exc:
            error = clip_message(str(exc))
            log.warning("command refused (id %s): %s", cid, error)
            return {"id": cid, "ok": False, "error": error}
        except Exception as exc:  # noqa: BLE001 - a failing command must not end the command loop
            log.exception("command failed (id %s)", cid)
            return {"id": cid, "ok": False, "error": clip_message(f"{type(exc).__name__}: {exc}")}
        log.info("command %s (id %s): ok", cmd.action, cid)
        return {"id": cid, "ok": True, "action": cmd.action, **(detail or {})}

    # ----------------------------------------------------------------- handlers
    async def pause(self, cmd: Command) -> None:
        self.service.set_state("paused")

    async def resume(self, cmd: Command) -> None:
        if self.service.state == "stopped":
            raise CommandError("resume: stacking is stopped; use start")
        self.service.set_state("running")

    async def start(self, cmd: Command) -> None:
        self.service.set_state("running")
        self.service.plans.start()

    async def stop(self, cmd: Command) -> None:
        await self.service.plans.stop()
        self.service.set_state("stopped")
        await self.service.write_products(force=True)

    async def plan(self, cmd: Command) -> dict:
        service = self.service
        self._can_acquire("plan")
        if service.plans.running:
            raise CommandError("plan: a plan is running; send stop first")
        if service.state != "running":
            service.set_state("running")
        service.plans.start(cmd.plan)
        return {"plan": dataclasses.asdict(cmd.plan)}

    async def queue(self, cmd: Command) -> dict:
        """Append a plan to the night's queue (run at once when nothing runs)."""
        service = self.service
        self._can_acquire("queue")
        try:
            status = service.plans.enqueue(cmd.plan)
        except RuntimeError as exc:
            raise CommandError(f"queue: {exc}") from None
        if service.state != "running":
            service.set_state("running")
        service.publish_status()
        return {"plan": dataclasses.asdict(cmd.plan), "queue": status}

    def _can_acquire(self, action: str) -> None:
        if self.service.config.indi is None:
            raise CommandError(f"{action}: no [indi] section in the config: nothing to acquire with")
        if not indi_available():
            raise CommandError(f"{action}: device control is not installed: {INDI_EXTRA}")

    async def autofocus(self, cmd: Command) -> dict:
        """Queued on the running light plan (done before its next frame), else run now in an
        INDI session of its own; the reply says which, or what came of it (the curve is in the
        `autofocus` event and the status's `focus`)."""
        service = self.service
        if service.config.indi is None or not service.config.indi.focuser:
            raise CommandError("autofocus: no focuser: set [indi] focuser to its INDI device name")
        if not indi_available():
            raise CommandError(f"autofocus: device control is not installed: {INDI_EXTRA}")
        from daemon.autofocus import autofocus_command  # PyIndi: the [indi] extra

        try:
            offset = autofocus_command(cmd.params)
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        try:
            if service.plans.running:
                target = service.plans.request_autofocus(offset)
                return {"queued": True, "target": target, "start_offset_steps": offset}
            result = await service.plans.autofocus_now(offset)
        except RuntimeError as exc:
            raise CommandError(f"autofocus: {exc}") from None
        service.publish_status()
        return {"queued": False, "focused": result["ok"],
                **{k: result.get(k) for k in ("position", "hfr_px", "hfr_px_start", "reason")}}

    async def reset(self, cmd: Command) -> dict:
        name = cmd.params.get("stack")
        reply = await self.service.job(lambda session: session.reset(name))
        self.service.pointing.forget(reply["stack"])
        self.service.publish_status()
        return reply

    async def restack(self, cmd: Command) -> dict:
        name = cmd.params.get("stack")
        return await self.service.job(lambda session: session.restack(name))

    async def set_reference(self, cmd: Command) -> dict:
        """Only a file under the capture folder: a command must not make the daemon read any
        file it can reach."""
        service = self.service
        capture = service.capture_dir.resolve()
        given = Path(cmd.params["path"])
        path = (given if given.is_absolute() else capture / given).resolve()
        if not path.is_relative_to(capture):
            raise CommandError(f"set_reference: {clip_message(str(given), 200)} is not under the capture folder "
                               f"{service.capture_dir}")
        if not path.is_file():
            raise CommandError(f"set_reference: {path.relative_to(capture)} is not a file in the capture folder")
        reply, again = await service.job(lambda session: session.set_reference(path))
        service.pointing.forget(reply["stack"])
        for p in sorted(again, key=lambda p: (p.stat().st_mtime if p.exists() else 0, str(p))):
            service.enqueue(p)
        service.publish_status()
        return reply
