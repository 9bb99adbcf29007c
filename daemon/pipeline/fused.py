"""The fused colour path: calibrated mosaic -> (per row band) debayer -> warp -> running stack.

Why: at full resolution a colour frame's RGB image is 3x the mosaic (12 bytes a pixel: 140 MB
at 12 Mpx, 313 MB at 26 Mpx), and the unfused path writes it twice (debayer, warp) and reads
it twice (warp, stack) through main memory. Here the output is made a band of rows at a time:
the mosaic rows a band needs (`warp.source_rows`) are debayered (`debayer.debayer_rows`, bit
for bit the full debayer's rows), warped into the band (`warp.warp_rows`) and fed to the
rejecting stack (`RunningStack.add_banded`, as planes), while the band is still in cache. Each stage runs
on all cores over the band's rows. The only full-size arrays are the stack's statistics and
the calibrated mosaic itself.

The result equals the unfused path's (debayer, warp, add of whole frames): bit for bit where
the warp is our bicubic kernel (`warp.own_cubic`: a session's near-translations and meridian
flips), else up to the float32 rounding of OpenCV's source coordinates, which it computes
from each band's own origin. Affine transforms only (what registration produces); callers
keep the unfused path for perspective ones.

`RegisteredMosaic` is the frame as the spool keeps it instead of the registered RGB image:
the calibrated mosaic with its transform and sky offset, from which `registered_rows` makes
any rows of the registered image again (the final re-stack), by interpolation or by Bayer
drizzle (`daemon.pipeline.drizzle`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import cv2
import numba
import numpy as np

from daemon.pipeline.debayer import debayer_rows
from daemon.pipeline.drizzle import drizzle_restack, drizzle_rows, drizzle_sums
from daemon.pipeline.stack import RunningStack, band_rows
from daemon.pipeline.warp import own_cubic, source_rows, warp_rows

#: Final re-stack methods a `RegisteredMosaic` can be re-made with.
FINAL_METHODS = ("bilinear", "drizzle")


def is_affine(matrix: np.ndarray) -> bool:
    return bool(np.allclose(np.asarray(matrix, np.float64)[2], [0.0, 0.0, 1.0]))


def is_identity(matrix: np.ndarray) -> bool:
    """Whether a 3x3 transform is the identity (to floating-point tolerance): no resampling."""
    return bool(np.allclose(np.asarray(matrix, np.float64), np.eye(3)))


def registered_band(mosaic: np.ndarray, bayer: str, matrix: np.ndarray, b0: int, b1: int, *,
                    interpolation: str = "bicubic", out: np.ndarray | None = None,
                    parallel: bool = True, planar: bool = False) -> np.ndarray:
    """Rows b0..b1 of the registered RGB image of a calibrated mosaic, NaN outside the frame.

    mosaic: (H, W) float32 (or float16, e.g. a spool memmap: the rows needed are read as
    float32), ADU; bayer: its CFA pattern; matrix: frame -> reference (3x3, affine), the
    output grid the mosaic's own (H, W); interpolation: as `warp`; parallel=False: all on
    the calling thread (OpenCV's own threads aside). Equals
    `warp(debayer(mosaic), matrix, (H, W))[b0:b1]`: bit for bit with the identity matrix and
    where `warp.own_cubic`, else up to the float32 rounding of OpenCV's source coordinates.
    Returns (b1 - b0, W, 3) float32, or with `planar` its planes (3, b1 - b0, W) (what the
    running stack takes), into `out` if given."""
    h, w = mosaic.shape
    identity = is_identity(matrix)
    if not identity and not is_affine(matrix):
        raise ValueError("registered_band needs an affine matrix")
    if out is None:
        out = np.empty((3, b1 - b0, w) if planar else (b1 - b0, w, 3), np.float32)
    s0, s1 = (b0, b1) if identity else source_rows(matrix, b0, b1, w, h, interpolation)
    d0, d1 = max(0, s0 - 1), min(h, s1 + 1)  # the debayer's neighbours
    src = mosaic[d0:d1]
    if src.dtype != np.float32:
        src = src.astype(np.float32)
    if identity:
        debayer_rows(src, bayer, b0, b1, d0=d0, full_h=h, out=out, parallel=parallel, planar=planar)
    elif s1 <= s0:
        out[...] = np.nan
    else:
        planes = own_cubic(matrix, interpolation)  # (our bicubic kernel reads planes)
        rgb = debayer_rows(src, bayer, s0, s1, d0=d0, full_h=h, parallel=parallel, planar=planes)
        warp_rows(rgb, s0, (h, w), matrix, b0, b1, w, interpolation, out=out, planar=planes, planar_out=planar,
                  parallel=parallel)
    return out


def registered_bands(mosaic: np.ndarray, bayer: str, matrix: np.ndarray, *, interpolation: str = "bicubic",
                     rows: int | None = None, r0: int = 0, r1: int | None = None
                     ) -> Iterator[tuple[int, np.ndarray]]:
    """`registered_band` of rows r0..r1 (default all), band by band: yields (first row,
    (rows, W, 3) float32); the yielded array is reused for the next band."""
    h, w = mosaic.shape
    r1 = h if r1 is None else r1
    rows = rows or band_rows(w)
    out = np.empty((min(rows, max(r1 - r0, 0)), w, 3), np.float32)
    for b0 in range(r0, r1, rows):
        b1 = min(b0 + rows, r1)
        yield b0, registered_band(mosaic, bayer, matrix, b0, b1, interpolation=interpolation, out=out[: b1 - b0])


def stack_mosaic(stack: RunningStack, mosaic: np.ndarray, bayer: str, matrix: np.ndarray, weight: float,
                 offset: np.ndarray | None = None, *, interpolation: str = "bicubic", rows: int | None = None,
                 threads: int | None = None) -> int:
    """Debayer, warp and stack one calibrated mosaic band by band on `threads` threads
    (default: numba's, one per core; see the module docstring): `stack` an (H, W, 3)
    RunningStack on the mosaic's grid, `offset` per plane (ADU, the sky normalisation) added
    before combining. OpenCV runs on one thread per band meanwhile (its thread count is
    process-wide: restored afterwards). Returns the pixels rejected."""
    if stack.shape != mosaic.shape + (3,):
        raise ValueError(f"mosaic {mosaic.shape} does not match the stack {stack.shape}")
    rows = rows or band_rows(mosaic.shape[1])
    threads = threads or numba.get_num_threads()

    def make(b0: int, b1: int) -> np.ndarray:
        return registered_band(mosaic, bayer, matrix, b0, b1, interpolation=interpolation, parallel=threads <= 1,
                               planar=True)

    cv_threads = cv2.getNumThreads()
    if threads > 1:
        cv2.setNumThreads(1)
    try:
        return stack.add_banded(make, rows, weight, offset, threads=threads, planar=True)
    finally:
        cv2.setNumThreads(cv_threads)


def mosaic_sky(mosaic: np.ndarray, bayer: str) -> list[float]:
    """Per-plane (R, G, B) sky level (ADU) of a calibrated mosaic: the median of each
    colour's samples over a sparse grid of ~40k 2x2 cells (both greens for G). What the
    colour paths at full resolution normalise the background with, fused or not."""
    h, w = mosaic.shape
    step = max(1, int(np.sqrt((h // 2) * (w // 2) / 40000)))
    cells = [np.asarray(mosaic[dy::2, dx::2][::step, ::step], np.float32) for dy in (0, 1) for dx in (0, 1)]
    out = []
    for colour in "RGB":
        vals = np.concatenate([cells[k].ravel() for k, c in enumerate(bayer.upper()) if c == colour])
        out.append(float(np.nanmedian(vals)))
    return out


@dataclass
class RegisteredMosaic:
    """A stacked colour frame as the spool keeps it at full resolution: the calibrated
    mosaic (ADU, (H, W)), its CFA pattern, its transform into the reference (3x3), the
    per-plane offset (ADU) the live stack added, and how the final re-stack re-makes it
    (`final`: "bilinear" with `interpolation`, or "drizzle" with `pixfrac`). One mosaic is a
    third of the registered RGB image's bytes."""

    data: np.ndarray
    bayer: str
    matrix: np.ndarray
    offset: tuple[float, float, float]
    interpolation: str = "bicubic"
    final: str = "bilinear"
    pixfrac: float = 0.7

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.data.shape) + (3,)

    def __getitem__(self, key) -> np.ndarray:
        """Rows of the registered RGB image (ADU), as `RegisteredView` makes them."""
        return RegisteredView(self.data, self.meta())[key]

    def view(self) -> RegisteredView:
        return RegisteredView(self.data, self.meta())

    @property
    def combine_frames(self):
        return self.view().combine_frames

    def interpolated(self, r0: int, r1: int) -> np.ndarray:
        return self.view().interpolated(r0, r1)

    def drizzled(self, r0: int, r1: int) -> tuple[np.ndarray, np.ndarray]:
        return self.view().drizzled(r0, r1)

    def meta(self) -> dict:
        """JSON-able description (what the spool's index stores beside the mosaic)."""
        return {"kind": "mosaic", "bayer": self.bayer, "matrix": [list(map(float, r)) for r in self.matrix],
                "offset": [float(v) for v in self.offset], "interpolation": self.interpolation,
                "final": self.final, "pixfrac": float(self.pixfrac)}


class RegisteredView:
    """The registered RGB image of a spooled mosaic, made on demand: `shape` (H, W, 3) and
    row slicing (`view[r0:r1]`, float32 in stored units: times the spool's scale is ADU),
    which is all `daemon.pipeline.restack.restack` asks of a frame. Bilinear + warp, or
    Bayer drizzle, as the mosaic's `final` says."""

    def __init__(self, mosaic: np.ndarray, meta: dict, scale: float = 1.0):
        self.mosaic = mosaic
        self.bayer = str(meta["bayer"])
        self.matrix = np.asarray(meta["matrix"], np.float64)
        self.offset = np.asarray(meta["offset"], np.float32) / np.float32(scale)
        self.interpolation = str(meta.get("interpolation", "bicubic"))
        self.final = str(meta.get("final", "bilinear"))
        self.pixfrac = float(meta.get("pixfrac", 0.7))
        if self.final not in FINAL_METHODS:
            raise ValueError(f"spooled mosaic: unknown final method {self.final!r} (known: {FINAL_METHODS})")
        self.shape = tuple(mosaic.shape) + (3,)

    def __getitem__(self, key) -> np.ndarray:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("a RegisteredView gives row slices only")
        r0, r1, _ = key.indices(self.shape[0])
        r1 = max(r0, r1)
        if self.final == "drizzle":
            out = drizzle_rows(self.mosaic, self.bayer, self.matrix, r0, r1, pixfrac=self.pixfrac)
            out += self.offset
            return out
        return self.interpolated(r0, r1)

    def interpolated(self, r0: int, r1: int) -> np.ndarray:
        """Rows r0..r1 by bilinear debayer + warp (stored units, offset added)."""
        out = np.empty((r1 - r0, self.shape[1], 3), np.float32)
        for b0, band in registered_bands(self.mosaic, self.bayer, self.matrix,
                                         interpolation=self.interpolation, r0=r0, r1=r1):
            out[b0 - r0: b0 - r0 + band.shape[0]] = band
        out += self.offset
        return out

    def drizzled(self, r0: int, r1: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows r0..r1 by Bayer drizzle: (values in stored units with the offset, NaN where
        no drop landed; coverage weight per pixel and colour)."""
        num, den = drizzle_sums(self.mosaic, self.bayer, self.matrix, r0, r1, pixfrac=self.pixfrac)
        with np.errstate(invalid="ignore", divide="ignore"):
            val = np.where(den > 0, num / np.where(den > 0, den, 1), np.nan).astype(np.float32)
        val += self.offset
        return val, den

    @property
    def combine_frames(self):
        """How `daemon.pipeline.restack.restack` combines frames like this one: drizzle's own
        combination (`drizzle_restack`) for "drizzle", else None (restack's own)."""
        return drizzle_restack if self.final == "drizzle" else None
