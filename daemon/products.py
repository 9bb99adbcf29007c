"""What a session leaves behind: the stack as 32-bit FITS with its provenance, and previews.

The FITS header answers "what is in this image?" without the daemon's state, in the keywords
Siril, PixInsight and ASTAP read: how many frames (NCOMBINE, STACKCNT), the exposure of one sub
(EXPTIME, as Siril writes it) and the total (LIVETIME), from when to when (DATE-OBS of the first
frame, DATE-END of the last), the capture metadata every input agrees on (INSTRUME, TELESCOP,
OBJECT, FILTER, GAIN, OFFSET, binning, pixel size, FOCALLEN, site, pointing; CCD-TEMP as the
mean), a celestial WCS (the reference frame's, carried through the stack's geometry by
`daemon.io.wcs.stack_wcs`), every input frame with its weight (HISTORY cards, one per frame),
the calibration masters, the rejection settings and the registration reference. Text is
ASCII-safe (`daemon.names.ascii_safe`): a file named `M42 星.fits` is written `M42 \\u661f.fits`.

Orientation: the stack is written BOTTOM-UP (ROWORDER='BOTTOM-UP', the FITS standard's order):
the preview's top row is the FITS file's last row, so viewers that put the first row at the
bottom (DS9, Siril, ASTAP) show the stack as the preview shows it.
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
from daemon.io.fits import write_fits
from daemon.io.wcs import StackGeometry, stack_wcs, wcs_header
from daemon.names import ascii_safe, ascii_unescape
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


#: Capture fields written when every input agrees: (field, keyword, comment).
_AGREED = (("camera", "INSTRUME", "camera"), ("telescope", "TELESCOP", "telescope"),
           ("target", "OBJECT", "target"), ("filter", "FILTER", "filter"), ("gain", "GAIN", "camera gain"),
           ("offset", "OFFSET", "camera offset"), ("focal_length_mm", "FOCALLEN", "[mm] focal length"),
           ("set_temp_c", "SET-TEMP", "[C] sensor set point"), ("site_lat_deg", "SITELAT", "[deg] site latitude"),
           ("site_lon_deg", "SITELONG", "[deg] site longitude, east positive"))
#: Inputs whose pointings spread wider than this (deg) have no common pointing.
POINTING_SPREAD_DEG = 0.5


def _agreed(values: list) -> Any:
    """The one value every input has (floats within 1e-6 relative), else None."""
    if not values or any(v is None for v in values):
        return None
    first = values[0]
    if isinstance(first, (int, float)) and not isinstance(first, bool):
        ok = all(isinstance(v, (int, float)) and abs(v - first) <= 1e-6 * max(1.0, abs(first)) for v in values)
    else:
        ok = all(v == first for v in values)
    return first if ok else None


def _sexagesimal(deg: float, hours: bool) -> str:
    value = deg / 15.0 if hours else abs(deg)
    d = int(value)
    m = int((value - d) * 60)
    sec = ((value - d) * 60 - m) * 3600 / 60
    text = f"{d:02d} {m:02d} {sec:0{5 if hours else 4}.{2 if hours else 1}f}"
    return text if hours else ("-" if deg < 0 else "+") + text


def _pointing(frames: list[dict]) -> tuple[float, float] | None:
    """Mean pointing (deg) of inputs that all have one within POINTING_SPREAD_DEG, else None."""
    ra = [f.get("ra_deg") for f in frames]
    dec = [f.get("dec_deg") for f in frames]
    if not frames or any(v is None for v in ra + dec):
        return None
    r, d = np.radians(np.asarray(ra, float)), np.radians(np.asarray(dec, float))
    xyz = np.stack([np.cos(d) * np.cos(r), np.cos(d) * np.sin(r), np.sin(d)], axis=1)
    mean = xyz.mean(axis=0)
    mean /= np.linalg.norm(mean)
    if np.degrees(np.arccos(np.clip(xyz @ mean, -1, 1))).max() > POINTING_SPREAD_DEG:
        return None
    return float(np.degrees(np.arctan2(mean[1], mean[0])) % 360.0), float(np.degrees(np.arcsin(mean[2])))


def capture_header(frames: list[dict], geometry: StackGeometry | None = None) -> fits.Header:
    """Capture cards of a stack from its inputs' capture dicts (pure; see `_AGREED`).

    frames: per input, the FrameMeta fields of `daemon.pipeline.live.capture_fields`.
    geometry: the stack's geometry; the pixel size written is the stack pixel's
    (sensor pitch x scale, e.g. x 2 for a superpixel stack), so FOCALLEN and XPIXSZ give
    the stack's plate scale.
    """
    h = fits.Header()
    if not frames:
        return h
    for name, key, comment in _AGREED:
        value = _agreed([f.get(name) for f in frames])
        if value is not None:
            h[key] = (ascii_safe(value) if isinstance(value, str) else value, comment)
    binning = _agreed([tuple(f["binning"]) if f.get("binning") else None for f in frames])
    if binning is not None:
        h["XBINNING"] = (int(binning[0]), "camera binning")
        h["YBINNING"] = (int(binning[1]), "camera binning")
    pixel = _agreed([f.get("pixel_size_um") for f in frames])
    if pixel is not None:
        scale = geometry.scale if geometry is not None else 1.0
        h["XPIXSZ"] = (float(pixel) * scale, "[um] stack pixel size (binned, x superpixel scale)")
        h["YPIXSZ"] = (float(pixel) * scale, "[um] stack pixel size (binned, x superpixel scale)")
    temps = [f.get("sensor_temp_c") for f in frames if f.get("sensor_temp_c") is not None]
    if temps:
        h["CCD-TEMP"] = (round(float(np.mean(temps)), 3), f"[C] mean sensor temperature of {len(temps)} frames")
    pointing = _pointing(frames)
    if pointing is not None:
        h["RA"] = (round(pointing[0], 6), "[deg] mean pointing of the inputs (J2000)")
        h["DEC"] = (round(pointing[1], 6), "[deg] mean pointing of the inputs (J2000)")
        h["OBJCTRA"] = (_sexagesimal(pointing[0], True), "[h m s] mean pointing")
        h["OBJCTDEC"] = (_sexagesimal(pointing[1], False), "[d m s] mean pointing")
    return h


def stack_header(
    provenance: list[dict],
    *,
    masters: dict[str, str | None] | None = None,
    settings: dict | None = None,
    reference: str | None = None,
    method: str = "live",
    rejected: dict[str, int] | None = None,
    extra: dict | None = None,
    geometry: StackGeometry | None = None,
    reference_wcs: Any = None,
    height: int | None = None,
    wcs_solved: bool = False,
) -> fits.Header:
    """The header of a stack (pure).

    provenance: one dict per combined frame (path, weight, date_obs ISO, exposure_s, and
        `capture`: the frame's capture metadata, daemon.pipeline.live.capture_fields).
    method: "live" (running kappa-sigma) or "final" (winsorized sigma clipping re-stack).
    settings: the rejection/quality settings used (LiveSettings as a dict, RestackSettings).
    geometry, reference_wcs, height: the stack's geometry, the reference frame's celestial
        WCS (cards or astropy WCS, array convention) and the stack's rows: with all three, the
        stack's WCS (written BOTTOM-UP) is added; wcs_solved: that WCS comes from a plate
        solve of the reference (PLTSOLVD = T), not from its header.
    """
    h = fits.Header()
    n = len(provenance)
    h["NCOMBINE"] = (n, "number of frames combined")
    h["STACKCNT"] = (n, "number of frames combined (Siril)")
    # Exposures the inputs did not state (no or a bad EXPTIME) are unknown, never 0 s.
    exposures = [float(e) for p in provenance if (e := p.get("exposure_s")) is not None]
    if exposures:
        total = float(sum(exposures))
        one = _agreed(exposures)
        unknown = f"; {n - len(exposures)} of unknown exposure" if len(exposures) < n else ""
        h["EXPTIME"] = (float(one if one is not None else total / len(exposures)),
                        "[s] exposure of one sub" + ("" if one is not None else " (mean)"))
        h["LIVETIME"] = (total, f"[s] total exposure of the combined frames{unknown}")
        h["TOTEXP"] = (total, f"[s] total exposure of the combined frames{unknown}")
    times = [(t, float(p.get("exposure_s") or 0.0)) for p in provenance
             if (t := _parse_time(p.get("date_obs"))) is not None]
    if times:
        first = min(t for t, _ in times)
        end = max(t + timedelta(seconds=e) for t, e in times)
        h["DATE-OBS"] = (_fits_time(first), "start of the first combined exposure (UTC)")
        h["DATE-END"] = (_fits_time(end), "end of the last combined exposure (UTC)")
    frames = [p.get("capture") or {} for p in provenance]
    h.extend(capture_header(frames if all(frames) else [], geometry), update=True)
    if reference_wcs is not None and geometry is not None and height is not None:
        w = stack_wcs(reference_wcs, geometry, int(height), bottom_up=True)
        if w is not None:
            h.extend(wcs_header(w), update=True)
            h["PLTSOLVD"] = (bool(wcs_solved), "WCS from a plate solve of the reference frame")
    h["STACKMTH"] = ("online kappa-sigma running mean" if method == "live"
                     else "winsorized sigma clipping", "combination method")
    for key, value in (settings or {}).items():
        if isinstance(value, (bool, int, float, str)):
            h[f"HIERARCH LB {key.upper()}"] = ascii_safe(value) if isinstance(value, str) else value
    if rejected:
        for key, value in rejected.items():
            h[f"HIERARCH LB REJECTED {key.upper()}"] = (int(value), "rejected samples")
    if reference:
        h["REFFRAME"] = (ascii_safe(os.path.basename(reference)), "registration reference frame")
        h["REFPATH"] = ascii_safe(reference)
    for kind, path in (masters or {}).items():
        if path:
            h[MASTER_KEYS.get(kind, f"HIERARCH LB MASTER {kind.upper()}")] = (ascii_safe(str(path)),
                                                                               f"master {kind} used")
    for key, value in (extra or {}).items():
        h[key] = ascii_safe(value) if isinstance(value, str) else value
    h["CREATOR"] = f"lightbucket {__version__}"
    for i, p in enumerate(provenance, 1):
        t = _parse_time(p.get("date_obs"))
        exp = "-" if p.get("exposure_s") is None else f"{float(p['exposure_s']):g}s"
        h.add_history(f"IN {i:04d} w={float(p.get('weight', 1.0)):.4f} exp={exp} date={_fits_time(t) if t else '-'}")
        # a long path wraps onto more cards; non-ASCII escaped (ascii_safe)
        h.add_history(f"IN {i:04d} file={ascii_safe(str(p.get('path') or '-'))}")
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
            rec["path"] = ascii_unescape(rest[len("file="):].rstrip())
            continue
        for item in rest.split():
            key, _, value = item.partition("=")
            if key == "w":
                rec["weight"] = float(value)
            elif key == "exp":
                rec["exposure_s"] = None if value == "-" else float(value.rstrip("s"))
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
    pipeline=None,
) -> fits.Header:
    """Write a stack as 32-bit float FITS (atomically, BOTTOM-UP) with its header.

    pipeline_or_image: a LivePipeline (image, provenance, reference, settings, geometry and
        reference WCS are taken from it unless given) or an (H, W) / (H, W, 3) float32 image
        (top-down, as the pipeline holds it). Colour goes to FITS as three planes (NAXIS3 = 3,
        R, G, B).
    pipeline: with an image (a re-stack of the live stack's frames), the LivePipeline whose
        geometry, reference WCS and per-frame capture metadata (matched by path) describe it.
    Returns the header written.
    """
    if isinstance(pipeline_or_image, np.ndarray):
        image = pipeline_or_image
        pipe = pipeline
    else:
        pipe = pipeline_or_image
        image = pipe.stack_image()
        if image is None:
            raise ValueError("nothing stacked yet: no frame was accepted")
        provenance = pipe.provenance() if provenance is None else provenance
    if pipe is not None:
        reference = reference or getattr(pipe, "reference_path", None)
        settings = settings if settings is not None else getattr(pipe, "rejection_settings", None)
        if masters is None:  # the files the pipeline's masters were loaded from
            sources = getattr(getattr(pipe, "masters", None), "sources", None) or {}
            masters = {kind: getattr(meta, "path", None) for kind, meta in sources.items()}
        captured = {p.get("path"): p.get("capture") for p in pipe.provenance()}
        provenance = [p if p.get("capture") else {**p, "capture": captured.get(p.get("path"))}
                      for p in (provenance or [])]
    data = np.asarray(image, dtype=np.float32)
    header = stack_header(provenance or [], masters=masters, settings=settings, reference=reference,
                          method=method, rejected=rejected, extra=extra,
                          geometry=getattr(pipe, "geometry", None), height=data.shape[0],
                          reference_wcs=getattr(pipe, "reference_wcs", None),
                          wcs_solved=bool(getattr(pipe, "wcs_solved", False)))
    if data.ndim == 3:  # write_fits stores (H, W, 3) as the FITS cube (3, H, W)
        header["CTYPE3"] = ("RGB", "colour planes R, G, B")
    write_fits(Path(path), data, header, bottom_up=True)
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
