"""Settings of the device side: [indi], [camera], [plan], [site], [mount] and [focus], as plain
frozen dataclasses.

Why a module of their own: the config (and a watch-only daemon, the most common install)
needs these shapes without the code that drives devices; `daemon.acquisition` and
`drivers/` import PyIndi, this module imports nothing heavier than astropy's angle parser.
Each dataclass checks its own values in `__post_init__`, so a bad value is refused the same
way wherever it comes from (the TOML file, `--set`, a `plan` command) and before anything
runs: `SettingsError` names the section and the key.

Units: seconds, degrees (J2000 for ra/dec), arcseconds, pixels, degrees Celsius, metres,
minutes where a key says `_min`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from daemon.pipeline.frame import FrameType

#: Longest single exposure a plan accepts (s): beyond any sky frame; a typo like 1e9 is refused.
MAX_EXPOSURE_S = 3600.0
#: Most frames one plan may ask for (a whole night of 1 s frames is ~40 000).
MAX_COUNT = 100_000
#: Sun altitude (deg) at each twilight a plan may name: `until = "dawn"`, `start = "dusk"`, ...
TWILIGHT_SUN_ALT_DEG = {"": -18.0, "nautical-": -12.0, "civil-": -6.0}
DAWNS = {f"{k}dawn": v for k, v in TWILIGHT_SUN_ALT_DEG.items()}
DUSKS = {f"{k}dusk": v for k, v in TWILIGHT_SUN_ALT_DEG.items()}
#: Most points a horizon profile may have (one a degree is plenty).
MAX_HORIZON_POINTS = 3600


class SettingsError(ValueError):
    """A setting that cannot be used; the message names `[section] key = value` and why."""


def parse_ra(value: float | str) -> float:
    """RA in degrees [0, 360) from degrees or an hour-angle string ("19h59m36s", "19:59:36").

    Raises SettingsError naming `[plan] ra` when the value is no angle.
    """
    from astropy.coordinates import Angle  # astropy's units load slowly: only when parsing

    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value) % 360.0
    text = str(value).strip()
    try:
        return float(text) % 360.0
    except ValueError:
        pass
    try:
        unit = "deg" if "d" in text.lower() or "°" in text else "hourangle"
        return float(Angle(text, unit=unit).deg) % 360.0
    except Exception as exc:  # noqa: BLE001 - astropy raises several types for bad angles
        raise SettingsError(f"[plan] ra = {value!r}: not an angle ({exc})") from None


def parse_dec(value: float | str) -> float:
    """Dec in degrees [-90, 90] from degrees or a string ("+22d43m16s", "+22:43:16").

    Raises SettingsError naming `[plan] dec` when the value is no angle or out of range.
    """
    from astropy.coordinates import Angle

    try:
        deg = float(value) if isinstance(value, (int, float)) else float(
            Angle(str(value).strip(), unit="deg").deg)
    except Exception as exc:  # noqa: BLE001 - astropy raises several types for bad angles
        raise SettingsError(f"[plan] dec = {value!r}: not an angle ({exc})") from None
    if not -90.0 <= deg <= 90.0:
        raise SettingsError(f"[plan] dec = {value!r}: outside -90..+90 degrees")
    return deg


def parse_until(value: str | datetime | None, key: str = "until") -> datetime | None:
    """An ISO 8601 time (UTC when no zone is given) -> aware datetime; None for none or for a
    twilight name ("dawn", "nautical-dawn", "civil-dawn"; for `start` "dusk", ...), which only a
    site and a date turn into a time (daemon.sky).

    Raises SettingsError naming `[plan] <key>` when the text is neither.
    """
    names = DAWNS if key == "until" else DUSKS
    if value in (None, "") or value in names:
        return None
    if isinstance(value, datetime):
        t = value
    else:
        try:
            t = datetime.fromisoformat(str(value))
        except ValueError:
            raise SettingsError(f"[plan] {key} = {value!r}: not an ISO time (e.g. 2026-12-07T05:30:00+01:00) "
                                f"nor one of {', '.join(names)}") from None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def parse_horizon(path: str | Path) -> tuple[tuple[float, float], ...]:
    """A horizon profile file -> ((azimuth_deg, altitude_deg), ...) sorted by azimuth.

    The file: one "azimuth altitude" pair a line (degrees; azimuth from north through east;
    spaces, tabs or a comma between), `#` starts a comment. Between points the horizon is
    interpolated linearly, across north too. Raises SettingsError naming `[plan] horizon_file`,
    the file and the line when it cannot be read or a value is out of range.
    """
    where = f"[plan] horizon_file = {str(path)!r}"
    try:
        text = Path(path).expanduser().read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsError(f"{where}: cannot read it ({exc})") from None
    points = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].replace(",", " ").strip()
        if not line:
            continue
        parts = line.split()
        try:
            az, alt = (float(x) for x in parts) if len(parts) == 2 else (math.nan, math.nan)
        except ValueError:
            az = alt = math.nan
        if not (0.0 <= az <= 360.0 and -90.0 <= alt <= 90.0):
            raise SettingsError(f"{where}: line {n} {line!r}: expected 'azimuth altitude' in degrees "
                                "(azimuth 0-360, altitude -90..90)")
        points.append((az % 360.0, alt))
        if len(points) > MAX_HORIZON_POINTS:
            raise SettingsError(f"{where}: more than {MAX_HORIZON_POINTS} points")
    if not points:
        raise SettingsError(f"{where}: no 'azimuth altitude' pairs in it")
    return tuple(sorted(points))


def _check_range(section: str, key: str, value: float, low: float, high: float, *, low_open: bool = False) -> None:
    ok = (value > low if low_open else value >= low) and value <= high
    if not ok:
        bound = f"> {low:g}" if low_open else f">= {low:g}"
        raise SettingsError(f"[{section}] {key} = {value!r}: must be {bound} and <= {high:g}")


@dataclass(frozen=True)
class IndiSettings:
    """Config [indi]: where the indiserver is and which devices to use.

    host, port: an indiserver to connect to; with `drivers` non-empty, the daemon starts its
    own indiserver with those drivers on `port`. camera, mount, filter_wheel, focuser: INDI
    device names ("" for none).
    """

    host: str = "127.0.0.1"
    port: int = 7624
    drivers: tuple[str, ...] = ()
    camera: str = "CCD Simulator"
    mount: str = "Telescope Simulator"
    filter_wheel: str = ""
    focuser: str = ""
    #: Simulators only: "real" makes the CCD simulator draw Tycho-2's stars (frames solve).
    sim_sky: str = "synthetic"
    #: Simulators only: the mount's gotos miss by this much (east, north arcsec) until synced.
    sim_pointing_error_arcsec: tuple[float, float] = (0.0, 0.0)

    def __post_init__(self) -> None:
        _check_range("indi", "port", self.port, 1, 65535)
        if self.sim_sky not in ("synthetic", "real"):
            raise SettingsError(f"[indi] sim_sky = {self.sim_sky!r}: expected 'synthetic' or 'real'")
        if len(self.sim_pointing_error_arcsec) != 2:
            raise SettingsError(f"[indi] sim_pointing_error_arcsec = {list(self.sim_pointing_error_arcsec)!r}: "
                                "expected [east, north] arcsec")


@dataclass(frozen=True)
class CameraSettings:
    """Config [camera]. cooler_c: set-point in deg C (None: leave the cooler alone); gain and
    offset in the driver's units (None: leave as set); binning 1-4; upload_prefix: the first
    part of the file names the daemon gives its own light frames."""

    cooler_c: float | None = None
    gain: float | None = None
    offset: float | None = None
    binning: int = 1
    upload_prefix: str = "light"

    def __post_init__(self) -> None:
        _check_range("camera", "binning", self.binning, 1, 4)
        if self.cooler_c is not None:
            _check_range("camera", "cooler_c", self.cooler_c, -60.0, 40.0)


@dataclass(frozen=True)
class PlanSettings:
    """Config [plan]: what to image (or which calibration frames to take), how many, how.

    target: the object's name (stack and file names). ra/dec: J2000, degrees or sexagesimal
    strings ("19h59m36s", "+22d43m16s"). exposure_s: seconds per frame. count: frames
    (0: until `until`, an ISO time, or until stopped). dither_every: frames between dithers
    (0: none), dither_px: the largest dither (px), settle_s: wait after a slew or dither (s).
    frame_type: light, dark, bias, flat or darkflat. park: park the mount when the plan ends.
    center: centre on the target by plate solving after each slew (None: when a solver is
    installed), within center_tolerance_arcsec, at most center_max_tries times, each with a
    center_exposure_s frame. autofocus: focus with the [indi] focuser at the plan's start
    (after centring; see [focus]). pointing_check_s: every this many seconds one of the plan's
    stacked frames is plate-solved to check where it points (0: never); one farther than
    pointing_far_arcsec from the target is reported, and re-centred on with pointing_recenter.

    Sky limits (they need a site: [site], or the mount's own): until may also be "dawn"
    (astronomical, sun at -18 deg), "nautical-dawn" (-12) or "civil-dawn" (-6); start: "dusk",
    "nautical-dusk", "civil-dusk" or an ISO time: the plan waits until then. min_altitude_deg:
    the target is imaged only above this altitude (deg), and above horizon_file's profile (see
    `parse_horizon`) where that is higher. max_faults: device faults in a row before the plan
    gives up.
    """

    target: str
    ra: float | str | None = None
    dec: float | str | None = None
    filter: str | None = None
    exposure_s: float = 10.0
    count: int = 0
    until: str | None = None
    dither_every: int = 0
    dither_px: float = 10.0
    settle_s: float = 2.0
    frame_type: FrameType = FrameType.LIGHT
    park: bool = False
    center: bool | None = None
    center_tolerance_arcsec: float = 30.0
    center_max_tries: int = 5
    center_exposure_s: float = 2.0
    start: str | None = None
    min_altitude_deg: float = 20.0
    horizon_file: str | None = None
    max_faults: int = 8
    autofocus: bool = False
    pointing_check_s: float = 0.0
    pointing_far_arcsec: float = 120.0
    pointing_recenter: bool = False

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "frame_type", FrameType(self.frame_type))
        except ValueError:
            raise SettingsError(f"[plan] frame_type = {self.frame_type!r}: expected one of "
                                f"{', '.join(t.value for t in FrameType)}") from None
        _check_range("plan", "exposure_s", self.exposure_s, 0.0, MAX_EXPOSURE_S)
        _check_range("plan", "count", self.count, 0, MAX_COUNT)
        _check_range("plan", "dither_every", self.dither_every, 0, MAX_COUNT)
        _check_range("plan", "dither_px", self.dither_px, 0.0, 1000.0, low_open=True)
        _check_range("plan", "settle_s", self.settle_s, 0.0, 600.0)
        _check_range("plan", "center_tolerance_arcsec", self.center_tolerance_arcsec, 0.0, 36000.0, low_open=True)
        _check_range("plan", "center_max_tries", self.center_max_tries, 1, 20)
        _check_range("plan", "center_exposure_s", self.center_exposure_s, 0.0, 600.0, low_open=True)
        _check_range("plan", "min_altitude_deg", self.min_altitude_deg, -10.0, 89.0)
        _check_range("plan", "max_faults", self.max_faults, 1, 1000)
        _check_range("plan", "pointing_check_s", self.pointing_check_s, 0.0, 86400.0)
        _check_range("plan", "pointing_far_arcsec", self.pointing_far_arcsec, 0.0, 36000.0, low_open=True)
        parse_until(self.until)
        parse_until(self.start, "start")
        if self.horizon_file:
            parse_horizon(self.horizon_file)
        if self.ra is not None:
            parse_ra(self.ra)
        if self.dec is not None:
            parse_dec(self.dec)

    @property
    def ra_deg(self) -> float | None:
        """ra in degrees, None when not given."""
        return None if self.ra is None else parse_ra(self.ra)

    @property
    def dec_deg(self) -> float | None:
        """dec in degrees, None when not given."""
        return None if self.dec is None else parse_dec(self.dec)

    @property
    def until_time(self) -> datetime | None:
        """`until` as an aware datetime, None when not given or a twilight."""
        return parse_until(self.until)

    @property
    def until_sun_alt_deg(self) -> float | None:
        """The sun's altitude (deg) that ends the plan when `until` is a dawn, else None."""
        return DAWNS.get(self.until or "")

    @property
    def start_time(self) -> datetime | None:
        """`start` as an aware datetime, None when not given or a dusk."""
        return parse_until(self.start, "start")

    @property
    def start_sun_alt_deg(self) -> float | None:
        """The sun's altitude (deg) the plan waits for when `start` is a dusk, else None."""
        return DUSKS.get(self.start or "")

    @property
    def horizon(self) -> tuple[tuple[float, float], ...]:
        """The horizon profile's (azimuth, altitude) points, () without horizon_file."""
        return parse_horizon(self.horizon_file) if self.horizon_file else ()


@dataclass(frozen=True)
class SiteSettings:
    """Config [site]: where the telescope stands. latitude: degrees, north positive; longitude:
    degrees, east positive (-180..360; 0..360 as INDI gives it is accepted); elevation_m: metres
    above sea level. Without [site] the mount's own site (INDI GEOGRAPHIC_COORD) is used; with
    it, the mount is told this one.
    """

    latitude: float
    longitude: float
    elevation_m: float = 0.0

    def __post_init__(self) -> None:
        _check_range("site", "latitude", self.latitude, -90.0, 90.0)
        _check_range("site", "longitude", self.longitude, -180.0, 360.0)
        _check_range("site", "elevation_m", self.elevation_m, -500.0, 9000.0)
        if self.longitude > 180.0:
            object.__setattr__(self, "longitude", self.longitude - 360.0)

    def describe(self) -> str:
        """"50.1000 N, 8.6800 E, 120 m": for messages."""
        ns, ew = "N" if self.latitude >= 0 else "S", "E" if self.longitude >= 0 else "W"
        return f"{abs(self.latitude):.4f} {ns}, {abs(self.longitude):.4f} {ew}, {self.elevation_m:.0f} m"


@dataclass(frozen=True)
class MountSettings:
    """Config [mount]: what the mount does on its own during a night.

    meridian_flip: flip a German equatorial mount (one that reports a pier side) once the
    target is flip_after_min minutes of hour angle past the meridian; an exposure running then
    may finish if it ends within flip_max_wait_min more, else it is aborted. settle_s: wait
    after the flip's slew. park_on_fault: park when a plan gives up after [plan] max_faults
    faults in a row (the mount is left tracking otherwise).
    """

    meridian_flip: bool = True
    flip_after_min: float = 5.0
    flip_max_wait_min: float = 10.0
    settle_s: float = 5.0
    park_on_fault: bool = True

    def __post_init__(self) -> None:
        _check_range("mount", "flip_after_min", self.flip_after_min, 0.0, 120.0)
        _check_range("mount", "flip_max_wait_min", self.flip_max_wait_min, 0.0, 120.0)
        _check_range("mount", "settle_s", self.settle_s, 0.0, 600.0)


@dataclass(frozen=True)
class FocusSettings:
    """Config [focus]: autofocus with the [indi] focuser (daemon.autofocus) and when a night
    focuses again (daemon.focus.RefocusTrigger).

    step: focuser steps between samples; points: samples per sweep (a fit needs 5);
    exposure_s: each sample's exposure (s); backlash_steps: the overshoot before a move inward
    (steps); max_sweeps: sweeps before giving up; min_stars: a sample with fewer stars counts
    as none. refocus: focus again during a light plan when the FWHM of its frames (accepted, or
    rejected for their FWHM) has risen to refocus_fwhm_factor times the best since the last
    focus (the median of refocus_min_frames frames), or when the focuser's temperature probe
    has fallen refocus_temp_drop_c (deg C) below the last focus's.
    """

    step: int = 4000
    points: int = 7
    exposure_s: float = 1.0
    backlash_steps: int = 1000
    max_sweeps: int = 3
    min_stars: int = 5
    refocus: bool = True
    refocus_fwhm_factor: float = 1.3
    refocus_temp_drop_c: float = 2.0
    refocus_min_frames: int = 3

    def __post_init__(self) -> None:
        for key, low, high in (("step", 1, 1_000_000), ("points", 5, 51), ("backlash_steps", 0, 1_000_000),
                               ("max_sweeps", 1, 20), ("min_stars", 1, 10_000), ("refocus_min_frames", 1, 100)):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int):
                raise SettingsError(f"[focus] {key} = {value!r}: must be an integer")
            _check_range("focus", key, value, low, high)
        _check_range("focus", "exposure_s", self.exposure_s, 0.0, 600.0, low_open=True)
        _check_range("focus", "refocus_fwhm_factor", self.refocus_fwhm_factor, 1.0, 10.0, low_open=True)
        _check_range("focus", "refocus_temp_drop_c", self.refocus_temp_drop_c, 0.0, 50.0, low_open=True)
