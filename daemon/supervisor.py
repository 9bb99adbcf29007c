"""The plan supervisor: runs acquisition plans over INDI, one at a time, and what ends them.

One plan at a time: the night's queue at start (the config's plans, `config.queue` or its
[plan]), or one sent with the `plan` command. The queue is kept in <state.dir>/queue.json
(daemon.plan_queue, run by daemon.night.run_queue): a daemon restarted mid-night resumes the
plan that was running with the frames it has, and goes on with the rest; `queue` events carry
its status. Frames reach the stacks only through the folder watcher, like any other program's.
When a plan ends:
- a light plan that ran to its end gets its stack's final re-stack, once all its frames are
  processed (what `restack` does on demand);
- a calibration plan (bias, dark, flat, darkflat) ends in a master built from its frames; from
  then on the master calibrates every new stack (and any stack still empty), and the checkpoint
  keeps it, so a restart calibrates the same way.

The supervisor runs on the event loop; the stacking work it asks for (the master, the final
re-stack) runs on the worker thread through the service's `job`. It also hands each stacked
frame of the running light plan to that plan's refocus trigger (`frame_done`, daemon.upkeep),
and runs the `autofocus` command: queued on the running plan, else on its own.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from daemon.config import Config, ConfigError
from daemon.plan_queue import PlanQueue
from daemon.session import SessionError
from daemon.settings import PlanSettings

log = logging.getLogger("lightbucket")

#: Install line for device control, named when a plan is asked of a daemon without it.
INDI_EXTRA = "pip install 'lightbucket[indi]' (or LIGHTBUCKET_EXTRAS=indi scripts/bootstrap.sh)"


def indi_available() -> bool:
    """Whether the INDI extra (pyindi-client) is installed (found, not imported)."""
    try:
        return importlib.util.find_spec("PyIndi") is not None
    except (ImportError, ValueError):
        return False


class PlanSupervisor:
    """Starts, stops and finishes plans. Loop only.

    publish: (kind, payload) -> None, an event to MQTT and the page; progress: called with
    each `plan` progress payload (the service keeps the latest for `status`); job: runs
    fn(session) on the worker thread and awaits its result; processed: awaits until given frame
    paths are in the ledger (or the timeout, seconds, passes) and says whether they are.
    """

    def __init__(self, config: Config, publish: Callable[[str, dict], None], progress: Callable[[dict], None],
                 job: Callable[..., Awaitable[Any]], processed: Callable[[list[str], float], Awaitable[bool]]):
        if config.indi is not None and not indi_available():
            raise ConfigError(f"{config.source}: [indi]: device control is not installed: {INDI_EXTRA}")
        self.config = config
        self._publish, self._progress, self._job, self._processed = publish, progress, job, processed
        self._task: asyncio.Task | None = None
        self._stop: asyncio.Event | None = None
        self._save_to: Path | None = None  # where the running queue is kept (None: a plan command's own)
        #: The queue running (or last run): the night's, or the `plan` command's one plan.
        self.queue: PlanQueue | None = None
        #: The running plan's PlanRunner (daemon.acquisition), None between plans.
        self.runner = None
        #: The latest `autofocus` event (status `focus`), None before the first.
        self.focus: dict | None = None
        self._focusing = False
        self._preparing: set[asyncio.Task] = set()  # `_prepare_stack` jobs under way (referenced)

    @property
    def queue_file(self) -> Path:
        return self.config.state.dir / "queue.json"

    def night_plans(self) -> tuple[PlanSettings, ...]:
        """The night's plans: the config's queue ([[plan]] entries) or its one [plan]."""
        plans = tuple(getattr(self.config, "queue", None) or ())
        return plans or ((self.config.plan,) if self.config.plan is not None else ())

    def queue_status(self) -> dict | None:
        """The queue's status for `status` (None before any plan ran)."""
        return None if self.queue is None else self.queue.status()

    def target_of(self, name: str | None) -> tuple[float, float] | None:
        """(RA, Dec) degrees J2000 the mount was sent to for target `name` by a plan of the
        running (or last) queue; None when no plan pointed at it."""
        if self.queue is None or name is None:
            return None
        for plan in (e.plan for e in self.queue.entries):
            if plan.target == name and plan.ra is not None and plan.dec is not None:
                return plan.ra_deg, plan.dec_deg
        return None

    @property
    def running(self) -> bool:
        """A plan is running."""
        return self._task is not None and not self._task.done()

    def start(self, plan: PlanSettings | None = None) -> asyncio.Task | None:
        """Run `plan` (default: the config's [plan]) as a task, unless one is running or the
        config has no [indi]; returns the task (None when nothing started)."""
        if self.config.indi is None or self.running:
            return None
        if plan is not None:  # the plan command: a queue of its own, not the night's
            queue, save_to = PlanQueue([plan]), None
        else:
            plans = self.night_plans()
            if not plans:
                log.warning("%s: [indi] without [plan]: nothing to acquire, watching only", self.config.source)
                return None
            queue, save_to = PlanQueue.load(self.queue_file, plans), self.queue_file
            if not queue.rearm():  # all ran: a new run of the night's plans
                queue = PlanQueue(plans)
        return self._run(queue, save_to)

    def _run(self, queue: PlanQueue, save_to: Path | None) -> asyncio.Task:
        self.queue, self._save_to = queue, save_to
        self._stop = asyncio.Event()
        self._task = asyncio.create_task(self._run_queue(queue, save_to), name="plan")
        return self._task

    def enqueue(self, plan: PlanSettings) -> dict:
        """Append `plan` to the night's queue (kept in queue.json, so a restart keeps it) and
        run the queue when nothing runs. Returns the queue's status. Raises RuntimeError while
        a single `plan` command's plan runs (stop it first)."""
        if self.running:
            if self._save_to is None:
                raise RuntimeError("a plan sent with `plan` is running; send stop first, or queue plans only")
            self.queue.add(plan)
            self.queue.save(self.queue_file)
        else:
            queue = PlanQueue.load(self.queue_file, self.night_plans())
            queue.rearm()
            queue.add(plan)
            queue.save(self.queue_file)
            self._run(queue, self.queue_file)
        return self.queue.status()

    async def run(self, plan: PlanSettings) -> dict:
        """Run one plan to its end and return its summary (state, frames, paths, master, final)."""
        if self.running:
            raise RuntimeError("a plan is already running")
        task = self.start(plan)
        if task is None:
            raise RuntimeError("no [indi] section: nothing to acquire with")
        return await task

    async def wait(self) -> dict | None:
        """The summary of the running (or last) plan once it ends; None when none ran."""
        if self._task is None:
            return None
        return await asyncio.shield(self._task)

    async def stop(self, timeout_s: float = 30.0) -> None:
        """Stop the running plan (the exposure in hand is aborted); cancel it if it does not
        stop within `timeout_s`."""
        if self.running:
            self._stop.set()
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout_s)
            except TimeoutError:
                self._task.cancel()

    def frame_done(self, out: Any) -> None:
        """A frame judged by the pipeline (daemon.session.Outcome): when it is one of the
        running light plan's, its FWHM goes to the plan's refocus trigger."""
        runner, r = self.runner, getattr(out, "result", None)
        if runner is None or r is None:
            return
        why = runner.upkeep.frame_measured(out.path, r.accepted, r.reason, r.fwhm_px)
        if why:
            log.info("refocus: %s", why)

    def request_autofocus(self, start_offset_steps: int = 0) -> str:
        """The autofocus command during a plan: queued on the running light plan (before its
        next frame). Returns the plan's target; RuntimeError saying why when it cannot be."""
        runner = self.runner
        if runner is None or not self.running:
            raise RuntimeError("no plan is running")
        if not runner.light:
            raise RuntimeError(f"the running plan takes {runner.plan.frame_type} frames: focus after it")
        runner.request_autofocus("command", start_offset_steps)
        return runner.plan.target

    async def autofocus_now(self, start_offset_steps: int = 0) -> dict:
        """The autofocus command with no plan running: its own INDI session (daemon.upkeep.
        focus_once); returns the result. RuntimeError when one runs already."""
        from daemon.upkeep import focus_once  # PyIndi: the [indi] extra

        if self._focusing:
            raise RuntimeError("an autofocus is running")
        self._focusing = True
        try:
            return await focus_once(self.config, self._events(), start_offset_steps)
        finally:
            self._focusing = False

    def _events(self):
        """The plans' event sink: `plan` progress to the status, everything as `acquisition`."""
        supervisor = self

        class Events:
            async def publish(self, kind: str, payload: dict) -> None:
                if kind == "plan":
                    supervisor._progress({k: v for k, v in payload.items() if k != "paths"})
                elif kind == "autofocus":
                    supervisor.focus = {**payload, "event": "autofocus"}
                supervisor._publish("acquisition", {"event": kind, **payload})

        return Events()

    def _set_runner(self, runner) -> None:
        self.runner = runner
        if runner is None:  # a stack made ahead for frames that never came is freed
            self._prepare_stack(None, None, None)

    def _prepare_stack(self, shape: tuple[int, int] | None, bayer: str | None, key) -> None:
        """A light plan's first exposure starts (PlanRunner's expect_frames): its stack is made
        meanwhile on the worker thread (`Session.prepare`), without holding up the plan."""
        async def make() -> None:
            try:
                await self._job(lambda session: session.prepare(shape, bayer, key))
            except Exception:  # noqa: BLE001 - only the first frame's speed is at stake
                log.exception("making the stack ahead of the plan's frames failed")

        task = asyncio.create_task(make(), name="prepare-stack")
        self._preparing.add(task)
        task.add_done_callback(self._preparing.discard)

    async def _run_queue(self, queue: PlanQueue, save_to) -> dict:
        """Run the queue's plans; returns the last plan's summary, with "queue" (its status)."""
        from daemon.night import run_queue  # PyIndi: the [indi] extra, only with plans

        try:
            summaries = await run_queue(self.config, queue, self._events(), self._stop, save_to=save_to,
                                        on_finished=self._finished, on_runner=self._set_runner,
                                        expect_frames=self._prepare_stack)
        except Exception as exc:  # noqa: BLE001 - stacking of what arrives goes on
            log.exception("acquisition failed")
            error = f"{type(exc).__name__}: {exc}"
            self._publish("acquisition", {"event": "error", "error": error})
            return {"state": "failed", "frames": 0, "paths": [], "error": error, "queue": queue.status()}
        summary = dict(summaries[-1]) if summaries else {"state": "done", "frames": 0, "paths": []}
        if summary.get("state") == "failed":
            self._publish("acquisition", {"event": "error", "error": summary.get("error")})
        summary["queue"] = queue.status()
        return summary

    async def _finished(self, plan: PlanSettings, summary: dict) -> None:
        """After each plan: its event, then its product (final re-stack, master) into summary."""
        log.info("acquisition %s: %s frames", summary.get("state"), summary.get("frames"))
        self._publish("acquisition", {"event": "finished", **summary})
        paths = summary.get("paths") or []
        if not paths:
            return
        if not plan.frame_type.is_calibration:
            if summary.get("state") == "done":
                summary["final"] = await self._final_restack(paths)
        elif summary.get("state") == "done" or len(paths) >= 3:
            try:
                out = await self._job(lambda session: session.build_master(
                    plan.frame_type, paths, exposure_s=plan.exposure_s, filter_name=plan.filter))
            except (ValueError, OSError) as exc:
                log.error("master %s from %d frames not built: %s", plan.frame_type, len(paths), exc)
                summary["error"] = f"master not built: {exc}"
                self._publish("acquisition", {"event": "error", "error": summary["error"]})
            else:
                summary["master"] = str(out)
                self._publish("acquisition", {"event": "master", "kind": str(plan.frame_type),
                                              "path": str(out), "frames": len(paths)})

    async def _final_restack(self, paths: list[str], timeout_s: float = 600.0) -> str | None:
        """The session-end product of a light plan that ran to its end: once its frames are all
        processed, the final re-stack of their stack."""
        if not await self._processed(paths, timeout_s):
            log.warning("final re-stack skipped: frames of the plan still unprocessed after %g s", timeout_s)
            return None
        try:
            reply = await self._job(lambda session: session.restack_of_file(paths[-1]))
        except (SessionError, ValueError, OSError) as exc:
            log.error("final re-stack not written: %s", exc)
            return None
        self._publish("acquisition", {"event": "final", "stack": reply["stack"], "path": reply["path"]})
        return reply["path"]
