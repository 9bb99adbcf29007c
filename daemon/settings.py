"""Settings of the device side: [indi], [camera] and [plan], as plain frozen dataclasses.

Why a module of their own: the config (and a watch-only daemon, the most common install)
needs these shapes without the code that drives devices; `daemon.acquisition` and
`drivers/` import PyIndi, this module imports nothing heavier than astropy's angle parser.
Each dataclass checks its own values in `__post_init__`, so a bad value is refused the same
way wherever it comes from (the TOML file, `--set`, a `plan` command) and before anything
runs: `SettingsError` names the section and the key.

Units: seconds, degrees (J2000 for ra/dec), arcseconds, pixels, degrees Celsius.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from daemon.pipeline.frame import FrameType

#: Longest single exposure a plan accepts (s): beyond any sky frame; a typo like 1e9 is refused.
MAX_EXPOSURE_S = 3600.0
#: Most frames one plan may ask for (a whole night of 1 s frames is ~40 000).
MAX_COUNT = 100_000


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


def parse_until(value: str | datetime | None) -> datetime | None:
    """An ISO 8601 time (UTC when no zone is given) -> aware datetime; None for none.

    Raises SettingsError naming `[plan] until` when the text is no ISO time.
    """
    if value in (None, ""):
        return None
    if isinstance(value, datetime):
        t = value
    else:
        try:
            t = datetime.fromisoformat(str(value))
        except ValueError:
            raise SettingsError(f"[plan] until = {value!r}: not an ISO time (e.g. 2026-12-07T05:30:00+01:00)") \
                from None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


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
    center_exposure_s frame.
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
        parse_until(self.until)
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
        """`until` as an aware datetime, None when not given."""
        return parse_until(self.until)
