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

Pure numpy/numba, no I/O. Used by `daemon.pipeline.fused.RegisteredView` for the final
re-stack of spooled mosaics when `stack.debayer = "drizzle"`.
"""

from __future__ import annotations

import numba
import numpy as np

from daemon.pipeline.debayer import _check_pattern


def drizzle_rows(mosaic: np.ndarray, bayer: str, matrix: np.ndarray, r0: int, r1: int, *,
                 pixfrac: float = 0.7, width: int | None = None) -> np.ndarray:
    """Output rows r0..r1 of the Bayer drizzle of one calibrated mosaic.

    mosaic: (H, W) float32 or float16 (a spool memmap), ADU; bayer: its CFA pattern; matrix:
    frame -> reference (3x3, affine, full-resolution pixels); pixfrac: drop side as a
    fraction of an input pixel (0 < pixfrac <= 1); width: output columns (default W).
    Returns (r1 - r0, width, 3) float32, NaN where no drop of a colour landed. Only the
    mosaic rows whose drops can reach the band are read. ValueError on a non-affine matrix
    or a pixfrac out of range."""
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
    num = np.zeros((r1 - r0, width, 3), np.float64)
    den = np.zeros((r1 - r0, width, 3), np.float64)
    if s1 > s0 and r1 > r0:
        src = np.asarray(mosaic[s0:s1], np.float32)
        colour = np.array(["RGB".index(c) for c in pattern], np.int64)
        _drop(src, s0, colour, m, half, r0, num, den)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan).astype(np.float32)
    return out


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
