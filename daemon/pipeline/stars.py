"""Star detection with sep, per-star shape and per-frame quality metrics.

Pure: arrays in, records out. Two steps, for speed without losing accuracy:
1. Detect on a reduced luminance image (the 2x2 superpixel of a colour mosaic; a 2x2-binned
   mono frame on large sensors) with a sep background map: a quarter of the pixels costs a
   quarter of the time.
2. Re-measure the brightest stars on full-resolution cutouts
   (`daemon.pipeline.moments.refine_fullres`): windowed centroid, FWHM and ellipticity, on
   the green pixels only for a mosaic.
All positions and sizes in `Stars` are in FULL-RESOLUTION frame pixels (x = column, y = row,
0-based, centre of the first pixel at 0, 0)."""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np
import sep

from daemon.pipeline.debayer import luminance, reduction
from daemon.pipeline.moments import FWHM_PER_SIGMA, refine_fullres
from daemon.pipeline.shape import saturated_stars, shape_on_luminance, shape_summary

#: sep's pixel stack: its default (300k) suffices for 30k stars; a bigger one costs its
#: allocation on EVERY extract call (measured +50 ms at 3M), so it is raised only to retry.
_PIXSTACK = 300_000
_PIXSTACK_RETRY = 5_000_000

@dataclass
class Stars:
    """Detected stars, brightest first. Units: px (full-resolution frame), ADU.

    `fwhm` comes from the flux-weighted mean radius (see `refine_fullres`), `hfr` is the
    half-flux radius of a Gaussian of that FWHM (FWHM / 2); `ellipticity` is 1 - b/a of
    sep's second moments on the detection image. `shape` is the (rows, columns) of the
    frame they were found in; `n_total` is how many passed the filters before the list was
    capped to the brightest `max_stars`.
    """

    x: np.ndarray
    y: np.ndarray
    flux: np.ndarray
    fwhm: np.ndarray
    hfr: np.ndarray
    ellipticity: np.ndarray
    shape: tuple[int, int] | None = None
    n_total: int = 0
    #: Registration keeps its pattern index of a reference here, so it is built once.
    #: (Not state: rebuilt when needed, never saved.)
    index_cache: dict = field(default_factory=dict, repr=False, compare=False, metadata={"cache": True})

    def __len__(self) -> int:
        return int(self.x.size)

    @property
    def xy(self) -> np.ndarray:
        """(N, 2) float64 positions."""
        return np.column_stack([self.x, self.y]).astype(np.float64)

    @classmethod
    def empty(cls, shape: tuple[int, int] | None = None) -> Stars:
        z = np.zeros(0, dtype=np.float64)
        return cls(z, z.copy(), z.copy(), z.copy(), z.copy(), z.copy(), shape=shape, n_total=0)

    @classmethod
    def from_xy(cls, x, y, flux=None, shape=None) -> Stars:
        """Stars from bare positions (e.g. a catalogue); sorted brightest first if flux given."""
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        f = np.ones_like(x) if flux is None else np.asarray(flux, dtype=np.float64)
        order = np.argsort(-f, kind="stable")
        nan = np.full(x.size, np.nan)
        return cls(x[order], y[order], f[order], nan, nan.copy(), nan.copy(), shape=shape, n_total=x.size)


@dataclass
class FrameMetrics:
    """Quality of one frame: what the stack's rejection and the status display need.

    fwhm_px/eccentricity are medians over the measured stars; background is the median sky
    level (ADU per pixel) and noise the sky's standard deviation per full-resolution pixel
    (ADU), estimated from the detection image.
    """

    n_stars: int
    fwhm_px: float | None
    fwhm_arcsec: float | None
    eccentricity: float | None
    background: float
    noise: float
    hfr_px: float | None = None
    #: Median a/b of the shape stars (1 = round), None if unmeasured.
    elongation: float | None = None

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in
                ("n_stars", "fwhm_px", "fwhm_arcsec", "eccentricity", "elongation", "hfr_px", "background",
                 "noise")}


def detect_stars(
    image: np.ndarray,
    *,
    thresh: float = 5.0,
    max_stars: int = 500,
    minarea: int = 4,
    reduction_factor: int = 1,
    background_box: int = 64,
    _return_bkg: bool = False,
    _owned: bool = False,
    _windowed: bool = True,
):
    """Stars in a 2-D image (ADU) with a sep background map, brightest first.

    `image` is the detection image; `reduction_factor` k says it is a k x k reduction of the
    frame (superpixel/binning, see `debayer.luminance`) and maps every position and size back
    to full-resolution pixels. Only the brightest `max_stars` get the (costlier) windowed
    centroid and half-flux radius; `Stars.n_total` counts all that passed.

    `image` is not modified (`_owned=True`: the caller gives it up, and it is used as the
    background-subtracted scratch image, saving a full-size copy). `_windowed=False` (for
    `measure`, which re-measures on the full frame anyway) leaves the isophotal positions
    and the FWHM of a sample of `SIZE_SAMPLE` stars only (NaN for the others);
    `_return_bkg` also returns the `_DetectionSizes` that gives the windowed positions and
    the FWHM of any subset.

    Rejected as not-a-star: objects sharper than any PSF (peak holding most of the flux: hot
    pixels, cosmic rays), objects flagged truncated at the image edge, non-positive flux.
    """
    data = np.ascontiguousarray(image, dtype=np.float32)
    owned = _owned or not np.may_share_memory(data, image)
    k = int(reduction_factor)
    full_shape = (data.shape[0] * k, data.shape[1] * k)
    mask = None
    if not np.isfinite(np.add.reduce(data, axis=None)):  # a NaN/inf anywhere: no full-size mask otherwise
        finite = np.isfinite(data)
        mask = ~finite
        data = np.where(finite, data, np.float32(0.0))
        owned = True
    box = max(16, int(background_box // k))
    # Background subtracted in place (no full-size background map): on the caller's image
    # only through a copy.
    sub = data if owned else data.copy()
    del data
    bkg = _subtract_background(sub, mask, box)
    rms = float(bkg.globalrms) or 1.0
    objs = _extract(sub, thresh, rms, mask, minarea)
    h, w = sub.shape
    ok = (objs["flux"] > 0) & (objs["a"] > 0) & (objs["npix"] >= minarea)
    # Sharpness: a Gaussian PSF of FWHM >= 1 detection pixel puts at most ~55 % of its flux
    # in one pixel; a hot pixel or cosmic-ray hit puts most of it there.
    ok &= objs["peak"] < 0.65 * objs["flux"]
    # Clumps of defects (hot pixel next to a cosmic-ray hit, ...) pass that test; but in the
    # 3x3 median a star's peak keeps >= ~10 % of its height (measured on undersampled real
    # stars, als_m27 superpixels: 0.10..0.6), a clump of isolated spikes < 1 %.
    yp = np.clip(objs["ypeak"], 0, h - 1)
    xp = np.clip(objs["xpeak"], 0, w - 1)
    ok &= _median3x3_at(sub, yp, xp) > 0.05 * sub[yp, xp]
    # Stars cut by the frame edge have biased centroids.
    ok &= (objs["xmin"] > 0) & (objs["ymin"] > 0) & (objs["xmax"] < w - 1) & (objs["ymax"] < h - 1)
    objs = objs[ok]
    order = np.argsort(-objs["flux"], kind="stable")
    n_total = int(order.size)
    objs = objs[order[:max_stars]]
    if objs.size == 0:
        stars = Stars.empty(full_shape)
        return (stars, bkg, rms, None) if _return_bkg else stars

    sizes = _DetectionSizes(sub, objs, k)
    n = objs.size
    if _windowed:
        fwhm = sizes.fwhm(slice(None))
        x, y = sizes.windowed(slice(None))
    else:
        # `measure` re-measures every star on the full frame: it needs the sizes here only
        # for its median size guess (a sample) and where the full frame fails (on demand).
        fwhm = np.full(n, np.nan)
        sample = np.unique(np.linspace(0, n - 1, min(n, SIZE_SAMPLE)).round().astype(np.int64))
        fwhm[sample] = sizes.fwhm(sample)
        x, y = objs["x"] * k + (k - 1) / 2.0, objs["y"] * k + (k - 1) / 2.0
    stars = Stars(
        x=x.astype(np.float64),
        y=y.astype(np.float64),
        flux=objs["flux"].astype(np.float64) * k * k,
        fwhm=fwhm,
        hfr=fwhm / 2.0,
        ellipticity=1.0 - objs["b"].astype(np.float64) / objs["a"].astype(np.float64),
        shape=full_shape,
        n_total=n_total,
    )
    return (stars, bkg, rms, sizes) if _return_bkg else stars


#: With `_windowed=False` (`measure`, which re-measures on the full frame) the detection
#: image's size is measured for this many stars only, evenly spread over the brightness
#: ranks: their median FWHM is the size guess for `refine_fullres`, within 0.8 % of the
#: median over all 500 on the bench frames, at a fifth of the cost (sep.flux_radius: ~25 us
#: a star, 13 ms for 500 at 4144x2822).
SIZE_SAMPLE = 100


class _DetectionSizes:
    """Half-flux radii and windowed centroids of the detected stars on the (background-
    subtracted) detection image, measured on demand and kept. `k` is the reduction factor;
    `fwhm` and `windowed` answer in full-resolution px."""

    def __init__(self, sub: np.ndarray, objs: np.ndarray, k: int):
        self._sub, self._k = sub, k
        self._x, self._y = objs["x"].astype(np.float64), objs["y"].astype(np.float64)
        self._a = objs["a"].astype(np.float64)
        self._hfr = np.full(self._x.size, np.nan)

    def hfr(self, sel) -> np.ndarray:
        """Half-flux radii (detection px) of stars `sel` (indices, mask or slice); from sep's
        second moment `a` where sep.flux_radius fails. Each star is independent of the others."""
        idx = np.arange(self._x.size)[sel]
        todo = idx[np.isnan(self._hfr[idx])]
        if todo.size:
            a = self._a[todo]
            r, _ = sep.flux_radius(self._sub, self._x[todo], self._y[todo], np.clip(6.0 * a, 3.0, 30.0), 0.5,
                                   subpix=5)
            self._hfr[todo] = np.where(np.isfinite(r) & (r > 0), r, a * 1.1774)
        return self._hfr[idx]

    def fwhm(self, sel) -> np.ndarray:
        """FWHM (full-resolution px) of stars `sel` from their half-flux radius, without the
        extra pixel-box blur of binning (a box of k pixels adds (k^2 - 1)/12 px^2 of variance
        relative to 1-px pixels)."""
        k = self._k
        sigma_full2 = (self.hfr(sel) * k / 1.1774) ** 2 - (k * k - 1) / 12.0
        return np.sqrt(np.maximum(sigma_full2, 0.04)) * FWHM_PER_SIGMA

    def windowed(self, sel) -> tuple[np.ndarray, np.ndarray]:
        """Windowed centroids (full-resolution px) of stars `sel`; isophotal where it fails."""
        xs, ys = self._x[sel], self._y[sel]
        if xs.size:
            sig = np.clip(2.0 * self.hfr(sel) / FWHM_PER_SIGMA, 0.5, 20.0)
            xw, yw, wflag = sep.winpos(self._sub, xs, ys, sig)
            good = (wflag == 0) & np.isfinite(xw) & np.isfinite(yw) & (np.hypot(xw - xs, yw - ys) < 2.0)
            xs, ys = np.where(good, xw, xs), np.where(good, yw, ys)
        k = self._k
        return xs * k + (k - 1) / 2.0, ys * k + (k - 1) / 2.0


#: Detection images of at least this many pixels get their sky background from every other
#: row and column (a quarter of the pixels, same per-pixel noise statistics): sep.Background
#: costs ~8 ns per pixel, the largest part of detection, and the sky is smooth on the scale
#: of its mesh (`background_box`), so the map interpolated back is the same to a small
#: fraction of the noise (tests/test_stars.py measures it). 1 Mpx takes in 1280x1024 mono
#: frames (measured: the same stars, 98-100 % within 0.01 px, background 15 -> 7.5 ms), not
#: the 640x512 superpixels of a 1280x1024 mosaic (there up to 4 % of the stars changed for
#: 4 ms). Binning those mono frames for detection instead lost 20 % of the stars.
SUBSAMPLE_BACKGROUND_PIXELS = 1_000_000


class _Background:
    """What detection keeps of the sky estimate: global level and noise (ADU)."""

    def __init__(self, globalback: float, globalrms: float):
        self.globalback = globalback
        self.globalrms = globalrms


def _subtract_background(data: np.ndarray, mask: np.ndarray | None, box: int) -> _Background:
    """Subtract sep's background map from `data` in place (float32, C-contiguous); returns its
    global level and noise. Large images: the map is estimated on the 2x-subsampled image with
    a mesh of the same sky area, then resampled back (bilinear, exact pixel mapping) in row
    bands, so no full-size map is ever allocated."""
    h, w = data.shape
    if h * w < SUBSAMPLE_BACKGROUND_PIXELS or min(h, w) < 8 * box:
        bkg = sep.Background(data, mask=mask, bw=box, bh=box, fw=3, fh=3)
        bkg.subfrom(data)
        return _Background(float(bkg.globalback), float(bkg.globalrms))
    small = np.ascontiguousarray(data[::2, ::2])
    smask = None if mask is None else np.ascontiguousarray(mask[::2, ::2])
    half = max(8, box // 2)
    bkg = sep.Background(small, mask=smask, bw=half, bh=half, fw=3, fh=3)
    back = bkg.back()  # small: a quarter of the detection image
    rows = max(1, (4 << 20) // (4 * w))  # ~4 MB bands
    band = np.empty((rows, w), np.float32)
    for r0 in range(0, h, rows):
        n = min(rows, h - r0)
        # Full-image pixel (x, y) is subsampled pixel (x / 2, y / 2).
        m = np.array([[0.5, 0.0, 0.0], [0.0, 0.5, 0.5 * r0]])
        cv2.warpAffine(back, m, (w, n), dst=band[:n], flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                       borderMode=cv2.BORDER_REPLICATE)
        data[r0:r0 + n] -= band[:n]
    return _Background(float(bkg.globalback), float(bkg.globalrms))


def _median3x3_at(img: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """3x3 median of `img` around each (y, x), edges replicated: `cv2.medianBlur(img, 3)[y, x]`
    without filtering the whole image."""
    h, w = img.shape
    d = np.array([-1, 0, 1])
    ys = np.clip(np.asarray(y)[:, None, None] + d[None, :, None], 0, h - 1)
    xs = np.clip(np.asarray(x)[:, None, None] + d[None, None, :], 0, w - 1)
    return np.median(img[ys, xs].reshape(len(ys), 9), axis=1)


def _extract(sub: np.ndarray, thresh: float, rms: float, mask, minarea: int) -> np.ndarray:
    """sep.extract, retried with bigger buffers and then less sensitively when a frame
    overflows sep's buffers (a frame full of "objects": glow, cloud edges, a huge nebula)."""
    kw = dict(err=rms, mask=mask, minarea=minarea, deblend_cont=0.005, clean=True)
    try:
        return sep.extract(sub, thresh, **kw)
    except Exception:  # noqa: BLE001 - sep raises a bare Exception naming the full buffer
        pass
    sep.set_extract_pixstack(_PIXSTACK_RETRY)
    sep.set_sub_object_limit(8192)
    try:
        try:
            return sep.extract(sub, thresh, **kw)
        except Exception:  # noqa: BLE001 - as above
            kw.update(minarea=minarea * 2, deblend_cont=1.0)
            return sep.extract(sub, thresh * 3, **kw)
    finally:
        sep.set_extract_pixstack(_PIXSTACK)
        sep.set_sub_object_limit(1024)


def auto_bin(shape: tuple[int, int], bayer: str | None, max_detect_pixels: int = 3_500_000) -> int:
    """Binning for detection on top of the CFA superpixel: 2 for a mono frame of more than
    `max_detect_pixels`, else 1. Never more: a total reduction beyond 2 squeezes a 3-px star
    under one detection pixel, where it no longer passes as a star (measured at 6248x4176:
    reduction 4 found 108 of ~1200 stars). Positions and sizes are re-measured on the full
    frame afterwards (`refine_fullres`), so binning costs no accuracy."""
    if bayer is not None:
        return 1
    return 2 if shape[0] * shape[1] > max_detect_pixels else 1


def measure(
    image: np.ndarray,
    bayer: str | None = None,
    plate_scale: float | None = None,
    *,
    bin_factor: int | None = None,
    max_stars: int = 500,
    thresh: float = 5.0,
    refine: bool = True,
) -> tuple[Stars, FrameMetrics]:
    """Detect stars on the frame's luminance and summarise the frame.

    `image` is a calibrated 2-D frame (CFA mosaic when `bayer` is set) in ADU; `plate_scale`
    in arcsec/px gives `fwhm_arcsec`. `bin_factor=None` picks binning by frame size (see
    `auto_bin`). Positions are full-resolution frame pixels whatever the binning.
    """
    if bin_factor is None:
        bin_factor = auto_bin(image.shape[:2], bayer)
    k = reduction(bayer, bin_factor)
    lum = luminance(image, bayer, bin_factor)
    refining = k > 1 or refine
    stars, bkg, rms, sizes = detect_stars(lum, thresh=thresh, max_stars=max_stars, reduction_factor=k,
                                          _return_bkg=True, _owned=lum is not image, _windowed=not refining)
    stars.shape = tuple(image.shape[:2])
    if len(stars) and refining:
        # Positions and sizes from the full-resolution pixels: on a reduced image a small
        # star is undersampled, its FWHM comes out 5-20 % too big (measured, k = 2).
        full = np.asarray(image)
        rx, ry, rf, re = refine_fullres(full, stars.x, stars.y, bayer, stars.fwhm)
        g0 = np.nanmedian(stars.fwhm)
        g1 = np.nanmedian(rf) if np.isfinite(rf).any() else g0
        if abs(g1 / g0 - 1.0) > 0.15:  # the reduced image misjudged the size: redo with it
            rx, ry, rf, re = refine_fullres(full, stars.x, stars.y, bayer, np.where(np.isfinite(rf), rf, g1))
        # Where the full frame gives no centroid or size (edge, no profile): those of the
        # detection image, measured for these stars only.
        miss = ~(np.isfinite(rx) & np.isfinite(ry))
        if miss.any():
            rx, ry = rx.copy(), ry.copy()
            rx[miss], ry[miss] = sizes.windowed(miss)
        stars.x, stars.y = rx, ry
        miss = ~np.isfinite(rf)
        rf[miss] = sizes.fwhm(miss)
        stars.fwhm = rf
        stars.hfr = stars.fwhm / 2.0
        stars.ellipticity = np.where(np.isfinite(re), re, stars.ellipticity)
    # Quality medians from the brightest well-measured stars (not saturated giants, not
    # the faint noisy tail): the 10th..90th percentile in flux of the measured list.
    if len(stars):
        n = len(stars)
        sel = slice(int(0.1 * n), max(int(0.9 * n), 1)) if n >= 10 else slice(0, n)
        fwhm = float(np.nanmedian(stars.fwhm[sel]))
        ell = stars.ellipticity
        saturated = saturated_stars(np.asarray(image), stars)
        if bayer is not None and k == 2 and np.isfinite(fwhm):
            # Shape of a colour frame on the superpixel luminance (the detection image): on
            # the mosaic's green checkerboard the moments of an undersampled star read too
            # elongated and follow the true shape poorly (see `shape_on_luminance`).
            ell = shape_on_luminance(lum, stars, fwhm)
        ecc, elong = shape_summary(stars, np.where(saturated, np.nan, ell), fwhm)
    else:
        fwhm = ecc = elong = None
    metrics = FrameMetrics(
        n_stars=stars.n_total,
        fwhm_px=fwhm,
        fwhm_arcsec=(fwhm * plate_scale) if (fwhm is not None and plate_scale) else None,
        eccentricity=ecc,
        background=float(bkg.globalback),
        # Mean of k*k pixels has 1/k of the per-pixel noise (for a mosaic, an average over
        # the colour channels).
        noise=rms * k,
        hfr_px=(fwhm / 2.0) if fwhm is not None else None,
        elongation=elong,
    )
    return stars, metrics
