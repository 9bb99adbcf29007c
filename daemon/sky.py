"""The sky clock of a site: sidereal time, hour angle, altitude, rise and set under a limit,
twilight. Pure functions of (site, time, target); no devices, no I/O.

Offline by design: a telescope in a field has no network, and astropy by default fetches the
IERS-A table (UT1-UTC) when its own is over 30 days old, and fails (or stalls 10 s a try) when it
cannot. Importing this module switches that off for the whole process: astropy uses the tables
bundled with the installed `astropy-iers-data`; past their end UT1-UTC is held at the last
predicted value (under 1 s of time: under 0.004 deg in hour angle, nothing a limit in minutes
notices). `tables_warning` says when the tables are older than the date asked about, so the log
tells the observer to update the package.

How rise and set are found: the altitude is sampled every `step_s` (60 s) over the window and a
crossing of the limit is interpolated linearly between the two samples around it (altitude is
smooth: the error is far below a second). Twilight: the sun's altitude is sampled every 5 min,
then the crossing is bisected to a second. Altitudes are geometric (no refraction): limits are
set well above the horizon, and twilight is defined without it.

Conventions: angles in degrees; azimuth from north through east; hour angle negative east of
the meridian, in [-180, 180); times are aware UTC datetimes. The target's (ra, dec) are J2000.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import numpy as np
from astropy.utils import data as _astropy_data
from astropy.utils import iers

# Before anything computes a time: never download, never refuse for age (see the docstring).
iers.conf.auto_download = False
iers.conf.auto_max_age = None
_astropy_data.conf.allow_internet = False

from astropy import units as u  # noqa: E402 - after the offline switch, on purpose
from astropy.coordinates import TETE, EarthLocation, SkyCoord, get_sun  # noqa: E402
from astropy.time import Time  # noqa: E402
from erfa import ErfaWarning  # noqa: E402

from daemon.settings import SiteSettings  # noqa: E402

log = logging.getLogger(__name__)

#: Degrees of hour angle per second of time (the sidereal rate).
SIDEREAL_DEG_PER_S = 360.0 / 86164.0905
#: How far ahead rise, set and twilight are looked for (h): a night and the day around it.
LOOKAHEAD_H = 36.0


def tables_warning(when: datetime | None = None) -> str | None:
    """A message when astropy's bundled IERS-A or leap-second tables do not cover `when`
    (default: now), None when they do. What it means: UT1-UTC extrapolated (sky positions off by
    well under a second of time), or a leap second missed (times off by 1 s)."""
    when = when or datetime.now(UTC)
    with warnings.catch_warnings():  # "dubious year": the very thing reported below
        warnings.simplefilter("ignore", ErfaWarning)
        mjd = Time(when).utc.mjd
    notes = []
    try:
        table = iers.IERS_Auto.open()
        end = float(table["MJD"][-1].value) if hasattr(table["MJD"][-1], "value") else float(table["MJD"][-1])
        if mjd > end:
            notes.append(f"its IERS-A table ends {Time(end, format='mjd').iso[:10]}")
    except Exception as exc:  # noqa: BLE001 - a missing table is what we warn about, not a crash
        notes.append(f"its IERS-A table cannot be read ({exc})")
    try:
        expires = iers.LeapSeconds.auto_open().expires  # the newest table installed (offline)
        if mjd > expires.mjd:
            notes.append(f"its leap-second table expired {expires.iso[:10]}")
    except Exception as exc:  # noqa: BLE001 - as above
        notes.append(f"its leap-second table cannot be read ({exc})")
    if not notes:
        return None
    return (f"astropy's bundled time tables are older than {when:%Y-%m-%d}: {'; '.join(notes)}. Sky "
            "positions stay good to about a second of time; update with "
            "`pip install -U astropy-iers-data pyerfa` when online")


def location(site: SiteSettings) -> EarthLocation:
    return EarthLocation.from_geodetic(site.longitude * u.deg, site.latitude * u.deg, site.elevation_m * u.m)


def _times(when: datetime | Sequence[datetime] | Time) -> Time:
    return when if isinstance(when, Time) else Time(when, scale="utc")


def local_sidereal_deg(site: SiteSettings, when: datetime | Time) -> float | np.ndarray:
    """Apparent local sidereal time (deg, 0..360) at the site."""
    lst = _times(when).sidereal_time("apparent", longitude=site.longitude * u.deg)
    return lst.deg


def apparent_radec(ra_deg: float, dec_deg: float, when: datetime | Time) -> tuple[float, float]:
    """J2000 (ra, dec) -> (ra, dec) of date, true equator and equinox (deg): what the mount uses."""
    t = _times(when)
    c = SkyCoord(ra_deg * u.deg, dec_deg * u.deg, frame="icrs").transform_to(TETE(obstime=t))
    return float(c.ra.deg), float(c.dec.deg)


def hour_angle_deg(ra_deg: float, dec_deg: float, site: SiteSettings, when: datetime) -> float:
    """Hour angle (deg, [-180, 180), negative east of the meridian) of a J2000 target."""
    ra, _ = apparent_radec(ra_deg, dec_deg, when)
    return (float(local_sidereal_deg(site, when)) - ra + 180.0) % 360.0 - 180.0


def _alt_az(ha_deg, dec_deg, lat_deg) -> tuple[np.ndarray, np.ndarray]:
    """Geometric (alt, az) in degrees from hour angle, declination and latitude."""
    ha, dec, lat = np.radians(ha_deg), np.radians(dec_deg), math.radians(lat_deg)
    sin_alt = np.sin(dec) * math.sin(lat) + np.cos(dec) * math.cos(lat) * np.cos(ha)
    alt = np.degrees(np.arcsin(np.clip(sin_alt, -1.0, 1.0)))
    az = np.degrees(np.arctan2(-np.cos(dec) * np.sin(ha),
                               np.sin(dec) * math.cos(lat) - np.cos(dec) * math.sin(lat) * np.cos(ha)))
    return alt, az % 360.0


def alt_az(ra_deg: float, dec_deg: float, site: SiteSettings,
           when: datetime | Sequence[datetime] | Time) -> tuple[np.ndarray, np.ndarray]:
    """(altitude, azimuth) in degrees of a J2000 target at one time or many (arrays).

    The position of date is computed once, at the first time: over a day the target moves by
    precession and aberration less than 0.01 deg.
    """
    t = _times(when)
    first = t if t.isscalar else t[0]
    ra, dec = apparent_radec(ra_deg, dec_deg, first)
    ha = local_sidereal_deg(site, t) - ra
    return _alt_az(ha, dec, site.latitude)


def sun_alt_deg(site: SiteSettings, when: datetime | Sequence[datetime] | Time) -> np.ndarray:
    """The sun's geometric altitude (deg) at the site, at one time or many."""
    t = _times(when)
    sun = get_sun(t).transform_to(TETE(obstime=t))
    ha = local_sidereal_deg(site, t) - sun.ra.deg
    return _alt_az(ha, sun.dec.deg, site.latitude)[0]


class Horizon:
    """The lowest altitude a target may have, by azimuth: `min_alt_deg` everywhere, raised by a
    horizon profile (trees, a house) where that is higher.

    Parameters
    ----------
    min_alt_deg : float, the altitude limit (deg).
    points : ((azimuth, altitude), ...) in degrees (`daemon.settings.parse_horizon`), or ();
        linear between points, across north too.
    """

    def __init__(self, min_alt_deg: float, points: Sequence[tuple[float, float]] = ()):
        self.min_alt_deg = float(min_alt_deg)
        pts = sorted((float(a) % 360.0, float(h)) for a, h in points)
        self._az = np.array([p[0] for p in pts])
        self._alt = np.array([p[1] for p in pts])

    @property
    def has_profile(self) -> bool:
        return len(self._az) > 0

    def limit_deg(self, az_deg):
        """The altitude limit (deg) at azimuth(s) `az_deg`."""
        az = np.asarray(az_deg, dtype=float) % 360.0
        if not self.has_profile:
            return np.full_like(az, self.min_alt_deg)
        xp = np.r_[self._az[-1] - 360.0, self._az, self._az[0] + 360.0]
        fp = np.r_[self._alt[-1], self._alt, self._alt[0]]
        return np.maximum(self.min_alt_deg, np.interp(az, xp, fp))

    def describe(self) -> str:
        return f"{self.min_alt_deg:g} deg" + (" and the horizon profile" if self.has_profile else "")


@dataclass(frozen=True)
class Visibility:
    """When a target is above its limit, from `start` on (up to LOOKAHEAD_H hours).

    up: above the limit at `start`. rise: the first time it comes above (None when up at start
    or never). set: the first time it goes below after `start` (or after `rise`; None when it
    stays up). never: never above over a whole sidereal day (`reason` says why, naming the
    altitude). max_alt_deg: its highest altitude over that day.
    """

    up: bool
    rise: datetime | None
    set: datetime | None
    never: bool
    max_alt_deg: float
    reason: str = ""


def _crossing(t0: datetime, step_s: float, i: int, margin: np.ndarray) -> datetime:
    """Time where `margin` crosses zero between samples i and i+1 (linear interpolation)."""
    a, b = margin[i], margin[i + 1]
    frac = 0.0 if a == b else float(a / (a - b))
    return t0 + timedelta(seconds=step_s * (i + min(max(frac, 0.0), 1.0)))


def visibility(ra_deg: float, dec_deg: float, site: SiteSettings, start: datetime, horizon: Horizon,
               step_s: float = 60.0) -> Visibility:
    """When the J2000 target is above `horizon` at `site`, from `start` on.

    Parameters
    ----------
    ra_deg, dec_deg : float, J2000 degrees.
    site : SiteSettings.
    start : aware datetime (UTC) from which to look.
    horizon : Horizon, the limit.
    step_s : float, sampling step (s); crossings are interpolated between samples.
    """
    n = int(LOOKAHEAD_H * 3600 / step_s) + 1
    offsets = np.arange(n) * step_s
    times = Time(start) + offsets * u.s
    alt, az = alt_az(ra_deg, dec_deg, site, times)
    margin = alt - horizon.limit_deg(az)
    above = margin >= 0.0
    day = offsets <= 86164.0905 + step_s
    max_alt = float(alt[day].max())
    if not above[day].any():
        best = int(np.argmax(margin[day]))
        reason = (f"never rises above {horizon.describe()} from {site.describe()}: its highest altitude is "
                  f"{max_alt:.1f} deg")
        if horizon.has_profile:
            reason += f" (at azimuth {az[best]:.0f} deg, {margin[best]:.1f} deg under the limit there)"
        return Visibility(False, None, None, True, max_alt, reason)
    rise = set_ = None
    i0 = 0
    if not above[0]:
        i = int(np.argmax(above))
        rise = _crossing(start, step_s, i - 1, margin)
        i0 = i
    below = ~above[i0:]
    if below.any():
        j = i0 + int(np.argmax(below))
        set_ = _crossing(start, step_s, j - 1, margin)
    return Visibility(bool(above[0]), rise, set_, False, max_alt)


def sun_crossing(site: SiteSettings, after: datetime, alt_deg: float, rising: bool,
                 hours: float = LOOKAHEAD_H) -> datetime | None:
    """The first time after `after` that the sun passes `alt_deg` going up (rising: a dawn) or
    down (a dusk), to about a second; None when it does not within `hours` (polar day or night).
    """
    step_s = 300.0
    n = int(hours * 3600 / step_s) + 1
    times = Time(after) + np.arange(n) * step_s * u.s
    margin = sun_alt_deg(site, times) - alt_deg
    sign = np.sign(margin)
    if rising:
        idx = np.nonzero((sign[:-1] < 0) & (sign[1:] >= 0))[0]
    else:
        idx = np.nonzero((sign[:-1] >= 0) & (sign[1:] < 0))[0]
    if idx.size == 0:
        return None
    lo = after + timedelta(seconds=step_s * int(idx[0]))
    hi = lo + timedelta(seconds=step_s)
    while (hi - lo).total_seconds() > 1.0:
        mid = lo + (hi - lo) / 2
        up = float(sun_alt_deg(site, mid)) >= alt_deg
        if up == rising:
            hi = mid
        else:
            lo = mid
    return lo + (hi - lo) / 2


def iso(t: datetime | None) -> str | None:
    """An aware datetime as ISO 8601 in UTC to the second (events, status), None for None."""
    return None if t is None else t.astimezone(UTC).replace(microsecond=0).isoformat()
