"""The frame record shared by every stage: pixels plus what the capture program said.

Loaders (`daemon.io`) fill it from FITS headers or raw files; the pipeline only reads it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np

#: The four 2x2 colour filter arrays, named from the top-left pixel of the *array*
#: (row 0, column 0) after the loader has applied ROWORDER and X/YBAYROFF.
BAYER_PATTERNS = ("RGGB", "BGGR", "GRBG", "GBRG")


class FrameType(enum.StrEnum):
    """What a frame is: the one spelling of frame kinds (config, commands, masters, INDI)."""

    LIGHT = "light"
    BIAS = "bias"
    DARK = "dark"
    FLAT = "flat"
    DARKFLAT = "darkflat"

    @property
    def is_calibration(self) -> bool:
        """Bias, dark, flat or dark flat: frames that end in a master, not in a stack."""
        return self is not FrameType.LIGHT


@dataclass(frozen=True)
class FrameMeta:
    """Acquisition metadata of one frame. Units: seconds, degrees Celsius, degrees (J2000)."""

    path: str | None = None
    frame_type: FrameType = FrameType.LIGHT
    exposure_s: float | None = None
    gain: float | None = None
    offset: float | None = None
    binning: tuple[int, int] = (1, 1)
    sensor_temp_c: float | None = None
    set_temp_c: float | None = None
    #: One of BAYER_PATTERNS relative to array[0, 0], or None for a mono sensor.
    bayer: str | None = None
    date_obs: datetime | None = None
    filter: str | None = None
    target: str | None = None
    ra_deg: float | None = None
    dec_deg: float | None = None
    camera: str | None = None
    telescope: str | None = None
    #: Pixel pitch (um, binned) and focal length (mm): give the plate scale when both known.
    pixel_size_um: float | None = None
    focal_length_mm: float | None = None
    #: Observing site (degrees, east longitude positive), from SITELAT/SITELONG and friends.
    site_lat_deg: float | None = None
    site_lon_deg: float | None = None
    #: The frame's celestial WCS as FITS cards ((key, value), ...) in the *array's* pixel
    #: convention: pixel (1, 1) is the centre of array[0, 0] of the top-down array handed out
    #: (the loader converts a BOTTOM-UP file's WCS). None when the file has none.
    wcs: tuple[tuple[str, object], ...] | None = None
    #: Header keys that were absent or unreadable, so callers can say what is missing.
    missing: tuple[str, ...] = field(default_factory=tuple)
    #: Header values present but unusable ("EXPTIME='abc' is not a number"), each naming the
    #: key; the field is then as if the key were absent.
    warnings: tuple[str, ...] = field(default_factory=tuple)

    @property
    def plate_scale_arcsec(self) -> float | None:
        """Arcseconds per pixel, or None when pixel size or focal length is unknown."""
        if self.pixel_size_um and self.focal_length_mm:
            return 206.264806 * self.pixel_size_um / self.focal_length_mm
        return None

    @property
    def is_colour(self) -> bool:
        return self.bayer is not None


@dataclass
class Frame:
    """Pixels as float32 ADU, 2-D (a CFA mosaic for colour sensors), and their metadata.

    `calibrated` is set by `LivePipeline` when it has calibrated `data` in place (saving a
    full-size copy per frame): the pixels are then calibrated ADU and are not calibrated again.
    """

    data: np.ndarray  # None once `LivePipeline.process(frame, consume=True)` has used it
    meta: FrameMeta
    calibrated: bool = False
