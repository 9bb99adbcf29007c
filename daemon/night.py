"""A night's queue of plans run one after another on INDI, resumable after a restart.

`run_queue` is what a supervisor awaits instead of one `run_acquisition`: it asks the
`PlanQueue` for the next entry, runs it with the frames it already has (`done_paths`: a plan
interrupted by a crash or a stop goes on where it was, frames taken are not taken again),
records each frame and the end in the queue, saves the queue after each (atomically, in the
state folder), and publishes `queue` events with the queue's status. It ends when the queue has
nothing left, the night is over (a plan ended at dawn), a plan failed (the queue halts) or stop.

Why a frame is recorded from the plan's `running` event: that event is published once the file
is in the capture folder, so what the queue holds is always on disk. A kill -9 between the two
loses at most the record of that one frame, which is then taken once more.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import types
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from daemon.acquisition import AcquisitionError, Events, run_acquisition
from daemon.plan_queue import PlanQueue
from daemon.settings import PlanSettings

log = logging.getLogger(__name__)

Finished = Callable[[PlanSettings, dict], Awaitable[None]]


def _with_plan(config: Any, plan: PlanSettings) -> Any:
    if dataclasses.is_dataclass(config):
        return dataclasses.replace(config, plan=plan)
    return types.SimpleNamespace(**{**vars(config), "plan": plan})


class _Recording:
    """The plan's events, passed on; each frame recorded in the queue and saved first."""

    def __init__(self, events: Events, queue: PlanQueue, save):
        self.events, self.queue, self.save = events, queue, save

    async def publish(self, kind: str, payload: dict) -> None:
        if kind == "plan" and payload.get("state") == "running" and payload.get("path"):
            self.queue.frame(payload["path"])
            self.save()
        await self.events.publish(kind, payload)


async def run_queue(config: Any, queue: PlanQueue, events: Events, stop: asyncio.Event, *,
                    save_to: str | Path | None = None, on_finished: Finished | None = None,
                    **runner_options) -> list[dict]:
    """Run the queue's plans in order (see the module docstring).

    Parameters
    ----------
    config : the daemon's Config (or any object with indi, camera, capture, site, mount);
        its `plan` is replaced by each entry's.
    queue : PlanQueue, e.g. `PlanQueue.load(state_dir / "queue.json", plans)`.
    events : where plan events go (kind "plan") and the queue's status (kind "queue").
    stop : set to stop the running plan and the queue.
    save_to : the queue's file (None: not saved).
    on_finished : awaited with (plan, summary) after each plan (final re-stack, masters).
    runner_options : passed to `run_acquisition` (PlanRunner options).

    Returns the summaries of the plans run, in order; a failed plan's is {"state": "failed",
    "error": ...} and ends the queue.
    """
    def save() -> None:
        if save_to is not None:
            queue.save(save_to)

    async def publish_queue() -> None:
        try:
            await events.publish("queue", queue.status())
        except Exception as exc:  # noqa: BLE001 - reporting must never stop the night
            log.warning("queue event not published: %s", exc)

    summaries: list[dict] = []
    recording = _Recording(events, queue, save)
    while not stop.is_set():
        entry = queue.next()
        if entry is None:
            break
        save()
        await publish_queue()
        if entry.paths:
            log.info("plan %s resumes with %d frames taken", entry.plan.target, len(entry.paths))
        try:
            summary = await run_acquisition(_with_plan(config, entry.plan), recording, stop,
                                            done_paths=list(entry.paths), **runner_options)
        except AcquisitionError as exc:
            queue.fail(str(exc))
            save()
            await publish_queue()
            summaries.append({"state": "failed", "error": str(exc)})
            break
        queue.finish(summary)
        save()
        await publish_queue()
        summaries.append(summary)
        if on_finished is not None:
            await on_finished(entry.plan, summary)
    return summaries
