"""`load_frame(path) -> Frame`: the one entry point for reading a frame of any supported format.

The format is chosen by suffix from the one list in `daemon.io.formats` (FITS, XISF, TIFF,
LibRaw's raws); a file without a known suffix is read as FITS when it starts with the FITS
signature. Anything else, and anything broken or too large (`daemon.io.limits`), raises
`FrameError` naming the file and the problem. Header values present but unusable are logged
(one warning each, naming key and file) and listed in `FrameMeta.warnings`.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, replace

import numpy as np

from daemon.io.errors import FrameError, FrameTooLarge
from daemon.io.fits import peek_fits, read_fits_frame
from daemon.io.formats import ALL_SUFFIXES, FITS_SUFFIXES, RAW_SUFFIXES, describe_suffix, format_of
from daemon.io.raw import read_raw_frame
from daemon.io.tiff import read_tiff_frame
from daemon.io.xisf import read_xisf_frame
from daemon.pipeline.frame import Frame, FrameMeta, FrameType

__all__ = ["FrameError", "FrameTooLarge", "FrameLoader", "LoadOptions", "load_frame", "is_fits", "is_raw",
           "unsupported_reason"]

log = logging.getLogger("lightbucket.io")


@dataclass(frozen=True)
class LoadOptions:
    """How frames are read (from [capture]): the decode limit in bytes of float32 pixels
    (None: from the memory the process may use, daemon.io.limits) and the CFA pattern of
    TIFFs whose sidecar names none (None: mono). Which names are read at all is the
    watcher's business (capture.patterns narrow it there)."""

    max_frame_bytes: int | None = None
    tiff_bayer: str | None = None


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


def unsupported_reason(path: str | os.PathLike) -> str:
    """Why a file of this name is not read: its kind and what is read."""
    return (f"unsupported file type ({describe_suffix(path)}): lightbucket reads FITS, XISF, 16-bit TIFF "
            f"and camera raw ({len(ALL_SUFFIXES)} suffixes: {', '.join(ALL_SUFFIXES[:12])}, ...)")


def load_frame(path: str | os.PathLike, frame_type: FrameType | None = None, *,
               out: np.ndarray | None = None, options: LoadOptions | None = None) -> Frame:
    """Pixels (float32 ADU, 2-D, top-down, CFA mosaic for colour sensors) and metadata.

    Parameters
    ----------
    path : the frame file.
    frame_type : FrameType or None, overrides what the file says (raw files say nothing:
        LIGHT by default).
    out : an array a 16-bit FITS frame may be decoded into (`FrameLoader`).
    options : LoadOptions or None, the decode limit and TIFF pattern (defaults: LoadOptions()).

    Raises
    ------
    FrameError naming the file: unsupported, unreadable, truncated, or FrameTooLarge.
    """
    path = os.fspath(path)
    opts = options or LoadOptions()
    if not os.path.isfile(path):
        reason = ("is a directory" if os.path.isdir(path) else
                  "not a regular file (a pipe, socket or device)" if os.path.exists(path) else "no such file")
        raise FrameError(path, reason)
    fmt = format_of(path) or ("fits" if is_fits(path) else None)
    limit = opts.max_frame_bytes
    if fmt == "fits":
        frame = read_fits_frame(path, out, max_bytes=limit)
    elif fmt == "xisf":
        frame = read_xisf_frame(path, max_bytes=limit)
    elif fmt == "tiff":
        frame = read_tiff_frame(path, bayer=opts.tiff_bayer, max_bytes=limit)
    elif fmt == "raw":
        frame = read_raw_frame(path, frame_type or FrameType.LIGHT, max_bytes=limit)
    else:
        raise FrameError(path, unsupported_reason(path))
    for warning in frame.meta.warnings:
        log.warning("%s", warning)
    if frame_type is not None and frame.meta.frame_type is not frame_type:
        frame = Frame(frame.data, replace(frame.meta, frame_type=frame_type))
    return frame


#: Largest frame array `FrameLoader` keeps for the next frame (bytes): 16 Mpx of float32, the
#: largest block malloc also keeps for the pipeline thread (daemon.memory).
REUSE_MAX_BYTES = 64 << 20


class FrameLoader:
    """`load_frame` for a stream of frames: each FITS frame is decoded into the previous
    frame's pixel array when nothing else holds that any more and the size matches.

    Why: a fresh frame-sized array is new memory, which the kernel zeroes page by page on
    first touch (and a virtual machine's host may have to supply again): decoding into the
    previous frame's array is several times faster (bench/PERFORMANCE.md). "Nothing else
    holds it" is CPython's reference count: the caller has dropped the frame (the service,
    after `process(frame, consume=True)`), no view of it is alive; a frame still held is
    never overwritten, the next one just gets a new array. The kept array is memory held
    between frames: frames above `REUSE_MAX_BYTES` are kept only with `keep_large`, right
    where the pipeline holds a frame's pixels through its processing anyway (mono; colour at
    full resolution, whose fused path reads the mosaic to the end), wrong where it frees them
    early (a colour mosaic freed once debayered: superpixel, or the unfused path), which the
    kept array would outlive: a 26 Mpx session's peak would grow by a mosaic (104 MB).
    One loader per thread that loads.
    """

    def __init__(self, options: LoadOptions | None = None, *, keep_large: bool = True) -> None:
        self.options = options or LoadOptions()
        self.keep_large = keep_large
        self._last: np.ndarray | None = None

    def __call__(self, path: str | os.PathLike, frame_type: FrameType | None = None) -> Frame:
        """`load_frame`; any failure is a FrameError (a decoder's MemoryError or internal
        error included), so one bad file never stops the caller's loop."""
        try:
            frame = load_frame(path, frame_type, out=self._free_array(), options=self.options)
        except FrameError:
            raise
        except OSError as exc:
            raise FrameError(path, f"cannot read file: {exc.strerror or exc}") from None
        except Exception as exc:  # noqa: BLE001 - MemoryError, a decoder's own bug: this file's fault
            raise FrameError(path, f"cannot be decoded ({type(exc).__name__}: {exc})") from None
        self._last = frame.data if self.keep_large or frame.data.nbytes <= REUSE_MAX_BYTES else None
        return frame

    def peek(self, path: str | os.PathLike) -> tuple[tuple[int, int], FrameMeta] | None:
        """The (rows, columns) and metadata a frame file will load with, from its header alone,
        while it may still be being written (`daemon.io.fits.peek_fits`, with this loader's
        decode limit). FITS only: None for other formats, and where the header does not tell."""
        return peek_fits(path, max_bytes=self.options.max_frame_bytes) if is_fits(path) else None

    def reserve(self, shape: tuple[int, int] | None) -> None:
        """An array for the next frame, of `shape` (H, W), written once now: made while a plan's
        first exposure runs (`Session.prepare`), so that the first frame is not decoded into
        new memory (the class docstring's reason). Kept whatever its size: the first frame
        takes it, and the keep rules apply from there on. None: keep no array (the plan
        ended before its frames came)."""
        self._last = None
        if shape is not None:
            self._last = np.full(tuple(int(n) for n in shape), 0, np.float32)

    def _free_array(self) -> np.ndarray | None:
        last, self._last = self._last, None
        # Held by `last` and getrefcount's argument only: nobody else has it.
        return last if last is not None and sys.getrefcount(last) <= 2 else None
