"""16-bit TIFF frames (SharpCap, DeepSkyStacker users): mono, or a CFA mosaic when told its pattern.

A TIFF says nothing of a colour filter array, exposure or gain. Those come, in this order, from a
sidecar JSON beside the file (`<name>.json`, e.g. `Light_001.tif.json`, or `<stem>.json`:
FITS keywords and values, {"BAYERPAT": "RGGB", "EXPTIME": 30, "GAIN": 120}) and for the pattern
from the config (`capture.tiff_bayer`). Without either the frame is mono. The capture time is
the TIFF DateTime tag when the sidecar has no DATE-OBS; a WCS from the sidecar's cards.
Page 0 is the frame, rows top-down as stored; RGB (3-sample) TIFFs are already debayered and are not frames.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from daemon.io.errors import FrameError
from daemon.io.fits import meta_with_sidecar
from daemon.io.header import parse_bayer
from daemon.io.limits import check_frame_size
from daemon.io.wcs import frame_wcs, wcs_cards
from daemon.pipeline.frame import Frame


def tiff_sidecar(path: str) -> dict[str, Any]:
    """The FITS-style keywords of a TIFF's sidecar JSON ({} when there is none or it is unreadable)."""
    p = Path(path)
    for candidate in (p.with_name(p.name + ".json"), p.with_suffix(".json")):
        try:
            data = json.loads(candidate.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict):
            return {str(k).upper(): v for k, v in data.items() if isinstance(v, (str, int, float, bool))}
    return {}


def read_tiff_frame(path: str | os.PathLike, *, bayer: str | None = None, max_bytes: int | None = None) -> Frame:
    """A 2-D TIFF image as float32 ADU with the metadata of its sidecar.

    Parameters
    ----------
    path : the .tif/.tiff file.
    bayer : str or None, the CFA pattern from the config (capture.tiff_bayer) for TIFFs whose
        sidecar names none; None: mono unless the sidecar says BAYERPAT.
    max_bytes : int or None, the decode limit (daemon.io.limits), checked from the tags.

    Raises
    ------
    FrameError (FrameTooLarge) naming the file and what is wrong.
    """
    path = os.fspath(path)
    if os.path.getsize(path) == 0:
        raise FrameError(path, "empty file (0 bytes)")
    try:
        with tifffile.TiffFile(path) as tif:
            if not tif.pages:
                raise FrameError(path, "TIFF file holds no image")
            page = tif.pages[0]
            shape = tuple(int(n) for n in page.shape)
            if len(shape) == 3 and shape[-1] in (3, 4) or int(getattr(page, "samplesperpixel", 1)) > 1:
                raise FrameError(path, f"colour TIFF ({shape}): already debayered; only mono or CFA frames "
                                       "are frames")
            if len(shape) != 2:
                raise FrameError(path, f"TIFF image of shape {shape}: not a 2-D frame")
            check_frame_size(path, shape[1], shape[0], 1, max_bytes)
            if page.dtype is None or page.dtype.kind not in "uif":
                raise FrameError(path, f"TIFF sample type {page.dtype} is not supported")
            stamp = page.tags.get("DateTime")
            data = page.asarray()
    except FrameError:
        raise
    except Exception as exc:  # noqa: BLE001 - tifffile raises TiffFileError, ValueError, OSError...
        raise FrameError(path, f"not a readable TIFF file ({type(exc).__name__}: {exc})") from None
    values = tiff_sidecar(path)
    if "DATE-OBS" not in values and stamp is not None:
        try:
            t = datetime.strptime(str(stamp.value).strip("\x00 "), "%Y:%m:%d %H:%M:%S").replace(tzinfo=UTC)
            values["DATE-OBS"] = t.isoformat()
        except ValueError:
            pass
    meta = meta_with_sidecar(values, path)
    pattern = meta.bayer or (parse_bayer(bayer) if bayer else None)
    if bayer and pattern is None:
        raise FrameError(path, f"capture.tiff_bayer {bayer!r} is not one of RGGB, BGGR, GRBG, GBRG")
    wcs = frame_wcs(values, shape[0], bottom_up=False) if "CTYPE1" in values else None
    return Frame(np.ascontiguousarray(data, dtype=np.float32), replace(meta, bayer=pattern, wcs=wcs_cards(wcs)))
