"""Celestial WCS of frames and stacks: the reference frame's sky, carried through the stack's geometry.

Conventions (one place): a WCS handed around inside lightbucket is in the *array* convention of
the image it describes: FITS pixel (1, 1) is the centre of array[0, 0] of the top-down array
(row 0 = first row the camera read out), x along columns. A file's own WCS is converted to it by
`frame_wcs` (a BOTTOM-UP file is flipped like its pixels). A stack's pixel (c, r) (0-based
column, row of its array) sits at reference-array position (s*c + x0, s*r + y0): s = 1 and
(x0, y0) = 0 for mono and full-resolution debayer, s = 2 and 0.5 for superpixel (half scale),
s < 1 for a drizzle. `stack_wcs` maps the reference's WCS through that and, for a file written
BOTTOM-UP, through the row flip, so `astropy.wcs.WCS(header).celestial` of the written stack
gives the sky. SIP distortion is carried for these diagonal maps (scale and flip).

Pure functions of headers and WCS objects: no I/O. The plate solver feeds its solved WCS (of the
reference frame's array, or of a stack's array with `StackGeometry()`) into `stack_wcs`.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
from astropy.io import fits
from astropy.utils.exceptions import AstropyWarning
from astropy.wcs import WCS, FITSFixedWarning, Sip

from daemon.pipeline.geometry import StackGeometry

__all__ = ["StackGeometry", "frame_wcs", "stack_wcs", "wcs_cards", "wcs_from_cards", "wcs_header"]


def _quiet_wcs(header: Mapping[str, Any] | fits.Header) -> WCS | None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", (FITSFixedWarning, AstropyWarning))
        try:
            w = WCS(fits.Header(header) if not isinstance(header, fits.Header) else header, naxis=2)
        except Exception:  # noqa: BLE001 - malformed WCS cards: the frame has no usable WCS
            return None
    if not w.has_celestial or not np.all(np.isfinite(w.wcs.crval)):
        return None
    try:
        if not np.isfinite(np.linalg.det(w.pixel_scale_matrix)) or np.linalg.det(w.pixel_scale_matrix) == 0:
            return None
    except Exception:  # noqa: BLE001 - astropy refuses some degenerate matrices
        return None
    return w


def wcs_cards(w: WCS | None) -> tuple[tuple[str, object], ...] | None:
    """A WCS as ((key, value), ...) cards (what FrameMeta.wcs holds), None for None."""
    if w is None:
        return None
    return tuple((k, v) for k, v in wcs_header(w).items() if k)


def frame_wcs(header: Mapping[str, Any] | fits.Header, height: int, bottom_up: bool) -> WCS | None:
    """The celestial WCS of a frame file in the array convention, or None when it has none.

    Parameters
    ----------
    header : the frame's FITS header (or the FITS keywords of an XISF file).
    height : int, rows of the image.
    bottom_up : bool, the file is ROWORDER='BOTTOM-UP' (the loader flips its rows).
    """
    w = _quiet_wcs(header)
    if w is None:
        return None
    if not bottom_up:
        return w
    # array row i = stored row height-1-i: stored FITS Y = height + 1 - array Y.
    return _affine(w, np.diag([1.0, -1.0]), np.array([0.0, height + 1.0]))


def wcs_from_cards(cards: tuple[tuple[str, object], ...] | Mapping[str, Any] | None) -> WCS | None:
    """A WCS from FrameMeta.wcs (or a dict of cards); None when absent or not celestial."""
    if not cards:
        return None
    return _quiet_wcs(dict(cards))


def stack_wcs(reference: WCS | fits.Header | Mapping[str, Any] | tuple, geometry: StackGeometry,
              height: int, *, bottom_up: bool = True) -> WCS | None:
    """The celestial WCS of a stack written to FITS.

    Parameters
    ----------
    reference : astropy WCS, header, dict or FrameMeta.wcs cards
        The reference frame's celestial WCS in the array convention (module docstring).
    geometry : StackGeometry
        Where the stack's pixels lie on the reference array.
    height : int
        Rows of the stack image.
    bottom_up : bool, default True
        The stack is written with its first row at the bottom (ROWORDER='BOTTOM-UP').

    Returns
    -------
    WCS or None
        None when `reference` holds no usable celestial WCS.
    """
    w = reference if isinstance(reference, WCS) else (
        wcs_from_cards(reference) if isinstance(reference, tuple) else _quiet_wcs(reference))
    if w is None:
        return None
    w = w.celestial
    s = float(geometry.scale)
    # Stack FITS (X, Y) -> stack array (c, r) = (X - 1, height - Y or Y - 1) -> reference array
    # (s*c + x0, s*r + y0) -> reference FITS (+1): ref = A @ (X, Y) + b.
    if bottom_up:
        a = np.diag([s, -s])
        b = np.array([1.0 - s + geometry.x0, s * height + 1.0 + geometry.y0])
    else:
        a = np.diag([s, s])
        b = np.array([1.0 - s + geometry.x0, 1.0 - s + geometry.y0])
    return _affine(w, a, b)


def _affine(w: WCS, a: np.ndarray, b: np.ndarray) -> WCS:
    """The WCS of new pixel coordinates p' where the old ones are p = a @ p' + b (a diagonal)."""
    out = w.deepcopy()
    m = w.pixel_scale_matrix  # CD: world offsets per old pixel
    out.wcs.crpix = np.linalg.solve(a, np.asarray(w.wcs.crpix, float) - b)
    if out.wcs.has_cd():
        out.wcs.cd = m @ a
    else:
        out.wcs.pc = m @ a
        out.wcs.cdelt = [1.0, 1.0]
    if out.wcs.has_crota():  # the rotation is in the PC matrix now
        out.wcs.crota = [0.0, 0.0]
    if w.sip is not None:
        s1, s2 = float(a[0, 0]), float(a[1, 1])
        out.sip = _scaled_sip(w.sip, s1, s2, w.wcs.crpix, out.wcs.crpix)
    out.wcs.set()
    return out


def _scaled_sip(sip, s1: float, s2: float, crpix_old, crpix_new):
    """SIP polynomials for relative pixels u = s1*u', v = s2*v' (u' in the new pixels):
    A'_pq = A_pq s1^(p-1) s2^q, B'_pq = B_pq s1^p s2^(q-1), likewise AP/BP."""
    def scale(coef, first: bool):
        if coef is None:
            return None
        c = np.array(coef, dtype=float)
        p = np.arange(c.shape[0])[:, None]
        q = np.arange(c.shape[1])[None, :]
        return c * (s1 ** (p - 1) * s2 ** q if first else s1 ** p * s2 ** (q - 1))

    return Sip(scale(sip.a, True), scale(sip.b, False), scale(sip.ap, True), scale(sip.bp, False),
               np.asarray(crpix_new, float))


def wcs_header(w: WCS) -> fits.Header:
    """The WCS as header cards to add to a written image (TAN-SIP when distorted)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", (FITSFixedWarning, AstropyWarning))
        h = w.to_header(relax=True)
    for key in ("DATE-OBS", "MJD-OBS", "DATEREF", "MJDREF", "MJDREFI", "MJDREFF", "WCSAXES"):
        h.remove(key, ignore_missing=True)
    return h
