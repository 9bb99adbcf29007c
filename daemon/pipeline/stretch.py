"""Automatic screen stretch of a linear stack for the preview (pure, float32).

A linear stack is almost black on screen: the sky sits a few percent above zero and the
faint nebula just above it. The stretch here is the one PixInsight's STF "auto" popularised:
clip the shadows a few robust sigmas below the background median, then apply the midtones
transfer function (MTF) that puts the background at a fixed grey (`target_background`).
Before that: downscale (the preview needs no more than ~1920 px and everything after is
then cheap), optionally subtract a smooth background model (light pollution gradients), and
neutralise the background so the sky comes out grey rather than tinted.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import cv2
import numba
import numpy as np


@dataclass(frozen=True)
class StretchSettings:
    """shadows_clip: black point relative to the background median (robust sigma, negative).
    target_background: screen level of the sky after stretching (0..1).
    linked: one stretch for all colour planes (keeps the colour balance) or one per plane.
    neutralize: shift the planes so their backgrounds match (grey sky).
    gradient: subtract a smooth background model (grid of `grid` x `grid` sigma-clipped
        medians, smoothed and interpolated) before stretching.
    max_edge: long edge of the output (px); larger images are downscaled first."""

    shadows_clip: float = -2.8
    target_background: float = 0.25
    linked: bool = False
    neutralize: bool = True
    gradient: bool = False
    grid: int = 16
    max_edge: int = 1920


def downscale(image: np.ndarray, max_edge: int) -> np.ndarray:
    """Area-average down to a long edge of `max_edge` px: the weights of OpenCV's INTER_AREA
    (same result to float rounding), in one numba pass that sums the input rows of an output
    row with contiguous (vectorised) loads first and then sums along the row; OpenCV sums
    along every input row first, through an index table: 1.7x (4144x2822x3) to 3x (6248x4176)
    slower. An output pixel whose area holds a NaN (no data) is NaN: the unstacked border
    grows by about one preview pixel, and no full-size temporary is needed to avoid that.
    A view of planes (the running stack's (H, W, C) image of (C, H, W) planes) is read as
    planes, with no interleaved copy; not downscaled, it comes back interleaved (one copy)."""
    h, w = image.shape[:2]
    f = max_edge / max(h, w)
    planes = _plane_view(image)
    if f >= 1:
        if planes is not None:  # interleaved in one pass
            return cv2.merge(list(planes))
        return image.astype(np.float32, copy=False)
    dh, dw = max(1, round(h * f)), max(1, round(w * f))
    xi, xw = _area_weights(w, dw)
    if planes is not None:  # read as they are, no interleaved copy
        out = np.empty((dh, dw * planes.shape[0]), np.float32)
        _area_kernel_planes(planes, out, *_area_weights(h, dh), xi, xw)
        return out.reshape(dh, dw, planes.shape[0])
    src = np.ascontiguousarray(image, dtype=np.float32)
    c = 1 if src.ndim == 2 else src.shape[2]
    out = np.empty((dh, dw * c), np.float32)
    _area_kernel(src.reshape(h, w * c), out, *_area_weights(h, dh), xi * c, xw)
    return out.reshape((dh, dw) + src.shape[2:])


def _plane_view(image: np.ndarray) -> np.ndarray | None:
    """The C-contiguous (C, H, W) float32 planes an (H, W, C) image is a view of (the running
    stack's image), or None when it is no such view (interleaved, mono)."""
    if image.ndim != 3 or image.dtype != np.float32 or image.flags.c_contiguous:
        return None
    planes = np.moveaxis(image, 2, 0)
    return planes if planes.flags.c_contiguous else None


@functools.lru_cache(maxsize=16)
def _area_weights(n: int, dn: int) -> tuple[np.ndarray, np.ndarray]:
    """INTER_AREA along one axis, n -> dn <= n px, as OpenCV computes it: output pixel d
    covers input [d * n / dn, (d + 1) * n / dn), each input pixel weighted by the fraction
    of it covered (below 1e-3 of a pixel: left out), normalised to sum to 1. Returned as
    (dn, K) input indices and weights (float32), rows padded with index n and weight 0.
    Cached: the preview has the same size frame after frame."""
    scale = n / dn
    rows = []
    for d in range(dn):
        f1 = d * scale
        f2 = f1 + scale
        cell = min(scale, n - f1)
        s2 = min(math.floor(f2), n - 1)
        s1 = min(math.ceil(f1), s2)
        taps = [(s1 - 1, (s1 - f1) / cell)] if s1 - f1 > 1e-3 else []
        taps += [(s, 1.0 / cell) for s in range(s1, s2)]
        if f2 - s2 > 1e-3:
            taps.append((s2, min(f2 - s2, 1.0, cell) / cell))
        rows.append(taps)
    k = max(len(t) for t in rows)
    idx, wt = np.full((dn, k), n, np.int64), np.zeros((dn, k), np.float32)
    for d, taps in enumerate(rows):
        idx[d, :len(taps)], wt[d, :len(taps)] = zip(*taps, strict=True)
    return idx, wt


@numba.njit(parallel=True, cache=True, nogil=True)
def _area_kernel_planes(src, dst, yi, yw, xi, xw):  # pragma: no cover - numba
    """`_area_kernel` of an image given as planes, src (C, H, W) float32, into the same
    interleaved dst (h, w * C), with the same sums in the same order (the same values); xi
    pixel indices (not times C), padded with W."""
    c, n = src.shape[0], src.shape[2]
    for i in numba.prange(dst.shape[0]):
        buf = np.zeros(c * (n + 1), np.float32)  # the planes' summed rows, one after the other
        for k in range(yi.shape[1]):
            a = yw[i, k]
            if a == 0:
                break
            for ch in range(c):
                row = src[ch, yi[i, k]]
                acc = buf[ch * (n + 1): ch * (n + 1) + n]
                for t in range(n):
                    acc[t] += a * row[t]
        _area_columns(buf, dst[i], xi, xw, c, n + 1)


@numba.njit(parallel=True, cache=True, nogil=True)
def _area_kernel(src, dst, yi, yw, xi, xw):  # pragma: no cover - numba
    """dst (h, w * C) = area average of src (H, W * C), C channels interleaved, float32.
    yi, yw: (h, Ky) rows and weights per output row (weight 0 = padding, the rest follow);
    xi, xw: (w, Kx) element offsets of pixels (index * C) and weights per output column,
    padded with offset W * C: a zero pixel appended to the row buffer, so the padding adds
    0 * 0 and never a NaN. A fixed Kx keeps the inner loop free of mispredicted branches."""
    h, wc = dst.shape
    c = wc // xi.shape[0]
    n = src.shape[1]
    for i in numba.prange(h):
        buf = np.zeros(n + c, np.float32)
        for k in range(yi.shape[1]):
            a = yw[i, k]
            if a == 0:
                break
            row = src[yi[i, k]]
            for t in range(n):
                buf[t] += a * row[t]
        _area_columns(buf, dst[i], xi, xw, c, 1)


@numba.njit(inline="always")
def _area_columns(buf, out, xi, xw, c, step):  # pragma: no cover - numba
    """The column pass of the area kernels: one output row `out` (w * C, interleaved) from
    its summed input row `buf` (1-D): channel ch of pixel j is the sum over taps k of
    xw[j, k] * buf[xi[j, k] + ch * step] (`step`: from one channel's value to the next's in
    `buf`, 1 interleaved, a plane's length planar)."""
    w, kx = xi.shape
    if c == 3:  # three accumulators: the channel loop inside the tap loop is slower
        for j in range(w):
            r = g = b = np.float32(0)
            for k in range(kx):
                o, a = xi[j, k], xw[j, k]
                r += a * buf[o]
                g += a * buf[o + step]
                b += a * buf[o + 2 * step]
            out[3 * j], out[3 * j + 1], out[3 * j + 2] = r, g, b
    else:
        for j in range(w):
            for ch in range(c):
                v = np.float32(0)
                for k in range(kx):
                    v += xw[j, k] * buf[xi[j, k] + ch * step]
                out[j * c + ch] = v


def mtf(m: float | np.ndarray, x: np.ndarray) -> np.ndarray:
    """Midtones transfer function: 0 -> 0, m -> 0.5, 1 -> 1 (x in [0, 1])."""
    return ((m - 1) * x) / ((2 * m - 1) * x - m)


def midtones_for(x: float, target: float) -> float:
    """The midtones balance m with mtf(m, x) == target."""
    x = min(max(x, 1e-6), 1 - 1e-6)
    return float(x * (target - 1) / (2 * target * x - target - x))


def background_stats(plane: np.ndarray, samples: int = 60_000) -> tuple[float, float, float]:
    """(median, robust sigma = 1.4826 * MAD, minimum) of one plane's finite pixels (ADU),
    from a regular grid of about `samples` pixels: plenty for three numbers, and no
    full-size temporary."""
    h, w = plane.shape
    step = max(1, int(np.sqrt(h * w / samples)))
    v = plane[::step, ::step].ravel()
    v = v[np.isfinite(v)]
    if v.size == 0:
        return np.nan, 0.0, np.nan
    low = float(v.min())
    med = float(_median(v))
    return med, float(1.4826 * _median(np.abs(v - med))), low


def _median(v: np.ndarray) -> np.floating:
    """np.median of a 1-D float array without NaN, reordering v: the same value from the
    same arithmetic (the mean of the two middle values in v's dtype), but one selection and
    a max where np.median partitions for three positions (one to look for NaN) and copies
    first: ~4x faster on the ~70k samples of `background_stats`."""
    k = v.size // 2
    v.partition(k)
    return v[k] if v.size % 2 else (v[:k].max() + v[k]) / 2


def background_model(plane: np.ndarray, grid: int = 16) -> np.ndarray:
    """Smooth background of one plane: sigma-clipped medians in a grid x grid mesh (stars
    and nebula cores excluded), median-filtered, bicubically interpolated to full size."""
    h, w = plane.shape
    small = downscale(plane, 384)  # the model is smooth: a small copy carries all of it
    if small.shape != plane.shape:
        return cv2.resize(background_model(small, grid), (w, h), interpolation=cv2.INTER_CUBIC)
    gy, gx = max(2, min(grid, h // 8)), max(2, min(grid, w // 8))
    ys = np.linspace(0, h, gy + 1).astype(int)
    xs = np.linspace(0, w, gx + 1).astype(int)
    mesh = np.empty((gy, gx), np.float32)
    for i in range(gy):
        for j in range(gx):
            cell = plane[ys[i]:ys[i + 1], xs[j]:xs[j + 1]]
            v = cell[np.isfinite(cell)]
            if v.size == 0:
                mesh[i, j] = np.nan
                continue
            for _ in range(3):
                med = np.median(v)
                sig = 1.4826 * np.median(np.abs(v - med)) + 1e-12
                v = v[np.abs(v - med) < 2.5 * sig] if v.size > 10 else v
            mesh[i, j] = np.median(v) if v.size else med
    if np.isnan(mesh).all():
        return np.zeros_like(plane)
    mesh = np.where(np.isnan(mesh), np.nanmedian(mesh), mesh).astype(np.float32)
    mesh = cv2.medianBlur(mesh, 3) if min(gy, gx) >= 3 else mesh
    return cv2.resize(mesh, (w, h), interpolation=cv2.INTER_CUBIC)


def _prepare(image: np.ndarray, s: StretchSettings) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The downscaled image as (H', W', C) float32 and per-channel (a, b, m): the screen value
    of pixel x is mtf(m, clip(a * x + b, 0, 1)). Neutralisation and the black/white points
    are folded into a and b, so they cost no pass over the image.

    The image is the caller's own array when it needs no downscaling and no gradient
    removal (read it, never write it): the statistics sample it and the white point is one
    reduction, so a full-size copy, or a split into planes, would only cost time."""
    small = downscale(image, s.max_edge)
    if small.ndim == 2:
        small = small[..., None]
    n = small.shape[2]
    if s.gradient:
        if np.shares_memory(small, image):  # never modify the caller's stack
            small = small.copy()
        for c in range(n):
            model = background_model(small[..., c], s.grid)
            small[..., c] -= model - np.nanmedian(model)
    stats = np.array([background_stats(small[..., c]) for c in range(n)])  # median, sigma, min
    if np.isnan(stats).any():  # nothing (sampled) to stretch: a black screen
        return small, np.zeros(n, np.float32), np.zeros(n, np.float32), np.full(n, 0.5)
    med, sig, low = stats[:, 0], stats[:, 1], stats[:, 2]
    off = (med.mean() - med) if (s.neutralize and n > 1) else np.zeros(n)
    med, low = med + off, low + off
    if s.linked or n == 1:
        med, sig = np.full(n, med.mean()), np.full(n, sig.mean())
    white = float(np.max(channel_max(small) + off))
    black = np.minimum(np.maximum(med + s.shadows_clip * sig, low), med)
    span = np.maximum(white - black, 1e-6)
    m = np.array([midtones_for((med[c] - black[c]) / span[c], s.target_background) for c in range(n)])
    return small, (1.0 / span).astype(np.float32), ((off - black) / span).astype(np.float32), m


def channel_max(image: np.ndarray) -> np.ndarray:
    """Per-channel maximum of an (H, W, C) image, NaN ignored (NaN for a channel with no
    data). The rows are reduced first, element-wise over (W * C)-long contiguous rows, then
    the (W, C) result: numpy's reduction over the pixels of an interleaved image runs its
    inner loop C elements long, ~50x slower."""
    h, w, c = image.shape
    with np.errstate(invalid="ignore"):
        return np.fmax.reduce(np.fmax.reduce(image.reshape(h, w * c), axis=0).reshape(w, c), axis=0)


def stretch(image: np.ndarray, settings: StretchSettings = StretchSettings()) -> np.ndarray:
    """Linear stack (H, W) or (H, W, 3), ADU, NaN = no data -> screen image in [0, 1], float32,
    downscaled to `settings.max_edge`. Missing pixels come out black."""
    small, a, b, m = _prepare(image, settings)
    x = np.clip(small * a + b, 0, 1)
    out = np.nan_to_num(mtf(m, x).astype(np.float32), copy=False, nan=0.0)
    return out[..., 0] if out.shape[2] == 1 else out


def stretch_uint8(image: np.ndarray, settings: StretchSettings = StretchSettings()) -> np.ndarray:
    """The same stretch straight to uint8 for the preview, in one vectorised pass (float32;
    the uint8 screen value is the float stretch's to within one level, and NaN is black)."""
    small, a, b, m = _prepare(image, settings)
    h, w, n = small.shape
    out = np.empty((h, w * n), np.uint8)
    src = np.ascontiguousarray(small).reshape(h, w * n)
    _stretch_kernel(src, a, b, m.astype(np.float32), (1 - m).astype(np.float32), out)
    return out.reshape(small.shape[:2]) if n == 1 else out.reshape(small.shape)


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _stretch_kernel(src, a, b, m, u, dst):  # pragma: no cover - numba
    """dst = round(255 * mtf(m, clip(a * src + b, 0, 1))) per channel, NaN -> 0; src, dst
    (H, W * C), channels interleaved; a, b, m and u = 1 - m (from float64): (C,) float32.

    The MTF is written as u x / (m (1 - x) + u x): a sum of two non-negative terms, with no
    cancellation in float32 even for m near 1. Per-channel constants are
    spread along a row once so that the inner loop is one contiguous, branch-free loop
    that LLVM vectorises (error_model="numpy": no zero-division check, which would stop
    it). Not parallel: ~1 ms for a 1280x1024x3 image, and on a busy machine waking a second
    thread can cost more than that."""
    h, wn = src.shape
    n = a.size
    ra, rb = np.empty(wn, np.float32), np.empty(wn, np.float32)
    rm, ru, ru255 = np.empty(wn, np.float32), np.empty(wn, np.float32), np.empty(wn, np.float32)
    for t in range(wn):
        c = t % n
        ra[t], rb[t], rm[t], ru[t] = a[c], b[c], m[c], u[c]
        ru255[t] = u[c] * np.float32(255)
    one, zero, half = np.float32(1), np.float32(0), np.float32(0.5)
    for i in range(h):
        row, out = src[i], dst[i]
        for t in range(wn):
            x = row[t] * ra[t] + rb[t]
            x = x if x > zero else zero  # NaN (no data) -> 0, black
            x = x if x < one else one
            out[t] = np.uint8(ru255[t] * x / (rm[t] * (one - x) + ru[t] * x) + half)


def to_uint8(screen: np.ndarray) -> np.ndarray:
    """[0, 1] float -> uint8 (rounded)."""
    return (np.clip(screen, 0, 1) * 255 + 0.5).astype(np.uint8)


@dataclass(frozen=True)
class ScreenTransfer:
    """The preview's per-channel transfer, kept to stretch full-resolution crops the same way:
    the screen value of pixel x in channel c is mtf(m[c], clip(a[c] * x + b[c], 0, 1)).
    a, b, m: (C,) float32 (C = 1 for mono, 3 for colour)."""

    a: np.ndarray
    b: np.ndarray
    m: np.ndarray


def screen_transfer(image: np.ndarray, settings: StretchSettings = StretchSettings()) -> ScreenTransfer:
    """The transfer `stretch_uint8` applies to `image` ((H, W) or (H, W, 3) float32, NaN = no
    data), measured on the whole image at the preview's scale (`settings.max_edge`), so a crop
    stretched with it looks like that part of the preview at full resolution. Reads `image`,
    never writes it."""
    _, a, b, m = _prepare(image, settings)
    return ScreenTransfer(a.astype(np.float32), b.astype(np.float32), np.asarray(m, np.float32))


def apply_transfer(crop: np.ndarray, transfer: ScreenTransfer) -> np.ndarray:
    """A full-resolution crop ((h, w) or (h, w, C) float32) -> uint8 screen image of the same
    shape, with the transfer of `screen_transfer`; NaN is black. Raises ValueError when the
    crop's channels do not match the transfer's."""
    planes = crop[..., None] if crop.ndim == 2 else crop
    h, w, n = planes.shape
    if n != transfer.a.size:
        raise ValueError(f"crop has {n} channels, the transfer {transfer.a.size}")
    out = np.empty((h, w * n), np.uint8)
    src = np.ascontiguousarray(planes, dtype=np.float32).reshape(h, w * n)
    m = transfer.m
    _stretch_kernel(src, transfer.a, transfer.b, m, (1 - m).astype(np.float32), out)
    return out.reshape(h, w) if crop.ndim == 2 else out.reshape(h, w, n)
