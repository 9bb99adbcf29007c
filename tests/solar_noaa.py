"""The sun's altitude by NOAA's solar calculator equations (Meeus, low precision), written out
here on purpose: the twilight tests check daemon.sky (astropy) against this, not against
astropy again. Accuracy about 1 arcmin in altitude: a few seconds of time at twilight.

Also the mean sidereal time (IAU 1982) and Meeus' annual precession in RA/Dec, for the
rise-time checks.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta


def julian_day(t: datetime) -> float:
    return t.astimezone(UTC).timestamp() / 86400.0 + 2440587.5


def sun_altitude_deg(t: datetime, lat_deg: float, lon_deg: float) -> float:
    """Geometric altitude of the sun's centre (no refraction), NOAA spreadsheet equations."""
    jc = (julian_day(t) - 2451545.0) / 36525.0
    l0 = (280.46646 + jc * (36000.76983 + jc * 0.0003032)) % 360.0
    m = 357.52911 + jc * (35999.05029 - 0.0001537 * jc)
    e = 0.016708634 - jc * (0.000042037 + 0.0000001267 * jc)
    mr = math.radians(m)
    c = (math.sin(mr) * (1.914602 - jc * (0.004817 + 0.000014 * jc)) + math.sin(2 * mr) * (0.019993 - 0.000101 * jc)
         + math.sin(3 * mr) * 0.000289)
    omega = math.radians(125.04 - 1934.136 * jc)
    app_long = math.radians(l0 + c - 0.00569 - 0.00478 * math.sin(omega))
    eps0 = 23.0 + (26.0 + (21.448 - jc * (46.815 + jc * (0.00059 - jc * 0.001813))) / 60.0) / 60.0
    eps = math.radians(eps0 + 0.00256 * math.cos(omega))
    decl = math.asin(math.sin(eps) * math.sin(app_long))
    y = math.tan(eps / 2) ** 2
    l0r = math.radians(l0)
    eqtime_min = 4.0 * math.degrees(y * math.sin(2 * l0r) - 2 * e * math.sin(mr)
                                    + 4 * e * y * math.sin(mr) * math.cos(2 * l0r)
                                    - 0.5 * y * y * math.sin(4 * l0r) - 1.25 * e * e * math.sin(2 * mr))
    u = t.astimezone(UTC)
    minutes = u.hour * 60 + u.minute + (u.second + u.microsecond / 1e6) / 60.0
    true_solar_min = (minutes + eqtime_min + 4.0 * lon_deg) % 1440.0
    ha = math.radians(true_solar_min / 4.0 - 180.0)
    lat = math.radians(lat_deg)
    cos_zen = math.sin(lat) * math.sin(decl) + math.cos(lat) * math.cos(decl) * math.cos(ha)
    return 90.0 - math.degrees(math.acos(max(-1.0, min(1.0, cos_zen))))


def sun_crossing(after: datetime, lat_deg: float, lon_deg: float, alt_deg: float, rising: bool,
                 hours: float = 36.0) -> datetime | None:
    """First time after `after` the sun passes alt_deg going up (rising) or down: minute scan, bisection."""
    prev = sun_altitude_deg(after, lat_deg, lon_deg) - alt_deg
    for k in range(1, int(hours * 60) + 1):
        t = after + timedelta(minutes=k)
        cur = sun_altitude_deg(t, lat_deg, lon_deg) - alt_deg
        if (prev < 0 <= cur) if rising else (prev >= 0 > cur):
            lo, hi = t - timedelta(minutes=1), t
            for _ in range(12):
                mid = lo + (hi - lo) / 2
                above = sun_altitude_deg(mid, lat_deg, lon_deg) >= alt_deg
                lo, hi = (lo, mid) if above == rising else (mid, hi)
            return lo + (hi - lo) / 2
        prev = cur
    return None


def gmst_deg(t: datetime) -> float:
    """Greenwich mean sidereal time (deg), IAU 1982 (Meeus 12.4)."""
    d = julian_day(t) - 2451545.0
    jc = d / 36525.0
    return (280.46061837 + 360.98564736629 * d + 0.000387933 * jc * jc - jc ** 3 / 38710000.0) % 360.0


def precess(ra_deg: float, dec_deg: float, t: datetime) -> tuple[float, float]:
    """J2000 -> mean of date by Meeus' annual rates (good to arcseconds over decades)."""
    years = (julian_day(t) - 2451545.0) / 365.25
    ra, dec = math.radians(ra_deg), math.radians(dec_deg)
    dra_s = (3.075 + 1.336 * math.sin(ra) * math.tan(dec)) * years
    ddec_as = 20.04 * math.cos(ra) * years
    return ra_deg + dra_s * 15.0 / 3600.0, dec_deg + ddec_as / 3600.0


def altitude_deg(ra_deg: float, dec_deg: float, t: datetime, lat_deg: float, lon_deg: float) -> tuple[float, float]:
    """(altitude, azimuth) of a J2000 target, mean place of date, no refraction."""
    ra, dec = precess(ra_deg, dec_deg, t)
    ha = math.radians(gmst_deg(t) + lon_deg - ra)
    d, lat = math.radians(dec), math.radians(lat_deg)
    alt = math.asin(math.sin(d) * math.sin(lat) + math.cos(d) * math.cos(lat) * math.cos(ha))
    az = math.atan2(-math.cos(d) * math.sin(ha),
                    math.sin(d) * math.cos(lat) - math.cos(d) * math.sin(lat) * math.cos(ha))
    return math.degrees(alt), math.degrees(az) % 360.0


def night_site(now: datetime, lat_deg: float | None = None) -> tuple[float, float]:
    """(latitude, longitude) of a site where it is the middle of the night at `now`: the sun
    near lower culmination, and (at |latitude| 30 on the winter side) far below -18 deg."""
    best = max(range(-180, 180), key=lambda lon: -sun_altitude_deg(now, 0.0, lon))
    if lat_deg is None:
        lat_deg = 30.0 if sun_altitude_deg(now, 89.0, 0.0) < 0 else -30.0  # the hemisphere in winter
    return lat_deg, float(best)
