"""Running weighted-mean stack with online outlier rejection, in memory independent of N.

Why this design: a Raspberry Pi cannot keep every frame of a session in RAM, yet satellites,
planes and hot pixels must be rejected *while* stacking. Per pixel we keep the weighted mean
and the weighted sum of squared deviations (West's weighted Welford update), the total
weight and a sample count. Once `warmup` frames have gone in, each new sample is compared
with the running mean: if any colour plane lies beyond `kappa` sigma the pixel of that frame
is left out (all planes together, because a trail or a hot pixel spoils the whole sample).

The warm-up is per pixel: a pixel's statistics are trusted once it holds `warmup` samples
(pixels near the border of a dithered session are covered by fewer frames and get there
later). Until then we also remember, per pixel, its two brightest samples (as IEEE half
floats) and which frames they came from. When a pixel's warm-up ends, where its two brightest
are both outliers against the remaining samples (two hits on one spot) both are removed from
the sums (the inverse Welford update); else the brightest is tested against the others
likewise. A satellite in frame 1 is therefore not locked in. The bookkeeping costs 2 x 2
bytes per pixel and plane for the first `3 * warmup` frames only; then pixels still short of
`warmup` samples get their re-check with what they have and the buffers are freed.

The per-pixel work is one fused pass in a numba kernel, parallel over rows: numpy needed
~25 full-size passes (0.7 s per 4144x2822 RGB frame on 2 cores, 2 s during the warm-up);
the kernel does it in one pass with no full-size temporaries (see bench/).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numba
import numpy as np

from daemon.pipeline.half import to_half

#: Frame index stored for "no warm-up sample here".
_NONE = 255


@dataclass(frozen=True)
class StackSettings:
    """Rejection parameters of the running stack.

    kappa: a sample further than kappa sigma from the running mean is rejected (sigma units).
    warmup: samples a pixel combines without rejection before its statistics are trusted
        (4..84).
    warmup_kappa: threshold for removing the brightest warm-up samples when the warm-up ends.
    sigma_floor: per-pixel sigma is never taken below this fraction of the frame-wide
        background sigma of its plane: a sigma estimated from a handful of samples is often
        far too small, and without the floor ~20 % of good background samples would be thrown
        away early in a session. Pixels on stars and nebula keep their own larger sigma.
    reject: False gives a plain weighted mean (no rejection, no warm-up bookkeeping).
    """

    kappa: float = 3.0
    warmup: int = 5
    warmup_kappa: float = 3.0
    sigma_floor: float = 1.0
    reject: bool = True


class RunningStack:
    """Weighted mean per pixel and plane of registered frames, with kappa-sigma rejection.

    Frames are (H, W) or (H, W, C) float32 in reference coordinates, NaN where the frame has
    no data (outside the warped area). Weights are relative (the reference frame ~1).
    """

    def __init__(self, shape: tuple[int, ...], settings: StackSettings = StackSettings()):
        if len(shape) not in (2, 3):
            raise ValueError(f"stack shape must be (H, W) or (H, W, C), got {shape}")
        if settings.reject and not 4 <= settings.warmup <= (_NONE - 1) // 3:
            raise ValueError(f"warmup must be 4..{(_NONE - 1) // 3} frames, got {settings.warmup}")
        self.settings = settings
        self.shape = tuple(int(s) for s in shape)
        h, w = self.shape[:2]
        c = self.shape[2] if len(self.shape) == 3 else 1
        self._planes = c
        # Internally always (H, W, C) so one code path serves mono and colour.
        # NaN until a pixel gets its first sample: the mean is the image, no copy needed.
        self.mean = np.full((h, w, c), np.nan, np.float32)
        self.m2 = np.zeros((h, w, c), np.float32)
        self.wsum = np.zeros((h, w), np.float32)
        self.count = np.zeros((h, w), np.uint16)
        self.n_frames = 0
        self.total_weight = 0.0
        self.rejected_pixels = 0  # samples rejected over the whole session
        self._noise = np.zeros(c, np.float32)  # background sigma per plane (ADU)
        # Warm-up: two brightest samples per pixel (float16 bits) and their frame index.
        self._top: list[np.ndarray] | None = None
        self._top_idx: list[np.ndarray] | None = None
        self._warm_weights: list[float] = []
        #: Frames after which the warm-up buffers are flushed and freed.
        self._track_frames = 3 * settings.warmup
        if settings.reject:
            self._top = [np.zeros((h, w, c), np.uint16) for _ in range(2)]
            self._top_idx = [np.full((h, w), _NONE, np.uint8) for _ in range(2)]

    # ------------------------------------------------------------------ public API
    @property
    def rejecting(self) -> bool:
        """True once (nearly) every pixel's warm-up is over and new samples are tested."""
        return self.settings.reject and self.n_frames >= self.settings.warmup

    def add(self, image: np.ndarray, weight: float = 1.0, offset: np.ndarray | float | None = None) -> int:
        """Add one registered frame; returns the number of pixels rejected from it.

        offset: added to the frame per plane (ADU) before combining, e.g. to bring each
        frame's sky background to the reference level.
        """
        img = image[..., None] if image.ndim == 2 else image
        if img.shape != self.mean.shape:
            raise ValueError(f"frame shape {image.shape} does not match the stack {self.shape}")
        if img.dtype != np.float32:
            raise TypeError(f"frames must be float32, got {img.dtype}")
        if not weight > 0:
            raise ValueError(f"frame weight must be > 0, got {weight}")
        off = np.zeros(self._planes, np.float32) if offset is None else np.broadcast_to(
            np.asarray(offset, np.float32), (self._planes,)).copy()
        s = self.settings
        tracking = self._top is not None
        if tracking:
            self._warm_weights.append(float(weight))
        top1, top2 = self._top if tracking else (_EMPTY_U16, _EMPTY_U16)
        idx1, idx2 = self._top_idx if tracking else (_EMPTY_U8, _EMPTY_U8)
        per_row = _add_frame(img, off, np.float32(weight), self.mean, self.m2, self.wsum, self.count,
                             s.reject, s.warmup, np.float32(s.kappa ** 2), np.float32(s.warmup_kappa ** 2),
                             self._floor2(), tracking, top1, top2, idx1, idx2, np.uint8(min(self.n_frames, _NONE - 1)),
                             self._weights_table(), _HALF_TABLE)
        self.n_frames += 1
        self.total_weight += float(weight)
        rejected = int(per_row[:, 0].sum())
        self.rejected_pixels += rejected + int(per_row[:, 1].sum())
        if s.reject and self.n_frames >= 2:
            self._noise[...] = self._noise_estimate()
        if tracking and self.n_frames >= self._track_frames:
            self.rejected_pixels += self._end_warmup()
        return rejected

    def image(self) -> np.ndarray:
        """The current stack, NaN where no frame has contributed: a read-only *view* (no
        full-size copy on a Pi), valid until the next `add`; copy it to keep it."""
        out = self.mean.reshape(self.shape) if len(self.shape) == 2 else self.mean.view()
        out.flags.writeable = False
        return out

    def sigma(self) -> np.ndarray:
        """Per-pixel sample standard deviation of the accepted samples (ADU)."""
        n = self.count.astype(np.float32)
        with np.errstate(divide="ignore", invalid="ignore"):
            scale = np.where((n > 1) & (self.wsum > 0), n / ((n - 1) * self.wsum), 0).astype(np.float32)
        out = np.sqrt(np.maximum(self.m2 * scale[..., None], 0))
        return out[..., 0] if len(self.shape) == 2 else out

    def state(self) -> dict:
        """Everything needed to resume exactly: numpy arrays and JSON-able scalars."""
        st = {
            "mean": self.mean, "m2": self.m2, "wsum": self.wsum, "count": self.count,
            "noise": self._noise, "n_frames": self.n_frames, "total_weight": self.total_weight,
            "rejected_pixels": self.rejected_pixels, "shape": list(self.shape),
            "settings": self.settings.__dict__.copy(),
        }
        if self._top is not None:
            st["top1"], st["top2"] = self._top
            st["top1_idx"], st["top2_idx"] = self._top_idx
            st["warm_weights"] = list(self._warm_weights)
        return st

    @classmethod
    def from_state(cls, state: dict, settings: StackSettings | None = None) -> RunningStack:
        """Resume from `state()`. `settings` (default: the saved ones) may differ, e.g. a
        changed kappa in the config: they apply from the next frame on."""
        stack = cls(tuple(state["shape"]), settings or StackSettings(**state["settings"]))
        stack.mean[...] = state["mean"]
        stack.m2[...] = state["m2"]
        stack.wsum[...] = state["wsum"]
        stack.count[...] = state["count"]
        stack._noise[...] = state["noise"]
        stack.n_frames = int(state["n_frames"])
        stack.total_weight = float(state["total_weight"])
        stack.rejected_pixels = int(state["rejected_pixels"])
        if stack._top is not None and "top1" in state:
            for i, key in enumerate(("top1", "top2")):
                stack._top[i][...] = state[key]
                stack._top_idx[i][...] = state[f"{key}_idx"]
            stack._warm_weights = [float(x) for x in state["warm_weights"]]
        else:
            stack._top = stack._top_idx = None
        return stack

    # ------------------------------------------------------------------ internals
    def _floor2(self) -> np.ndarray:
        return ((self.settings.sigma_floor * self._noise) ** 2).astype(np.float32)

    def _weights_table(self) -> np.ndarray:
        """Weight of each warm-up frame by its index (what the top-2 buffers store)."""
        weights = np.zeros(_NONE + 1, np.float32)
        weights[: len(self._warm_weights)] = self._warm_weights
        return weights

    def _end_warmup(self) -> int:
        """Re-check pixels still short of `warmup` samples with what they have; free buffers."""
        per_row = _recheck_all(self.mean, self.m2, self.wsum, self.count, *self._top, *self._top_idx,
                               self._weights_table(), np.float32(self.settings.warmup_kappa ** 2),
                               self._floor2(), _HALF_TABLE)
        self._top = self._top_idx = None
        self._warm_weights = []
        return int(per_row.sum())

    def _noise_estimate(self) -> np.ndarray:
        """Background sigma per plane (ADU) from a sparse grid of ~40k pixels: the mean
        per-pixel variance (unbiased, where a median of few-sample sigmas is not), leaving
        out stars and trails (variance above 4x the median)."""
        h, w = self.shape[:2]
        step = max(1, int(np.sqrt(h * w / 40000)))
        ws = self.wsum[::step, ::step]
        n = self.count[::step, ::step].astype(np.float32)
        good = (n > 1) & (ws > 0)
        out = np.zeros(self._planes, np.float32)
        if not good.any():
            return out
        factor = n[good] / ((n[good] - 1) * ws[good])
        m2 = self.m2[::step, ::step]
        for c in range(self._planes):
            # One contiguous plane at a time: a median along axis 0 of an (N, 3) array costs 4x.
            vc = m2[..., c][good] * factor
            med = np.median(vc)
            out[c] = np.sqrt(vc[vc <= 4 * med].mean()) if med > 0 else 0.0
        return out


_EMPTY_U16 = np.zeros((1, 1, 1), np.uint16)
_EMPTY_U8 = np.zeros((1, 1), np.uint8)


# ---------------------------------------------------------------------- kernels
#: Warm-up samples are stored as float16 of value * _HALF_SCALE: a power of two keeps the
#: 11-bit relative precision and moves the top of the range from 65504 to 262016 ADU, above
#: any 16-bit sensor's saturation even after flat division (65504 would turn a saturated
#: star core into inf).
_HALF_SCALE = 0.25
#: float16 bits -> float32 ADU, for decoding warm-up samples in the kernels (256 kB).
with np.errstate(invalid="ignore"):  # the NaN bit patterns stay NaN
    _HALF_TABLE = np.arange(65536, dtype=np.uint16).view(np.float16).astype(np.float32) * np.float32(1 / _HALF_SCALE)


def _add_frame(x, off, w, mean, m2, wsum, count, reject, warmup, kappa2, wkappa2, floor2,
               tracking, top1, top2, idx1, idx2, frame_no, weights, table):
    """One frame into the stack, in place. Returns per row (samples rejected against the
    running statistics, warm-up samples removed by the re-check). Mono and RGB stacks get
    kernels compiled for their number of planes (the plane loops unrolled): ~30 % faster
    than one kernel for any number (measured at 4144x2822 mono)."""
    kernel = {1: _add_frame_1, 3: _add_frame_3}.get(mean.shape[2], _add_frame_n)
    return kernel(x, off, w, mean, m2, wsum, count, reject, warmup, kappa2, wkappa2, floor2,
                  tracking, top1, top2, idx1, idx2, frame_no, weights, table)


@numba.njit(parallel=True, cache=True, nogil=True)
def _add_frame_1(x, off, w, mean, m2, wsum, count, reject, warmup, kappa2, wkappa2, floor2,
                 tracking, top1, top2, idx1, idx2, frame_no, weights, table):
    return _add_rows(x, off, w, mean, m2, wsum, count, reject, warmup, kappa2, wkappa2, floor2,
                     tracking, top1, top2, idx1, idx2, frame_no, weights, table, 1)


@numba.njit(parallel=True, cache=True, nogil=True)
def _add_frame_3(x, off, w, mean, m2, wsum, count, reject, warmup, kappa2, wkappa2, floor2,
                 tracking, top1, top2, idx1, idx2, frame_no, weights, table):
    return _add_rows(x, off, w, mean, m2, wsum, count, reject, warmup, kappa2, wkappa2, floor2,
                     tracking, top1, top2, idx1, idx2, frame_no, weights, table, 3)


@numba.njit(parallel=True, cache=True, nogil=True)
def _add_frame_n(x, off, w, mean, m2, wsum, count, reject, warmup, kappa2, wkappa2, floor2,
                 tracking, top1, top2, idx1, idx2, frame_no, weights, table):
    return _add_rows(x, off, w, mean, m2, wsum, count, reject, warmup, kappa2, wkappa2, floor2,
                     tracking, top1, top2, idx1, idx2, frame_no, weights, table, mean.shape[2])


@numba.njit(inline="always")
def _add_rows(x, off, w, mean, m2, wsum, count, reject, warmup, kappa2, wkappa2, floor2,
              tracking, top1, top2, idx1, idx2, frame_no, weights, table, nc):
    """The body of `_add_frame`, `nc` planes (a constant where inlined with one).

    Pixels that hold `warmup` samples (all pixels once the warm-up bookkeeping is over) are
    "steady": no top-2 tracking, no re-check; they take `_steady_run`, written without
    branches so that it vectorises (~3.5x faster). Pixels still in their warm-up (the dithered
    border, early frames) then take `_warmup_run`, and those that just reached `warmup`
    samples the re-check. Both runs do the Welford update with the same float32 operations in
    the same order: the result does not depend on which path a pixel took.

    Plain scalar indexing throughout: numba array views per pixel cost 4x."""
    h, wd = mean.shape[0], mean.shape[1]
    counts = np.zeros((h, 2), np.int64)
    for i in numba.prange(h):
        # Steady pixels first, the whole row in one vectorised call (inside any inner loop
        # LLVM no longer vectorises it: measured 3.5x slower); then those still in warm-up.
        if nc == 1:
            counts[i, 0] += _steady_run_1(i, x, off, w, mean, m2, wsum, count, reject, kappa2, floor2,
                                          tracking, warmup)
        elif nc == 3:
            counts[i, 0] += _steady_run_3(i, x, off, w, mean, m2, wsum, count, reject, kappa2, floor2,
                                          tracking, warmup)
        else:
            counts[i, 0] += _steady_run(i, x, off, w, mean, m2, wsum, count, reject, kappa2, floor2,
                                        tracking, warmup, nc)
        if not tracking:
            continue
        # Pixels in their warm-up: the same, vectorised where they are dense (see
        # `_warmup_run`); then the end-of-warm-up re-check of those that just reached
        # `warmup` samples (per pixel: it branches).
        hit = np.empty(wd, np.bool_)
        if nc == 1:
            n_hit = _warmup_run_1(i, x, off, w, mean, m2, wsum, count, warmup, top1, top2, idx1, idx2, frame_no,
                                  table, hit)
        elif nc == 3:
            n_hit = _warmup_run_3(i, x, off, w, mean, m2, wsum, count, warmup, top1, top2, idx1, idx2, frame_no,
                                  table, hit)
        else:
            n_hit = _warmup_run(i, x, off, w, mean, m2, wsum, count, warmup, top1, top2, idx1, idx2, frame_no,
                                table, hit, nc)
        if n_hit:
            sc = np.empty((_SCRATCH_ROWS, nc), np.float32)
            for j in range(wd):
                if hit[j]:
                    counts[i, 1] += _recheck_pixel(i, j, mean, m2, wsum, count, top1, top2, idx1, idx2,
                                                   weights, wkappa2, floor2, table, sc)
    return counts


@numba.njit(cache=True, nogil=True)
def _steady_run_1(i, x, off, w, mean, m2, wsum, count, reject, kappa2, floor2, tracking, warmup):
    """`_steady_run` of a mono stack, compiled on its own: inlined into `_add_rows`, or with
    the number of planes unknown, LLVM does not vectorise it (measured 4x slower)."""
    return _steady_run(i, x, off, w, mean, m2, wsum, count, reject, kappa2, floor2, tracking, warmup, 1)


@numba.njit(cache=True, nogil=True)
def _steady_run_3(i, x, off, w, mean, m2, wsum, count, reject, kappa2, floor2, tracking, warmup):
    """`_steady_run` of an RGB stack (see `_steady_run_1`)."""
    return _steady_run(i, x, off, w, mean, m2, wsum, count, reject, kappa2, floor2, tracking, warmup, 3)


@numba.njit(inline="always")
def _steady_run(i, x, off, w, mean, m2, wsum, count, reject, kappa2, floor2, tracking, warmup, nc):
    """Row i's steady pixels (all, once the warm-up bookkeeping is over; else those holding
    `warmup` samples): the rejection test and the weighted Welford update, as selects
    instead of branches so that it vectorises. Other pixels are left as they are. Returns the
    number of samples rejected."""
    nrej = 0
    for j in range(mean.shape[1]):
        n = count[i, j]
        ws = wsum[i, j]
        nf = np.float32(n)
        steady = (not tracking) | (n >= warmup)
        # (numba types these two float64, as `_bright_outlier` does.)
        scale = nf / (max(nf - 1, 1) * ws)
        grow = kappa2 * (1 + 1 / max(nf, 1))
        finite = True
        bad = False
        for c in range(nc):
            val = x[i, j, c] + off[c]
            finite &= math.isfinite(val)
            var = max(m2[i, j, c] * scale, floor2[c])
            d = val - mean[i, j, c]
            bad |= d * d > grow * var
        bad = bad & reject & (n >= 2)
        finite = finite & steady
        use = finite & (not bad)
        nrej += finite & bad
        ws_new = ws + w
        r = w / ws_new
        for c in range(nc):
            _welford(mean, m2, i, j, c, x[i, j, c] + off[c], n, w, r, use)
        wsum[i, j] = ws_new if use else ws
        count[i, j] = n + 1 if use else n
    return nrej


@numba.njit(inline="always")
def _welford(mean, m2, i, j, c, val, n, w, r, use):
    """West's weighted Welford update of pixel (i, j), plane c, with sample `val` of weight
    `w` (`r` = w / new weight sum) where `use`, as a select (vectorises). The one place both
    runs update the statistics: the same float32 operations whichever run a pixel takes."""
    mu = mean[i, j, c]
    q = m2[i, j, c]
    d = val - mu
    new_mu = val if n == 0 else mu + d * r
    new_q = np.float32(0.0) if n == 0 else np.float32(q + w * d * d * (1 - r))  # w * d_old * (x - mean_new)
    mean[i, j, c] = new_mu if use else mu
    m2[i, j, c] = new_q if use else q


@numba.njit(cache=True, nogil=True)
def _warmup_run_1(i, x, off, w, mean, m2, wsum, count, warmup, top1, top2, idx1, idx2, frame_no, table, hit):
    """`_warmup_run` of a mono stack, compiled on its own (see `_steady_run_1`)."""
    return _warmup_run(i, x, off, w, mean, m2, wsum, count, warmup, top1, top2, idx1, idx2, frame_no, table, hit, 1)


@numba.njit(cache=True, nogil=True)
def _warmup_run_3(i, x, off, w, mean, m2, wsum, count, warmup, top1, top2, idx1, idx2, frame_no, table, hit):
    """`_warmup_run` of an RGB stack (see `_steady_run_1`)."""
    return _warmup_run(i, x, off, w, mean, m2, wsum, count, warmup, top1, top2, idx1, idx2, frame_no, table, hit, 3)


@numba.njit(inline="always")
def _warmup_run(i, x, off, w, mean, m2, wsum, count, warmup, top1, top2, idx1, idx2, frame_no, table, hit, nc):
    """Row i's pixels that are still in their warm-up (fewer than `warmup` samples): see
    `_warmup_pixels`. A row where many are (the first frames) goes through it as one
    vectorised loop; a row with a few (the dithered border, pixels whose brightest sample
    the re-check took out) pixel by pixel. Returns how many pixels have just reached
    `warmup` samples, flagged in `hit`, for the caller to re-check."""
    wd = mean.shape[1]
    n_warm = 0
    for j in range(wd):
        n_warm += count[i, j] < warmup
    if n_warm == 0:
        return 0
    if n_warm * 8 >= wd:
        return _warmup_pixels(i, 0, wd, x, off, w, mean, m2, wsum, count, warmup, top1, top2, idx1, idx2,
                              frame_no, table, hit, nc)
    n_hit = 0
    for j in range(wd):
        hit[j] = False
        if count[i, j] < warmup:
            n_hit += _warmup_pixels(i, j, j + 1, x, off, w, mean, m2, wsum, count, warmup, top1, top2, idx1, idx2,
                                    frame_no, table, hit, nc)
    return n_hit


@numba.njit(inline="always")
def _warmup_pixels(i, j0, j1, x, off, w, mean, m2, wsum, count, warmup, top1, top2, idx1, idx2, frame_no, table,
                   hit, nc):
    """Pixels j0..j1 of row i in their warm-up: no rejection test; the two brightest samples
    (by the sum over planes) remembered as half floats with their frame index; the weighted
    Welford update. Written as selects instead of branches so that it vectorises (the
    per-pixel version with branches took 4-5x the steady pass at 4144x2822). Pixels not in
    warm-up are left as they are. Flags in `hit[j]` the pixels that have just reached
    `warmup` samples and returns their number."""
    n_hit = 0
    for j in range(j0, j1):
        n = count[i, j]
        finite = True
        key = np.float32(0.0)
        k1 = np.float32(0.0)
        k2 = np.float32(0.0)
        for c in range(nc):
            val = x[i, j, c] + off[c]
            finite &= math.isfinite(val)
            key += val
            k1 += table[top1[i, j, c]]
            k2 += table[top2[i, j, c]]
        use = finite & (n < warmup)
        i1 = idx1[i, j]
        i2 = idx2[i, j]
        first = (i1 == _NONE) | (key > k1)  # the new brightest; the old one becomes second
        second = (not first) & ((i2 == _NONE) | (key > k2))
        ws = wsum[i, j]
        ws_new = ws + w
        r = w / ws_new
        for c in range(nc):
            val = x[i, j, c] + off[c]
            h = to_half(val * _HALF_SCALE)
            t1 = top1[i, j, c]
            t2 = top2[i, j, c]
            top1[i, j, c] = h if use & first else t1
            top2[i, j, c] = (t1 if first else h) if use & (first | second) else t2
            _welford(mean, m2, i, j, c, val, n, w, r, use)
        idx1[i, j] = frame_no if use & first else i1
        idx2[i, j] = (i1 if first else frame_no) if use & (first | second) else i2
        wsum[i, j] = ws_new if use else ws
        count[i, j] = n + 1 if use else n
        reached = use & (n + 1 == warmup)
        hit[j] = reached
        n_hit += reached
    return n_hit


# Rows of the per-row scratch array: the new sample, and for the warm-up re-check the two
# brightest samples and the statistics without one (1) and without both (2) of them.
_X1, _M1, _Q1, _X2, _M2, _Q2, _SCRATCH_ROWS = 0, 1, 2, 3, 4, 5, 6


@numba.njit(inline="always")
def _remove(sc, mean_row, m2_row, ws, x_row, wx, out_mean, out_m2):
    """Inverse weighted Welford update within the scratch array: statistics (rows mean_row,
    m2_row, weight ws) without sample x_row (weight wx) into rows out_*. Returns the weight."""
    ws2 = ws - wx
    for c in range(sc.shape[1]):
        x = sc[x_row, c]
        mo = (sc[mean_row, c] * ws - x * wx) / ws2
        sc[out_m2, c] = sc[m2_row, c] - wx * (x - mo) * (x - sc[mean_row, c])
        sc[out_mean, c] = mo
    return ws2


@numba.njit(inline="always")
def _bright_outlier(sc, x_row, mean_row, m2_row, ws, n, kappa2, floor2):
    """Is sample x_row more than kappa sigma *above* the statistics in any plane?"""
    nf = np.float32(n)
    scale = nf / ((nf - 1) * ws)
    grow = kappa2 * (1 + 1 / nf)
    for c in range(sc.shape[1]):
        var = max(sc[m2_row, c] * scale, floor2[c])
        d = sc[x_row, c] - sc[mean_row, c]
        if d > 0 and d * d > grow * var:
            return True
    return False


@numba.njit(inline="always")
def _recheck_pixel(i, j, mean, m2, wsum, count, top1, top2, idx1, idx2, weights, kappa2, floor2, table, sc):
    """End of one pixel's warm-up: take its one or two brightest samples out where they are
    outliers against the rest; mark the pixel done. Returns the samples removed."""
    nc = mean.shape[2]
    n = int(count[i, j])
    i1, i2 = idx1[i, j], idx2[i, j]
    idx1[i, j] = 255  # done: never re-checked again
    idx2[i, j] = 255
    if n < 4 or i1 == 255:
        return 0
    w1 = weights[i1]
    ws = wsum[i, j]
    if ws - w1 <= 0:
        return 0
    for c in range(nc):
        sc[_X1, c] = table[top1[i, j, c]]
        sc[_M2, c] = mean[i, j, c]  # the full statistics, staged in the scratch rows
        sc[_Q2, c] = m2[i, j, c]
    ws1 = _remove(sc, _M2, _Q2, ws, _X1, w1, _M1, _Q1)
    if n >= 5 and i2 != 255 and ws1 - weights[i2] > 0:
        for c in range(nc):
            sc[_X2, c] = table[top2[i, j, c]]
        ws2 = _remove(sc, _M1, _Q1, ws1, _X2, weights[i2], _M2, _Q2)
        if _bright_outlier(sc, _X2, _M2, _Q2, ws2, n - 2, kappa2, floor2):
            for c in range(nc):
                mean[i, j, c] = sc[_M2, c]
                m2[i, j, c] = max(sc[_Q2, c], np.float32(0.0))
            wsum[i, j] = ws2
            count[i, j] = n - 2
            return 2
    if _bright_outlier(sc, _X1, _M1, _Q1, ws1, n - 1, kappa2, floor2):
        for c in range(nc):
            mean[i, j, c] = sc[_M1, c]
            m2[i, j, c] = max(sc[_Q1, c], np.float32(0.0))
        wsum[i, j] = ws1
        count[i, j] = n - 1
        return 1
    return 0


@numba.njit(parallel=True, cache=True, nogil=True)
def _recheck_all(mean, m2, wsum, count, top1, top2, idx1, idx2, weights, kappa2, floor2, table):
    """Re-check every pixel whose warm-up is still open (before freeing the buffers)."""
    h, wd, nc = mean.shape
    removed = np.zeros(h, np.int64)
    for i in numba.prange(h):
        sc = np.empty((_SCRATCH_ROWS, nc), np.float32)
        for j in range(wd):
            if idx1[i, j] != 255:
                removed[i] += _recheck_pixel(i, j, mean, m2, wsum, count, top1, top2, idx1, idx2,
                                             weights, kappa2, floor2, table, sc)
    return removed
