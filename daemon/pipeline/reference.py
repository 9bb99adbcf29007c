"""What the live pipeline remembers about its registration reference and its stack's grid.

Two frames matter and may differ. The *grid frame* is the stack's first frame (or the one given
to `LivePipeline.set_reference`): the stack's pixels lie on its array (`StackGeometry`), so the
stack's WCS is that frame's WCS carried through the geometry. The *registration reference* may
be a better frame chosen later among the first few (`reference_frames`): frames are registered
to it and warped into the grid through `grid_from_ref`, the (fixed) transform of the reference
into the grid, so nothing stacked so far is resampled again when it changes.

A plate solve of the grid frame (`daemon.reference_solve`) replaces the WCS its header gave
(`LivePipeline.set_reference_wcs`); `GridFrame` is the immutable snapshot the solver works from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from daemon.pipeline.frame import FrameMeta

#: A better reference must score this much higher (`reference_score`): frames of one night
#: differ by a few % by chance, which is no reason to change.
REFERENCE_MARGIN = 1.05


@dataclass
class Reference:
    """The registration reference and the stack's grid.

    `noise` and `snr` stay the grid frame's: they are the unit of every frame's weight.
    `wcs` is the grid frame's celestial WCS (FITS cards, the array convention of
    `daemon.io.wcs`), from its header or, when `wcs_solved`, from a plate solve of it.
    `grid_stars` and `grid_meta` are the grid frame's star list and header (None after a
    restart from a checkpoint when the reference had changed: the solver reads the file).
    """

    path: str | None
    stars: Any  # daemon.pipeline.stars.Stars
    n_stars: int
    noise: float | None
    snr: float | None
    frame_shape: tuple[int, int]  # raw (CFA) frame shape
    bayer: str | None
    sky: list[float] = field(default_factory=list)  # per-plane background of the stacked image (ADU)
    wcs: dict | None = None
    #: Reference pixels -> grid pixels (3x3; identity when the reference is the grid frame).
    grid_from_ref: np.ndarray = field(default_factory=lambda: np.eye(3))
    #: FWHM (px) of the reference frame, for choosing a better one.
    fwhm_px: float | None = None
    #: Accepted frames still to be considered as a better reference.
    candidates_left: int = 0
    grid_path: str | None = None
    wcs_solved: bool = False
    grid_stars: Any = None
    grid_meta: FrameMeta | None = None


@dataclass(frozen=True)
class GridFrame:
    """A stack's grid frame as the plate solver needs it (copies: safe on any thread).

    path: its file; width, height: its array (px); x, y, flux: its detected stars (array
    convention, brightest first; None when unknown: solve from the file); meta: its header
    (None: read the file); wcs_solved: its WCS comes from a plate solve already.
    """

    path: str
    width: int
    height: int
    x: np.ndarray | None = None
    y: np.ndarray | None = None
    flux: np.ndarray | None = None
    meta: FrameMeta | None = None
    wcs_solved: bool = False


def grid_frame(ref: Reference | None) -> GridFrame | None:
    """The `GridFrame` snapshot of a pipeline's reference (None without a grid frame path)."""
    if ref is None or not ref.grid_path:
        return None
    s = ref.grid_stars
    h, w = ref.frame_shape[:2]
    return GridFrame(path=ref.grid_path, width=int(w), height=int(h),
                     x=None if s is None else np.array(s.x, np.float64),
                     y=None if s is None else np.array(s.y, np.float64),
                     flux=None if s is None else np.array(s.flux, np.float64),
                     meta=ref.grid_meta, wcs_solved=ref.wcs_solved)


def reference_score(n_stars: int, fwhm_px: float | None) -> float:
    """How good a registration reference a frame is: more stars and sharper ones are both
    better matches for every later frame (stars per px of FWHM; 0 if unmeasured). A frame
    replaces the reference only when it scores `REFERENCE_MARGIN` times higher."""
    return float(n_stars) / fwhm_px if fwhm_px else 0.0
