"""Hot, cold and dead pixels: find them in the masters, repair them in every light.

A defect map is a boolean array (True = do not trust this pixel). Repair replaces each
defect by the median of its same-colour neighbours: on a Bayer mosaic those are 2 px away
(the 8 pixels at distance 2 have the same filter), on a mono sensor the 8 adjacent pixels.
"""

from __future__ import annotations

import cv2
import numpy as np
from scipy import ndimage

from daemon.pipeline.cfa import cfa_planes

#: Hot pixel: dark current this many robust sigmas above the master dark's median.
DARK_KAPPA = 8.0
#: Dead/cold or over-sensitive pixel: normalised flat this far (fraction) from its local median.
FLAT_TOLERANCE = 0.3


#: A defect map flagging more than this fraction of the sensor is not a map of defects but of
#: a noise scale that went wrong (or a master of the wrong kind): warned about, not applied.
MAX_DEFECT_FRACTION = 0.005


def _sample(values: np.ndarray) -> np.ndarray:
    sample = np.asarray(values).ravel()
    if sample.size > 2_000_000:  # a strided sample is plenty for quantiles
        sample = sample[:: sample.size // 1_000_000]
    return sample[np.isfinite(sample)].astype(np.float64)


def quantisation_step(values: np.ndarray) -> float:
    """Smallest difference between distinct values of a master (ADU): 1 for an integer
    master, ~0 for a float one (0 with fewer than two distinct values)."""
    distinct = np.unique(_sample(values)[:200_000])
    return float(np.min(np.diff(distinct))) if distinct.size > 1 else 0.0


def noise_scale(values: np.ndarray, read_noise_adu: float = 0.0, step: float | None = None) -> tuple[float, float]:
    """(median, robust sigma) of a master's pixels (ADU), safe on quantised data.

    The MAD alone is 0 on an integer master whose noise is below 1 ADU (most pixels equal the
    median), and small on a dark clipped at 0 (bias-free, stored unsigned). So the sigma is
    the largest of: 1.4826 MAD; half the distance from the median to the 97.7th or the 2.3rd
    percentile (2 sigma each side of a normal distribution, whichever side is not clipped;
    hot pixels are far fewer than 2.3 %); the quantisation step `step` (default: that of
    `values`, 1 ADU for an integer master: the noise cannot be resolved below it); and
    `read_noise_adu`, the sensor's read noise where known (a master of N frames has
    read_noise / sqrt(N): give that).
    """
    sample = _sample(values)
    if sample.size == 0:
        return 0.0, 0.0
    med = float(np.median(sample))
    mad = 1.4826 * float(np.median(np.abs(sample - med)))
    lo, hi = np.percentile(sample, [2.275, 97.725])
    spread = max(hi - med, med - lo) / 2.0
    if step is None:
        step = quantisation_step(values)
    return med, max(mad, spread, step, float(read_noise_adu))


#: The local dark level is the median of this many px square around each pixel (of its own
#: colour on a mosaic): it follows amp glow and gradients, which are smooth on this scale,
#: while a hot pixel, or a cluster of up to 12 of them, stands out of it.
LOCAL_MEDIAN_PX = 5


def _local_residual(plane: np.ndarray) -> np.ndarray:
    """`plane` minus its `LOCAL_MEDIAN_PX` running median (float32; non-finite pixels count
    at the plane's median and stay non-finite in the result)."""
    x = np.array(plane, dtype=np.float32, order="C")
    finite = np.isfinite(x)
    if not finite.all():
        x[~finite] = np.median(x[finite]) if finite.any() else 0.0
    level = cv2.medianBlur(x, LOCAL_MEDIAN_PX)
    x -= level
    x[~finite] = np.nan
    return x


def defects_from_dark(dark: np.ndarray, bayer: str | None = None, kappa: float = DARK_KAPPA,
                      read_noise_adu: float = 0.0) -> np.ndarray:
    """Hot (and stuck-low) pixels of a master dark: beyond `kappa` robust sigmas of their
    local dark level.

    Each pixel is compared with the median of the `LOCAL_MEDIAN_PX` square around it (of its
    own colour on a mosaic, whose channels may have their own black levels), not with the
    frame's median: amp glow or a gradient then neither passes for hot pixels nor inflates the
    noise scale until real hot pixels hide below it. The scale is `noise_scale` of those
    deviations, floored at the dark's own quantisation step.

    Parameters
    ----------
    dark : the master dark's signal (ADU at the dark's exposure), float or integer, with or
        without its bias (only deviations from the local level count).
    bayer : CFA pattern of the sensor ("RGGB", ...), None for mono.
    kappa : threshold (sigma of `noise_scale`).
    read_noise_adu : noise floor where the sensor's read noise is known (ADU; 0 = unknown).

    Returns a boolean map, True = defect. Check its fraction (`MAX_DEFECT_FRACTION`) before
    applying it.
    """
    dark = np.asarray(dark)
    dev = np.empty(dark.shape, np.float32)
    for sl in cfa_planes(dark.shape, bayer):
        dev[sl] = _local_residual(dark[sl])
    med, sigma = noise_scale(dev, read_noise_adu, step=quantisation_step(dark))
    level = float(np.median(_sample(dark))) if dark.size else 0.0
    sigma = max(sigma, 1e-3 * max(abs(level), 1.0))
    with np.errstate(invalid="ignore"):
        return (dev - np.float32(med) > kappa * sigma) | (dev - np.float32(med) < -kappa * sigma)


def defects_from_flat(flat: np.ndarray, bayer: str | None, tolerance: float = FLAT_TOLERANCE,
                      size: int = 5) -> np.ndarray:
    """Pixels whose response differs from their same-colour neighbourhood by > `tolerance`.

    Compared with the mean of the surrounding `size` x `size` same-colour pixels (centre
    excluded), so vignetting and dust shadows, which are smooth, are not mistaken for
    defects; non-positive or non-finite values are defects too. A box mean rather than a
    median: 26 MP in ~1 s instead of ~13 s, and one defect moves its neighbours' mean by
    only 1/24 of its error, far inside the tolerance.
    """
    flat = np.asarray(flat, dtype=np.float32)
    out = ~np.isfinite(flat) | (flat <= 0)
    for sl in cfa_planes(flat.shape, bayer):
        plane = np.nan_to_num(flat[sl], nan=0.0)
        box = ndimage.uniform_filter(plane, size=size, mode="reflect") * np.float32(size * size)
        local = (box - plane) / np.float32(size * size - 1)
        with np.errstate(invalid="ignore", divide="ignore"):
            ratio = np.where(local > 0, plane / local, 0.0)
        out[sl] |= (ratio < 1 - tolerance) | (ratio > 1 + tolerance)
    return out


class DefectRepair:
    """A defect map turned into a repair plan once, applied to every light in place.

    Finding the defects (`np.nonzero` of a 26 MP map) and their valid same-colour neighbours
    costs ~70 ms per frame; both depend on the map only, so they are done here once (per
    `Masters`). `apply` then gathers at most 8 neighbour values per defect and writes the
    medians back: microseconds for the usual few thousand defects.

    Same result as the rule in `repair_defects`: each defect becomes the median of its valid
    (in-frame, non-defect) same-colour neighbours at 1 step (1 px mono, 2 px CFA), else at
    2 steps; with none at either it is left as it is.
    """

    def __init__(self, defects: np.ndarray, bayer: str | None):
        defects = np.asarray(defects, dtype=bool)
        self.shape: tuple[int, int] = tuple(defects.shape)  # type: ignore[assignment]
        h, w = self.shape
        ys, xs = np.nonzero(defects)
        step = 2 if bayer else 1
        targets, tables = [], []
        pending = np.arange(ys.size)
        for reach in (step, 2 * step):
            if pending.size == 0:
                break
            offs = [(dy, dx) for dy in (-reach, 0, reach) for dx in (-reach, 0, reach) if dy or dx]
            py, px = ys[pending], xs[pending]
            nbr = np.full((py.size, len(offs)), -1, dtype=np.int64)
            for k, (dy, dx) in enumerate(offs):
                ny, nx = py + dy, px + dx
                ok = (ny >= 0) & (ny < h) & (nx >= 0) & (nx < w)
                ok[ok] &= ~defects[ny[ok], nx[ok]]
                nbr[ok, k] = ny[ok] * w + nx[ok]
            have = (nbr >= 0).any(axis=1)
            targets.append(py[have].astype(np.int64) * w + px[have])
            tables.append(nbr[have])
            pending = pending[~have]
        #: Flat (row-major) index of each repairable defect, and of its valid neighbours
        #: (-1 = none), one row of 8 per defect.
        self.targets = np.concatenate(targets) if targets else np.zeros(0, np.int64)
        nbr = np.concatenate(tables) if tables else np.zeros((0, 8), np.int64)
        self._valid = nbr >= 0
        self._count = self._valid.sum(axis=1)
        self._nbr = np.where(self._valid, nbr, 0)
        self.n_defects = int(ys.size)

    def apply(self, data: np.ndarray) -> np.ndarray:
        """Repair `data` (float32, C-contiguous, the map's shape) in place; returns it."""
        if data.shape != self.shape:
            raise ValueError(f"defect map is {self.shape[1]}x{self.shape[0]} px, the frame "
                             f"{data.shape[1]}x{data.shape[0]} px")
        if self.targets.size == 0:
            return data
        flat = data.reshape(-1)  # a view for a contiguous array: writes reach `data`
        if not np.shares_memory(flat, data):
            raise ValueError("DefectRepair.apply needs a C-contiguous array")
        vals = flat[self._nbr]
        vals[~self._valid] = np.nan
        vals = np.sort(vals, axis=1)  # NaN (no neighbour) sorts last
        rows = np.arange(vals.shape[0])
        lo = vals[rows, (self._count - 1) // 2]
        hi = vals[rows, self._count // 2]
        # As np.nanmedian: the middle value, or the mean of the two middle ones.
        flat[self.targets] = np.where(lo == hi, lo, (lo + hi) * np.float32(0.5))
        return data


def repair_defects(data: np.ndarray, defects: np.ndarray, bayer: str | None) -> np.ndarray:
    """Copy of `data` with each defect replaced by the median of valid same-colour neighbours.

    Defects with no valid neighbour at distance 1 step are tried at 2 steps; if still none
    (a large dead block), the value is left as it is. For many frames with one map, build a
    `DefectRepair` once and `apply` it in place instead.
    """
    out = np.array(data, dtype=np.float32, copy=True, order="C")
    return DefectRepair(defects, bayer).apply(out)
