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

While that bookkeeping runs (when the stack's memory peaks) m2 is kept as bfloat16 (the top
half of its float32, `daemon.pipeline.half`): 2 bytes a pixel and plane less. m2 only sets
the rejection threshold. Each store rounds it to 8 significant bits, within 2^-8 of itself,
and it only grows by non-negative terms: after k samples its relative error is <= k * 2^-8
(k <= 3 * warmup; typically ~0.2 % at 15, sigma's half that), far below the ~30 % statistical
error of a sigma from 5 samples. A pixel in its warm-up keeps its m2 without the share of its
brightest sample (added back when read), so that taking that sample out (a trail) leaves the
rest's m2 with its own relative error, not one of the trail's m2; only where both brightest
are taken out, the second's share cancels at that precision. Then m2 is float32 again
(exactly) and stays so.

The per-pixel work is one fused pass in a numba kernel, parallel over rows: numpy needed
~25 full-size passes (0.7 s per 4144x2822 RGB frame on 2 cores, 2 s during the warm-up);
the kernel (`daemon.pipeline.stack_kernels`) does it in one pass with no full-size
temporaries (see bench/). The per-plane statistics are kept as planes, (C, H, W): a row of
one plane is consecutive memory, so the kernels run the same operation on a vector of
pixels at once (with the planes interleaved, (H, W, C), they load every third value); the
frames' bands go in as planes too (the fused colour path makes them so; `add` converts).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numba
import numpy as np

from daemon.pipeline.half import bfloat16_bits, bfloat16_values
from daemon.pipeline.stack_kernels import _HALF_TABLE, _NONE, _add_band, _recheck_all
from daemon.pipeline.warp import as_planes


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


#: Bytes of one band of samples (float32; `RunningStack.add` and the fused colour path): a
#: band, its source rows and the stack's statistics for it stay within a slice of a 2-core
#: machine's L3, while the rows of source a rotated frame needs beyond the band's own (the
#: debayer's extra work) stay few.
BAND_BYTES = 4 << 20


def band_rows(width: int, planes: int = 3, band_bytes: int = BAND_BYTES) -> int:
    """Rows per band: `band_bytes` of float32 samples, at least 8 rows, even."""
    rows = max(8, band_bytes // max(1, width * planes * 4))
    return int(rows - rows % 2)


def stack_bytes(shape: tuple[int, ...], settings: StackSettings = StackSettings()) -> int:
    """Bytes of a `RunningStack` of `shape` ((H, W) or (H, W, C)) at its largest: its
    statistics and, with rejection, the warm-up bookkeeping of its first frames (per pixel
    and plane: mean 4, m2 2 (bfloat16) and the two brightest samples 2 x 2; per pixel: their
    frame numbers 2, weight sum 4, sample count 2). 26 Mpx colour: 0.99 GB; 0.78 GB once the
    bookkeeping ends."""
    h, w = int(shape[0]), int(shape[1])
    c = int(shape[2]) if len(shape) == 3 else 1
    per_pixel = 4 * c + 4 + 2 + (2 * c + 4 * c + 2 if settings.reject else 4 * c)
    return h * w * per_pixel


class RunningStack:
    """Weighted mean per pixel and plane of registered frames, with kappa-sigma rejection.

    Frames are (H, W) or (H, W, C) float32 in reference coordinates, NaN where the frame has
    no data (outside the warped area). Weights are relative (the reference frame ~1).
    """

    def __init__(self, shape: tuple[int, ...], settings: StackSettings = StackSettings(), *,
                 prefault: bool = False):
        """An empty stack of `shape`, (H, W) or (H, W, C) with C 1 or 3. `prefault`: write
        every page of its statistics now (otherwise the first frame does, page by page: the
        kernel zeroes each, and a virtual machine's host may have to supply it first); for a
        stack made ahead of its frames (`LivePipeline.prepare`)."""

        def zeros(dims: tuple[int, ...], dtype) -> np.ndarray:  # with prefault written now
            return np.full(dims, 0, dtype) if prefault else np.zeros(dims, dtype)

        if len(shape) not in (2, 3) or (len(shape) == 3 and shape[2] not in (1, 3)):
            raise ValueError(f"stack shape must be (H, W), (H, W, 1) or (H, W, 3), got {shape}")
        if settings.reject and not 4 <= settings.warmup <= (_NONE - 1) // 3:
            raise ValueError(f"warmup must be 4..{(_NONE - 1) // 3} frames, got {settings.warmup}")
        self.settings = settings
        self.shape = tuple(int(s) for s in shape)
        h, w = self.shape[:2]
        c = self.shape[2] if len(self.shape) == 3 else 1
        self._planes = c
        # Internally always planes, (C, H, W), so one code path serves mono and colour.
        # NaN until a pixel gets its first sample: the mean is the image, no copy needed.
        self._mean = np.full((c, h, w), np.nan, np.float32)
        # Weighted sum of squared deviations (ADU^2), float32; None during the warm-up
        # bookkeeping, when `_m2_bf16` keeps it (see the module docstring).
        self._m2: np.ndarray | None = None if settings.reject else zeros((c, h, w), np.float32)
        self._m2_bf16: np.ndarray | None = zeros((c, h, w), np.uint16) if settings.reject else None
        self.wsum = zeros((h, w), np.float32)
        self.count = zeros((h, w), np.uint16)
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
            # One block: when the bookkeeping ends, float32 m2 takes exactly its bytes.
            self._top = list(zeros((2, c, h, w), np.uint16))
            self._top_idx = [np.full((h, w), _NONE, np.uint8) for _ in range(2)]

    # ------------------------------------------------------------------ public API
    @property
    def mean(self) -> np.ndarray:
        """The weighted mean (ADU), (H, W, C) (also mono: C = 1): a view of the planes."""
        return self._mean.transpose(1, 2, 0)

    @property
    def m2(self) -> np.ndarray | None:
        """The weighted sum of squared deviations (ADU^2, float32), (H, W, C) view; None
        during the warm-up bookkeeping (kept as bfloat16 then, see the module docstring)."""
        return None if self._m2 is None else self._m2.transpose(1, 2, 0)

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
        return self.add_banded(lambda r0, r1: img[r0:r1], band_rows(img.shape[1], img.shape[2]), weight, offset)

    def planes(self) -> np.ndarray:
        """The current stack as planes, (C, H, W) (also mono: C = 1), NaN where no frame has
        contributed: a read-only view, as `image`."""
        out = self._mean.view()
        out.flags.writeable = False
        return out

    def add_bands(self, bands: Iterable[tuple[int, np.ndarray]], weight: float = 1.0,
                  offset: np.ndarray | float | None = None, *, planar: bool = False) -> int:
        """Add one registered frame given as row bands, in any order: (first row, (rows, W, C)
        or (rows, W) float32, or with `planar` (C, rows, W)), each of the frame's rows exactly
        once (rows never given stay as they were, as where a frame has no data). The same
        statistics, bit for bit, as `add` of the whole frame: every pixel's update only reads
        that pixel. A band may be reused by the producer once the next one is requested.
        Returns the pixels rejected from the frame; `weight` and `offset` as in `add`."""
        ctx = self._begin(weight, offset)
        totals = [self._add_band(ctx, r0, band, planar) for r0, band in bands]
        return self._finish(weight, totals)

    def add_banded(self, make_band: Callable[[int, int], np.ndarray], rows: int, weight: float = 1.0,
                   offset: np.ndarray | float | None = None, threads: int | None = None, *,
                   planar: bool = False) -> int:
        """`add_bands` of a frame made band by band on `threads` threads at once (default:
        numba's, one per core): each takes the next band of `rows` rows, asks
        `make_band(r0, r1)` for it ((r1 - r0, W[, C]) float32, or with `planar`
        (C, r1 - r0, W); called concurrently, so it must not share buffers between calls) and
        adds it on its own thread. Why not parallel kernels per band: a parallel region waits
        for its slowest thread at every band, which on a loaded 2-core machine costs
        milliseconds per band; here a thread that is held up only delays its own band. Bit for
        bit `add`'s statistics. Returns the pixels rejected."""
        ctx = self._begin(weight, offset)
        threads = threads or numba.get_num_threads()
        h = self.shape[0]
        spans = [(r0, min(r0 + rows, h)) for r0 in range(0, h, max(1, int(rows)))]

        def work(span: tuple[int, int]) -> tuple[int, int]:
            return self._add_band(ctx, span[0], make_band(*span), planar)

        if threads > 1 and len(spans) > 1:
            totals = list(_band_pool(threads).map(work, spans))
        else:
            totals = [work(sp) for sp in spans]
        return self._finish(weight, totals)

    def _begin(self, weight: float, offset) -> dict:
        """Checks and the per-frame constants of the kernels (one frame being added)."""
        if not weight > 0:
            raise ValueError(f"frame weight must be > 0, got {weight}")
        off = np.zeros(self._planes, np.float32) if offset is None else np.broadcast_to(
            np.asarray(offset, np.float32), (self._planes,)).copy()
        tracking = self._top is not None
        # The frame's weight joins the warm-up weights when it is in (`_finish`): a frame that
        # fails (a band of the wrong shape) must not shift the later frames' weights.
        return {"off": off, "w": np.float32(weight), "tracking": tracking, "floor2": self._floor2(),
                "weights": self._weights_table(float(weight) if tracking else None),
                "frame_no": np.uint8(min(self.n_frames, _NONE - 1))}

    def _add_band(self, ctx: dict, r0: int, band: np.ndarray, planar: bool) -> tuple[int, int]:
        """One band into the statistics, on the calling thread: (samples rejected, warm-up
        samples removed)."""
        s = self.settings
        if band.dtype != np.float32:
            raise TypeError(f"frames must be float32, got {band.dtype}")
        if band.ndim == 2:
            x = band[None]
        elif planar:
            x = band
        elif band.shape[2:] == (1,):
            x = band[None, ..., 0]
        else:
            x = as_planes(band)
        r1 = r0 + x.shape[1]
        if (x.shape[0], x.shape[2]) != (self._planes, self.shape[1]) or not 0 <= r0 <= r1 <= self.shape[0]:
            raise ValueError(f"band of shape {band.shape} at row {r0} does not fit the stack {self.shape}"
                             + (" (planar)" if planar else ""))
        tracking = ctx["tracking"]
        if tracking:
            t1, t2 = self._top
            i1, i2 = self._top_idx
        else:
            t1, t2, i1, i2 = _EMPTY_U16, _EMPTY_U16, _EMPTY_U8, _EMPTY_U8
        m2 = self._m2 if self._m2 is not None else self._m2_bf16
        x = np.ascontiguousarray(x)
        per_row = _add_band(x, r0, ctx["off"], ctx["w"], self._mean, m2, self.wsum, self.count,
                         s.reject, s.warmup, np.float32(s.kappa ** 2), np.float32(s.warmup_kappa ** 2),
                         ctx["floor2"], tracking, t1, t2, i1, i2, ctx["frame_no"], ctx["weights"], _HALF_TABLE)
        return int(per_row[:, 0].sum()), int(per_row[:, 1].sum())

    def _finish(self, weight: float, totals: list[tuple[int, int]]) -> int:
        """After the last band: counts, the noise estimate, the end of the warm-up."""
        s = self.settings
        rejected = sum(t[0] for t in totals)
        if self._top is not None:
            self._warm_weights.append(float(weight))
        self.n_frames += 1
        self.total_weight += float(weight)
        self.rejected_pixels += rejected + sum(t[1] for t in totals)
        if s.reject and self.n_frames >= 2:
            self._noise[...] = self._noise_estimate()
        if self._top is not None and self.n_frames >= self._track_frames:
            self.rejected_pixels += self._end_warmup()
        return rejected

    def image(self) -> np.ndarray:
        """The current stack, (H, W) or (H, W, C), NaN where no frame has contributed: a
        read-only *view* (no full-size copy on a Pi; of the planes, so colour is not
        C-contiguous: `planes` gives them as they are), valid until the next `add`; copy it
        to keep it."""
        out = self._mean[0] if len(self.shape) == 2 else self._mean.transpose(1, 2, 0)
        out.flags.writeable = False
        return out

    def sigma(self) -> np.ndarray:
        """Per-pixel sample standard deviation of the accepted samples (ADU)."""
        n = self.count.astype(np.float32)
        with np.errstate(divide="ignore", invalid="ignore"):
            scale = np.where((n > 1) & (self.wsum > 0), n / ((n - 1) * self.wsum), 0).astype(np.float32)
        out = np.sqrt(np.maximum(self._m2_values() * scale, 0))
        return out[0] if len(self.shape) == 2 else out.transpose(1, 2, 0)

    def state(self) -> dict:
        """Everything needed to resume exactly: numpy arrays and JSON-able scalars. Per-plane
        arrays are planes, (C, H, W) ("layout": "planes"; a state without that key has them
        (H, W, C), as before). m2 is "m2" (float32) or, during the warm-up bookkeeping,
        "m2_bf16" (uint16: bfloat16 bits, of m2 without the brightest sample's share where a
        pixel's warm-up is open)."""
        st = {
            "layout": "planes", "mean": self._mean, "wsum": self.wsum, "count": self.count,
            "noise": self._noise, "n_frames": self.n_frames, "total_weight": self.total_weight,
            "rejected_pixels": self.rejected_pixels, "shape": list(self.shape),
            "settings": self.settings.__dict__.copy(),
        }
        if self._m2 is not None:
            st["m2"] = self._m2
        else:
            st["m2_bf16"] = self._m2_bf16
        if self._top is not None:
            st["top1"], st["top2"] = self._top
            st["top1_idx"], st["top2_idx"] = self._top_idx
            st["warm_weights"] = list(self._warm_weights)
        return st

    @classmethod
    def from_state(cls, state: dict, settings: StackSettings | None = None) -> RunningStack:
        """Resume from `state()`. `settings` (default: the saved ones) may differ, e.g. a
        changed kappa in the config: they apply from the next frame on. A state of an older
        version (float32 "m2" during the warm-up) is converted (m2 rounded as the warm-up
        keeps it), and one with (H, W, C) arrays (no "layout") taken as planes; KeyError naming
        "m2" when a state has none."""
        stack = cls(tuple(state["shape"]), settings or StackSettings(**state["settings"]))
        if state.get("layout") != "planes":
            state = _planes_state(state)
        stack._mean[...] = state["mean"]
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
            if "m2_bf16" in state:
                stack._m2_bf16[...] = state["m2_bf16"]
            else:  # float32 m2 of an older version
                for rows in _row_bands(stack.shape[0]):
                    stack._m2_bf16[:, rows] = bfloat16_bits(state["m2"][:, rows] - _state_share(state, rows))
            # With a lower warm-up now, pixels already holding enough samples are re-checked
            # at once (the kernels take them as steady, with their m2 whole).
            due = (stack._top_idx[0] != _NONE) & (stack.count >= stack.settings.warmup)
            stack.rejected_pixels += stack._recheck(due)
        else:
            stack._top = stack._top_idx = None
            stack._m2_bf16 = None
            stack._m2 = np.zeros(stack._mean.shape, np.float32)
            if "m2_bf16" in state:  # (its warm-up bookkeeping dropped: with reject off now)
                for rows in _row_bands(stack.shape[0]):
                    stack._m2[:, rows] = bfloat16_values(state["m2_bf16"][:, rows]) + _state_share(state, rows)
            else:
                stack._m2[...] = state["m2"]
        return stack

    # ------------------------------------------------------------------ internals
    def _floor2(self) -> np.ndarray:
        return ((self.settings.sigma_floor * self._noise) ** 2).astype(np.float32)

    def _weights_table(self, adding: float | None = None) -> np.ndarray:
        """Weight of each warm-up frame by its index (what the top-2 buffers store), with that
        of the frame being added (`adding`) after them."""
        weights = np.zeros(_NONE + 1, np.float32)
        weights[: len(self._warm_weights)] = self._warm_weights
        if adding is not None:
            weights[len(self._warm_weights)] = adding
        return weights

    def _recheck(self, due: np.ndarray) -> int:
        """The warm-up re-check of the open pixels where `due` (bool, (H, W)) now; returns the
        samples it took out."""
        if not due.any():
            return 0
        idx = [np.where(due, i, np.uint8(_NONE)) for i in self._top_idx]
        per_row = _recheck_all(self._mean, self._m2_bf16, self.wsum, self.count, *self._top, *idx,
                               self._weights_table(), np.float32(self.settings.warmup_kappa ** 2),
                               self._floor2(), _HALF_TABLE)
        for i in self._top_idx:
            i[due] = _NONE
        return int(per_row.sum())

    def _end_warmup(self) -> int:
        """Re-check pixels still short of `warmup` samples with what they have; free buffers."""
        per_row = _recheck_all(self._mean, self._m2_bf16, self.wsum, self.count, *self._top, *self._top_idx,
                               self._weights_table(), np.float32(self.settings.warmup_kappa ** 2),
                               self._floor2(), _HALF_TABLE)
        block = self._top[0].base  # `__init__`'s (2, C, H, W) uint16 of the two brightest, now free
        self._top = self._top_idx = None
        self._warm_weights = []
        # float32 m2 in their memory, exactly its size: no new pages in this frame, and no step
        # up of the process's memory where malloc keeps the freed buffers.
        self._m2 = block.reshape(-1).view(np.float32).reshape(self._mean.shape)
        for rows in _row_bands(self.shape[0]):  # every pixel done: m2 whole
            self._m2[:, rows] = bfloat16_values(self._m2_bf16[:, rows])
        self._m2_bf16 = None
        return int(per_row.sum())

    def _m2_values(self, rows: slice = slice(None), cols: slice = slice(None)) -> np.ndarray:
        """m2 (ADU^2, float32) of the pixels [rows, cols] as planes (C, rows, cols), whichever
        form keeps it."""
        if self._m2 is not None:
            return self._m2[:, rows, cols]
        sel = (slice(None), rows, cols)
        out = bfloat16_values(self._m2_bf16[sel])
        idx1 = self._top_idx[0][rows, cols]
        open_ = idx1 != _NONE  # (pixels whose warm-up is over have m2 whole)
        if open_.any():
            out[:, open_] += _brightest_share(self._top[0][sel][:, open_], idx1[open_], self._weights_table(),
                                              self._mean[sel][:, open_], self.wsum[rows, cols][open_])
        return out

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
        m2 = self._m2_values(slice(None, None, step), slice(None, None, step))
        for c in range(self._planes):
            # One contiguous plane at a time: a median along axis 0 of an (N, 3) array costs 4x.
            vc = m2[c][good] * factor
            med = np.median(vc)
            # (m2 of identical samples can round a hair below 0: never a NaN sigma)
            out[c] = np.sqrt(max(float(vc[vc <= 4 * med].mean()), 0.0)) if med > 0 else 0.0
        return out


#: Rows converted at a time between the two forms of m2 (no full-size temporaries).
_M2_ROWS = 64


def _brightest_share(top1: np.ndarray, idx1: np.ndarray, weights: np.ndarray, mean: np.ndarray,
                     wsum: np.ndarray) -> np.ndarray:
    """What their brightest warm-up sample (float16 bits `top1`, (C, ...) planes, frame
    `idx1`, its weight in `weights` by frame) adds to the m2 of pixels whose warm-up is open
    (ADU^2, planes as `top1`; 0 elsewhere): the kernels' `_share` times (x1 - mean)^2, the
    same float32 operations. The warm-up form of m2 keeps it apart."""
    w1 = weights[idx1]
    with np.errstate(divide="ignore", invalid="ignore"):
        share = np.where((idx1 != _NONE) & (wsum - w1 > 0), w1 * wsum / (wsum - w1), np.float32(0.0))[None]
        d = _HALF_TABLE[top1] - mean
        return np.where(share > 0, share * d * d, np.float32(0.0))


def _row_bands(h: int) -> list[slice]:
    return [slice(r0, r0 + _M2_ROWS) for r0 in range(0, h, _M2_ROWS)]


def _state_share(state: dict, rows: slice) -> np.ndarray | float:
    """`_brightest_share` of the rows of a saved state (0 without warm-up bookkeeping)."""
    if "top1" not in state:
        return 0.0
    weights = np.zeros(_NONE + 1, np.float32)
    weights[: len(state["warm_weights"])] = state["warm_weights"]
    return _brightest_share(np.asarray(state["top1"][:, rows]), np.asarray(state["top1_idx"][rows]), weights,
                            np.asarray(state["mean"][:, rows], np.float32), np.asarray(state["wsum"][rows], np.float32))


#: The per-plane arrays of a state (`RunningStack.state`).
_PLANE_KEYS = ("mean", "m2", "m2_bf16", "top1", "top2")


def _planes_state(state: dict) -> dict:
    """A state of the interleaved layout ((H, W, C) arrays, no "layout" key) with its
    per-plane arrays as (C, H, W) views."""
    out = dict(state)
    for key in _PLANE_KEYS:
        if key in out:
            out[key] = np.moveaxis(np.asarray(out[key]), 2, 0)
    out["layout"] = "planes"
    return out



_POOL: dict[int, ThreadPoolExecutor] = {}
_POOL_LOCK = threading.Lock()


def _band_pool(threads: int) -> ThreadPoolExecutor:
    """The threads `add_banded` runs bands on (made once, kept: new threads per frame would
    each get a fresh malloc arena)."""
    with _POOL_LOCK:
        if threads not in _POOL:
            _POOL[threads] = ThreadPoolExecutor(threads, thread_name_prefix="band")
        return _POOL[threads]


_EMPTY_U16 = np.zeros((1, 1, 1), np.uint16)
_EMPTY_U8 = np.zeros((1, 1), np.uint8)
