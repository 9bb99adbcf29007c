"""Which capture files have been dealt with, so that no frame is ever stacked twice.

The ledger is saved *inside the same checkpoint* as the stacks (daemon.checkpoint): a file is
either in both (stacked and recorded) or in neither (it will be processed again after a crash),
never in one only. Entries are keyed by the path relative to the capture folder.

A file that failed to load (corrupt, truncated) is recorded with its size and mtime: it is not
retried unless it changes, so a half-copied file that is later completed is picked up.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class Entry:
    outcome: str  # "stacked", "rejected" or "error"
    size: int  # bytes
    mtime_ns: int
    stack: str | None = None  # stack key name, for stacked/rejected frames
    reason: str | None = None


class Ledger:
    def __init__(self, root: Path, entries: dict[str, Entry] | None = None):
        self.root = Path(root)
        self.entries: dict[str, Entry] = dict(entries or {})

    def key(self, path: str | os.PathLike) -> str:
        p = Path(path)
        try:
            return p.resolve().relative_to(self.root.resolve()).as_posix()
        except ValueError:
            return p.resolve().as_posix()

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
