"""Which capture files have been dealt with, so that no frame is ever stacked twice.

The ledger is saved *inside the same checkpoint* as the stacks (daemon.checkpoint): a file is
either in both (stacked and recorded) or in neither (it will be processed again after a crash),
never in one only. Entries are keyed by the path relative to the capture folder.

A file that failed to load (corrupt, truncated, unsupported, too large) is recorded with its
size and mtime: it is not retried unless it changes, so a half-copied file that is later
completed is picked up, and each version of a file gets one answer. `InHand` marks the file
being processed, so that one that keeps killing the process is quarantined at restart.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger("lightbucket")

#: The reason a quarantined file is given (see InHand).
QUARANTINED = ("quarantined: the daemon stopped twice while this file was in hand (out of memory, a crash "
               "or kill -9); not read again until the file changes")
#: Starts that found the same file version in hand before it is quarantined. One death proves
#: nothing about the file (kill -9, a power cut or the watchdog stop whatever is in hand, and
#: the frame is read again); a second in a row on the same file is a crash loop in the making.
DEATHS_TO_QUARANTINE = 2


@dataclass(frozen=True)
class Entry:
    outcome: str  # "stacked", "rejected" or "error"
    size: int  # bytes
    mtime_ns: int
    stack: str | None = None  # stack key name, for stacked/rejected frames
    reason: str | None = None


def file_key(root: str | os.PathLike, path: str | os.PathLike) -> str:
    """A file's ledger key: its path relative to the capture folder `root` (POSIX), or its
    absolute path when it lies outside."""
    p = Path(path).resolve()
    try:
        return p.relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        return p.as_posix()


class Ledger:
    def __init__(self, root: Path, entries: dict[str, Entry] | None = None):
        self.root = Path(root)
        self.entries: dict[str, Entry] = dict(entries or {})

    def key(self, path: str | os.PathLike) -> str:
        return file_key(self.root, path)

    def done(self, path: str | os.PathLike) -> bool:
        """True when `path` needs no processing: stacked or rejected, or failed and unchanged."""
        entry = self.entries.get(self.key(path))
        if entry is None:
            return False
        if entry.outcome != "error":
            return True
        try:
            st = os.stat(path)
        except OSError:
            return True
        return (st.st_size, st.st_mtime_ns) == (entry.size, entry.mtime_ns)

    def record(self, path: str | os.PathLike, outcome: str, *, stack: str | None = None,
               reason: str | None = None) -> None:
        try:
            st = os.stat(path)
            size, mtime = st.st_size, st.st_mtime_ns
        except OSError:
            size, mtime = -1, -1
        self.entries[self.key(path)] = Entry(outcome, size, mtime, stack, reason)

    def count(self, outcome: str) -> int:
        return sum(1 for e in self.entries.values() if e.outcome == outcome)

    def to_json(self) -> dict:
        return {"root": str(self.root), "entries": {k: asdict(v) for k, v in self.entries.items()}}

    @classmethod
    def from_json(cls, data: dict, root: Path) -> Ledger:
        return cls(root, {k: Entry(**v) for k, v in data.get("entries", {}).items()})


class InHand:
    """The file the worker is loading or stacking, kept on disk so that a process that dies
    with it in hand (out of memory, a crash in a decoder, kill -9) is known at restart.

    Invariant: the marker names a file from before its load begins until its outcome is
    decided (stacked, rejected, error), with `deaths`: how many processes already died with
    that version in hand. A marker found at start therefore names the file the last process
    died with: it is read again once (`retry`), and quarantined (recorded as an error with this
    file version, not retried until it changes) when it was in hand at DEATHS_TO_QUARANTINE
    deaths in a row, instead of dying on it again and again. The marker is written with a
    rename (never torn) but not fsync'ed: after a power cut it may be lost, and the file is
    then simply processed again.
    """

    NAME = "in-hand.json"

    def __init__(self, state_dir: Path):
        self.path = Path(state_dir) / self.NAME
        self._retrying: dict | None = None  # the left-over marker of a file read once more

    def retry(self, marker: dict) -> None:
        """The file of `marker` (a left-over one, its `deaths` counting the last) is read once
        more: its next `begin` carries those deaths, so that another quarantines it."""
        self._retrying = marker

    def begin(self, frame: str | os.PathLike) -> None:
        """Mark `frame` as in hand. A state folder that cannot be written is logged, never
        raised: processing goes on without the marker (the checkpoint reports the disk)."""
        try:
            st = os.stat(frame)
            size, mtime = st.st_size, st.st_mtime_ns
        except OSError:
            size, mtime = -1, -1
        mark = {"path": os.fspath(frame), "size": size, "mtime_ns": mtime, "deaths": 0}
        retrying = self._retrying
        if retrying is not None and all(retrying.get(k) == mark[k] for k in ("path", "size", "mtime_ns")):
            mark["deaths"] = retrying["deaths"]
            self._retrying = None
        tmp = self.path.with_name(f".{self.NAME}.tmp")
        try:
            tmp.write_text(json.dumps(mark))
            os.replace(tmp, self.path)
        except OSError as exc:
            log.warning("in-hand marker %s not written: %s", self.path, exc)
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)  # a full disk: hold no space

    def end(self) -> None:
        try:
            self.path.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("in-hand marker %s not removed: %s", self.path, exc)

    def is_version(self, marker: dict) -> bool:
        """The marked file still exists as the version that was in hand (size, mtime)."""
        try:
            st = os.stat(marker["path"])
        except (OSError, KeyError):
            return False
        return (st.st_size, st.st_mtime_ns) == (marker.get("size"), marker.get("mtime_ns"))

    def left_over(self) -> dict | None:
        """The marker a previous process left ({"path", "size", "mtime_ns", "deaths"}), None if none."""
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        if not (isinstance(data, dict) and isinstance(data.get("path"), str)):
            return None
        deaths = data.get("deaths")
        return {**data, "deaths": deaths if isinstance(deaths, int) and deaths >= 0 else 0}


def quarantine_left_over(ledger: Ledger, in_hand: InHand) -> str | None:
    """At start, before any frame is processed: the file the last process died with (`InHand`)
    is read once more (it stays out of `ledger`, so the start's backlog takes it) or, when it
    was in hand at DEATHS_TO_QUARANTINE deaths in a row, recorded in `ledger` as an error with
    the reason QUARANTINED. The marker is removed either way.

    A file already decided in the ledger (the process died after its checkpoint) or changed
    since (a new version: it gets its own answer) is left alone. Returns the quarantined path
    (for its event and log line), None when there was nothing to quarantine.
    """
    marker = in_hand.left_over()
    if marker is None:
        return None
    path = marker["path"]
    quarantined = None
    if in_hand.is_version(marker) and not ledger.done(path):
        deaths = marker["deaths"] + 1
        if deaths >= DEATHS_TO_QUARANTINE:
            ledger.record(path, "error", reason=QUARANTINED)
            log.error("%s: %s", path, QUARANTINED)
            quarantined = path
        else:
            in_hand.retry({**marker, "deaths": deaths})
            log.warning("%s: the daemon stopped while this file was in hand: reading it once more", path)
    in_hand.end()
    return quarantined
