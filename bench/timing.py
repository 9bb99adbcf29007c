"""Timers the benchmark's workers share: exclusive time per stage, CPU time, peak RSS."""

from __future__ import annotations

import resource
import time
from contextlib import contextmanager
from pathlib import Path


class StageTimer:
    """Exclusive wall time per stage for the current frame: when a timed stage calls another,
    the inner time is counted for the inner stage only."""

    def __init__(self) -> None:
        self.frame: dict[str, float] = {}
        self._stack: list[list] = []  # [name, start, child_time]

    def reset(self) -> None:
        self.frame = {}

    @contextmanager
    def stage(self, name: str):
        entry = [name, time.perf_counter(), 0.0]
        self._stack.append(entry)
        try:
            yield
        finally:
            self._stack.pop()
            elapsed = time.perf_counter() - entry[1]
            self.frame[name] = self.frame.get(name, 0.0) + elapsed - entry[2]
            if self._stack:
                self._stack[-1][2] += elapsed

    def wrap(self, name: str, fn):
        def timed(*a, **kw):
            with self.stage(name):
                return fn(*a, **kw)

        timed.__wrapped__ = fn
        return timed


def _cpu_s() -> float:
    """User + system CPU seconds of this process, all threads."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def just_written(path: Path) -> None:
    """Bring a frame file into the page cache, untimed, as if the camera had just written it
    (which is what the daemon sees). The sessions are generated once and reused, and this VM
    reclaims cold page cache (kdamond), so without this "load" timed a disk read of the
    file at random: 40-230 ms for the same 52 MB frame. Read through a small buffer, so the
    process's peak RSS is not touched."""
    buf = bytearray(1 << 20)
    with open(path, "rb", buffering=0) as fh:
        while fh.readinto(buf):
            pass
