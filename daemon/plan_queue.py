"""The night's queue of plans: run in order, each with its own limits, kept across restarts.

Pure bookkeeping (no devices, no asyncio): whoever runs plans asks `next()` for the entry to run,
calls `frame(path)` after each frame and `finish(summary)` (or `fail(reason)`) when the
`PlanRunner` returns, and shows `status()`. `save`/`load` keep it in the state folder, so a
daemon killed mid-plan resumes where it was: the entry that was running comes back first with
the frames it has (pass them as `PlanRunner(done_paths=...)`: they are not taken again).

How entries end: "done" (count, until, or the target set below its limit: the next one starts),
"refused" (never rises, no dark sky: the next one starts), "stopped" (by the user: `next()`
offers it again, to resume), "failed" (faults, a failed flip: the queue halts, the rig needs a
look). A plan ended by dawn or daylight ends the night: `next()` returns None until
`new_night()`.

Crash safety: `save` writes a temporary file and renames it over the old one: either the old or
the new queue is on disk, never a torn one.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from daemon.settings import PlanSettings

PENDING, RUNNING, DONE, STOPPED, REFUSED, FAILED = "pending", "running", "done", "stopped", "refused", "failed"
#: Why a plan ended that ends the whole night (daemon.schedule end reasons).
NIGHT_ENDS = ("dawn", "daylight")


def plan_key(plan: PlanSettings) -> str:
    """What identifies a plan across a restart: all its settings (a changed plan is a new one)."""
    return json.dumps(dataclasses.asdict(plan), sort_keys=True, default=str)


@dataclass
class Entry:
    """One plan of the queue and how far it got. paths: its frames so far; ended: why it ended
    (schedule/PlanRunner words: count, until, dawn, target sets, ...); reason: why refused or
    failed."""

    plan: PlanSettings
    state: str = PENDING
    paths: list[str] = field(default_factory=list)
    ended: str | None = None
    reason: str | None = None
    #: Added by the `queue` command (not one of the config's plans): saved with its settings.
    added: bool = False

    def as_dict(self) -> dict:
        p = self.plan
        return {"target": p.target, "frame_type": str(p.frame_type), "filter": p.filter, "exposure_s": p.exposure_s,
                "count": p.count, "frames": len(self.paths), "state": self.state, "ended": self.ended,
                "reason": self.reason}


def _restore(entry: Entry, old: dict) -> None:
    entry.state = old.get("state", PENDING)
    entry.paths = [str(p) for p in old.get("paths", [])]
    entry.ended, entry.reason = old.get("ended"), old.get("reason")


class PlanQueue:
    """Plans run one after another (see the module docstring)."""

    def __init__(self, plans: Sequence[PlanSettings] = ()):
        self.entries = [Entry(p) for p in plans]
        self.night_over = False

    @property
    def halted(self) -> bool:
        """An entry failed: nothing more runs until the queue is changed."""
        return any(e.state == FAILED for e in self.entries)

    def current(self) -> Entry | None:
        return next((e for e in self.entries if e.state == RUNNING), None)

    def next(self) -> Entry | None:
        """The entry to run now (marked running): the one that was running (a restart), else
        the first pending or stopped one; None when the night is over, the queue halted or
        everything ran."""
        if self.night_over or self.halted:
            return None
        entry = self.current() or next((e for e in self.entries if e.state in (PENDING, STOPPED)), None)
        if entry is not None:
            entry.state = RUNNING
        return entry

    def add(self, plan: PlanSettings) -> Entry:
        """Append a plan (the `queue` command); it is saved with its settings."""
        entry = Entry(plan, added=True)
        self.entries.append(entry)
        return entry

    def frame(self, path: str) -> None:
        """A frame of the running entry was taken."""
        entry = self.current()
        if entry is None:
            raise RuntimeError("no plan of the queue is running")
        entry.paths.append(str(path))

    def finish(self, summary: dict) -> Entry:
        """The running entry's PlanRunner returned `summary` (state, paths, ended, reason)."""
        entry = self.current()
        if entry is None:
            raise RuntimeError("no plan of the queue is running")
        state = summary.get("state")
        entry.state = {"done": DONE, "refused": REFUSED, "stopped": STOPPED}.get(state, FAILED)
        entry.paths = list(summary.get("paths", entry.paths))
        entry.ended, entry.reason = summary.get("ended"), summary.get("reason")
        if entry.state == DONE and entry.ended in NIGHT_ENDS:
            self.night_over = True
        return entry

    def fail(self, reason: str) -> Entry:
        """The running entry's PlanRunner raised (AcquisitionError): the queue halts."""
        entry = self.current()
        if entry is None:
            raise RuntimeError("no plan of the queue is running")
        entry.state, entry.reason = FAILED, reason
        return entry

    def new_night(self) -> None:
        """Let pending entries run again (the next evening)."""
        self.night_over = False

    def rearm(self) -> bool:
        """At a (re)start of the daemon: a new night for what is left, and entries that failed
        get another try with their frames (the restart may have been the fix). False when
        nothing is left to run (every entry done or refused)."""
        self.night_over = False
        for e in self.entries:
            if e.state == FAILED:
                e.state = STOPPED
        return any(e.state in (PENDING, RUNNING, STOPPED) for e in self.entries)

    def status(self) -> dict:
        """For the status: {"night_over", "halted", "entries": [...]}."""
        return {"night_over": self.night_over, "halted": self.halted,
                "entries": [e.as_dict() for e in self.entries]}

    # -- persistence -----------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps({"night_over": self.night_over, "entries": [
            {"key": plan_key(e.plan), "state": e.state, "paths": e.paths, "ended": e.ended, "reason": e.reason,
             **({"added": True, "plan": dataclasses.asdict(e.plan)} if e.added else {})}
            for e in self.entries]}, default=str)

    @classmethod
    def from_json(cls, text: str, plans: Sequence[PlanSettings]) -> PlanQueue:
        """The queue of `plans` (the config's), with the progress `text` recorded for those of
        them it knows (same settings, same position); others start afresh. Raises ValueError
        when `text` is not a saved queue."""
        data = json.loads(text)
        if not isinstance(data, dict) or not isinstance(data.get("entries"), list):
            raise ValueError("not a saved plan queue")
        queue = cls(plans)
        saved = [old for old in data["entries"] if isinstance(old, dict)]
        for entry, old in zip(queue.entries, [o for o in saved if not o.get("added")], strict=False):
            if old.get("key") != plan_key(entry.plan):
                break  # the queue was changed from here on: the rest starts afresh
            _restore(entry, old)
        for old in saved:  # plans the `queue` command added, with their own settings
            if old.get("added") and isinstance(old.get("plan"), dict):
                try:
                    entry = queue.add(PlanSettings(**old["plan"]))
                except (TypeError, ValueError):
                    continue  # settings this version no longer takes: that entry is dropped
                _restore(entry, old)
        queue.night_over = bool(data.get("night_over"))
        return queue

    def save(self, path: str | Path) -> None:
        """Write the queue to `path` atomically (see the module docstring)."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "w") as f:
            f.write(self.to_json())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path, plans: Sequence[PlanSettings]) -> PlanQueue:
        """The saved queue at `path` for `plans`, or a fresh one when there is none or it is
        unreadable (a new night: nothing lost but the bookkeeping)."""
        try:
            return cls.from_json(Path(path).read_text(), plans)
        except (OSError, ValueError):
            return cls(plans)
