"""WCS arithmetic on plain FITS cards (dicts): where a pixel grid points, and how it turns.

Pure (numpy and astropy.wcs, no I/O). Cards are a linear TAN WCS (CRVAL, CRPIX 1-based, CD);
pixel coordinates in the functions here are 0-based (x = column, y = row), the pipeline's.
Angles in degrees, scales in arcseconds per pixel.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from astropy.wcs import WCS


def _cd(cards: Mapping[str, Any]) -> np.ndarray:
    if "CD1_1" in cards:
        return np.array([[cards["CD1_1"], cards.get("CD1_2", 0.0)],
                         [cards.get("CD2_1", 0.0), cards["CD2_2"]]], dtype=np.float64)
    c1, c2 = cards["CDELT1"], cards["CDELT2"]
    rot = math.radians(float(cards.get("CROTA2", 0.0)))
    return np.array([[c1 * math.cos(rot), -c2 * math.sin(rot)],
                     [c1 * math.sin(rot), c2 * math.cos(rot)]])


def to_wcs(cards: Mapping[str, Any]) -> WCS:
    """An astropy WCS from TAN cards (CD or CDELT/CROTA2)."""
    w = WCS(naxis=2)
    w.wcs.ctype = [str(cards.get("CTYPE1", "RA---TAN"))[:8], str(cards.get("CTYPE2", "DEC--TAN"))[:8]]
    w.wcs.crval = [float(cards["CRVAL1"]), float(cards["CRVAL2"])]
    w.wcs.crpix = [float(cards["CRPIX1"]), float(cards["CRPIX2"])]
    w.wcs.cd = _cd(cards)
    return w


def pixel_to_sky(cards: Mapping[str, Any], x, y) -> tuple[np.ndarray, np.ndarray]:
    """(RA, Dec) in degrees of 0-based pixel positions x, y."""
    ra, dec = to_wcs(cards).all_pix2world(np.asarray(x, float), np.asarray(y, float), 0)
    return np.asarray(ra) % 360.0, np.asarray(dec)


def sky_to_pixel(cards: Mapping[str, Any], ra, dec) -> tuple[np.ndarray, np.ndarray]:
    """0-based pixel positions of (RA, Dec) in degrees."""
    x, y = to_wcs(cards).all_world2pix(np.asarray(ra, float), np.asarray(dec, float), 0)
    return np.asarray(x), np.asarray(y)


def center(cards: Mapping[str, Any], width: int, height: int) -> tuple[float, float]:
    """(RA, Dec) of the centre of a width x height grid (pixel (w-1)/2, (h-1)/2)."""
    ra, dec = pixel_to_sky(cards, (width - 1) / 2.0, (height - 1) / 2.0)
    return float(ra), float(dec)


def scale_arcsec(cards: Mapping[str, Any]) -> float:
    """Pixel scale: the square root of |det CD|, in arcsec per pixel."""
    return float(math.sqrt(abs(np.linalg.det(_cd(cards)))) * 3600.0)


def parity(cards: Mapping[str, Any]) -> str:
    """astrometry.net's parity name: "neg" when det CD > 0, else "pos"."""
    return "neg" if np.linalg.det(_cd(cards)) > 0 else "pos"


def rotation_deg(cards: Mapping[str, Any]) -> float:
    """astrometry.net's orientation, "up is N degrees E of N", in (-180, 180]."""
    cd = _cd(cards)
    s = 1.0 if np.linalg.det(cd) >= 0 else -1.0
    t = s * cd[0, 0] + cd[1, 1]
    a = s * cd[1, 0] - cd[0, 1]
    return float(-math.degrees(math.atan2(a, t)))


def separation_arcsec(ra1: float, dec1: float, ra2: float, dec2: float) -> float:
    """Great-circle distance between two positions (degrees in, arcseconds out; haversine)."""
    r1, d1, r2, d2 = map(math.radians, (ra1, dec1, ra2, dec2))
    h = math.sin((d2 - d1) / 2) ** 2 + math.cos(d1) * math.cos(d2) * math.sin((r2 - r1) / 2) ** 2
    return math.degrees(2 * math.asin(min(1.0, math.sqrt(h)))) * 3600.0


def transform(cards: Mapping[str, Any], matrix) -> dict[str, Any]:
    """The cards for a new pixel grid related to the old one by an affine map.

    matrix: 3x3 (or 2x3) taking NEW 0-based pixel (x, y, 1) to OLD 0-based pixel. Exact for a
    linear TAN WCS: CD' = CD A, and CRPIX' is the new pixel that lands on the old CRPIX.
    """
    m = np.asarray(matrix, dtype=np.float64)
    a, t = m[:2, :2], m[:2, 2]
    cd = _cd(cards)
    old_crpix0 = np.array([cards["CRPIX1"], cards["CRPIX2"]], dtype=np.float64) - 1.0
    new_crpix0 = np.linalg.solve(a, old_crpix0 - t)
    cd_new = cd @ a
    out = {k: v for k, v in cards.items() if k not in ("CDELT1", "CDELT2", "CROTA1", "CROTA2")}
    out.update(CRPIX1=float(new_crpix0[0] + 1.0), CRPIX2=float(new_crpix0[1] + 1.0),
               CD1_1=float(cd_new[0, 0]), CD1_2=float(cd_new[0, 1]),
               CD2_1=float(cd_new[1, 0]), CD2_2=float(cd_new[1, 1]))
    return out
