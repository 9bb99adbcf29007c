"""FITS header cards -> FrameMeta, whichever capture program wrote them.

INDI/KStars/Ekos, NINA, SharpCap, ASIAIR, MaxIm and friends agree on little: exposure is
EXPTIME or EXPOSURE (SharpCap adds EXPOINUS in microseconds), the frame type is IMAGETYP or
FRAME with values like 'Light Frame', 'LIGHT', 'Dark Flat', coordinates come as RA/DEC in
degrees or OBJCTRA/OBJCTDEC in sexagesimal hours/degrees. Each field below lists the cards
tried in order; the first readable one wins. Cards absent everywhere are reported in
`FrameMeta.missing` under their canonical name (the first in the list).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from daemon.pipeline.frame import BAYER_PATTERNS, FrameMeta, FrameType

EXPOSURE_KEYS = ("EXPTIME", "EXPOSURE", "EXP_TIME", "EXPTIM")
FRAME_TYPE_KEYS = ("IMAGETYP", "FRAME", "FRAMETYP", "IMAGETYPE")
GAIN_KEYS = ("GAIN", "ISOSPEED", "ISO")
OFFSET_KEYS = ("OFFSET", "BLKLEVEL", "BLACKLEV", "BRIGHTNS")
SENSOR_TEMP_KEYS = ("CCD-TEMP", "CCD_TEMP", "CCDTEMP", "SENSOR-T", "DET-TEMP", "TEMPERAT")
SET_TEMP_KEYS = ("SET-TEMP", "SET_TEMP", "SETTEMP")
BAYER_KEYS = ("BAYERPAT", "COLORTYP", "CFA-PAT", "BAYER")
DATE_KEYS = ("DATE-OBS", "DATE_OBS", "DATE-BEG", "DATE-STA")
FILTER_KEYS = ("FILTER", "FILTNAM", "FILTER1")
TARGET_KEYS = ("OBJECT", "OBJNAME", "TARGET")
CAMERA_KEYS = ("INSTRUME", "CAMERA")
TELESCOPE_KEYS = ("TELESCOP",)
PIXEL_KEYS = ("XPIXSZ", "PIXSIZE1", "PIXSIZE")
FOCAL_KEYS = ("FOCALLEN", "FOCAL")
SITE_LAT_KEYS = ("SITELAT", "OBSLAT", "LAT-OBS", "LATITUDE")
SITE_LON_KEYS = ("SITELONG", "OBSLONG", "LONG-OBS", "LONGITUD")
#: Longest exposure taken as real (s): a day. Above it (or below 0) the value is a fault.
MAX_EXPOSURE_S = 86400.0
#: Largest binning a camera offers; above it (or not a whole number >= 1) it is a fault.
MAX_BINNING = 16

#: Values capture programs put in OBJECT/FILTER when they know nothing.
_PLACEHOLDERS = {"", "unknown", "none", "n/a", "na", "-"}


def _get(header: Mapping[str, Any], keys: tuple[str, ...]) -> tuple[str | None, Any]:
    for key in keys:
        if key in header:
            value = header[key]
            if value is None or (isinstance(value, str) and not value.strip()):
                continue
            return key, value
    return None, None


def _float(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        return float(str(value).strip()) if isinstance(value, str) else float(value)
    except (TypeError, ValueError):
        return None


def _text(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return None if text.lower() in _PLACEHOLDERS else text


def parse_frame_type(value: Any) -> FrameType | None:
    """'Light Frame', 'LIGHT', 'Dark Flat', 'FLATDARK', 'Bias Frame', 'Offset', 'Flat Field'..."""
    text = str(value).strip().lower()
    if not text:
        return None
    if "dark" in text and "flat" in text:
        return FrameType.DARKFLAT
    if any(w in text for w in ("bias", "offset", "zero")):
        return FrameType.BIAS
    if "dark" in text:
        return FrameType.DARK
    if "flat" in text:
        return FrameType.FLAT
    if any(w in text for w in ("light", "object", "science", "tricolor")):
        return FrameType.LIGHT
    return None


def parse_date(value: Any) -> datetime | None:
    """ISO 8601 date-time (with or without 'T', fraction, 'Z'); naive times are taken as UTC."""
    text = str(value).strip().replace(" ", "T").rstrip("Z")
    m = re.match(r"^(\d{4}-\d{2}-\d{2})(?:T(\d{2}:\d{2}:\d{2})(\.\d+)?)?", text)
    if not m:
        return None
    date, time, frac = m.group(1), m.group(2) or "00:00:00", m.group(3) or ""
    frac = frac[:7]  # microseconds at most
    try:
        dt = datetime.fromisoformat(f"{date}T{time}{frac}")
    except ValueError:
        return None
    return dt.replace(tzinfo=UTC)


def parse_angle(value: Any, *, hours: bool) -> float | None:
    """Degrees from a number (already degrees) or a sexagesimal string.

    Strings like '19 59 41.99', '19:59:41.99', '19h59m41.99s', '+22 43 19.37', '-05d12m'.
    `hours` says a sexagesimal value is in hours (RA) and is multiplied by 15.
    """
    number = _float(value)
    if number is not None and not isinstance(value, str):
        return number
    text = str(value).strip()
    if number is not None and not re.search(r"[\s:hdms°']", text):
        return number  # a plain decimal string: degrees
    parts = re.findall(r"[-+]?\d+(?:\.\d*)?", text)
    if not parts:
        return None
    negative = text.lstrip().startswith("-")
    vals = [abs(float(p)) for p in parts[:3]]
    deg = vals[0] + (vals[1] / 60 if len(vals) > 1 else 0) + (vals[2] / 3600 if len(vals) > 2 else 0)
    deg = -deg if negative else deg
    return deg * 15.0 if hours else deg


def shift_pattern(pattern: str, x_offset: int, y_offset: int) -> str:
    """The 2x2 pattern seen from pixel (x_offset, y_offset) of an array whose (0, 0) has `pattern`."""
    grid = [[pattern[0], pattern[1]], [pattern[2], pattern[3]]]
    return "".join(grid[(r + y_offset) % 2][(c + x_offset) % 2] for r in (0, 1) for c in (0, 1))


def flip_rows_pattern(pattern: str, height: int) -> str:
    """Pattern at row 0 after the array's rows are reversed (row height-1 becomes row 0)."""
    return shift_pattern(pattern, 0, (height - 1) % 2)


def parse_bayer(value: Any) -> str | None:
    """Normalise a pattern card ('RGGB', 'rggb ', 'R G G B') or None for mono/unknown."""
    text = re.sub(r"[^A-Za-z]", "", str(value)).upper()
    return text if text in BAYER_PATTERNS else None


def meta_from_header(header: Mapping[str, Any], path: str | None = None) -> FrameMeta:
    """Metadata of one frame from its header, as it is *stored*.

    The Bayer pattern returned here is the one at the stored array's pixel (0, 0) with
    XBAYROFF/YBAYROFF applied; the caller that flips rows for ROWORDER adjusts it
    (see `flip_rows_pattern`).
    """
    missing: list[str] = []

    def pick(keys: tuple[str, ...], convert=_float, required: bool = True):
        _, raw = _get(header, keys)
        value = convert(raw) if raw is not None else None
        if value is None and required:
            missing.append(keys[0])
        return value

    warnings: list[str] = []

    def bad(key: str | None, raw: Any, why: str) -> None:
        warnings.append(f"{key}={raw!r} {why}: taken as absent")

    exposure_key, raw_exposure = _get(header, EXPOSURE_KEYS)
    exposure = _float(raw_exposure) if raw_exposure is not None else None
    if raw_exposure is not None and exposure is None:
        bad(exposure_key, raw_exposure, "is not a number")
    elif exposure is not None and not (0.0 <= exposure <= MAX_EXPOSURE_S):
        bad(exposure_key, raw_exposure, f"is outside 0..{MAX_EXPOSURE_S:g} s")
        exposure = None
    if exposure is None and raw_exposure is None and "EXPOINUS" in header:  # SharpCap: microseconds
        us = _float(header["EXPOINUS"])
        if us is not None and 0.0 <= us <= MAX_EXPOSURE_S * 1e6:
            exposure = us / 1e6
        else:
            bad("EXPOINUS", header["EXPOINUS"], "is not an exposure in microseconds")
    if exposure is None:
        missing.append("EXPTIME")
    frame_type = pick(FRAME_TYPE_KEYS, parse_frame_type)

    def binning(keys: tuple[str, ...]) -> int | None:
        key, raw = _get(header, keys)
        if raw is None:
            return None
        value = _float(raw)
        if value is None or value != int(value) or not 1 <= value <= MAX_BINNING:
            bad(key, raw, f"is not a binning 1..{MAX_BINNING}")
            return None
        return int(value)

    xbin = binning(("XBINNING", "BINNING", "XBIN")) or 1
    ybin = binning(("YBINNING", "BINNING", "YBIN")) or xbin

    bayer = None
    _, raw_bayer = _get(header, BAYER_KEYS)
    if raw_bayer is not None:
        bayer = parse_bayer(raw_bayer)
    if bayer is not None:
        xoff = int(_float(_get(header, ("XBAYROFF", "BAYOFFX", "XBAYEROF"))[1]) or 0)
        yoff = int(_float(_get(header, ("YBAYROFF", "BAYOFFY", "YBAYEROF"))[1]) or 0)
        bayer = shift_pattern(bayer, xoff, yoff)

    date_obs = pick(DATE_KEYS, parse_date, required=False)
    if date_obs is not None and "T" not in str(_get(header, DATE_KEYS)[1]) and "TIME-OBS" in header:
        t = parse_date(f"{str(_get(header, DATE_KEYS)[1]).strip()}T{str(header['TIME-OBS']).strip()}")
        date_obs = t or date_obs
    if date_obs is None and "DATE" in header:  # file-writing time: the best some programs give
        date_obs = parse_date(header["DATE"])
    if date_obs is None:
        missing.append("DATE-OBS")

    ra = dec = None
    for ra_key, dec_key, hours in (("RA", "DEC", False), ("OBJCTRA", "OBJCTDEC", True),
                                   ("RA_OBJ", "DEC_OBJ", False)):
        if ra_key in header and dec_key in header:
            ra_val = header[ra_key]
            # A sexagesimal RA string is in hours whatever the card is called.
            ra_hours = hours or (isinstance(ra_val, str) and bool(re.search(r"[\s:h]", ra_val.strip())))
            ra = parse_angle(ra_val, hours=ra_hours)
            dec = parse_angle(header[dec_key], hours=False)
            if ra is not None and dec is not None:
                break
    if (ra is None or dec is None) and str(header.get("CTYPE1", "")).startswith("RA"):
        ra, dec = _float(header.get("CRVAL1")), _float(header.get("CRVAL2"))
    if ra is None or dec is None:
        ra = dec = None
        missing.append("RA/DEC")

    pixel_key, pixel = _get(header, PIXEL_KEYS)
    pixel_size = _float(pixel)
    if pixel_size is None:
        missing.append(PIXEL_KEYS[0])
    elif pixel_key in ("PIXSIZE1", "PIXSIZE"):
        pixel_size *= xbin  # INDI's PIXSIZE1 is the unbinned pitch; XPIXSZ already includes binning

    return FrameMeta(
        path=path,
        frame_type=frame_type or FrameType.LIGHT,
        exposure_s=exposure,
        gain=pick(GAIN_KEYS),
        offset=pick(OFFSET_KEYS, required=False),
        binning=(int(xbin), int(ybin)),
        sensor_temp_c=pick(SENSOR_TEMP_KEYS),
        set_temp_c=pick(SET_TEMP_KEYS, required=False),
        bayer=bayer,
        date_obs=date_obs,
        filter=pick(FILTER_KEYS, _text, required=False),
        target=pick(TARGET_KEYS, _text),
        ra_deg=ra,
        dec_deg=dec,
        camera=pick(CAMERA_KEYS, _text),
        telescope=pick(TELESCOPE_KEYS, _text, required=False),
        pixel_size_um=pixel_size,
        focal_length_mm=pick(FOCAL_KEYS),
        site_lat_deg=_angle(_get(header, SITE_LAT_KEYS)[1], hours=False),
        site_lon_deg=_angle(_get(header, SITE_LON_KEYS)[1], hours=False),
        missing=tuple(missing),
        warnings=tuple(f"{path}: {w}" if path else w for w in warnings),
    )


def _angle(value: Any, *, hours: bool) -> float | None:
    return None if value is None else parse_angle(value, hours=hours)
