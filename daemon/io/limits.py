"""Bounded decode: a frame is refused, before its pixels are decoded, when its declared size
(width x height x planes as float32, what the loader hands out) exceeds a limit.

Why: a 4 MB tile-compressed FITS can declare 16000x16000 pixels; decoded whole it takes
1 GB and under a memory limit kills the daemon, at every restart. The header (FITS, XISF
geometry, TIFF tags, LibRaw's sizes) states the size before the data is touched.
"""

from __future__ import annotations

import os

from daemon.io.errors import FrameTooLarge

#: Share of the machine's physical memory one decoded frame may take: the pipeline holds a few
#: frame-sized arrays at once (calibrated mosaic, debayered RGB, warp output, the stack).
MEMORY_SHARE = 8


def default_max_frame_bytes() -> int:
    """The default limit (bytes of float32 pixels): physical memory / MEMORY_SHARE
    (512 MiB on a 4 GB Raspberry Pi: 134 Mpx mono, ~45 Mpx colour once debayered)."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 4 << 30
    return max(64 << 20, int(total) // MEMORY_SHARE)


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
