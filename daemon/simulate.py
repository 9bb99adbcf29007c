"""Synthetic sky and sensor with known truth, for the demo, the tests and the benchmark.

Everything that a live stacker must cope with can be switched on here with a known answer:
a star field seen through a known transform (shift, rotation, scale, mirror), seeing (FWHM)
and trailing (elongated PSF), cloud (attenuation map), a satellite trail, sky background,
vignetting, bias, dark current, hot pixels, photon and read noise, and a Bayer mosaic with
known colour ratios.

Coordinates follow the pipeline's convention: x = column, y = row, 0-based, the centre of the
first pixel at (0, 0). A transform matrix here maps *reference* sky coordinates (x, y, 1) onto
the *frame*, so the registration of such a frame should recover its inverse.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import numpy as np

from daemon.pipeline.frame import BAYER_PATTERNS

#: Channel index (0=R, 1=G, 2=B) of each 2x2 CFA position, row-major, per pattern.
_CFA_CHANNELS = {p: [{"R": 0, "G": 1, "B": 2}[c] for c in p] for p in BAYER_PATTERNS}


@dataclass(frozen=True)
class StarField:
    """Stars in reference-frame pixel coordinates (px) with total fluxes (ADU per second)."""

    x: np.ndarray
    y: np.ndarray
    flux: np.ndarray

    def __len__(self) -> int:
        return int(self.x.size)


def random_star_field(
    shape: tuple[int, int],
    n_stars: int,
    *,
    seed: int = 0,
    flux_range: tuple[float, float] = (50.0, 20000.0),
    margin: float = 0.0,
) -> StarField:
    """A field of `n_stars` with a power-law flux distribution (many faint, few bright).

    `margin` is a fraction of the frame added on each side: 0.25 scatters stars beyond the
    edges too, so that shifted or rotated frames still have stars near their borders; a
    negative margin keeps them that far inside.
    """
    rng = np.random.default_rng(seed)
    h, w = shape
    mx, my = margin * w, margin * h
    x = rng.uniform(-mx, w - 1 + mx, n_stars)
    y = rng.uniform(-my, h - 1 + my, n_stars)
    # Inverse-transform sampling of dN/dF ~ F^-2 between the two flux limits.
    lo, hi = flux_range
    u = rng.uniform(0, 1, n_stars)
    flux = 1.0 / (1.0 / lo - u * (1.0 / lo - 1.0 / hi))
    return StarField(x.astype(np.float64), y.astype(np.float64), flux.astype(np.float64))


def transform_matrix(
    dx: float = 0.0,
    dy: float = 0.0,
    rotation_deg: float = 0.0,
    scale: float = 1.0,
    *,
    center: tuple[float, float] = (0.0, 0.0),
    mirror: bool = False,
) -> np.ndarray:
    """3x3 matrix: rotate by `rotation_deg` (counter-clockwise in x-right/y-down pixel axes
    as drawn by numpy, i.e. +angle turns +x towards +y) and scale about `center`, then shift
    by (dx, dy) px. `mirror` flips x about the centre first (a mirrored optical train)."""
    cx, cy = center
    t = np.deg2rad(rotation_deg)
    c, s = np.cos(t) * scale, np.sin(t) * scale
    m = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    if mirror:
        m = m @ np.diag([-1.0, 1.0, 1.0])
    to_origin = np.array([[1.0, 0, -cx], [0, 1.0, -cy], [0, 0, 1.0]])
    back = np.array([[1.0, 0, cx + dx], [0, 1.0, cy + dy], [0, 0, 1.0]])
    return back @ m @ to_origin


def apply_matrix(matrix: np.ndarray, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Map points through a 3x3 matrix (affine or projective)."""
    pts = matrix @ np.vstack([x, y, np.ones_like(x)])
    return pts[0] / pts[2], pts[1] / pts[2]


@dataclass(frozen=True)
class Sensor:
    """A camera: offsets and noise in ADU, dark current in ADU/s, and its fixed defects.

    Hot pixels are drawn from `defect_seed`, so every frame (light, dark, flat) of one
    sensor has them in the same places, as a real sensor does.
    """

    bias_adu: float = 500.0
    dark_current_adu_s: float = 0.2
    read_noise_adu: float = 3.0
    gain_e_per_adu: float = 1.0
    n_hot_pixels: int = 0
    hot_pixel_adu_s: float = 200.0
    defect_seed: int = 1234
    bayer: str | None = None
    #: Fractional light loss in the corners (0.3 = corners get 70 % of the centre).
    vignetting: float = 0.0
    saturation_adu: float = 65535.0

    def hot_pixel_mask(self, shape: tuple[int, int]) -> np.ndarray:
        mask = np.zeros(shape, dtype=bool)
        if self.n_hot_pixels:
            rng = np.random.default_rng(self.defect_seed)
            idx = rng.choice(shape[0] * shape[1], self.n_hot_pixels, replace=False)
            mask.flat[idx] = True
        return mask

    def flat_field(self, shape: tuple[int, int]) -> np.ndarray:
        """Relative sensitivity (1 at the centre): the vignetting a flat should record."""
        if not self.vignetting:
            return np.ones(shape, dtype=np.float32)
        h, w = shape
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        r2 = ((xx - (w - 1) / 2) / ((w - 1) / 2)) ** 2 + ((yy - (h - 1) / 2) / ((h - 1) / 2)) ** 2
        return (1.0 - self.vignetting * r2 / 2.0).astype(np.float32)

    def channel_map(self, shape: tuple[int, int]) -> np.ndarray | None:
        """Channel index (0=R, 1=G, 2=B) of every pixel, or None for mono."""
        if self.bayer is None:
            return None
        ch = np.array(_CFA_CHANNELS[self.bayer], dtype=np.int8).reshape(2, 2)
        h, w = shape
        return np.tile(ch, ((h + 1) // 2, (w + 1) // 2))[:h, :w]


@dataclass(frozen=True)
class Trail:
    """A satellite or plane: a straight line of `adu_per_px` peak brightness, Gaussian profile."""

    x0: float
    y0: float
    x1: float
    y1: float
    adu_per_px: float = 2000.0
    width_px: float = 2.0


@dataclass
class Exposure:
    """What the sky and mount do during one exposure."""

    exposure_s: float = 10.0
    #: Maps reference coordinates onto this frame (see transform_matrix); None = identity.
    matrix: np.ndarray | None = None
    fwhm_px: float = 3.0
    #: Trailing/wind: the PSF's sigma along `elongation_angle_deg` is this much larger.
    elongation: float = 1.0
    elongation_angle_deg: float = 0.0
    sky_adu_s: float = 10.0
    #: Star-light transmission: a scalar or a per-pixel map (cloud). 1 = clear.
    transmission: float | np.ndarray = 1.0
    trails: list[Trail] = field(default_factory=list)
    #: Colour of starlight and sky per channel (R, G, B) relative to green, for CFA sensors.
    star_rgb: tuple[float, float, float] = (1.0, 1.0, 1.0)
    sky_rgb: tuple[float, float, float] = (1.0, 1.0, 1.0)
    seed: int = 0


def render_stars(
    shape: tuple[int, int],
    field: StarField,
    *,
    matrix: np.ndarray | None = None,
    fwhm_px: float = 3.0,
    elongation: float = 1.0,
    elongation_angle_deg: float = 0.0,
    flux_scale: float = 1.0,
) -> np.ndarray:
    """Noise-free image of the stars (ADU), Gaussian PSFs sampled at pixel centres.

    Each star's total flux is `field.flux * flux_scale`; its centre is its reference position
    mapped through `matrix`. Stars off the frame are skipped; stars on the edge are clipped.
    """
    h, w = shape
    x, y = (field.x, field.y) if matrix is None else apply_matrix(matrix, field.x, field.y)
    sigma = fwhm_px / 2.3548
    half = int(np.ceil(4 * sigma * max(elongation, 1.0))) + 1
    keep = (x > -half) & (x < w - 1 + half) & (y > -half) & (y < h - 1 + half)
    x, y, flux = x[keep], y[keep], field.flux[keep] * flux_scale
    img = np.zeros(shape, dtype=np.float64)
    if x.size == 0:
        return img.astype(np.float32)
    # Inverse covariance of the elliptical Gaussian.
    t = np.deg2rad(elongation_angle_deg)
    sa, sb = sigma * elongation, sigma
    rot = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    cov = rot @ np.diag([sa**2, sb**2]) @ rot.T
    icov = np.linalg.inv(cov)
    norm = 1.0 / (2 * np.pi * sa * sb)
    ix0, iy0 = np.floor(x).astype(int), np.floor(y).astype(int)
    off = np.arange(-half, half + 2)
    ox, oy = np.meshgrid(off, off)  # (K, K)
    px = ix0[:, None, None] + ox[None]
    py = iy0[:, None, None] + oy[None]
    ddx, ddy = px - x[:, None, None], py - y[:, None, None]
    q = icov[0, 0] * ddx**2 + 2 * icov[0, 1] * ddx * ddy + icov[1, 1] * ddy**2
    val = flux[:, None, None] * norm * np.exp(-0.5 * q)
    inside = (px >= 0) & (px < w) & (py >= 0) & (py < h)
    np.add.at(img, (py[inside], px[inside]), val[inside])
    return img.astype(np.float32)


def render_trail(shape: tuple[int, int], trail: Trail) -> np.ndarray:
    """Noise-free image of one trail (ADU)."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    dx, dy = trail.x1 - trail.x0, trail.y1 - trail.y0
    length2 = dx * dx + dy * dy or 1.0
    t = np.clip(((xx - trail.x0) * dx + (yy - trail.y0) * dy) / length2, 0.0, 1.0)
    dist2 = (xx - (trail.x0 + t * dx)) ** 2 + (yy - (trail.y0 + t * dy)) ** 2
    sigma = trail.width_px / 2.3548
    return (trail.adu_per_px * np.exp(-0.5 * dist2 / sigma**2)).astype(np.float32)


def light_signal(shape: tuple[int, int], field: StarField, exp: Exposure, sensor: Sensor) -> np.ndarray:
    """Expected light (ADU) reaching each pixel, before bias, dark and noise: stars through
    the transmission, sky, trails, times vignetting and the CFA colour response."""
    stars = render_stars(
        shape, field, matrix=exp.matrix, fwhm_px=exp.fwhm_px, elongation=exp.elongation,
        elongation_angle_deg=exp.elongation_angle_deg, flux_scale=exp.exposure_s,
    )
    stars *= np.asarray(exp.transmission, dtype=np.float32)
    sky = np.float32(exp.sky_adu_s * exp.exposure_s)
    chans = sensor.channel_map(shape)
    if chans is not None:
        stars *= np.asarray(exp.star_rgb, dtype=np.float32)[chans]
        sky = sky * np.asarray(exp.sky_rgb, dtype=np.float32)[chans]
    light = stars + sky
    for trail in exp.trails:
        light += render_trail(shape, trail)
    return (light * sensor.flat_field(shape)).astype(np.float32)


def expose(
    shape: tuple[int, int],
    field: StarField | None,
    exp: Exposure,
    sensor: Sensor = Sensor(),
    *,
    light: bool = True,
    flat_level_adu: float | None = None,
    as_uint16: bool = True,
) -> np.ndarray:
    """One raw frame as a camera would deliver it (ADU).

    `light=False` gives a dark (or a bias with exposure_s=0). `flat_level_adu` gives a flat:
    a uniform illumination of that level at the centre, shaped by vignetting and CFA colour.
    """
    rng = np.random.default_rng(exp.seed)
    h, w = shape
    if flat_level_adu is not None:
        signal = np.full(shape, flat_level_adu, dtype=np.float32) * sensor.flat_field(shape)
        chans = sensor.channel_map(shape)
        if chans is not None:
            signal *= np.asarray(exp.sky_rgb, dtype=np.float32)[chans]
    elif light and field is not None:
        signal = light_signal(shape, field, exp, sensor)
    else:
        signal = np.zeros(shape, dtype=np.float32)
    dark = np.full(shape, sensor.dark_current_adu_s * exp.exposure_s, dtype=np.float32)
    dark[sensor.hot_pixel_mask(shape)] += sensor.hot_pixel_adu_s * exp.exposure_s
    electrons = (signal + dark) * sensor.gain_e_per_adu
    # Photon (shot) noise; the normal approximation is exact enough above a few electrons.
    shot = rng.standard_normal(shape, dtype=np.float32) * np.sqrt(np.maximum(electrons, 0.0))
    data = (electrons + shot) / sensor.gain_e_per_adu
    data += sensor.bias_adu + rng.standard_normal(shape, dtype=np.float32) * sensor.read_noise_adu
    data = np.clip(data, 0, sensor.saturation_adu)
    if as_uint16:
        return np.round(data).astype(np.uint16)
    return data.astype(np.float32)


def fits_header(
    *,
    exposure_s: float,
    frame_type: str = "Light",
    bayer: str | None = None,
    target: str | None = "SIM FIELD",
    filter_name: str | None = None,
    date_obs: datetime | None = None,
    gain: float | None = 100.0,
    temperature_c: float | None = -10.0,
) -> dict:
    """FITS cards as INDI's CCD driver writes them, for frames written by tests and demo."""
    date_obs = date_obs or datetime(2026, 11, 24, 21, 0, 0, tzinfo=UTC)
    hdr = {
        "EXPTIME": float(exposure_s),
        "IMAGETYP": f"{frame_type} Frame",
        "DATE-OBS": date_obs.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3],
        "XBINNING": 1,
        "YBINNING": 1,
        "INSTRUME": "lightbucket simulator",
    }
    if gain is not None:
        hdr["GAIN"] = gain
    if temperature_c is not None:
        hdr["CCD-TEMP"] = temperature_c
    if bayer:
        hdr.update({"BAYERPAT": bayer, "XBAYROFF": 0, "YBAYROFF": 0, "ROWORDER": "TOP-DOWN"})
    if target:
        hdr["OBJECT"] = target
    if filter_name:
        hdr["FILTER"] = filter_name
    return hdr


def session_times(start: datetime, exposure_s: float, n: int, gap_s: float = 2.0) -> list[datetime]:
    """DATE-OBS of `n` consecutive exposures with a readout/download gap between them."""
    return [start + timedelta(seconds=i * (exposure_s + gap_s)) for i in range(n)]
