"""Bounded decode: a frame is refused, before its pixels are decoded, when its declared size
(width x height x planes as float32, what the loader hands out) exceeds a limit.

Why: a 4 MB tile-compressed FITS can declare 16000x16000 pixels; decoded whole it takes
1 GB and under a memory limit kills the daemon, at every restart. The header (FITS, XISF
geometry, TIFF tags, LibRaw's sizes) states the size before the data is touched.

The default limit is a share of the memory the process may use: the machine's physical
memory, or less where a cgroup (systemd's MemoryMax=, a container) or an address-space
rlimit (ulimit -v) caps it; the config's capture.max_frame_bytes replaces it.
"""

from __future__ import annotations

import os
import resource
from pathlib import Path

from daemon.io.errors import FrameTooLarge

#: Share of the process's memory one decoded frame may take: the pipeline holds a few
#: frame-sized arrays at once (calibrated mosaic, debayered RGB, warp output, the stack).
MEMORY_SHARE = 8
#: The smallest default limit (bytes): 16 Mpx of float32, whatever the memory says.
MIN_DEFAULT_BYTES = 64 << 20
#: cgroup v1 writes "no limit" as a page-rounded 2**63 - 1; anything above this is no limit.
_NO_LIMIT = 1 << 60


def _physical_memory() -> int | None:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def _read_limit(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if not text.isdigit():  # cgroup v2 "max"
        return None
    value = int(text)
    return value if 0 < value < _NO_LIMIT else None


def cgroup_memory_limit(proc_cgroup: str | os.PathLike = "/proc/self/cgroup",
                        root: str | os.PathLike = "/sys/fs/cgroup") -> int | None:
    """The tightest memory limit (bytes) of the process's cgroup and its ancestors, None if none.

    Parameters
    ----------
    proc_cgroup : the process's cgroup membership file (lines `id:controllers:path`).
    root : where the cgroup file systems are mounted: v2 (`<root>/<path>/memory.max`) or v1
        (`<root>/memory/<path>/memory.limit_in_bytes`).
    """
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        return None
    limits: list[int] = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            base, name = Path(root), "memory.max"
        elif "memory" in controllers.split(","):
            base, name = Path(root) / "memory", "memory.limit_in_bytes"
        else:
            continue
        folder = base / path.lstrip("/")
        while True:
            value = _read_limit(folder / name)
            if value is not None:
                limits.append(value)
            if folder == base or base not in folder.parents:
                break
            folder = folder.parent
    return min(limits) if limits else None


def _rlimit() -> int | None:
    limits = []
    for which in (resource.RLIMIT_AS, getattr(resource, "RLIMIT_DATA", None)):
        if which is None:
            continue
        soft, _ = resource.getrlimit(which)
        if soft != resource.RLIM_INFINITY and soft > 0:
            limits.append(int(soft))
    return min(limits) if limits else None


def process_memory_bytes() -> int:
    """The memory this process may use (bytes): the least of physical memory, its cgroup's
    limit and its address-space/data rlimits (4 GiB when none can be read)."""
    known = [v for v in (_physical_memory(), cgroup_memory_limit(), _rlimit()) if v]
    return min(known) if known else 4 << 30


def default_max_frame_bytes() -> int:
    """The default limit (bytes of float32 pixels): `process_memory_bytes()` / MEMORY_SHARE,
    at least MIN_DEFAULT_BYTES (512 MiB on a 4 GB Raspberry Pi: 134 Mpx mono, ~45 Mpx colour
    once debayered)."""
    return max(MIN_DEFAULT_BYTES, process_memory_bytes() // MEMORY_SHARE)


def check_frame_size(path: str, width: int, height: int, planes: int = 1, max_bytes: int | None = None) -> None:
    """Raise FrameTooLarge naming the file and the size when the decoded frame would exceed
    `max_bytes` (None: `default_max_frame_bytes()`).

    Parameters
    ----------
    path : the file, for the message.
    width, height, planes : the declared image size (pixels, planes).
    max_bytes : int or None, the limit in bytes of float32 pixels (config capture.max_frame_bytes).
    """
    limit = default_max_frame_bytes() if max_bytes is None else int(max_bytes)
    need = int(width) * int(height) * int(planes) * 4
    if need > limit:
        raise FrameTooLarge(
            path, f"too large: {width}x{height}{f'x{planes}' if planes > 1 else ''} pixels would decode to "
                  f"{need / 2**20:.0f} MiB, over the limit of {limit / 2**20:.0f} MiB "
                  "(capture.max_frame_bytes); not decoded")
