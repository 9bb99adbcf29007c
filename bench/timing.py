"""Timers the benchmark's workers share: exclusive time per stage, CPU time, peak RSS (per
stage where Linux allows)."""

from __future__ import annotations

import resource
import time
from contextlib import contextmanager
from pathlib import Path


class MemoryPeaks:
    """Peak resident memory (bytes) per stage of a frame, exact: the process's high-water mark
    (Linux's VmHWM) read and reset at every stage boundary, each interval's peak counted for
    the innermost stage open during it ("between": none). Why: the process's one peak says
    how much, not what for. `peak` is the process's peak over all intervals; `ru_maxrss` no
    longer is once the resets have lowered it. `available` is False where the mark cannot be
    reset (not Linux, /proc/self/clear_refs not writable): then nothing is recorded."""

    def __init__(self) -> None:
        self.frame: dict[str, int] = {}
        self.peak = 0
        self.available = _reset_hwm()

    def boundary(self, stage: str) -> None:
        """The interval since the last boundary ran in `stage`: its peak is recorded, the mark reset."""
        if not self.available:
            return
        hwm = _status_bytes("VmHWM")
        self.peak = max(self.peak, hwm)
        self.frame[stage] = max(self.frame.get(stage, 0), hwm)
        _reset_hwm()


def _status_bytes(key: str) -> int:
    """A memory line of /proc/self/status (VmRSS, VmHWM, ...) in bytes, 0 where there is none."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def resident_bytes() -> int:
    """The process's resident memory now (VmRSS), 0 where unknown."""
    return _status_bytes("VmRSS")


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # 5: reset the peak resident set size to the current one
        return _status_bytes("VmHWM") > 0
    except OSError:
        return False


class StageTimer:
    """Exclusive wall time per stage for the current frame: when a timed stage calls another,
    the inner time is counted for the inner stage only. With `memory`, its peaks per stage too."""

    def __init__(self, memory: MemoryPeaks | None = None) -> None:
        self.frame: dict[str, float] = {}
        self.memory = memory
        self._stack: list[list] = []  # [name, start, child_time]

    def reset(self) -> None:
        if self.memory is not None:
            self.memory.boundary(self._stack[-1][0] if self._stack else "between")
            self.memory.frame = {}
        self.frame = {}

    @contextmanager
    def stage(self, name: str):
        if self.memory is not None:
            self.memory.boundary(self._stack[-1][0] if self._stack else "between")
        entry = [name, time.perf_counter(), 0.0]
        self._stack.append(entry)
        try:
            yield
        finally:
            if self.memory is not None:
                self.memory.boundary(name)
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
