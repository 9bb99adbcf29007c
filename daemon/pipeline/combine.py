"""Pixel-wise combination of a stack of frames (axis 0): sigma-clipped mean or median.

Pure functions on one *band* of rows (N frames x h rows x W columns): the caller decides
how many rows fit in memory (`band_rows`) and feeds band after band, so the working set is
a few times N*h*W*4 bytes whatever the frame size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

METHODS = ("sigma", "median")
#: float32 temporaries alive at once per input element in `sigma_clip_mean` (stack copy for
#: the median, deviations, masked values, masks): used to size bands.
WORKING_COPIES = 5


@dataclass
class CombineResult:
    data: np.ndarray  # (h, W) float32
    rejected: int     # input pixels rejected as outliers


def band_rows(n_frames: int, width: int, memory_bytes: int, *, multiple: int = 2) -> int:
    """Rows per band so that a band's working set stays within `memory_bytes`.

    Always at least `multiple` rows and a multiple of it (2 keeps CFA row parity)."""
    per_row = max(1, n_frames * width * 4 * WORKING_COPIES)
    rows = max(multiple, memory_bytes // per_row)
    return int(rows - rows % multiple)


def median_combine(stack: np.ndarray) -> CombineResult:
    """Pixel-wise median, NaN (no data) ignored."""
    stack = np.asarray(stack, dtype=np.float32)
    if np.isnan(stack).any():
        return CombineResult(np.nanmedian(stack, axis=0).astype(np.float32), 0)
    return CombineResult(np.median(stack, axis=0).astype(np.float32), 0)


def sigma_clip_mean(stack: np.ndarray, kappa: float = 3.0, *, kappa_low: float | None = None,
                    iterations: int = 5) -> CombineResult:
    """Mean of each pixel's values after iterative kappa-sigma rejection.

    The first pass measures spread robustly (median and 1.4826 * MAD), so a single huge
    outlier among few frames (a cosmic ray in one of 5 biases) cannot hide by inflating the
    standard deviation; later passes use mean and standard deviation of the survivors.
    Pixels where everything would be rejected keep the median. NaN counts as missing.
    With fewer than 3 frames there is nothing to vote with: plain mean.
    """
    x = np.asarray(stack, dtype=np.float32)
    n = x.shape[0]
    k_hi, k_lo = float(kappa), float(kappa if kappa_low is None else kappa_low)
    finite = np.isfinite(x)
    all_finite = bool(finite.all())
    if n < 3:
        with np.errstate(invalid="ignore"):
            return CombineResult(np.nanmean(x, axis=0).astype(np.float32) if not all_finite
                                 else x.mean(axis=0, dtype=np.float32), 0)
    median = (np.median(x, axis=0) if all_finite else np.nanmedian(x, axis=0)).astype(np.float32)
    dev = x - median
    absdev = np.abs(dev)
    sigma = 1.4826 * (np.median(absdev, axis=0) if all_finite else np.nanmedian(absdev, axis=0))
    del absdev
    # With few frames a pixel's own MAD is often tiny by chance and would reject good values:
    # the band's typical spread is a floor (pixels of one band share read and sky noise).
    floor = np.float32(np.nanmedian(sigma))
    sigma = np.maximum(sigma, floor)
    keep = _within(dev, sigma, k_lo, k_hi)
    if not all_finite:
        keep &= finite
    for _ in range(iterations - 1):
        count = keep.sum(axis=0)
        vals = np.where(keep, x, 0.0)
        mean = vals.sum(axis=0, dtype=np.float64) / np.maximum(count, 1)
        dev = x - mean.astype(np.float32)
        vals = np.where(keep, dev, 0.0)
        var = (vals.astype(np.float32) ** 2).sum(axis=0, dtype=np.float64) / np.maximum(count - 1, 1)
        del vals
        new_keep = _within(dev, np.maximum(np.sqrt(var).astype(np.float32), floor), k_lo, k_hi)
        if not all_finite:
            new_keep &= finite
        # Only ever reject more: a pixel rejected by the robust first pass stays rejected.
        new_keep &= keep
        if np.array_equal(new_keep, keep):
            break
        keep = new_keep
    count = keep.sum(axis=0)
    total = np.where(keep, x, 0.0).sum(axis=0, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(count > 0, total / np.maximum(count, 1), median)
    rejected = int(finite.sum() - keep.sum())
    return CombineResult(mean.astype(np.float32), rejected)


def _within(dev: np.ndarray, sigma: np.ndarray, k_lo: float, k_hi: float) -> np.ndarray:
    # sigma == 0 (identical values) keeps exactly the values equal to the centre.
    return (dev <= k_hi * sigma) & (dev >= -k_lo * sigma)


def combine(stack: np.ndarray, method: str = "sigma", kappa: float = 3.0) -> CombineResult:
    if method == "sigma":
        return sigma_clip_mean(stack, kappa)
    if method == "median":
        return median_combine(stack)
    raise ValueError(f"unknown combine method {method!r}: use one of {', '.join(METHODS)}")
