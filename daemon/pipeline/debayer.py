"""Colour from a Bayer mosaic, and a luminance image for star detection.

Pure numpy/OpenCV on float32; no I/O. The CFA pattern names the 2x2 cell at array[0, 0]
(see `daemon.pipeline.frame.BAYER_PATTERNS`), after the loader has applied ROWORDER and the
Bayer offsets.

Why our own bilinear kernel rather than `cv2.cvtColor(..., COLOR_Bayer*)`: OpenCV's
demosaicing accepts only 8/16-bit integers, while calibrated frames are float32 and may hold
negative values after dark subtraction. Bilinear demosaicing is one 3x3 convolution per
channel of the channel's sparse samples; `_bilinear` computes exactly those sums in one pass,
with the borders mirrored as reflect-101, which keeps the 2x2 parity at the edges, so the
borders are interpolated from the right colour too.
"""

from __future__ import annotations

import numba
import numpy as np

from daemon.pipeline.frame import BAYER_PATTERNS

DEBAYER_METHODS = ("bilinear", "superpixel")


def _check_pattern(pattern: str) -> str:
    p = (pattern or "").upper()
    if p not in BAYER_PATTERNS:
        raise ValueError(f"unknown Bayer pattern {pattern!r}; expected one of {', '.join(BAYER_PATTERNS)}")
    return p


def _offsets(pattern: str) -> dict[str, list[tuple[int, int]]]:
    """(row, column) offsets inside the 2x2 cell of each colour, e.g. RGGB: R at (0, 0)."""
    out: dict[str, list[tuple[int, int]]] = {"R": [], "G": [], "B": []}
    for i, c in enumerate(pattern):
        out[c].append((i // 2, i % 2))
    return out


def debayer(cfa: np.ndarray, pattern: str, method: str = "bilinear") -> np.ndarray:
    """RGB float32 image from a 2-D CFA mosaic (ADU).

    - "bilinear": (H, W, 3), every missing sample is the mean of its nearest same-colour
      neighbours; measured samples are kept exactly.
    - "superpixel": (H//2, W//2, 3), one RGB pixel per 2x2 cell (green = mean of the two);
      no interpolation at all, half the resolution, a quarter of the pixels to warp and stack.
    """
    pattern = _check_pattern(pattern)
    if cfa.ndim != 2:
        raise ValueError(f"debayer needs a 2-D CFA mosaic, got shape {cfa.shape}")
    data = np.asarray(cfa, dtype=np.float32)
    offs = _offsets(pattern)
    if method == "superpixel":
        h2, w2 = data.shape[0] // 2, data.shape[1] // 2
        out = np.empty((h2, w2, 3), dtype=np.float32)
        (r0, c0), = offs["R"]
        (b0, d0), = offs["B"]
        (g0, e0), (g1, e1) = offs["G"]
        # One parallel pass (numpy's four strided passes cost ~3x at 26 Mpx); green is
        # (g0 + g1) * 0.5 in float32 as before.
        _superpixel(data, out, r0, c0, g0, e0, g1, e1, b0, d0)
        return out
    if method != "bilinear":
        raise ValueError(f"unknown debayer method {method!r}; expected one of {', '.join(DEBAYER_METHODS)}")
    if min(data.shape) < 2:
        raise ValueError(f"a Bayer mosaic needs at least 2x2 pixels, got shape {data.shape}")
    colour = np.array(["RGB".index(c) for c in pattern], dtype=np.int64)
    out = np.empty(data.shape + (3,), dtype=np.float32)
    _bilinear(data, out, colour)
    return out


def debayer_rows(cfa: np.ndarray, pattern: str, r0: int, r1: int, d0: int = 0, full_h: int | None = None,
                 out: np.ndarray | None = None, *, parallel: bool = True, planar: bool = False) -> np.ndarray:
    """Rows r0..r1 of `debayer(mosaic, pattern, "bilinear")`, bit for bit, without the rest.

    cfa: rows d0.. of the full mosaic (2-D float32), holding at least rows r0 - 1 .. r1 (within the frame);
    full_h: the full mosaic's height (default: d0 + len(cfa)), where its borders are
    mirrored as `debayer` does. Row indices are the full mosaic's. Returns (r1 - r0, W, 3)
    float32, or with planar=True the same values as planes (3, r1 - r0, W) (what
    `daemon.pipeline.cubic` resamples), into `out` if given. parallel=False: on the calling
    thread only (for callers that run bands on threads of their own). Raises ValueError when
    `cfa` lacks a needed row."""
    pattern = _check_pattern(pattern)
    full_h = d0 + cfa.shape[0] if full_h is None else int(full_h)
    if not 0 <= r0 <= r1 <= full_h:
        raise ValueError(f"rows {r0}..{r1} outside a mosaic of {full_h} rows")
    need0, need1 = (r0 - 1 if r0 > 0 else 1), (r1 + 1 if r1 < full_h else full_h - 1)
    if r1 > r0 and (min(need0, r0) < d0 or max(need1, r1) > d0 + cfa.shape[0]):
        raise ValueError(f"debayer_rows {r0}..{r1} needs mosaic rows {min(need0, r0)}..{max(need1, r1)}, "
                         f"got {d0}..{d0 + cfa.shape[0]}")
    if out is None:
        shape = (3, r1 - r0, cfa.shape[1]) if planar else (r1 - r0, cfa.shape[1], 3)
        out = np.empty(shape, np.float32)
    colour = np.array(["RGB".index(c) for c in pattern], dtype=np.int64)
    if planar:
        kernel = _bilinear_planes if parallel else _bilinear_planes_serial
    else:
        kernel = _bilinear_rows if parallel else _bilinear_rows_serial
    kernel(cfa, d0, full_h, out, r0, colour)
    return out


@numba.njit(parallel=True, cache=True, nogil=True)
def _bilinear(data: np.ndarray, out: np.ndarray, colour: np.ndarray) -> None:
    """Bilinear demosaicing in one parallel pass, (H, W) -> (H, W, 3): each missing sample is
    the mean of its nearest same-colour neighbours (the two beside or above/below it, or the
    four diagonal ones), measured samples kept exactly; borders mirrored without repeating the
    edge (OpenCV's reflect-101), which keeps the 2x2 colour parity. The same result as one 3x3
    convolution per colour plane (to float32 rounding) at ~1/5 of the time: no sparse planes,
    no merge. `colour`: 0/1/2 (R/G/B) of the 2x2 cell, row-major."""
    h = data.shape[0]
    for i in numba.prange(h):
        _bilinear_row(data, 0, h, out, i, i, colour, False)


@numba.njit(parallel=True, cache=True, nogil=True)
def _bilinear_rows(data, d0, full_h, out, r0, colour):  # pragma: no cover - numba
    """`_bilinear` of full-mosaic rows r0 .. r0 + len(out) from `data` = mosaic rows d0.."""
    for k in numba.prange(out.shape[0]):
        _bilinear_row(data, d0, full_h, out, k, r0 + k, colour, False)


@numba.njit(cache=True, nogil=True)
def _bilinear_rows_serial(data, d0, full_h, out, r0, colour):  # pragma: no cover - numba
    """`_bilinear_rows` on the calling thread."""
    for k in range(out.shape[0]):
        _bilinear_row(data, d0, full_h, out, k, r0 + k, colour, False)


@numba.njit(parallel=True, cache=True, nogil=True)
def _bilinear_planes(data, d0, full_h, out, r0, colour):  # pragma: no cover - numba
    """`_bilinear_rows` into planes: out (3, rows, W)."""
    for k in numba.prange(out.shape[1]):
        _bilinear_row(data, d0, full_h, out, k, r0 + k, colour, True)


@numba.njit(cache=True, nogil=True)
def _bilinear_planes_serial(data, d0, full_h, out, r0, colour):  # pragma: no cover - numba
    """`_bilinear_planes` on the calling thread."""
    for k in range(out.shape[1]):
        _bilinear_row(data, d0, full_h, out, k, r0 + k, colour, True)


@numba.njit(inline="always")
def _bilinear_row(data, d0, h, out, k, i, colour, planar):  # pragma: no cover - numba
    """Full-mosaic row i (mosaic height h, `data` starting at row d0) into out[k]. The
    interior goes two columns (one 2x2 cell's row) at a time through `_bilinear_pairs`, whose
    colours are constants there, so that it vectorises (~1.6x the per-pixel loop, the same
    float32 operations: bit for bit); the border columns and an odd last one pixel by pixel."""
    w = data.shape[1]
    up = (i - 1 if i > 0 else 1) - d0
    dn = (i + 1 if i < h - 1 else h - 2) - d0
    ii = i - d0
    j1 = 1 + max(0, (w - 3) // 2 * 2)  # pairs (j, j + 1) for j = 1, 3, .. < j1, all interior
    for j in range(0, min(1, w)):
        _bilinear_pixel(data, out, k, i, j, colour, ii, up, dn, planar)
    c1 = colour[(i & 1) * 2 + 1]  # the colour of the row's odd columns
    c0 = colour[(i & 1) * 2]
    if c1 == 1:  # green at odd columns: the pairs start with green
        if c0 == 0:
            _bilinear_pairs(data, out, k, ii, up, dn, 1, j1, True, 0, planar)
        else:
            _bilinear_pairs(data, out, k, ii, up, dn, 1, j1, True, 2, planar)
    elif c1 == 0:
        _bilinear_pairs(data, out, k, ii, up, dn, 1, j1, False, 0, planar)
    else:
        _bilinear_pairs(data, out, k, ii, up, dn, 1, j1, False, 2, planar)
    for j in range(max(j1, 1), w):
        _bilinear_pixel(data, out, k, i, j, colour, ii, up, dn, planar)


@numba.njit(inline="always")
def _bilinear_pairs(data, out, k, ii, up, dn, j0, j1, green_first, x, planar):  # pragma: no cover - numba
    """Interior columns j0..j1 (pairs, 1 <= j0, j1 <= W - 2) of one row: green and colour `x`
    (0 R or 2 B; the other one, 2 - x, lies above and below) alternating, green first or
    not. Literal arguments where called: no colour lookups, no branches per pixel."""
    y = 2 - x
    half = np.float32(0.5)
    quarter = np.float32(0.25)
    for j in range(j0, j1, 2):
        jg = j if green_first else j + 1
        jx = j + 1 if green_first else j
        _put(out, k, jg, 1, np.float32(data[ii, jg]), planar)
        _put(out, k, jg, x, (np.float32(data[ii, jg - 1]) + np.float32(data[ii, jg + 1])) * half, planar)
        _put(out, k, jg, y, (np.float32(data[up, jg]) + np.float32(data[dn, jg])) * half, planar)
        _put(out, k, jx, x, np.float32(data[ii, jx]), planar)
        _put(out, k, jx, 1, (np.float32(data[ii, jx - 1]) + np.float32(data[ii, jx + 1]) + np.float32(data[up, jx])
                             + np.float32(data[dn, jx])) * quarter, planar)
        _put(out, k, jx, y, (np.float32(data[up, jx - 1]) + np.float32(data[up, jx + 1]) + np.float32(data[dn, jx - 1])
                             + np.float32(data[dn, jx + 1])) * quarter, planar)


@numba.njit(inline="always")
def _bilinear_pixel(data, out, k, i, j, colour, ii, up, dn, planar):  # pragma: no cover - numba
    """Pixel (row i, column j) into out[k, j], any column (borders mirrored); `ii`, `up`,
    `dn`: the rows of i and its neighbours in `data`."""
    w = data.shape[1]
    lf = j - 1 if j > 0 else 1
    rt = j + 1 if j < w - 1 else w - 2
    c = colour[(i & 1) * 2 + (j & 1)]
    v = np.float32(data[ii, j])
    if c == 1:  # green site: red/blue beside it on one axis, the other on the other axis
        ch = colour[(i & 1) * 2 + ((j + 1) & 1)]
        _put(out, k, j, 1, v, planar)
        _put(out, k, j, ch, (np.float32(data[ii, lf]) + np.float32(data[ii, rt])) * np.float32(0.5), planar)
        _put(out, k, j, 2 - ch, (np.float32(data[up, j]) + np.float32(data[dn, j])) * np.float32(0.5), planar)
    else:  # red or blue site: green on the 4 sides, the other colour on the 4 diagonals
        _put(out, k, j, c, v, planar)
        _put(out, k, j, 1, (np.float32(data[ii, lf]) + np.float32(data[ii, rt]) + np.float32(data[up, j])
                            + np.float32(data[dn, j])) * np.float32(0.25), planar)
        _put(out, k, j, 2 - c, (np.float32(data[up, lf]) + np.float32(data[up, rt]) + np.float32(data[dn, lf])
                                + np.float32(data[dn, rt])) * np.float32(0.25), planar)


@numba.njit(inline="always")
def _put(out, k, j, c, v, planar):  # pragma: no cover - numba
    """out[k, j, c] = v, or out[c, k, j] = v into planes (`planar`: a literal where called,
    so that each caller compiles one of the two)."""
    if planar:
        out[c, k, j] = v
    else:
        out[k, j, c] = v


def luminance(data: np.ndarray, bayer: str | None, bin_factor: int = 1) -> np.ndarray:
    """2-D float32 image for star detection (ADU per pixel, i.e. a mean, not a sum).

    Colour (CFA) frames give the 2x2 superpixel mean (R+G+G+B)/4 at half resolution, which
    needs no demosaicing and no colour balance, and a star's colour cannot shift its centroid.
    Mono frames give the data itself. `bin_factor` > 1 bins that further (k x k mean), for
    speed on large sensors.

    Pixel (i, j) of the result covers full-resolution pixels [k*i, k*i + k) where k is the
    reduction factor (`reduction(bayer, bin_factor)`); a position u in it is k*u + (k-1)/2
    in the full frame. `daemon.pipeline.stars.measure` does that mapping for you.
    """
    k = reduction(bayer, bin_factor)
    img = np.asarray(data, dtype=np.float32)
    if img.ndim != 2:
        raise ValueError(f"luminance needs a 2-D frame, got shape {img.shape}")
    if bayer is not None:
        _check_pattern(bayer)
    if k == 1:
        return img
    return bin_mean(img, k)


def reduction(bayer: str | None, bin_factor: int = 1) -> int:
    """The size reduction `luminance` applies: `bin_factor`, times 2 for a CFA (whose
    luminance is built from 2x2 superpixels, then binned by `bin_factor`)."""
    k = max(1, int(bin_factor))
    return 2 * k if bayer is not None else k


def bin_mean(img: np.ndarray, k: int) -> np.ndarray:
    """k x k block mean (float32), dropping the incomplete last row/column blocks."""
    h, w = (img.shape[0] // k) * k, (img.shape[1] // k) * k
    if k == 2:
        # One pass, parallel over rows, same float32 operations in the same order as summing
        # the four strided views (bit-identical): ~3x faster than the numpy passes at 26 Mpx.
        out = np.empty((h // 2, w // 2), np.float32)
        _bin2(np.asarray(img, dtype=np.float32), out)
        return out
    return img[:h, :w].reshape(h // k, k, w // k, k).mean(axis=(1, 3), dtype=np.float32)


@numba.njit(parallel=True, cache=True, nogil=True)
def _bin2(img, out):  # pragma: no cover - numba
    """out[i, j] = (((a + b) + c) + d) * 0.25 of the 2x2 block (a, b: first column, rows 2i
    and 2i + 1; c, d: second column), in float32."""
    h2, w2 = out.shape
    q = np.float32(0.25)
    for i in numba.prange(h2):
        for j in range(w2):
            v = img[2 * i, 2 * j] + img[2 * i + 1, 2 * j]
            v += img[2 * i, 2 * j + 1]
            v += img[2 * i + 1, 2 * j + 1]
            out[i, j] = v * q


@numba.njit(parallel=True, cache=True, nogil=True)
def _superpixel(cfa, out, r0, c0, g0, e0, g1, e1, b0, d0):  # pragma: no cover - numba
    """out[i, j] = (R, (G1 + G2) / 2, B) of 2x2 cell (i, j); offsets inside the cell."""
    h2, w2 = out.shape[0], out.shape[1]
    half = np.float32(0.5)
    for i in numba.prange(h2):
        y = 2 * i
        for j in range(w2):
            x = 2 * j
            out[i, j, 0] = cfa[y + r0, x + c0]
            out[i, j, 1] = (cfa[y + g0, x + e0] + cfa[y + g1, x + e1]) * half
            out[i, j, 2] = cfa[y + b0, x + d0]
