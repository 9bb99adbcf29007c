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

from dataclasses import dataclass

import cv2
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
    """Area-average down to a long edge of `max_edge` px. An output pixel whose area holds a
    NaN (no data) is NaN: the unstacked border grows by about one preview pixel, and no
    full-size temporary is needed to avoid that."""
    h, w = image.shape[:2]
    f = max_edge / max(h, w)
    if f >= 1:
        return image.astype(np.float32, copy=False)
    size = (max(1, round(w * f)), max(1, round(h * f)))
    return cv2.resize(np.ascontiguousarray(image, dtype=np.float32), size, interpolation=cv2.INTER_AREA)


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
    med = float(np.median(v))
    return med, float(1.4826 * np.median(np.abs(v - med))), float(v.min())


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


def _prepare(image: np.ndarray, s: StretchSettings) -> tuple[list[np.ndarray], np.ndarray, np.ndarray, np.ndarray]:
    """Downscaled copies of the planes (each a contiguous (H', W') float32 array: per-plane
    arithmetic on an interleaved (H', W', 3) image runs numpy's inner loops 3 elements long,
    several times slower) and per-plane (a, b, m): the screen value of pixel x is
    mtf(m, clip(a * x + b, 0, 1)). Neutralisation and the black/white points are folded into
    a and b, so they cost no pass over the image."""
    small = downscale(image, s.max_edge)
    if small.ndim == 2:
        planes = [small.copy() if np.shares_memory(small, image) else small]  # never modify the caller's stack
    else:
        planes = list(cv2.split(np.ascontiguousarray(small)))  # new arrays
    n = len(planes)
    if s.gradient:
        for p in planes:
            model = background_model(p, s.grid)
            p -= model - np.nanmedian(model)
    stats = np.array([background_stats(p) for p in planes])  # median, sigma, min
    if np.isnan(stats).any():  # nothing (sampled) to stretch: a black screen
        return planes, np.zeros(n, np.float32), np.zeros(n, np.float32), np.full(n, 0.5)
    med, sig, low = stats[:, 0], stats[:, 1], stats[:, 2]
    off = (med.mean() - med) if (s.neutralize and n > 1) else np.zeros(n)
    med, low = med + off, low + off
    if s.linked or n == 1:
        med, sig = np.full(n, med.mean()), np.full(n, sig.mean())
    white = float(np.max(np.array([np.nanmax(p) for p in planes]) + off))
    black = np.minimum(np.maximum(med + s.shadows_clip * sig, low), med)
    span = np.maximum(white - black, 1e-6)
    m = np.array([midtones_for((med[c] - black[c]) / span[c], s.target_background) for c in range(n)])
    return planes, (1.0 / span).astype(np.float32), ((off - black) / span).astype(np.float32), m


def _join(planes: list[np.ndarray]) -> np.ndarray:
    return planes[0] if len(planes) == 1 else cv2.merge(planes)


def stretch(image: np.ndarray, settings: StretchSettings = StretchSettings()) -> np.ndarray:
    """Linear stack (H, W) or (H, W, 3), ADU, NaN = no data -> screen image in [0, 1], float32,
    downscaled to `settings.max_edge`. Missing pixels come out black."""
    planes, a, b, m = _prepare(image, settings)
    for c, p in enumerate(planes):
        p *= a[c]
        p += b[c]
        np.clip(p, 0, 1, out=p)
        p[...] = mtf(m[c], p)
        np.nan_to_num(p, copy=False, nan=0.0)
    return _join(planes)


def stretch_uint8(image: np.ndarray, settings: StretchSettings = StretchSettings()) -> np.ndarray:
    """The same stretch straight to uint8 for the preview, through a 16-bit lookup table
    per plane instead of float arithmetic per pixel (~3x faster)."""
    planes, a, b, m = _prepare(image, settings)
    x = np.linspace(0, 1, 65536)
    out = []
    for c, p in enumerate(planes):
        p *= a[c] * np.float32(65535)
        p += b[c] * np.float32(65535)
        np.clip(p, 0, 65535, out=p)
        with np.errstate(invalid="ignore"):  # NaN (no data) -> a huge negative index -> black
            idx = p.astype(np.int32)
        out.append(np.take(to_uint8(mtf(m[c], x)), idx, mode="clip"))
    return _join(out)


def to_uint8(screen: np.ndarray) -> np.ndarray:
    """[0, 1] float -> uint8 (rounded)."""
    return (np.clip(screen, 0, 1) * 255 + 0.5).astype(np.uint8)
