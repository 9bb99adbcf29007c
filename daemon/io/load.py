"""`load_frame(path) -> Frame`: the one entry point for reading a frame of any supported format.

FITS is recognised by its suffix or its 'SIMPLE  =' signature, camera raw by suffix; anything
else, and anything broken, raises `FrameError` naming the file and the problem.
"""

from __future__ import annotations

import os
import sys

import numpy as np

from daemon.io.errors import FrameError
from daemon.io.fits import FITS_SUFFIXES, read_fits_frame
from daemon.io.raw import RAW_SUFFIXES, read_raw_frame
from daemon.pipeline.frame import Frame, FrameType

__all__ = ["FrameError", "FrameLoader", "load_frame", "is_fits", "is_raw"]


def is_fits(path: str | os.PathLike) -> bool:
    name = str(path).lower()
    if name.endswith(FITS_SUFFIXES):
        return True
    try:
        with open(path, "rb") as fh:
            return fh.read(9) == b"SIMPLE  ="
    except OSError:
        return False


def is_raw(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(RAW_SUFFIXES)


def load_frame(path: str | os.PathLike, frame_type: FrameType | None = None, *,
               out: np.ndarray | None = None) -> Frame:
    """Pixels (float32 ADU, 2-D, top-down, CFA mosaic for colour sensors) and metadata.

    `frame_type` overrides what the file says (raw files say nothing: LIGHT by default).
    `out`: an array a 16-bit FITS frame may be decoded into (`FrameLoader`).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        reason = "is a directory" if os.path.isdir(path) else "no such file"
        raise FrameError(path, reason)
    if is_fits(path):
        frame = read_fits_frame(path, out)
    elif is_raw(path):
        frame = read_raw_frame(path, frame_type or FrameType.LIGHT)
    else:
        raise FrameError(path, "unknown file type: not FITS and not a camera raw suffix "
                               f"({', '.join(s for s in RAW_SUFFIXES[:8])}, ...)")
    if frame_type is not None and frame.meta.frame_type is not frame_type:
        from dataclasses import replace
        frame = Frame(frame.data, replace(frame.meta, frame_type=frame_type))
    return frame


#: Largest frame array `FrameLoader` keeps for the next frame (bytes): 16 Mpx of float32, the
#: largest block malloc also keeps for the pipeline thread (daemon.memory).
REUSE_MAX_BYTES = 64 << 20


class FrameLoader:
    """`load_frame` for a stream of frames: each FITS frame is decoded into the previous
    frame's pixel array when nothing else holds that any more and the size matches.

    Why: a fresh frame-sized array is new memory, which the kernel zeroes page by page on
    first touch (and a virtual machine's host may have to supply again): on the CI VM,
    decoding a 4144x2822 frame into fresh memory took 50 ms, into the previous frame's
    1.5-6 ms. "Nothing else holds it" is CPython's reference count: the caller has dropped
    the frame (the service, after `process(frame, consume=True)`), no view of it is alive;
    a frame still held is never overwritten, the next one just gets a new array. Frames above
    `REUSE_MAX_BYTES` are not kept: the kept array is memory held through the next frame's
    processing, and a 26 Mpx colour frame's 104 MB mosaic, freed once debayered, is the
    difference between a 6248x4176 session peaking at 1.01-1.02 GB or at 1.12-1.19 (bench).
    One loader per thread that loads.
    """

    def __init__(self) -> None:
        self._last: np.ndarray | None = None

    def __call__(self, path: str | os.PathLike, frame_type: FrameType | None = None) -> Frame:
        frame = load_frame(path, frame_type, out=self._free_array())
        self._last = frame.data if frame.data.nbytes <= REUSE_MAX_BYTES else None
        return frame

    def _free_array(self) -> np.ndarray | None:
        last, self._last = self._last, None
        # Held by `last` and getrefcount's argument only: nobody else has it.
        return last if last is not None and sys.getrefcount(last) <= 2 else None
