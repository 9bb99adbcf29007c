"""The one error every loader raises, so callers catch a single type and can say which file."""

from __future__ import annotations


class FrameError(ValueError):
    """A file that cannot be used as a frame: not an image, truncated, empty, unsupported.

    `path` is the file, `reason` a short human sentence of what is wrong with it.
    """

    def __init__(self, path: object, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class FrameTooLarge(FrameError):
    """A frame whose declared size exceeds the decode limit: refused before any pixel is decoded."""
