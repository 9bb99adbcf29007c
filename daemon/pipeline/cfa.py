"""The colour planes of a CFA mosaic as slices, so per-channel work needs no copies.

A Bayer mosaic has four positions in its 2x2 cell (two of them green); processing each
position separately (flat normalisation, defect search) keeps colours from mixing.
"""

from __future__ import annotations


def cfa_planes(shape: tuple[int, ...], bayer: str | None) -> list[tuple[slice, slice]]:
    """Slices selecting each CFA position (4 for a Bayer mosaic, the whole array for mono)."""
    if not bayer:
        return [(slice(None), slice(None))]
    return [(slice(r, None, 2), slice(c, None, 2)) for r in (0, 1) for c in (0, 1)]
