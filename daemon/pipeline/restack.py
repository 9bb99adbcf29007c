"""Final re-stack: winsorized sigma clipping over all registered frames, in row bands.

The live stack has to decide about each sample when it arrives; at the end of the session
every frame is available (spooled on disk), so each pixel can be judged against all of its
samples at once. Winsorized sigma clipping (as in PixInsight's ImageIntegration) estimates
each pixel's centre by the median and its dispersion by the standard deviation of the
samples winsorized at +-1.5 sigma, which a single satellite cannot inflate, then rejects
beyond kappa_low/kappa_high sigma and repeats until nothing changes.

The clipping is chosen by the number of samples, as Siril and PixInsight advise: below
`min_frames` (5) no estimate of a pixel's spread is good enough to reject by, and clipping
only costs noise, so a pixel of 3 or 4 samples is their plain weighted mean (what the live
stack is then). The sigma has Bessel's correction (n - 1), which matters at 5-10 samples.

Frames are read in row bands sized to a memory budget, so a session of any length needs
only `band_bytes` of working memory plus the output. Each pixel's samples are clipped in a
numba kernel (sort, winsorize, reject, in per-thread scratch): 6.5x faster than the numpy
formulation with nanmedian/nanstd over the band (20 frames x 3 M values: 4.5 s vs 30 s).
Pure: frames are any array-likes (numpy memmaps of the spool in practice).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numba
import numpy as np


@dataclass(frozen=True)
class RestackSettings:
    """kappa_low / kappa_high: rejection thresholds below / above the median (sigma).
    iterations: maximum rejection passes. winsor_cut: winsorizing bound (sigma).
    min_frames: below this many samples a pixel is only averaged, never clipped (count).
    band_bytes: working memory per band (bytes)."""

    kappa_low: float = 4.0
    kappa_high: float = 3.0
    iterations: int = 5
    winsor_cut: float = 1.5
    min_frames: int = 5
    band_bytes: int = 64 << 20


@dataclass
class RestackResult:
    image: np.ndarray  # float32 (H, W) or (H, W, C), NaN where no frame has data
    rejected_low: int  # samples rejected below / above the median
    rejected_high: int
    n_frames: int


@numba.njit(inline="always")
def _sort(a, n):
    """Insertion sort of a[:n] in place (n is a few hundred at most: no allocation)."""
    for i in range(1, n):
        x = a[i]
        j = i - 1
        while j >= 0 and a[j] > x:
            a[j + 1] = a[j]
            j -= 1
        a[j + 1] = x


@numba.njit(inline="always")
def _winsorized_sigma(v, n, med, cut):
    """Robust sigma of v[:n] (n >= 2): the std (n - 1 in the denominator) of the samples
    clipped (not removed) to med +- cut*sigma, iterated to convergence, times 1.134 to be
    unbiased for a normal distribution at 1.5."""
    mean = 0.0
    for k in range(n):
        mean += v[k]
    mean /= n
    var = 0.0
    for k in range(n):
        var += (v[k] - mean) ** 2
    sigma = math.sqrt(var / (n - 1))
    for _ in range(10):
        lo, hi = med - cut * sigma, med + cut * sigma
        mean = 0.0
        for k in range(n):
            mean += min(max(v[k], lo), hi)
        mean /= n
        var = 0.0
        for k in range(n):
            var += (min(max(v[k], lo), hi) - mean) ** 2
        new = 1.134 * math.sqrt(var / (n - 1))
        if abs(new - sigma) <= 5e-4 * sigma:
            return new
        sigma = new
    return sigma


@numba.njit(inline="always")
def clip_samples(v, carry, n, srt, rej_row, kappa_low, kappa_high, iterations, cut, min_frames):
    """Winsorized sigma clipping of one pixel's samples v[:n] in place: up to `iterations`
    rounds while at least `min_frames` samples are left, each keeping the samples within
    median - kappa_low * sigma .. median + kappa_high * sigma (sigma: `_winsorized_sigma`);
    `carry[:n]` (a weight or a frame index per sample) is kept in step with v. Rejections are
    counted in rej_row[0] (low) and rej_row[1] (high); srt is scratch of v's size. Returns
    the samples left."""
    for _ in range(iterations):
        if n < min_frames:
            break
        for k in range(n):
            srt[k] = v[k]
        _sort(srt, n)
        med = srt[n // 2] if n % 2 else 0.5 * (srt[n // 2 - 1] + srt[n // 2])
        sigma = _winsorized_sigma(v, n, med, cut)
        lo, hi = med - kappa_low * sigma, med + kappa_high * sigma
        m = 0
        for k in range(n):
            if v[k] < lo:
                rej_row[0] += 1
            elif v[k] > hi:
                rej_row[1] += 1
            else:
                v[m] = v[k]
                carry[m] = carry[k]
                m += 1
        if m == n:
            break
        n = m
    return n


@numba.njit(parallel=True, cache=True, nogil=True)
def _clip_kernel(d, weights, kappa_low, kappa_high, iterations, cut, min_frames):
    """Per pixel (column of d, shape (N, P)): winsorized sigma clipping, then the weighted
    mean of what is left. Returns (mean (P,), rejected low (P,), rejected high (P,))."""
    nf, npx = d.shape
    out = np.empty(npx, np.float32)
    rej = np.zeros((npx, 2), np.int32)
    chunk = 4096
    for b in numba.prange((npx + chunk - 1) // chunk):
        v = np.empty(nf, np.float64)  # the pixel's live samples
        wv = np.empty(nf, np.float64)  # and their weights
        srt = np.empty(nf, np.float64)
        for p in range(b * chunk, min((b + 1) * chunk, npx)):
            n = 0
            for k in range(nf):
                x = d[k, p]
                if math.isfinite(x):
                    v[n] = x
                    wv[n] = weights[k]
                    n += 1
            if n == 0:
                out[p] = np.nan
                continue
            n = clip_samples(v, wv, n, srt, rej[p], kappa_low, kappa_high, iterations, cut, min_frames)
            total = 0.0
            wsum = 0.0
            for k in range(n):
                total += v[k] * wv[k]
                wsum += wv[k]
            out[p] = total / wsum if wsum > 0 else np.nan
    return out, rej


def clip_band(d: np.ndarray, weights: np.ndarray, settings: RestackSettings) -> tuple[np.ndarray, int, int]:
    """Combine one band: d is (N, ...) float32 with NaN for no data. Returns (weighted mean
    of shape d.shape[1:], samples rejected low, samples rejected high)."""
    flat = d.reshape(d.shape[0], -1)
    mean, rej = _clip_kernel(flat, np.asarray(weights, np.float64), settings.kappa_low, settings.kappa_high,
                             settings.iterations, settings.winsor_cut, settings.min_frames)
    totals = rej.sum(axis=0)
    return mean.reshape(d.shape[1:]), int(totals[0]), int(totals[1])


def restack(
    frames: Sequence[np.ndarray],
    weights: Sequence[float] | None = None,
    scales: Sequence[float] | None = None,
    settings: RestackSettings = RestackSettings(),
) -> RestackResult:
    """Winsorized sigma-clipped weighted mean of registered frames (all the same shape).

    scales: per-frame factor applied to the stored values (the spool stores float16 scaled
    into range); None = 1.
    """
    if not frames:
        raise ValueError("restack needs at least one frame")
    shape = tuple(frames[0].shape)
    for i, f in enumerate(frames):
        if tuple(f.shape) != shape:
            raise ValueError(f"frame {i} has shape {tuple(f.shape)}, expected {shape}")
    n = len(frames)
    w = np.ones(n, np.float32) if weights is None else np.asarray(weights, np.float32)
    sc = np.ones(n, np.float32) if scales is None else np.asarray(scales, np.float32)
    combine = getattr(frames[0], "combine_frames", None)
    if combine is not None:  # frames that say how they combine (spooled mosaics: Bayer drizzle)
        return combine(frames, w, sc, settings)
    row_elems = int(np.prod(shape[1:]))
    # The band of all frames is the only big buffer (float32, N x rows x row_elems).
    rows = max(1, settings.band_bytes // (4 * n * row_elems))
    out = np.empty(shape, np.float32)
    band = np.empty((n, min(rows, shape[0])) + shape[1:], np.float32)
    rl = rh = 0
    for r0 in range(0, shape[0], rows):
        r1 = min(r0 + rows, shape[0])
        d = band[:, : r1 - r0]
        for i, f in enumerate(frames):
            d[i] = f[r0:r1]
            if sc[i] != 1:
                d[i] *= sc[i]
        out[r0:r1], nl, nh = clip_band(d, w, settings)
        rl, rh = rl + nl, rh + nh
    return RestackResult(out, rl, rh, n)
