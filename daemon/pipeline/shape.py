"""Frame shape for the quality gate: which stars to trust and their median elongation.

Pure numpy on the star list of `daemon.pipeline.stars` (positions in full-resolution px).
A frame's shape is that of its isolated, unsaturated, well-measured stars: a neighbour's wing
in the moments, the clipped plateau of a saturated star or the sky noise of a faint one all
make stars look elongated that are not. A colour frame's shape is measured on its superpixel
luminance, not on the mosaic (`shape_on_luminance`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from scipy.spatial import cKDTree

from daemon.pipeline.moments import refine_fullres

if TYPE_CHECKING:
    from daemon.pipeline.stars import Stars

#: Shape stars must be this many FWHM from any other detected star (isolated: no neighbour's
#: wing in the moments), and a frame needs this many of them for its shape to count.
ISOLATION_FWHM = 4.0
MIN_SHAPE_STARS = 5


#: A star whose brightest pixel reaches this fraction of the brightest star's is taken as
#: saturated (flat-topped: its moments are those of the clipped plateau, not of the PSF).
SATURATION_FRACTION = 0.9


def saturated_stars(image: np.ndarray, stars: Stars) -> np.ndarray:
    """Per star: its 3x3 peak in `image` (full resolution, any mosaic) is within
    `SATURATION_FRACTION` of the brightest star's peak: the saturation plateau where stars
    saturate; only the very brightest (never shape stars anyway) where none does. The
    stars' peaks, not the frame's maximum, so a hot pixel does not set the level."""
    n = len(stars)
    if n == 0:
        return np.zeros(0, bool)
    h, w = image.shape[:2]
    iy = np.clip(np.rint(stars.y).astype(np.int64), 1, h - 2)
    ix = np.clip(np.rint(stars.x).astype(np.int64), 1, w - 2)
    d = np.arange(-1, 2)
    box = image[iy[:, None, None] + d[None, :, None], ix[:, None, None] + d[None, None, :]].reshape(n, 9)
    with np.errstate(invalid="ignore"):
        peak = np.nanmax(np.where(np.isfinite(box), box, -np.inf), axis=1)
    top = float(np.max(peak))
    if not np.isfinite(top) or top <= 0:
        return np.zeros(n, bool)
    return peak >= SATURATION_FRACTION * top


def shape_summary(stars: Stars, ellipticity: np.ndarray, fwhm_px: float | None) -> tuple[float | None, float | None]:
    """Median eccentricity and elongation (a/b) of the frame's shape stars.

    Shape stars are the brighter half of the list without its brightest 5 % (sky noise makes
    round faint stars look elongated, since e >= 0 by construction), isolated (no detected
    star within `ISOLATION_FWHM` FWHM) and measured (a finite `ellipticity`: the caller sets
    saturated stars to NaN). With fewer than `MIN_SHAPE_STARS` isolated ones, the non-isolated are
    used too; (None, None) when no star has a measured shape.
    """
    n = len(stars)
    bright = np.zeros(n, bool)
    bright[slice(int(0.05 * n), max(int(0.5 * n), 1)) if n >= 10 else slice(0, n)] = True
    ok = bright & np.isfinite(ellipticity)
    use = ok
    if n > 1 and fwhm_px:
        d, _ = cKDTree(stars.xy).query(stars.xy, k=2)
        isolated = ok & (d[:, 1] > ISOLATION_FWHM * fwhm_px)
        if isolated.sum() >= MIN_SHAPE_STARS:
            use = isolated
    if not use.any():
        return None, None
    e = np.clip(ellipticity[use], 0.0, 0.999)
    ecc = float(np.median(np.sqrt(1.0 - (1.0 - e) ** 2)))
    elong = float(np.median(1.0 / (1.0 - e)))
    return ecc, elong


def shape_on_luminance(lum: np.ndarray, stars: Stars, fwhm_px: float) -> np.ndarray:
    """Ellipticity (1 - b/a) of each star measured on the 2x2 superpixel luminance `lum` of
    a colour mosaic, with the windowed moments of `refine_fullres` (NaN where it fails).

    On the mosaic itself only the green pixels can be used (colour would modulate the
    profile), a checkerboard that samples a 3-px star too coarsely for its second moments:
    the eccentricity reads ~0.1 higher and follows the true shape poorly. The superpixel sums
    all four colours at every site, as the debayered luminance does. Positions are
    full-resolution px; superpixel (i, j) is centred on full-resolution (2i + 0.5, 2j + 0.5).
    """
    xs, ys = (stars.x - 0.5) / 2.0, (stars.y - 0.5) / 2.0
    guess = np.full(len(stars), max(fwhm_px / 2.0, 1.0))
    _, _, _, ell = refine_fullres(lum, xs, ys, None, guess)
    return ell
