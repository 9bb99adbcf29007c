"""Where a stack's pixels lie on its reference frame: the map the stack's WCS is carried through.

A stack's array pixel (c, r) (0-based column, row) is at reference-array position
(scale * c + x0, scale * r + y0), pixel centres, 0-based, top-down (the loader's array).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StackGeometry:
    """scale: reference-array pixels per stack pixel (1 full resolution, 2 superpixel, < 1 drizzle).
    x0, y0: reference-array position of the stack's array[0, 0] (superpixel: 0.5, 0.5, the
    centre of the 2x2 cell)."""

    scale: float = 1.0
    x0: float = 0.0
    y0: float = 0.0


#: The superpixel debayer's geometry: stack pixel (i, j) is the 2x2 cell at (2i, 2j).
SUPERPIXEL = StackGeometry(2.0, 0.5, 0.5)
