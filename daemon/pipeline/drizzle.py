"""Bayer drizzle: each CFA sample dropped onto the output grid through the frame's transform.

Why: bilinear demosaicing invents two of every pixel's three colours from its neighbours,
which widens stars (a red or blue sample is spread over a 3x3 neighbourhood) and then the
warp interpolates once more. A dithered session samples every output pixel in every colour
over its frames, so the final re-stack can use only measured samples: each CFA sample is a
square drop of side `pixfrac` (in input pixels) centred on the sample, mapped into the
reference with the frame's transform (its centre exactly, its size by the transform's scale;
the drop stays axis-aligned, as in "turbo" drizzle, which for the fractions of a degree of
field rotation a session has changes nothing measurable), and adds its value to the output
pixels it overlaps, weighted by the overlap area, in its own colour plane only. Each output
pixel's value is the weighted mean of the drops it received (ADU per pixel, like the input);
NaN where none landed (a hole of this frame, filled by the other dithered frames in the
re-stack, which ignores NaN).

The trade-off: stars as sharp as the optics and the dithering allow, for more noise per
pixel than interpolation gives (interpolation averages neighbouring samples' noise), a
little more at a matched scale; smaller drops (`pixfrac`) sharpen and add noise
(tests/test_drizzle.py measures both against bilinear on synthetic truth;
bench/PERFORMANCE.md has the figures).

Pure numpy/numba, no I/O. Used by `daemon.pipeline.fused.RegisteredView` for the final
re-stack of spooled mosaics when `stack.debayer = "drizzle"` (`drizzle_restack`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numba
import numpy as np

from daemon.pipeline.debayer import _check_pattern
from daemon.pipeline.restack import RestackResult, RestackSettings, clip_samples


def drizzle_sums(mosaic: np.ndarray, bayer: str, matrix: np.ndarray, r0: int, r1: int, *,
                 pixfrac: float = 0.7, width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The drops of one calibrated mosaic on output rows r0..r1: (sum of overlap x value,
    sum of overlap), each (r1 - r0, width, 3) float32; the first over the second is the
    frame's drizzled image, the second its coverage weight per pixel and colour.

    mosaic: (H, W) float32 or float16 (a spool memmap), ADU; bayer: its CFA pattern; matrix:
    frame -> reference (3x3, affine, full-resolution pixels); pixfrac: drop side as a
    fraction of an input pixel (0 < pixfrac <= 1); width: output columns (default W). Only
    the mosaic rows whose drops can reach the band are read. ValueError on a non-affine
    matrix or a pixfrac out of range."""
    pattern = _check_pattern(bayer)
    m = np.asarray(matrix, np.float64)
    if not np.allclose(m[2], [0.0, 0.0, 1.0]):
        raise ValueError("drizzle needs an affine matrix")
    if not 0 < pixfrac <= 1:
        raise ValueError(f"drizzle pixfrac must be in (0, 1], got {pixfrac}")
    h, w = mosaic.shape
    width = w if width is None else int(width)
    scale = float(np.sqrt(abs(np.linalg.det(m[:2, :2]))))
    half = 0.5 * pixfrac * scale
    # Source rows whose drop can touch output rows r0..r1 (drop centres within half + 0.5).
    inv = np.linalg.inv(m)
    reach = (half + 1.0) / max(scale, 1e-9) + 1.0
    xs = np.array([0.0, width - 1.0, 0.0, width - 1.0])
    ys = np.array([r0, r0, r1 - 1.0, r1 - 1.0])
    sy = inv[1, 0] * xs + inv[1, 1] * ys + inv[1, 2]
    s0 = int(np.clip(np.floor(sy.min() - reach), 0, h))
    s1 = int(np.clip(np.ceil(sy.max() + reach) + 1, 0, h))
    num = np.zeros((max(r1 - r0, 0), width, 3), np.float32)
    den = np.zeros((max(r1 - r0, 0), width, 3), np.float32)
    if s1 > s0 and r1 > r0:
        src = np.asarray(mosaic[s0:s1], np.float32)
        colour = np.array(["RGB".index(c) for c in pattern], np.int64)
        _drop(src, s0, colour, m, half, r0, num, den)
    return num, den


def drizzle_rows(mosaic: np.ndarray, bayer: str, matrix: np.ndarray, r0: int, r1: int, *,
                 pixfrac: float = 0.7, width: int | None = None) -> np.ndarray:
    """Output rows r0..r1 of the Bayer drizzle of one calibrated mosaic (parameters as
    `drizzle_sums`): (r1 - r0, width, 3) float32 ADU, NaN where no drop of a colour landed."""
    num, den = drizzle_sums(mosaic, bayer, matrix, r0, r1, pixfrac=pixfrac, width=width)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan).astype(np.float32)


def drizzle_restack(frames: Sequence, weights: np.ndarray, scales: np.ndarray,
                    settings: RestackSettings | None = None) -> RestackResult:
    """The final re-stack of spooled mosaics by Bayer drizzle, with rejection.

    Why rejection is decided on the interpolated frames: a drizzled plane samples a star's
    core at a different offset in every frame (a red sample every 2 px), so its values
    scatter far more than the noise and sigma clipping of them takes out the brightest core
    samples (measured on synthetic truth: red and blue star fluxes 2-4 % low). Each pixel's
    samples are therefore judged (winsorized sigma clipping, `daemon.pipeline.restack`) on
    the bilinear + warp frames, which trails and hot pixels spoil just as much, and the
    frames kept are combined as drizzle does: sum of weight x overlap x value over sum of
    weight x overlap, per colour. A pixel no kept drop reached takes the interpolated mean
    (no holes).

    frames: `daemon.pipeline.fused.RegisteredView`s (`interpolated` and `drizzled` row
    methods, in stored units); weights, scales per frame (stored units x scale = ADU)."""
    settings = settings or RestackSettings()
    shape = tuple(frames[0].shape)
    n = len(frames)
    w = np.asarray(weights, np.float64)
    sc = np.asarray(scales, np.float32)
    row_elems = int(np.prod(shape[1:]))
    rows = max(1, settings.band_bytes // (3 * 4 * n * row_elems))
    out = np.empty(shape, np.float32)
    rl = rh = 0
    for r0 in range(0, shape[0], rows):
        r1 = min(r0 + rows, shape[0])
        dec = np.empty((n, r1 - r0) + shape[1:], np.float32)
        val = np.empty_like(dec)
        cov = np.empty_like(dec)
        for i, f in enumerate(frames):
            dec[i] = f.interpolated(r0, r1) * sc[i]
            v, c = f.drizzled(r0, r1)
            val[i], cov[i] = v * sc[i], c
        mean, rej = _clip_drizzle(dec.reshape(n, -1), val.reshape(n, -1), cov.reshape(n, -1), w,
                                  settings.kappa_low, settings.kappa_high, settings.iterations,
                                  settings.winsor_cut, settings.min_frames)
        out[r0:r1] = mean.reshape((r1 - r0,) + shape[1:])
        totals = rej.sum(axis=0)
        rl, rh = rl + int(totals[0]), rh + int(totals[1])
    return RestackResult(out, rl, rh, n)


@numba.njit(parallel=True, cache=True, nogil=True)
def _clip_drizzle(d, val, cov, weights, kappa_low, kappa_high, iterations, cut, min_frames):  # pragma: no cover
    """`restack._clip_kernel` deciding on `d` and averaging `val` by weight x `cov`."""
    nf, npx = d.shape
    out = np.empty(npx, np.float32)
    rej = np.zeros((npx, 2), np.int32)
    chunk = 4096
    for b in numba.prange((npx + chunk - 1) // chunk):
        v = np.empty(nf, np.float64)
        k_of = np.empty(nf, np.int64)
        srt = np.empty(nf, np.float64)
        for p in range(b * chunk, min((b + 1) * chunk, npx)):
            n = 0
            for k in range(nf):
                x = d[k, p]
                if math.isfinite(x):
                    v[n] = x
                    k_of[n] = k
                    n += 1
            if n == 0:
                out[p] = np.nan
                continue
            n = clip_samples(v, k_of, n, srt, rej[p], kappa_low, kappa_high, iterations, cut, min_frames)
            total = 0.0
            wsum = 0.0
            itotal = 0.0
            iwsum = 0.0
            for k in range(n):
                kk = k_of[k]
                itotal += v[k] * weights[kk]
                iwsum += weights[kk]
                c = cov[kk, p]
                x = val[kk, p]
                if c > 0 and math.isfinite(x):
                    total += x * weights[kk] * c
                    wsum += weights[kk] * c
            if wsum > 0:
                out[p] = total / wsum
            else:
                out[p] = itotal / iwsum if iwsum > 0 else np.nan
    return out, rej


@numba.njit(cache=True, nogil=True)
def _drop(src, s0, colour, m, half, r0, num, den):  # pragma: no cover - numba
    """Add every finite sample of `src` (mosaic rows s0..) as a drop of half-side `half`
    (output pixels) centred on m @ (x, y) into num/den (output rows r0..)."""
    bh, bw = num.shape[0], num.shape[1]
    for k in range(src.shape[0]):
        y = s0 + k
        for x in range(src.shape[1]):
            v = src[k, x]
            if not np.isfinite(v):
                continue
            c = colour[(y & 1) * 2 + (x & 1)]
            cx = m[0, 0] * x + m[0, 1] * y + m[0, 2]
            cy = m[1, 0] * x + m[1, 1] * y + m[1, 2] - r0
            ylo, yhi = cy - half, cy + half
            xlo, xhi = cx - half, cx + half
            iy0 = max(int(np.floor(ylo + 0.5)), 0)
            iy1 = min(int(np.floor(yhi + 0.5)), bh - 1)
            ix0 = max(int(np.floor(xlo + 0.5)), 0)
            ix1 = min(int(np.floor(xhi + 0.5)), bw - 1)
            for iy in range(iy0, iy1 + 1):
                oy = min(yhi, iy + 0.5) - max(ylo, iy - 0.5)
                if oy <= 0:
                    continue
                for ix in range(ix0, ix1 + 1):
                    ox = min(xhi, ix + 0.5) - max(xlo, ix - 0.5)
                    if ox <= 0:
                        continue
                    a = ox * oy
                    num[iy, ix, c] += a * v
                    den[iy, ix, c] += a
