"""Keep the memory of one frame for the next (glibc malloc settings of the daemon's process),
and keep the garbage collector off what start-up made (`freeze_startup_objects`).

Why: every frame allocates the same frame-sized arrays again (the decoded frame, the warped
image, the spool's float16 copy: tens of MB each). glibc serves allocations above 32 MB with
a fresh `mmap` and unmaps them on free, so each frame writes into new pages: the kernel
zeroes every page on first touch, and a virtual machine that hands freed memory back to its
host (virtio free page reporting) must get it supplied again. Reused memory costs neither.

`retain_freed_memory` stops the mmap-per-block and the trimming, so freed blocks stay in
malloc's heaps and the next frame reuses them. The pipeline runs on its own thread, whose
glibc arena is made of heaps of at most 64 MB: blocks up to that size are kept, larger ones
are still mapped fresh and returned at once. That limit is welcome: a 26 Mpx camera's
arrays, where memory is what a Pi lacks, are not kept, while a 12 Mpx camera's are. What is
kept stays resident while the daemon runs: at most the session's peak, which the live stack
holds most of anyway. The measurements behind this are in bench/PERFORMANCE.md.

Not glibc (musl, macOS): nothing changes, and the log says so.
"""

from __future__ import annotations

import ctypes
import gc
import logging

log = logging.getLogger(__name__)

# mallopt parameters, from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
#: Free memory at the top of a heap kept rather than returned (bytes): more than any frame.
_TRIM_THRESHOLD = 2**31 - 1


def _libc():
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") else None


def retain_freed_memory() -> bool:
    """Make malloc keep freed blocks for reuse (see the module docstring). Process-wide and
    idempotent; call it before the pipeline's thread starts. False where malloc is not glibc's."""
    libc = _libc()
    if libc is None:
        log.debug("malloc is not glibc's: frame memory is not kept from frame to frame")
        return False
    ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1
    if not ok:
        log.warning("mallopt refused a setting: frame memory may not be kept from frame to frame")
    return ok


def freeze_startup_objects() -> int:
    """Move every object alive now to the garbage collector's permanent generation
    (`gc.freeze`), after one last full collection. Call once, after the warm-up and before
    READY.

    Why: a full collection walks every object the collector tracks, and start-up leaves many
    (modules, numba's dispatchers and type caches, astropy's units) that live until the
    daemon stops. During the night each full collection would walk them again, holding the
    GIL: the pipeline's thread and the event loop (heartbeats, MQTT, the web page) stop
    alike. Frozen, they are skipped; what the night makes is collected as before. Frozen
    objects are still freed by reference counting, never by the cycle collector: a cycle
    among them that becomes garbage later stays (none is expected of start-up's objects).
    Returns the number of objects frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
