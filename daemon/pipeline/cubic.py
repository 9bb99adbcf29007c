"""Bicubic resampling through an affine transform near the pixel axes, vectorised (numba).

Why: OpenCV's `warpAffine` with INTER_CUBIC on float32 is scalar per sample; it was the
largest single stage of a full-resolution colour frame. Frames of one session differ from
their reference by a near-translation: a rotation of tenths of a degree, a scale within a few
1e-4, or those plus 180 degrees after a meridian flip. Along an output row the source position
then moves by about +-1 px per pixel, and for runs of hundreds of pixels its integer part
moves in step with the output column: over such a run the kernel's four source columns are
consecutive memory for every output pixel, and the loop vectorises (planar source, one plane
at a time). Each row is cut into such runs (`_run_length`).

The kernel is OpenCV's (Keys' cubic convolution, A = -0.75), at exact source coordinates
(OpenCV rounds them to 1/32 px). Output pixels whose 4x4 footprint leaves the source, or
holds a NaN sample, are NaN. Any affine transform gives the right result; those far from the
axes (`near_axes` False: runs of a few pixels) are faster through OpenCV, which callers use
there.
"""

from __future__ import annotations

import math

import numba
import numpy as np

#: Largest |source step per output pixel - (+-1, 0)| (px/px) on either axis for which
#: `near_axes` holds: runs of at least 50 output pixels (a rotation within ~1.1 degrees of 0 or
#: 180, a scale within 2 %).
NEAR_AXES_TOLERANCE = 0.02
#: Longest run (output pixels): the weights of a run stay in the first-level cache.
_RUN = 512
#: Output rows per task of the parallel whole-image kernels: planar sources, and interleaved
#: ones, whose tasks turn the rows they read into planes (a rotated band reads more rows than
#: it has; in longer bands that overlap costs less).
_ROWS_PER_TASK = 16
_ROWS_PER_TASK_INTERLEAVED = 64


def near_axes(inv: np.ndarray) -> bool:
    """Whether the output -> source affine `inv` (2x3 or 3x3) moves along an output row by
    about (+-1, 0) source px per px (see NEAR_AXES_TOLERANCE): where `cubic_rows` is faster
    than OpenCV."""
    a, d = float(inv[0][0]), float(inv[1][0])
    return abs(abs(a) - 1.0) <= NEAR_AXES_TOLERANCE and abs(d) <= NEAR_AXES_TOLERANCE


def cubic_rows(src: np.ndarray, s0: int, inv: np.ndarray, r0: int, out: np.ndarray, *,
               parallel: bool = False, planar_out: bool = False) -> np.ndarray:
    """Output rows r0 .. r0 + len(out) of the bicubic resampling of an image through the
    affine `inv` (output pixel (x, y) -> source (u, v), 2x3 or 3x3 float64, pixel centres on
    integers). src: (C, S, W_src) float32 planes, source rows s0 .. s0 + S of the image
    (a band, or all of it with s0 = 0); out: (h, W, C) float32, or with planar_out
    (C, h, W), written in place (NaN where the footprint leaves `src` or holds a NaN). The
    result depends only on the output row, never on the band: bands of an image are bit for
    bit the whole image's rows. parallel: the rows on all cores (numba's threads), else on
    the calling thread. Returns `out`."""
    m = np.ascontiguousarray(np.asarray(inv, np.float64)[:2])
    if src.ndim != 3 or out.ndim != 3 or src.shape[0] != out.shape[0 if planar_out else 2]:
        raise ValueError(f"cubic_rows needs (C, S, W) planes and an {'(C, h, W)' if planar_out else '(h, W, C)'} "
                         f"output, got {src.shape}, {out.shape}")
    if src.dtype != np.float32 or out.dtype != np.float32:
        raise TypeError("cubic_rows works on float32")
    (_cubic_parallel if parallel else _cubic_serial)(src, int(s0), m, int(r0), out, planar_out)
    return out


def cubic_image(image: np.ndarray, inv: np.ndarray, out: np.ndarray) -> np.ndarray:
    """`cubic_rows` of a whole image on all cores: image (H, W) or (H, W, C) float32 as
    frames come (colour interleaved), out (h, w[, C]) float32. Colour is turned into planes
    a band of source rows at a time, in each task's own scratch (no full-size copy); the
    same values as `cubic_rows` of the image's planes. Returns `out`."""
    m = np.ascontiguousarray(np.asarray(inv, np.float64)[:2])
    src = np.ascontiguousarray(image, np.float32)
    if src.ndim == 2:
        _cubic_parallel(src[None], 0, m, 0, out.reshape(out.shape[0], out.shape[1], 1), False)
    else:
        _cubic_interleaved(src, m, out.reshape(out.shape[0], out.shape[1], src.shape[2]))
    return out


@numba.njit(parallel=True, cache=True, nogil=True, error_model="numpy")
def _cubic_interleaved(src, inv, out):  # pragma: no cover - numba
    """`_cubic_parallel` of an (H, W, C) image: each task turns the source rows its output
    rows read (their corners mapped back, plus the kernel's reach) into planes first."""
    n_src, w_src, nc = src.shape
    h, w = out.shape[0], out.shape[1]
    d, e, f = inv[1, 0], inv[1, 1], inv[1, 2]
    for t in numba.prange((h + _ROWS_PER_TASK_INTERLEAVED - 1) // _ROWS_PER_TASK_INTERLEAVED):
        y0, y1 = t * _ROWS_PER_TASK_INTERLEAVED, min(h, (t + 1) * _ROWS_PER_TASK_INTERLEAVED)
        v_lo = min(min(f + e * y0, f + e * (y1 - 1)), min(d * (w - 1) + f + e * y0, d * (w - 1) + f + e * (y1 - 1)))
        v_hi = max(max(f + e * y0, f + e * (y1 - 1)), max(d * (w - 1) + f + e * y0, d * (w - 1) + f + e * (y1 - 1)))
        v_lo = min(max(v_lo, -4.0), n_src + 4.0)  # (a band mapped far outside reads nothing)
        v_hi = min(max(v_hi, -4.0), n_src + 4.0)
        s0 = min(max(int(math.floor(v_lo)) - 2, 0), n_src)
        s1 = min(max(int(math.floor(v_hi)) + 4, s0), n_src)
        planes = np.empty((nc, s1 - s0, w_src), np.float32)
        for r in range(s1 - s0):
            for c in range(nc):
                for j in range(w_src):
                    planes[c, r, j] = src[s0 + r, j, c]
        tmp = np.empty((nc, w), np.float32)
        wts = np.empty((8, _RUN), np.float32)
        for k in range(y0, y1):
            _row(planes, s0, inv, k, out, k, tmp, wts, False)


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _cubic_serial(src, s0, inv, r0, out, planar_out):  # pragma: no cover - numba
    """`cubic_rows` on the calling thread."""
    h, w = (out.shape[1], out.shape[2]) if planar_out else (out.shape[0], out.shape[1])
    tmp = np.empty((src.shape[0], w), np.float32)
    wts = np.empty((8, _RUN), np.float32)
    for k in range(h):
        _row(src, s0, inv, r0 + k, out, k, tmp, wts, planar_out)


@numba.njit(parallel=True, cache=True, nogil=True, error_model="numpy")
def _cubic_parallel(src, s0, inv, r0, out, planar_out):  # pragma: no cover - numba
    """`cubic_rows` on numba's threads, _ROWS_PER_TASK output rows per task."""
    h, w = (out.shape[1], out.shape[2]) if planar_out else (out.shape[0], out.shape[1])
    for t in numba.prange((h + _ROWS_PER_TASK - 1) // _ROWS_PER_TASK):
        tmp = np.empty((src.shape[0], w), np.float32)
        wts = np.empty((8, _RUN), np.float32)
        for k in range(t * _ROWS_PER_TASK, min(h, (t + 1) * _ROWS_PER_TASK)):
            _row(src, s0, inv, r0 + k, out, k, tmp, wts, planar_out)


@numba.njit(inline="always")
def _row(src, s0, inv, y, out, k, tmp, wts, planar_out):  # pragma: no cover - numba
    """Output row y (global) into row k of `out` ((h, W, C), or (C, h, W) with planar_out),
    through the planar scratch row `tmp` ((C, W))."""
    nc, n_src, w_src = src.shape
    w = tmp.shape[1]
    a, b, c = inv[0, 0], inv[0, 1], inv[0, 2]
    d, e, f = inv[1, 0], inv[1, 1], inv[1, 2]
    reverse = a < 0
    ub = b * y + c
    vb = e * y + f
    nan = np.float32(np.nan)
    x0 = 0
    while x0 < w:
        ua = a * x0 + ub
        va = d * x0 + vb
        iu = math.floor(ua)
        iv = math.floor(va)
        row = iv - s0  # the footprint's rows row - 1 .. row + 2 of src
        if iu < 1 or iu + 2 >= w_src or row < 1 or row + 2 >= n_src:
            for cc in range(nc):
                tmp[cc, x0] = nan
            x0 += 1
            continue
        n = _run_length(a, ub, d, vb, x0, iu, iv, w, w_src, reverse)
        ta = np.float32(ua - iu)
        fa = np.float32(va - iv)
        dt = np.float32(a + 1.0) if reverse else np.float32(a - 1.0)
        _weights(n, ta, dt, fa, np.float32(d), wts)
        for cc in range(nc):
            p0, p1, p2, p3 = src[cc, row - 1], src[cc, row], src[cc, row + 1], src[cc, row + 2]
            if reverse:
                _taps_reverse(p0, p1, p2, p3, np.uint64(iu - 1), n, wts, tmp[cc], np.uint64(x0))
            else:
                _taps(p0, p1, p2, p3, np.uint64(iu - 1), n, wts, tmp[cc], np.uint64(x0))
        x0 += n
    if planar_out:
        for cc in range(nc):
            out[cc, k, :] = tmp[cc]
    else:
        for x in range(w):
            for cc in range(nc):
                out[k, x, cc] = tmp[cc, x]


@numba.njit(inline="always")
def _run_length(a, ub, d, vb, x0, iu, iv, w, w_src, reverse):  # pragma: no cover - numba
    """Output pixels from x0 (1 .. _RUN) over which floor(u) -+ x and floor(v) stay those at
    x0 and the footprint stays inside the source columns. Each condition holds on a prefix
    (u and v are linear in x), so the end is found by bisection."""
    lo, hi = 1, min(_RUN, w - x0)
    if _same_run(a, ub, d, vb, x0, iu, iv, x0 + hi - 1, w_src, reverse):
        return hi
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _same_run(a, ub, d, vb, x0, iu, iv, x0 + mid - 1, w_src, reverse):
            lo = mid
        else:
            hi = mid - 1
    return lo


@numba.njit(inline="always")
def _same_run(a, ub, d, vb, x0, iu, iv, xe, w_src, reverse):  # pragma: no cover - numba
    iue = math.floor(a * xe + ub)
    if math.floor(d * xe + vb) != iv:
        return False
    if reverse:
        return iue + xe == iu + x0 and iue >= 1
    return iue - xe == iu - x0 and iue + 2 < w_src


@numba.njit(inline="always")
def _cubic_weights(t):  # pragma: no cover - numba
    """Keys' cubic convolution weights (A = -0.75, OpenCV's) of the four samples at
    offsets -1, 0, 1, 2 for a fractional position t (float32)."""
    a = np.float32(-0.75)
    one = np.float32(1.0)
    t1 = t + one
    w0 = ((a * t1 - np.float32(5.0) * a) * t1 + np.float32(8.0) * a) * t1 - np.float32(4.0) * a
    w1 = ((a + np.float32(2.0)) * t - (a + np.float32(3.0))) * t * t + one
    s = one - t
    w2 = ((a + np.float32(2.0)) * s - (a + np.float32(3.0))) * s * s + one
    return w0, w1, w2, one - w0 - w1 - w2


@numba.njit(inline="always")
def _weights(n, ta, dt, fa, dv, wts):  # pragma: no cover - numba
    """Column (rows 0-3) and row (4-7) weights of a run's n pixels: t = ta + dt q, fy = fa + dv q."""
    for q in range(n):
        qf = np.float32(q)
        wx0, wx1, wx2, wx3 = _cubic_weights(ta + dt * qf)
        wy0, wy1, wy2, wy3 = _cubic_weights(fa + dv * qf)
        wts[0, q] = wx0
        wts[1, q] = wx1
        wts[2, q] = wx2
        wts[3, q] = wx3
        wts[4, q] = wy0
        wts[5, q] = wy1
        wts[6, q] = wy2
        wts[7, q] = wy3


@numba.njit(inline="always")
def _taps(p0, p1, p2, p3, x0, n, wts, dst, d0):  # pragma: no cover - numba
    """dst[d0 + q] = the 4x4 weighted sum at source columns x0 + q .. x0 + q + 3 of rows
    p0..p3. Unsigned indices: numba adds no negative-index wraparound, the loads are
    consecutive and the loop vectorises."""
    for q in range(n):
        qu = np.uint64(q)
        x = x0 + qu
        dst[d0 + qu] = _sum16(p0, p1, p2, p3, x, x + np.uint64(1), x + np.uint64(2), x + np.uint64(3), wts, qu)


@numba.njit(inline="always")
def _taps_reverse(p0, p1, p2, p3, x0, n, wts, dst, d0):  # pragma: no cover - numba
    """`_taps` of a run whose source columns go backwards (x0 - q ..): 180 degrees turned."""
    for q in range(n):
        qu = np.uint64(q)
        x = x0 - qu
        dst[d0 + qu] = _sum16(p0, p1, p2, p3, x, x + np.uint64(1), x + np.uint64(2), x + np.uint64(3), wts, qu)


@numba.njit(inline="always")
def _sum16(p0, p1, p2, p3, x, x1, x2, x3, wts, q):  # pragma: no cover - numba
    w0, w1, w2, w3 = wts[np.uint64(0), q], wts[np.uint64(1), q], wts[np.uint64(2), q], wts[np.uint64(3), q]
    acc = wts[np.uint64(4), q] * (w0 * p0[x] + w1 * p0[x1] + w2 * p0[x2] + w3 * p0[x3])
    acc += wts[np.uint64(5), q] * (w0 * p1[x] + w1 * p1[x1] + w2 * p1[x2] + w3 * p1[x3])
    acc += wts[np.uint64(6), q] * (w0 * p2[x] + w1 * p2[x1] + w2 * p2[x2] + w3 * p2[x3])
    acc += wts[np.uint64(7), q] * (w0 * p3[x] + w1 * p3[x1] + w2 * p3[x2] + w3 * p3[x3])
    return acc
