"""Images for the page: full-resolution tiles of a stack and a thumbnail of the last sub.

Tiles: the worker thread owns the stack, so `crop_for_tile` runs there (a job on the worker,
one at a time with the frames) and returns an immutable copy of the crop with the preview's
screen transfer; `tile_jpeg` stretches and encodes that copy in any thread. The loop only
awaits both.

The last sub's thumbnail is read back from its file in a thread (the raw frame, uncalibrated:
enough to judge focus and clouds), only when a page asks for it: no cost per frame.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import cv2
import numpy as np

from daemon.io.load import load_frame
from daemon.pipeline.stretch import ScreenTransfer, StretchSettings, apply_transfer, screen_transfer, stretch_uint8

THUMB_EDGE = 480


@dataclass(frozen=True)
class TileCrop:
    """A copy of part of a stack (float32, NaN = no data) and the preview's transfer.
    x0, y0: its top-left pixel in the stack (x = column, y = row)."""

    pixels: np.ndarray
    transfer: ScreenTransfer
    x0: int
    y0: int


def crop_for_tile(image: np.ndarray, x: int, y: int, size: int, transfer: ScreenTransfer | None = None,
                  max_edge: int = 1280) -> TileCrop:
    """Copy the `size` x `size` window of `image` centred on (x, y), shifted to lie inside the
    image (smaller only where the image is); for the worker thread.

    Parameters
    ----------
    image : ndarray
        The stack, (H, W) or (H, W, 3) float32.
    x, y : int
        Centre column and row (px, full resolution); clamped into the image.
    size : int
        Edge of the window (px).
    transfer : ScreenTransfer, optional
        The stack's transfer if already measured (it changes only with the stack); measured
        on `image` at the preview's scale (`max_edge`) otherwise.
    """
    h, w = image.shape[:2]
    sw, sh = min(size, w), min(size, h)
    x0 = int(np.clip(x - sw // 2, 0, w - sw))
    y0 = int(np.clip(y - sh // 2, 0, h - sh))
    if transfer is None:
        transfer = screen_transfer(image, StretchSettings(max_edge=max_edge))
    crop = np.array(image[y0:y0 + sh, x0:x0 + sw], dtype=np.float32, copy=True)
    crop.setflags(write=False)
    return TileCrop(crop, transfer, x0, y0)


def tile_jpeg(tile: TileCrop, quality: int = 90) -> bytes:
    """The crop stretched like the preview, as JPEG bytes (RGB for colour stacks)."""
    img = apply_transfer(tile.pixels, tile.transfer)
    if img.ndim == 3:
        img = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError("could not encode the tile as JPEG")
    return buf.tobytes()


def thumbnail_of(path: str, max_edge: int = THUMB_EDGE) -> bytes:
    """The frame in `path` (any format the daemon reads) auto-stretched to a JPEG with long edge
    `max_edge` px. Raises OSError/ValueError (FrameError) when the file cannot be read."""
    frame = load_frame(path)
    img = stretch_uint8(np.asarray(frame.data, np.float32), StretchSettings(max_edge=max_edge))
    if img.ndim == 3:
        img = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 80])
    if not ok:
        raise ValueError(f"{path}: could not encode the thumbnail")
    return buf.tobytes()


async def sub_thumbnail(path: str) -> bytes:
    """`thumbnail_of` in a thread (the loop is never blocked)."""
    return await asyncio.to_thread(thumbnail_of, path)
