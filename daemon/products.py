"""What a session leaves behind: the stack as 32-bit FITS with its provenance, and previews.

The FITS header answers "what is in this image?" without the daemon's state: how many frames
(NCOMBINE), how much exposure, from when to when (DATE-OBS of the first frame, DATE-END of
the last), every input frame with its weight (HISTORY cards, one per frame), the calibration
masters, the rejection settings and the registration reference.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from astropy.io import fits

from daemon import __version__
from daemon.pipeline.stretch import StretchSettings, stretch_uint8

#: Header keywords for the calibration masters, by kind.
MASTER_KEYS = {"bias": "BIASFRM", "dark": "DARKFRM", "flat": "FLATFRM", "darkflat": "DFLATFRM"}


def _parse_time(value: Any) -> datetime | None:
    if value is None or isinstance(value, datetime):
        return value
    try:
        return datetime.fromisoformat(str(value))
    except ValueError:
        return None


def _fits_time(t: datetime) -> str:
    return t.replace(tzinfo=None).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3]


def stack_header(
    provenance: list[dict],
    *,
    masters: dict[str, str | None] | None = None,
    settings: dict | None = None,
    reference: str | None = None,
    method: str = "live",
    rejected: dict[str, int] | None = None,
    extra: dict | None = None,
) -> fits.Header:
    """The provenance header of a stack (pure).

    provenance: one dict per combined frame (path, weight, date_obs ISO, exposure_s, ...).
    method: "live" (running kappa-sigma) or "final" (winsorized sigma clipping re-stack).
    settings: the rejection/quality settings used (LiveSettings as a dict, RestackSettings).
    """
    h = fits.Header()
    h["NCOMBINE"] = (len(provenance), "number of frames combined")
    total = float(sum(float(p.get("exposure_s") or 0.0) for p in provenance))
    h["EXPTIME"] = (total, "[s] total exposure of the combined frames")
    h["TOTEXP"] = (total, "[s] total exposure of the combined frames")
    times = [(t, float(p.get("exposure_s") or 0.0)) for p in provenance
             if (t := _parse_time(p.get("date_obs"))) is not None]
    if times:
        first = min(t for t, _ in times)
        end = max(t + timedelta(seconds=e) for t, e in times)
        h["DATE-OBS"] = (_fits_time(first), "start of the first combined exposure (UTC)")
        h["DATE-END"] = (_fits_time(end), "end of the last combined exposure (UTC)")
    h["STACKMTH"] = ("online kappa-sigma running mean" if method == "live"
                     else "winsorized sigma clipping", "combination method")
    for key, value in (settings or {}).items():
        if isinstance(value, (bool, int, float, str)):
            h[f"HIERARCH LB {key.upper()}"] = value
    if rejected:
        for key, value in rejected.items():
            h[f"HIERARCH LB REJECTED {key.upper()}"] = (int(value), "rejected samples")
    if reference:
        h["REFFRAME"] = (os.path.basename(reference), "registration reference frame")
        h["REFPATH"] = reference
    for kind, path in (masters or {}).items():
        if path:
            h[MASTER_KEYS.get(kind, f"HIERARCH LB MASTER {kind.upper()}")] = (str(path), f"master {kind} used")
    for key, value in (extra or {}).items():
        h[key] = value
    h["CREATOR"] = f"lightbucket {__version__}"
    for i, p in enumerate(provenance, 1):
        t = _parse_time(p.get("date_obs"))
        h.add_history(f"IN {i:04d} w={float(p.get('weight', 1.0)):.4f} exp={float(p.get('exposure_s') or 0):g}s "
                      f"date={_fits_time(t) if t else '-'}")
        h.add_history(f"IN {i:04d} file={p.get('path') or '-'}")  # a long path wraps onto more cards
    return h


def inputs_from_header(header: fits.Header) -> list[dict]:
    """The per-frame provenance written by `stack_header`, read back from HISTORY cards:
    [{"index", "weight", "exposure_s", "date_obs", "path"}, ...]."""
    lines: list[str] = []
    for card in header.get("HISTORY", []):
        text = str(card)
        if text.startswith("IN ") or not lines:
            lines.append(text)
        else:
            lines[-1] += text  # continuation of a wrapped card
    frames: dict[int, dict] = {}
    for line in lines:
        parts = line.split(" ", 2)
        if len(parts) < 3 or parts[0] != "IN" or not parts[1].isdigit():
            continue
        rec = frames.setdefault(int(parts[1]), {"index": int(parts[1])})
        rest = parts[2]
        if rest.startswith("file="):
            rec["path"] = rest[len("file="):].rstrip()
            continue
        for item in rest.split():
            key, _, value = item.partition("=")
            if key == "w":
                rec["weight"] = float(value)
            elif key == "exp":
                rec["exposure_s"] = float(value.rstrip("s"))
            elif key == "date":
                rec["date_obs"] = None if value == "-" else value
    return [frames[k] for k in sorted(frames)]


def write_stack(
    path: str | os.PathLike,
    pipeline_or_image,
    provenance: list[dict] | None = None,
    *,
    masters: dict[str, str | None] | None = None,
    settings: dict | None = None,
    reference: str | None = None,
    method: str = "live",
    rejected: dict[str, int] | None = None,
    extra: dict | None = None,
) -> fits.Header:
    """Write a stack as 32-bit float FITS (atomically) with its provenance header.

    pipeline_or_image: a LivePipeline (image, provenance, reference and settings are taken
    from it unless given) or an (H, W) / (H, W, 3) float32 image. Colour goes to FITS as
    three planes (NAXIS3 = 3, R, G, B). Returns the header written.
    """
    from daemon.io.fits import write_fits

    if isinstance(pipeline_or_image, np.ndarray):
        image = pipeline_or_image
    else:
        pipe = pipeline_or_image
        image = pipe.stack_image()
        if image is None:
            raise ValueError("nothing stacked yet: no frame was accepted")
        provenance = pipe.provenance() if provenance is None else provenance
        reference = reference or getattr(pipe, "reference_path", None)
        settings = settings if settings is not None else getattr(pipe, "rejection_settings", None)
        if masters is None:  # the files the pipeline's masters were loaded from
            sources = getattr(getattr(pipe, "masters", None), "sources", None) or {}
            masters = {kind: getattr(meta, "path", None) for kind, meta in sources.items()}
    header = stack_header(provenance or [], masters=masters, settings=settings, reference=reference,
                          method=method, rejected=rejected, extra=extra)
    data = np.asarray(image, dtype=np.float32)
    if data.ndim == 3:  # write_fits stores (H, W, 3) as the FITS cube (3, H, W)
        header["CTYPE3"] = ("RGB", "colour planes R, G, B")
    write_fits(Path(path), data, header)
    return header


def preview_image(image: np.ndarray, max_edge: int = 1920, settings: StretchSettings | None = None) -> np.ndarray:
    """Auto-stretched uint8 preview, (h, w) or (h, w, 3) RGB, long edge <= max_edge."""
    s = settings or StretchSettings()
    if s.max_edge != max_edge:
        s = StretchSettings(**{**s.__dict__, "max_edge": max_edge})
    return stretch_uint8(image, s)


def preview_jpeg(image: np.ndarray, max_edge: int = 1920, quality: int = 85,
                 settings: StretchSettings | None = None, fmt: str = "jpeg") -> bytes:
    """The stack as an auto-stretched JPEG (or PNG with fmt="png"), as bytes."""
    img = preview_image(image, max_edge, settings)
    if img.ndim == 3:
        img = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
    if fmt == "png":
        ok, buf = cv2.imencode(".png", img)
    else:
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ValueError(f"could not encode the preview as {fmt}")
    return buf.tobytes()
