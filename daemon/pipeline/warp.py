"""Resample a frame onto the reference grid, NaN where the frame has no data.

Bicubic by default, chosen by measurement (noise-free 600x400 star fields, four sub-pixel
shifts/rotations):

    interpolation  FWHM after warp / before
                   FWHM 2.0 / 2.5 / 3.5 px
    bilinear       1.11 / 1.08 / 1.04 (max 1.15)
    bicubic        1.00 / 0.99 / 0.99
    lanczos        1.00 / 1.00 / 1.00

Bilinear blurs well-sampled stars by 4-11 %, which a stack keeps for good; bicubic keeps the
FWHM; Lanczos buys nothing measurable over bicubic at several times its cost (timings in
bench/PERFORMANCE.md). Bilinear stays available for the tightest budgets.

Bicubic through an affine matrix near the pixel axes (what registration gives within a
session, and after a meridian flip: `daemon.pipeline.cubic.near_axes`) runs in our own
vectorised kernel (`daemon.pipeline.cubic`, OpenCV's cubic at exact coordinates); every
other case in OpenCV.
"""

from __future__ import annotations

import cv2
import numba
import numpy as np

from daemon.pipeline.cubic import cubic_image, cubic_rows, near_axes

INTERPOLATIONS = {
    "bilinear": cv2.INTER_LINEAR,
    "bicubic": cv2.INTER_CUBIC,
    "lanczos": cv2.INTER_LANCZOS4,
    "nearest": cv2.INTER_NEAREST,
}


def warp(
    image: np.ndarray,
    matrix: np.ndarray,
    output_shape: tuple[int, int],
    interpolation: str = "bicubic",
) -> np.ndarray:
    """Image (2-D or H x W x 3, ADU) resampled so that frame pixel p lands on `matrix @ p`.

    `matrix` is a Registration matrix (frame -> reference, 3x3); `output_shape` the
    reference's (rows, columns). Output pixels whose source lies outside the frame, or that
    interpolate from a NaN, are NaN so they never dilute a stack. float32.
    """
    src = np.asarray(image, dtype=np.float32)
    if src.ndim not in (2, 3):
        raise ValueError(f"warp needs a 2-D or H x W x C image, got shape {src.shape}")
    m = np.asarray(matrix, dtype=np.float64)
    if m.shape != (3, 3):
        raise ValueError(f"warp needs a 3x3 matrix, got shape {m.shape}")
    try:
        flag = INTERPOLATIONS[interpolation]
        _MARGIN[interpolation]
    except KeyError:
        raise ValueError(f"unknown interpolation {interpolation!r}; "
                         f"expected one of {', '.join(INTERPOLATIONS)}") from None
    h, w = int(output_shape[0]), int(output_shape[1])
    if not src.flags.c_contiguous:
        src = np.ascontiguousarray(src)
    margin = _MARGIN[interpolation]
    # An explicit dst: measured 6x faster for H x W x 3 than letting OpenCV allocate it.
    out = np.empty((h, w) + src.shape[2:], dtype=np.float32)
    # Border 0, then NaN by geometry: OpenCV's cubic/Lanczos with a NaN border value leak
    # NaN into thousands of interior pixels (measured), and a 0 border must not be stacked.
    if own_cubic(m, interpolation):  # (its NaN outside the frame already as below)
        cubic_image(src, np.linalg.inv(m), out)
    elif np.allclose(m[2], [0.0, 0.0, 1.0]):
        # cv2 maps src -> dst with the forward matrix (it inverts it internally).
        cv2.warpAffine(src, m[:2], (w, h), dst=out, flags=flag,
                       borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        _nan_outside_affine(out, np.linalg.inv(m), src.shape[:2], margin)
    else:
        cv2.warpPerspective(src, m, (w, h), dst=out, flags=flag,
                            borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        valid = np.zeros(src.shape[:2], np.uint8)
        valid[margin : src.shape[0] - margin, margin : src.shape[1] - margin] = 255
        cover = cv2.warpPerspective(valid, m, (w, h), flags=cv2.INTER_LINEAR,
                                    borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        out[cover < 255] = np.nan
    return out


def own_cubic(matrix: np.ndarray, interpolation: str) -> bool:
    """Whether `warp` and `warp_rows` resample through `matrix` (frame -> reference, 3x3)
    with `daemon.pipeline.cubic` (bicubic, affine, near the axes) rather than OpenCV."""
    m = np.asarray(matrix, dtype=np.float64)
    return interpolation == "bicubic" and bool(np.allclose(m[2], [0.0, 0.0, 1.0])) and near_axes(np.linalg.inv(m))


def as_planes(image: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """(C, H, W) float32 planes of an (H, W) or (H, W, C) image: a view of a contiguous
    float32 2-D image, else a copy (into `out` if given), made by OpenCV's channel copy
    (numpy's strided transpose takes several times longer)."""
    if image.ndim == 2:
        planes = np.ascontiguousarray(image, np.float32)[None]
        if out is None:
            return planes
        out[...] = planes
        return out
    src = np.ascontiguousarray(image, np.float32)
    h, w, c = src.shape
    if out is None:
        out = np.empty((c, h, w), np.float32)
    if h and w:
        cv2.mixChannels([src], list(out), [k for i in range(c) for k in (i, i)])
    return out


def source_rows(matrix: np.ndarray, r0: int, r1: int, width: int, src_h: int, interpolation: str = "bicubic"
                ) -> tuple[int, int]:
    """The source rows [s0, s1) an affine `warp` reads for output rows r0..r1 (of `width`
    columns): the band's corners mapped back through the matrix, widened by the
    interpolation kernel's reach, clipped to the frame's `src_h` rows (s0 == s1: the band
    sees nothing of the frame). Affine only (ValueError otherwise)."""
    m = np.asarray(matrix, dtype=np.float64)
    if not np.allclose(m[2], [0.0, 0.0, 1.0]):
        raise ValueError("source_rows needs an affine matrix")
    inv = np.linalg.inv(m)
    xs = np.array([0.0, width - 1.0, 0.0, width - 1.0])
    ys = np.array([r0, r0, r1 - 1.0, r1 - 1.0])
    sy = inv[1, 0] * xs + inv[1, 1] * ys + inv[1, 2]
    reach = _MARGIN[interpolation] + 2
    s0 = int(np.clip(np.floor(sy.min()) - reach, 0, src_h))
    s1 = int(np.clip(np.ceil(sy.max()) + reach + 1, 0, src_h))
    return s0, max(s0, s1)


def warp_rows(src: np.ndarray, s0: int, src_shape: tuple[int, int], matrix: np.ndarray, r0: int, r1: int,
              width: int, interpolation: str = "bicubic", out: np.ndarray | None = None, *,
              planar: bool = False, planar_out: bool = False, parallel: bool = True) -> np.ndarray:
    """Output rows r0..r1 of `warp(image, matrix, (H, width), interpolation)` from only the
    source rows it reads: `src` = image rows s0 .. s0 + len(src) (at least `source_rows`),
    (rows, W[, C]), or with planar=True (C, rows, W) planes; `src_shape` the whole image's
    (rows, columns). Affine matrices only. Where `own_cubic`, bit for bit `warp`'s rows;
    else OpenCV's fixed-point source coordinates are computed from a translated matrix,
    which can move a coordinate across a 1/32 px step in rare pixels (float rounding of the
    translation). NaN outside the frame as in `warp`. parallel=False: our kernel on the
    calling thread (OpenCV's threads are process-wide). Returns (r1 - r0, width[, C])
    float32, or with planar_out (C, r1 - r0, width) (a colour source's planes), into `out`
    if given."""
    m = np.asarray(matrix, dtype=np.float64)
    flag = INTERPOLATIONS[interpolation]
    h = r1 - r0
    n_src = src.shape[1] if planar else src.shape[0]
    nc = src.shape[0] if planar else (src.shape[2] if src.ndim == 3 else 1)
    if out is None:
        shape = (nc, h, width) if planar_out else (h, width) + ((nc,) if planar or src.ndim == 3 else ())
        out = np.empty(shape, np.float32)
    if n_src == 0 or h == 0:
        out[...] = np.nan
        return out
    if own_cubic(m, interpolation):  # (NaN where a footprint leaves the frame: as below)
        cubic_rows(src if planar else as_planes(src), s0, np.linalg.inv(m), r0,
                   out.reshape(nc, h, width) if planar_out else out.reshape(h, width, nc),
                   parallel=parallel, planar_out=planar_out)
        return out
    if planar_out:
        return as_planes(warp_rows(src, s0, src_shape, m, r0, r1, width, interpolation, planar=planar,
                                   parallel=parallel), out=out.reshape(nc, h, width))
    if planar:
        src = np.moveaxis(src, 0, 2) if src.shape[0] > 1 else src[0]
    # band coordinates: output y - r0, source y - s0
    shift = np.array([[1.0, 0, 0], [0, 1.0, -r0], [0, 0, 1.0]]) @ m @ np.array([[1.0, 0, 0], [0, 1.0, s0], [0, 0, 1.0]])
    cv2.warpAffine(np.ascontiguousarray(src, np.float32), shift[:2], (width, h), dst=out, flags=flag,
                   borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    _nan_outside_affine(out, np.linalg.inv(m), tuple(src_shape[:2]), _MARGIN[interpolation], row0=r0)
    return out


#: Pixels an interpolation kernel reaches beyond its sample (source pixels needed at
#: floor(u) - margin .. floor(u) + 1 + margin); outputs needing any outside pixel are NaN.
_MARGIN = {"nearest": 0, "bilinear": 0, "bicubic": 1, "lanczos": 3}


def _nan_outside_affine(out: np.ndarray, inv: np.ndarray, src_shape: tuple[int, int], margin: int,
                        row0: int = 0) -> None:
    """Set to NaN every output pixel whose source position (inv @ p) is not inside
    [margin, size - 1 - margin] on both axes. Per row that is one interval of columns,
    computed exactly (the mapping is linear along a row) and cleared by slicing: much
    cheaper than a coverage-mask warp plus boolean indexing on an RGB frame. `out` holds the
    output rows row0.. (a band)."""
    h, w = out.shape[:2]
    sh, sw = src_shape
    y = np.arange(row0, row0 + h, dtype=np.float64)
    lo = np.zeros(h)
    hi = np.full(h, w - 1.0)
    eps = 1e-6
    for row, size in ((0, sw), (1, sh)):
        a, b, c = inv[row]
        # Source coordinate along this row: u(x) = a x + (b y + c); need lo_s <= u <= hi_s.
        base = b * y + c
        lo_s, hi_s = margin - eps, size - 1 - margin + eps
        if abs(a) < 1e-12:
            inside = (base >= lo_s) & (base <= hi_s)
            hi = np.where(inside, hi, -1.0)
            continue
        x1, x2 = (lo_s - base) / a, (hi_s - base) / a
        lo = np.maximum(lo, np.minimum(x1, x2))
        hi = np.minimum(hi, np.maximum(x1, x2))
    first = np.clip(np.ceil(lo), 0, w).astype(np.int64)
    last = np.clip(np.floor(hi), -1, w - 1).astype(np.int64)
    planes = out.shape[2] if out.ndim == 3 else 1
    _nan_outside_columns(out.reshape(h, w * planes), first * planes, (last + 1) * planes)


@numba.njit(cache=True, nogil=True)
def _nan_outside_columns(out: np.ndarray, start: np.ndarray, stop: np.ndarray) -> None:
    """NaN in each row of `out` outside the values [start, stop) (a Python loop over the
    rows cost 2-7 ms per frame)."""
    nan = np.float32(np.nan)
    for r in range(out.shape[0]):
        a, b = start[r], max(stop[r], start[r])
        for j in range(a):
            out[r, j] = nan
        for j in range(b, out.shape[1]):
            out[r, j] = nan
