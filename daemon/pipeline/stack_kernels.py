"""The per-pixel kernels of `daemon.pipeline.stack.RunningStack` (numba): one frame's samples
into the running weighted statistics, the warm-up bookkeeping and its re-check. See that
module for the method; here only how it is computed. Kept apart so that each module stays
readable; nothing here is public.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba.core import types
from numba.extending import overload

from daemon.pipeline.half import HALF_TO_FLOAT_NATIVE, from_bfloat16, from_half_native, to_bfloat16, to_half

#: Frame index stored for "no warm-up sample here".
_NONE = 255


def _allow_memory_checks(limit: int = 256) -> None:
    """Let LLVM vectorise loops that need up to `limit` run-time overlap checks (its default:
    128). numba tells LLVM nothing of which arrays may overlap, so before a vectorised loop
    LLVM checks every pair of address ranges written and read; the warm-up pass, which reads
    and writes three planes of four statistics, needs more than 128 and would run scalar.
    The checks run once per row. The options are LLVM's own and process-wide: set
    before the kernels compile, they shape the code numba caches (a process that loads
    kernels from the cache does not depend on them)."""
    import llvmlite.binding as llvm

    for option in ("vectorize-memory-check-threshold", "runtime-memory-check-threshold",
                   "memory-check-merge-threshold"):
        llvm.set_option("lightbucket", f"-{option}={limit}")


_allow_memory_checks()


# ---------------------------------------------------------------------- kernels
#: Warm-up samples are stored as float16 of value * _HALF_SCALE: a power of two keeps the
#: 11-bit relative precision and moves the top of the range from 65504 to 262016 ADU, above
#: any 16-bit sensor's saturation even after flat division (65504 would turn a saturated
#: star core into inf).
_HALF_SCALE = 0.25
#: float16 bits -> float32 ADU, for decoding warm-up samples in the kernels (256 kB).
with np.errstate(invalid="ignore"):  # the NaN bit patterns stay NaN
    _HALF_TABLE = np.arange(65536, dtype=np.uint16).view(np.float16).astype(np.float32) * np.float32(1 / _HALF_SCALE)


@numba.njit(inline="always")
def _warm_value(table, bits):
    """A warm-up sample's value (ADU, float32) from its float16 bits: the CPU's conversion
    times 1 / _HALF_SCALE where it has one (vectorises), else `table[bits]` (a gather); the
    same value either way (the scale is a power of two)."""
    if HALF_TO_FLOAT_NATIVE:
        return from_half_native(bits) * np.float32(1 / _HALF_SCALE)
    return table[bits]


def _m2_get(m2, i, j, c):
    """m2 of pixel (i, j), plane c, as float32 (ADU^2): `m2` float32, or uint16 of bfloat16
    bits (`RunningStack`'s warm-up form). Kernels only."""
    raise NotImplementedError


def _m2_set(m2, i, j, c, q):
    """Store m2 = q (ADU^2, finite) at pixel (i, j), plane c, in `m2`'s form (see `_m2_get`).
    A bfloat16 read back and stored again keeps its bits: an unchanged pixel stays so.
    Kernels only."""
    raise NotImplementedError


@overload(_m2_get, inline="always")
def _m2_get_impl(m2, i, j, c):
    if m2.dtype == types.uint16:
        def get_bfloat16(m2, i, j, c):
            return from_bfloat16(m2[c, i, j])
        return get_bfloat16

    def get(m2, i, j, c):
        return m2[c, i, j]
    return get


@overload(_m2_set, inline="always")
def _m2_set_impl(m2, i, j, c, q):
    if m2.dtype == types.uint16:
        def set_bfloat16(m2, i, j, c, q):
            m2[c, i, j] = to_bfloat16(q)
        return set_bfloat16

    def set_(m2, i, j, c, q):
        m2[c, i, j] = q
    return set_


def _add_band(x, r0, off, w, mean, m2, wsum, count, reject, warmup, kappa2, wkappa2, floor2,
              tracking, top1, top2, idx1, idx2, frame_no, weights, table):
    """One band of a frame into the stack, in place, on the calling thread
    (`RunningStack.add_banded` runs bands on threads of its own): `x` the band's planes
    (C, rows, W), its first row `r0` in the stack; the statistics whole ((C, H, W) and
    (H, W): a band of rows of (C, H, W) planes is no contiguous array, and numba vectorises
    only loops over arrays it knows to be contiguous). Returns per row (samples
    rejected against the running statistics, warm-up samples removed by the re-check). Mono
    and RGB stacks (the only kinds) get kernels compiled for their number of planes (the
    plane loops unrolled): ~30 % faster than one kernel for any number (measured at
    4144x2822 mono). Once the warm-up bookkeeping is over (`tracking` False), kernels with
    the steady pass only: m2 is float32 then, bfloat16 before (see `_m2_get`), and each form
    compiles only the code it runs."""
    if not tracking:
        steady = _steady_band_3 if mean.shape[0] == 3 else _steady_band_1
        return steady(x, r0, off, w, mean, m2, wsum, count, reject, kappa2, floor2)
    kernel = _add_band_3 if mean.shape[0] == 3 else _add_band_1
    return kernel(x, r0, off, w, mean, m2, wsum, count, reject, warmup, kappa2, wkappa2, floor2,
                  tracking, top1, top2, idx1, idx2, frame_no, weights, table)


def _add_band_1_py(x, r0, off, w, mean, m2, wsum, count, reject, warmup, kappa2, wkappa2, floor2,
                   tracking, top1, top2, idx1, idx2, frame_no, weights, table):
    return _add_rows(x, r0, off, w, mean, m2, wsum, count, reject, warmup, kappa2, wkappa2, floor2,
                     tracking, top1, top2, idx1, idx2, frame_no, weights, table, 1)


def _add_band_3_py(x, r0, off, w, mean, m2, wsum, count, reject, warmup, kappa2, wkappa2, floor2,
                   tracking, top1, top2, idx1, idx2, frame_no, weights, table):
    return _add_rows(x, r0, off, w, mean, m2, wsum, count, reject, warmup, kappa2, wkappa2, floor2,
                     tracking, top1, top2, idx1, idx2, frame_no, weights, table, 3)


#: The band kernels of mono and RGB stacks (numba, on the calling thread).
_add_band_1 = numba.njit(cache=True, nogil=True, error_model="numpy")(_add_band_1_py)
_add_band_3 = numba.njit(cache=True, nogil=True, error_model="numpy")(_add_band_3_py)


def _steady_band_1_py(x, r0, off, w, mean, m2, wsum, count, reject, kappa2, floor2):
    return _steady_rows(x, r0, off, w, mean, m2, wsum, count, reject, kappa2, floor2, 1)


def _steady_band_3_py(x, r0, off, w, mean, m2, wsum, count, reject, kappa2, floor2):
    return _steady_rows(x, r0, off, w, mean, m2, wsum, count, reject, kappa2, floor2, 3)


#: The steady-pass kernels of mono and RGB stacks, as `_add_band_1/_3`.
_steady_band_1 = numba.njit(cache=True, nogil=True, error_model="numpy")(_steady_band_1_py)
_steady_band_3 = numba.njit(cache=True, nogil=True, error_model="numpy")(_steady_band_3_py)


@numba.njit(inline="always")
def _steady_rows(x, r0, off, w, mean, m2, wsum, count, reject, kappa2, floor2, nc):
    """`_add_rows` without the warm-up bookkeeping: every pixel steady. The same
    `_steady_run` as there: the same statistics whichever kernel a frame takes."""
    h = x.shape[1]
    counts = np.zeros((h, 2), np.int64)
    for b in numba.prange(h):
        i = r0 + b
        if nc == 1:
            counts[b, 0] += _steady_run_1(i, x, r0, off, w, mean, m2, wsum, count, reject, kappa2, floor2, False, 0)
        else:
            counts[b, 0] += _steady_run_3(i, x, r0, off, w, mean, m2, wsum, count, reject, kappa2, floor2, False, 0)
    return counts


@numba.njit(inline="always")
def _add_rows(x, r0, off, w, mean, m2, wsum, count, reject, warmup, kappa2, wkappa2, floor2,
              tracking, top1, top2, idx1, idx2, frame_no, weights, table, nc):
    """The body of `_add_band`'s kernels, `nc` planes (1 or 3: a constant, inlined).

    Pixels that hold `warmup` samples (all pixels once the warm-up bookkeeping is over) are
    "steady": no top-2 tracking, no re-check; they take `_steady_run`, written without
    branches so that it vectorises (~3.5x faster). Pixels still in their warm-up (the dithered
    border, early frames) then take `_warmup_run`, and those that just reached `warmup`
    samples the re-check. Both runs do the Welford update with the same float32 operations in
    the same order: the result does not depend on which path a pixel took.

    Plain scalar indexing throughout: numba array views per pixel cost 4x."""
    h, wd = x.shape[1], mean.shape[2]
    counts = np.zeros((h, 2), np.int64)
    for b in numba.prange(h):
        i = r0 + b
        # Steady pixels first, the whole row in one vectorised call (inside any inner loop
        # LLVM no longer vectorises it: measured 3.5x slower); then those still in warm-up.
        # A row with none (the first frames) skips the steady pass: it would change nothing.
        # (The steady pass changes no warm-up pixel: their number holds for the run after it.)
        n_warm = _n_warm(i, count, warmup) if tracking else 0
        if n_warm == wd:
            pass
        elif nc == 1:
            counts[b, 0] += _steady_run_1(i, x, r0, off, w, mean, m2, wsum, count, reject, kappa2, floor2,
                                          tracking, warmup)
        else:
            counts[b, 0] += _steady_run_3(i, x, r0, off, w, mean, m2, wsum, count, reject, kappa2, floor2,
                                          tracking, warmup)
        if not tracking:
            continue
        # Pixels in their warm-up: the same, vectorised where they are dense (see
        # `_warmup_run`); then the end-of-warm-up re-check of those that just reached
        # `warmup` samples: the whole row's as selects where many did, else pixel by pixel.
        hit = np.empty(wd, np.bool_)
        w1s = np.empty(wd, np.float32)
        if nc == 1:
            n_hit = _warmup_run_1(i, x, r0, off, w, mean, m2, wsum, count, warmup, top1, top2, idx1, idx2, frame_no,
                                  weights, table, hit, w1s, n_warm)
        else:
            n_hit = _warmup_run_3(i, x, r0, off, w, mean, m2, wsum, count, warmup, top1, top2, idx1, idx2, frame_no,
                                  weights, table, hit, w1s, n_warm)
        if n_hit * 8 >= wd:  # many (the first frames' pixels end their warm-up together): the whole row
            counts[b, 1] += _recheck_pixels(i, 0, wd, hit, mean, m2, wsum, count, top1, top2, idx1, idx2, weights,
                                            wkappa2, floor2, table, nc)
        elif n_hit:
            for j in range(wd):
                if hit[j]:
                    counts[b, 1] += _recheck_pixels(i, j, j + 1, hit, mean, m2, wsum, count, top1, top2, idx1, idx2,
                                                    weights, wkappa2, floor2, table, nc)
    return counts


@numba.njit(inline="always")
def _n_warm(i, count, warmup):
    """How many pixels of row i are still in their warm-up (fewer than `warmup` samples)."""
    n = 0
    for j in range(count.shape[1]):
        n += count[i, j] < warmup
    return n


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _steady_run_1(i, x, r0, off, w, mean, m2, wsum, count, reject, kappa2, floor2, tracking, warmup):
    """`_steady_run` of a mono stack, compiled on its own: inlined into `_add_rows`, or with
    the number of planes unknown, LLVM does not vectorise it (measured 4x slower)."""
    return _steady_run(i, x, r0, off, w, mean, m2, wsum, count, reject, kappa2, floor2, tracking, warmup, 1)


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _steady_run_3(i, x, r0, off, w, mean, m2, wsum, count, reject, kappa2, floor2, tracking, warmup):
    """`_steady_run` of an RGB stack (see `_steady_run_1`)."""
    return _steady_run(i, x, r0, off, w, mean, m2, wsum, count, reject, kappa2, floor2, tracking, warmup, 3)


@numba.njit(inline="always")
def _steady_run(i, x, r0, off, w, mean, m2, wsum, count, reject, kappa2, floor2, tracking, warmup, nc):
    """Row i's steady pixels (all, once the warm-up bookkeeping is over; else those holding
    `warmup` samples): the rejection test and the weighted Welford update, as selects
    instead of branches so that it vectorises. Other pixels are left as they are. Returns the
    number of samples rejected."""
    nrej = 0
    for j in range(mean.shape[2]):
        n = count[i, j]
        ws = wsum[i, j]
        nf = np.float32(n)
        steady = (not tracking) | (n >= warmup)
        # float32 throughout (with integer literals numba would widen these to float64, which
        # halves the vector width: the pass took ~15 % longer).
        one = np.float32(1.0)
        scale = nf / (max(nf - one, one) * ws)
        grow = kappa2 * (one + one / max(nf, one))
        finite = True
        bad = False
        for c in range(nc):
            val = x[c, i - r0, j] + off[c]
            finite &= math.isfinite(val)
            var = max(_m2_get(m2, i, j, c) * scale, floor2[c])
            d = val - mean[c, i, j]
            bad |= d * d > grow * var
        bad = bad & reject & (n >= 2)
        finite = finite & steady
        use = finite & (not bad)
        nrej += finite & bad
        ws_new = ws + w
        r = w / ws_new
        for c in range(nc):
            _welford(mean, m2, i, j, c, x[c, i - r0, j] + off[c], n, w, r, use)
        wsum[i, j] = ws_new if use else ws
        count[i, j] = n + 1 if use else n
    return nrej


@numba.njit(inline="always")
def _welford_step(mu, q, val, n, w, r):
    """West's weighted Welford update of one pixel's plane: (mean, m2) with sample `val` of
    weight `w` (`r` = w / new weight sum). The one place both runs update the statistics:
    the same float32 operations whichever run a pixel takes."""
    d = val - mu
    new_mu = val if n == 0 else mu + d * r
    new_q = np.float32(0.0) if n == 0 else q + w * d * d * (np.float32(1.0) - r)  # w * d_old * (x - mean_new)
    return new_mu, new_q


@numba.njit(inline="always")
def _welford(mean, m2, i, j, c, val, n, w, r, use):
    """`_welford_step` of pixel (i, j), plane c, in place where `use`, as a select (vectorises)."""
    mu = mean[c, i, j]
    q = _m2_get(m2, i, j, c)
    new_mu, new_q = _welford_step(mu, q, val, n, w, r)
    mean[c, i, j] = new_mu if use else mu
    _m2_set(m2, i, j, c, new_q if use else q)


@numba.njit(inline="always")
def _share(i1, w1, ws):
    """w1 * ws / (ws - w1): times (x1 - mean)^2, what the brightest warm-up sample (frame i1,
    weight w1) adds to m2 (weight sum ws); 0 without one."""
    return w1 * ws / (ws - w1) if (i1 != _NONE) & (ws - w1 > 0) else np.float32(0.0)


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _warmup_run_1(i, x, r0, off, w, mean, m2, wsum, count, warmup, top1, top2, idx1, idx2, frame_no, weights, table,
                  hit, w1s, n_warm):
    """`_warmup_run` of a mono stack, compiled on its own (see `_steady_run_1`)."""
    return _warmup_run(i, x, r0, off, w, mean, m2, wsum, count, warmup, top1, top2, idx1, idx2, frame_no, weights,
                       table, hit, w1s, n_warm, 1)


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _warmup_run_3(i, x, r0, off, w, mean, m2, wsum, count, warmup, top1, top2, idx1, idx2, frame_no, weights, table,
                  hit, w1s, n_warm):
    """`_warmup_run` of an RGB stack (see `_steady_run_1`)."""
    return _warmup_run(i, x, r0, off, w, mean, m2, wsum, count, warmup, top1, top2, idx1, idx2, frame_no, weights,
                       table, hit, w1s, n_warm, 3)


@numba.njit(inline="always")
def _warmup_run(i, x, r0, off, w, mean, m2, wsum, count, warmup, top1, top2, idx1, idx2, frame_no, weights, table, hit,
                w1s, n_warm, nc):
    """Row i's pixels that are still in their warm-up (fewer than `warmup` samples; `n_warm`
    of them, `_n_warm`): see `_warmup_pixels`. A row where many are (the first frames) goes
    through it as one vectorised loop; a row with a few (the dithered border, pixels whose
    brightest sample the re-check took out) pixel by pixel. Returns how many pixels have
    just reached `warmup` samples, flagged in `hit`, for the caller to re-check."""
    wd = mean.shape[2]
    if n_warm == 0:
        return 0
    if n_warm * 8 >= wd:
        return _warmup_pixels(i, 0, wd, x, r0, off, w, mean, m2, wsum, count, warmup, top1, top2, idx1, idx2,
                              frame_no, weights, table, hit, w1s, nc)
    n_hit = 0
    for j in range(wd):
        hit[j] = False
        if count[i, j] < warmup:
            n_hit += _warmup_pixels(i, j, j + 1, x, r0, off, w, mean, m2, wsum, count, warmup, top1, top2, idx1, idx2,
                                    frame_no, weights, table, hit, w1s, nc)
    return n_hit


@numba.njit(inline="always")
def _warmup_pixels(i, j0, j1, x, r0, off, w, mean, m2, wsum, count, warmup, top1, top2, idx1, idx2, frame_no, weights,
                   table, hit, w1s, nc):
    """Pixels j0..j1 of row i in their warm-up: no rejection test; the two brightest samples
    (by the sum over planes) remembered as half floats with their frame index; the weighted
    Welford update. Written as selects instead of branches so that it vectorises (the
    per-pixel version with branches took 4-5x the steady pass at 4144x2822). Pixels not in
    warm-up are left as they are. Their m2 is stored without the share of their brightest
    sample (`_share`), so that the re-check takes that sample out without cancellation,
    whatever precision m2 is kept in. Flags in `hit[j]` the pixels that have just reached
    `warmup` samples and returns their number. `w1s`: scratch, a float32 per pixel of the row."""
    for j in range(j0, j1):  # (a gather on its own: in the loop below it would stop LLVM vectorising)
        w1s[j] = weights[idx1[i, j]]
    n_hit = 0
    for j in range(j0, j1):
        n = count[i, j]
        finite = True
        key = np.float32(0.0)
        k1 = np.float32(0.0)
        k2 = np.float32(0.0)
        for c in range(nc):
            val = x[c, i - r0, j] + off[c]
            finite &= math.isfinite(val)
            key += val
            k1 += _warm_value(table, top1[c, i, j])
            k2 += _warm_value(table, top2[c, i, j])
        use = finite & (n < warmup)
        i1 = idx1[i, j]
        i2 = idx2[i, j]
        first = (i1 == _NONE) | (key > k1)  # the new brightest; the old one becomes second
        second = (not first) & ((i2 == _NONE) | (key > k2))
        ws = wsum[i, j]
        ws_new = ws + w
        r = w / ws_new
        i1_new = frame_no if use & first else i1
        w1 = w1s[j]
        share = _share(i1, w1, ws)
        share_new = _share(i1_new, w if use & first else w1, ws_new if use else ws)  # (weights[frame_no] is w)
        for c in range(nc):
            val = x[c, i - r0, j] + off[c]
            h = to_half(val * _HALF_SCALE)
            t1 = top1[c, i, j]
            t2 = top2[c, i, j]
            t1_new = h if use & first else t1
            top1[c, i, j] = t1_new
            top2[c, i, j] = (t1 if first else h) if use & (first | second) else t2
            mu = mean[c, i, j]
            rest = _m2_get(m2, i, j, c)
            d1 = _warm_value(table, t1) - mu
            new_mu, new_q = _welford_step(mu, rest + (share * d1 * d1 if share > 0 else np.float32(0.0)), val, n, w, r)
            d1 = _warm_value(table, t1_new) - new_mu
            mean[c, i, j] = new_mu if use else mu
            _m2_set(m2, i, j, c, (new_q - (share_new * d1 * d1 if share_new > 0 else np.float32(0.0))) if use else rest)
        idx1[i, j] = i1_new
        idx2[i, j] = (i1 if first else frame_no) if use & (first | second) else i2
        wsum[i, j] = ws_new if use else ws
        count[i, j] = n + 1 if use else n
        reached = use & (n + 1 == warmup)
        hit[j] = reached
        n_hit += reached
    return n_hit


@numba.njit(inline="always")
def _recheck_pixels(i, j0, j1, hit, mean, m2, wsum, count, top1, top2, idx1, idx2, weights, kappa2, floor2, table,
                    nc):
    """End of the warm-up of the pixels j0..j1 of row i flagged in `hit`: take a pixel's one
    or two brightest samples out where they are outliers *above* the rest (both, where the
    second brightest is one against the statistics without both: two hits on one spot; else
    the brightest, where it is one against the statistics without it); mark the pixel done
    (its m2 whole from now on, see `_warmup_pixels`). Pixels not flagged are left as they are.
    The inverse Welford updates and the tests are computed for every pixel and applied by
    selects, without branches (a loop over a row's pixels that vectorises; the branching
    version took ~100 ns a pixel, the whole re-check frame 3x a warm-up frame). Returns the
    samples removed."""
    removed = 0
    for j in range(j0, j1):
        h = hit[j]
        n = np.int64(count[i, j])
        i1 = idx1[i, j]
        i2 = idx2[i, j]
        w1 = weights[i1]
        w2 = weights[i2]
        ws = wsum[i, j]
        share = _share(i1, w1, ws)
        ws1 = ws - w1  # without the brightest
        ws2 = ws1 - w2  # without both
        go = h & (n >= 4) & (i1 != _NONE) & (ws1 > 0)
        two = go & (n >= 5) & (i2 != _NONE) & (ws2 > 0)
        # (numba types these float64, as the threshold of the steady pass once was)
        nf1 = np.float32(n - 1)
        scale1 = nf1 / ((nf1 - 1) * ws1)
        grow1 = kappa2 * (1 + 1 / nf1)
        nf2 = np.float32(n - 2)
        scale2 = nf2 / ((nf2 - 1) * ws2)
        grow2 = kappa2 * (1 + 1 / nf2)
        bad1 = False
        bad2 = False
        for c in range(nc):
            x1, mu, rest, mo1, x2, mo2, q2 = _without_brightest(i, j, c, mean, m2, top1, top2, table, w1, w2, ws, ws1,
                                                                ws2)
            d1 = x1 - mo1
            bad1 |= (d1 > 0) & (d1 * d1 > grow1 * max(rest * scale1, floor2[c]))
            d2 = x2 - mo2
            bad2 |= (d2 > 0) & (d2 * d2 > grow2 * max(q2 * scale2, floor2[c]))
        drop2 = two & bad2
        drop1 = go & (not drop2) & bad1
        for c in range(nc):
            x1, mu, rest, mo1, x2, mo2, q2 = _without_brightest(i, j, c, mean, m2, top1, top2, table, w1, w2, ws, ws1,
                                                                ws2)
            q = rest + share * (x1 - mu) * (x1 - mu) if share > 0 else rest  # m2 whole again
            new_mu = mo2 if drop2 else (mo1 if drop1 else mu)
            new_q = max(q2, np.float32(0.0)) if drop2 else (max(rest, np.float32(0.0)) if drop1 else q)
            mean[c, i, j] = new_mu if h else mu
            _m2_set(m2, i, j, c, new_q if h else rest)
        wsum[i, j] = ws2 if drop2 else (ws1 if drop1 else ws)
        count[i, j] = n - 2 if drop2 else (n - 1 if drop1 else n)
        idx1[i, j] = _NONE if h else i1  # done: never re-checked again
        idx2[i, j] = _NONE if h else i2
        removed += 2 * drop2 + drop1
    return removed


@numba.njit(inline="always")
def _without_brightest(i, j, c, mean, m2, top1, top2, table, w1, w2, ws, ws1, ws2):
    """Plane c of pixel (i, j): its brightest warm-up sample x1, mean mu, m2 as kept (`rest`:
    without x1's share), the mean without x1 (mo1), the second brightest x2, and the mean and
    m2 without both (mo2, q2): the inverse weighted Welford updates (weights w1, w2; weight
    sums ws, ws1 = ws - w1, ws2 = ws1 - w2), m2 without x1 being `rest` itself (no
    cancellation). float32 throughout."""
    x1 = _warm_value(table, top1[c, i, j])
    mu = mean[c, i, j]
    rest = _m2_get(m2, i, j, c)
    mo1 = (mu * ws - x1 * w1) / ws1
    x2 = _warm_value(table, top2[c, i, j])
    mo2 = (mo1 * ws1 - x2 * w2) / ws2
    q2 = rest - w2 * (x2 - mo2) * (x2 - mo1)
    return x1, mu, rest, mo1, x2, mo2, q2


@numba.njit(parallel=True, cache=True, nogil=True)
def _recheck_all(mean, m2, wsum, count, top1, top2, idx1, idx2, weights, kappa2, floor2, table):
    """Re-check every pixel whose warm-up is still open (before freeing the buffers)."""
    nc, h, wd = mean.shape
    removed = np.zeros(h, np.int64)
    for i in numba.prange(h):
        hit = np.empty(wd, np.bool_)
        for j in range(wd):
            hit[j] = idx1[i, j] != _NONE
        removed[i] = _recheck_pixels(i, 0, wd, hit, mean, m2, wsum, count, top1, top2, idx1, idx2, weights, kappa2,
                                     floor2, table, nc)
    return removed
