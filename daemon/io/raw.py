"""Camera raw files (CR2, CR3, NEF, ARW, RAF, ORF, DNG, ...) through rawpy/LibRaw.

We take the sensor's CFA mosaic as recorded (`raw_image_visible`), subtract the black level
of each pixel's own channel, and name the 2x2 pattern from the file's colour map. Never
`postprocess()`: demosaicing, white balance and gamma would destroy the linear data that
calibration and stacking need.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime

import numpy as np
import tifffile

from daemon.io.errors import FrameError, FrameTooLarge
from daemon.io.formats import RAW_SUFFIXES
from daemon.io.limits import check_frame_size
from daemon.pipeline.frame import BAYER_PATTERNS, Frame, FrameMeta, FrameType

__all__ = ["RAW_SUFFIXES", "read_raw_frame"]


def read_raw_frame(path: str | os.PathLike, frame_type: FrameType = FrameType.LIGHT, *,
                   max_bytes: int | None = None) -> Frame:
    """The black-subtracted CFA mosaic (float32 ADU) of a camera raw file and its metadata.

    Raw files carry no frame type; `frame_type` is what the caller knows (e.g. from the
    `lightbucket master dark` command line), LIGHT by default. `max_bytes`: the decode limit
    (daemon.io.limits), checked from LibRaw's sizes before the mosaic is unpacked.
    """
    import rawpy  # imported here: a broken LibRaw must not stop FITS-only use

    path = str(path)
    if os.path.exists(path) and os.path.getsize(path) == 0:
        raise FrameError(path, "empty file (0 bytes)")
    try:
        with rawpy.imread(path) as raw:  # opened; the mosaic is unpacked on first access
            check_frame_size(path, raw.sizes.width, raw.sizes.height, 1, max_bytes)
            mosaic = raw.raw_image_visible
            colors = raw.raw_colors_visible
            if mosaic is None or mosaic.ndim != 2 or mosaic.size == 0:
                raise FrameError(path, "raw file has no single-plane CFA mosaic (linear/demosaiced raw)")
            desc = raw.color_desc.decode("ascii", "replace")
            pattern = _bayer_name(raw.raw_pattern, desc)
            if pattern is None:
                raise FrameError(
                    path, f"sensor colour filter array {raw.raw_pattern.tolist()} ({desc}) is not a "
                          "2x2 Bayer pattern (X-Trans and Foveon are not supported)")
            black = np.asarray(raw.black_level_per_channel, dtype=np.float32)
            data = mosaic.astype(np.float32)
            data -= black[colors]
            # Pattern at the visible area's (0, 0): LibRaw's colour map of the visible pixels.
            pattern = "".join(desc[int(c)] for c in colors[:2, :2].ravel()).upper()
            other = raw.other if hasattr(raw, "other") else None
            meta = _meta(path, pattern, other, frame_type)
    except (FrameError, FrameTooLarge):
        raise
    except Exception as exc:  # noqa: BLE001 - rawpy.LibRawError subclasses, OSError: this file's fault
        raise FrameError(path, f"not a readable camera raw file ({type(exc).__name__}: {exc})") from None
    if meta.bayer not in BAYER_PATTERNS:
        raise FrameError(path, f"unexpected colour layout {meta.bayer!r} at the image origin")
    return Frame(data, meta)


def _bayer_name(raw_pattern: np.ndarray | None, desc: str) -> str | None:
    if raw_pattern is None or np.asarray(raw_pattern).shape != (2, 2):
        return None
    name = "".join(desc[int(c)] for c in np.asarray(raw_pattern).ravel()).upper()
    return name if name in BAYER_PATTERNS else None


def _meta(path: str, pattern: str, other, frame_type: FrameType) -> FrameMeta:
    """Exposure, ISO (as gain), capture time from LibRaw; make/model and gaps from TIFF tags."""
    missing: list[str] = []
    exposure = iso = None
    date_obs = None
    if other is not None:
        shutter = getattr(other, "shutter_speed", None) or getattr(other, "shutter", None)
        exposure = float(shutter) if shutter else None
        iso = float(other.iso_speed) if getattr(other, "iso_speed", 0) else None
        ts = getattr(other, "timestamp", None)
        # Cameras record their clock without a zone: taken as UTC (set camera clocks to UTC).
        if isinstance(ts, datetime):
            if ts.year > 1970:  # LibRaw reports "unknown" as the epoch
                date_obs = ts if ts.tzinfo else ts.replace(tzinfo=UTC)
        elif ts:
            date_obs = datetime.fromtimestamp(int(ts), tz=UTC)
    tiff = _tiff_fields(path)
    camera = tiff.get("camera")
    iso = iso if iso is not None else tiff.get("iso")
    date_obs = date_obs or tiff.get("date_obs")
    for name, value in (("EXPTIME", exposure), ("ISO", iso), ("DATE-OBS", date_obs), ("INSTRUME", camera)):
        if value is None:
            missing.append(name)
    return FrameMeta(path=path, frame_type=frame_type, exposure_s=exposure, gain=iso, bayer=pattern,
                     date_obs=date_obs, camera=camera, missing=tuple(missing))


def _tiff_fields(path: str) -> dict:
    """Camera make/model, ISO and capture time from the TIFF/EXIF tags of TIFF-based raws
    (CR2, NEF, ARW, DNG...), for what LibRaw does not report. {} for other containers."""
    out: dict = {}
    try:
        with tifffile.TiffFile(path) as tif:
            tags = {t.name: t.value for t in tif.pages[0].tags.values()}
    except Exception:  # noqa: BLE001 - not a TIFF container (CR3, RAF...): LibRaw's fields only
        return out
    exif = tags.get("ExifTag") if isinstance(tags.get("ExifTag"), dict) else {}
    tags = {**exif, **tags}
    name = " ".join(str(tags[k]).strip("\x00 ") for k in ("Make", "Model") if tags.get(k))
    if name:
        out["camera"] = name
    iso = tags.get("PhotographicSensitivity") or tags.get("ISOSpeedRatings")
    if isinstance(iso, (tuple, list)):
        iso = iso[0] if iso else None
    if iso:
        out["iso"] = float(iso)
    stamp = tags.get("DateTimeOriginal") or tags.get("DateTime")
    if isinstance(stamp, str):
        try:
            out["date_obs"] = datetime.strptime(stamp.strip("\x00 "), "%Y:%m:%d %H:%M:%S").replace(tzinfo=UTC)
        except ValueError:
            pass
    return out
