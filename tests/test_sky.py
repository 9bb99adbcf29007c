"""The sky clock (daemon.sky) and plan windows (daemon.schedule) against independent equations.

Twilight is checked against NOAA's solar equations (tests/solar_noaa.py), altitudes and rise
times against plain spherical trigonometry with IAU 1982 sidereal time and Meeus' precession:
none of it through astropy. Dates and sites are fixed, so these do not depend on the hour.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import pytest

from daemon import schedule, sky
from daemon.settings import MountSettings, PlanSettings, SettingsError, SiteSettings, parse_horizon
from tests import solar_noaa as noaa

SITES = [SiteSettings(50.1, 8.7, 120), SiteSettings(-33.9, 18.4, 10), SiteSettings(35.0, -111.6, 2100),
         SiteSettings(19.8, -155.5, 4200)]
DATES = [datetime(2026, 12, 7, 12, 0, tzinfo=UTC), datetime(2027, 3, 20, 12, 0, tzinfo=UTC),
         datetime(2027, 6, 1, 12, 0, tzinfo=UTC), datetime(2026, 9, 15, 12, 0, tzinfo=UTC)]


def minutes(a: datetime, b: datetime) -> float:
    return abs((a - b).total_seconds()) / 60.0


@pytest.mark.parametrize("site", SITES, ids=lambda s: s.describe())
@pytest.mark.parametrize("date", DATES, ids=lambda d: d.date().isoformat())
def test_twilights_match_noaa(site, date):
    """Astronomical dawn and the other twilights within 2 minutes of NOAA's (seen: < 0.2 min)."""
    checked = 0
    for alt, rising in ((-18.0, True), (-12.0, True), (-6.0, True), (-18.0, False)):
        ours = sky.sun_crossing(site, date, alt, rising)
        theirs = noaa.sun_crossing(date, site.latitude, site.longitude, alt, rising)
        assert (ours is None) == (theirs is None), (alt, rising, ours, theirs)
        if ours is not None:
            assert minutes(ours, theirs) < 2.0, (alt, rising, ours, theirs)
            assert ours > date
            checked += 1
    # June at 50 N has no astronomical night: both say so; every other case has all four.
    assert checked == 4 or (site.latitude > 45 and date.month == 6)


def test_no_astronomical_night_in_june_at_50_north():
    site = SiteSettings(50.1, 8.7)
    date = datetime(2027, 6, 15, 12, tzinfo=UTC)
    assert sky.sun_crossing(site, date, -18.0, rising=True) is None
    assert noaa.sun_crossing(date, 50.1, 8.7, -18.0, rising=True) is None  # the control agrees
    plan = PlanSettings(target="M 13", ra="16h41m41s", dec="+36d27m35s", until="dawn", count=10)
    w = schedule.plan_window(plan, site, date)
    # The plan waits for the end of civil... of its own twilight: -18 deg never comes.
    assert w.refused and "no dark sky" in w.refused and "-18" in w.refused


def test_altitude_and_hour_angle_match_spherical_trig():
    site = SiteSettings(50.1, 8.7, 120)
    for k in range(12):
        t = datetime(2026, 12, 7, 0, tzinfo=UTC) + timedelta(minutes=97 * k)
        for ra, dec in ((10.0, 70.0), (83.8, -5.4), (279.2, 38.8), (201.3, -43.0)):
            alt, az = sky.alt_az(ra, dec, site, t)
            alt2, az2 = noaa.altitude_deg(ra, dec, t, site.latitude, site.longitude)
            assert float(alt) == pytest.approx(alt2, abs=0.02)  # nutation and aberration: < 0.01 deg
            if alt2 < 85:
                assert (float(az) - az2 + 180) % 360 - 180 == pytest.approx(0, abs=0.05)
            ra_date, _ = noaa.precess(ra, dec, t)
            ha2 = (noaa.gmst_deg(t) + site.longitude - ra_date + 180) % 360 - 180
            assert sky.hour_angle_deg(ra, dec, site, t) == pytest.approx(ha2, abs=0.02)


def _rise_by_trig(ra, dec, site, start, limit_deg):
    """First time after start the target's altitude passes limit_deg going up (1 s bisection)."""
    def alt(t):
        return noaa.altitude_deg(ra, dec, t, site.latitude, site.longitude)[0]
    t = start
    while alt(t) >= limit_deg:
        t += timedelta(minutes=1)
    while alt(t) < limit_deg:
        t += timedelta(minutes=1)
    lo, hi = t - timedelta(minutes=1), t
    while (hi - lo).total_seconds() > 1:
        mid = lo + (hi - lo) / 2
        lo, hi = (lo, mid) if alt(mid) >= limit_deg else (mid, hi)
    return hi


def test_target_below_the_limit_waits_for_its_rise():
    site = SiteSettings(50.1, 8.7, 120)
    now = datetime(2026, 12, 7, 20, 0, tzinfo=UTC)
    # Arcturus-like: below 20 deg at 20 UTC in December, rises in the small hours.
    plan = PlanSettings(target="Arcturus", ra="14h15m40s", dec="+19d10m57s", count=10)
    alt_now, _ = noaa.altitude_deg(plan.ra_deg, plan.dec_deg, now, 50.1, 8.7)
    assert alt_now < 20
    w = schedule.plan_window(plan, site, now)
    want = _rise_by_trig(plan.ra_deg, plan.dec_deg, site, now, 20.0)
    assert w.refused is None and w.start_reason == "target rises"
    assert w.rise == w.start and minutes(w.rise, want) < 1.0, (w.rise, want)
    assert w.end_reason in ("daylight", "target sets") and w.end > w.start


def test_target_that_never_rises_is_refused_naming_the_altitude():
    site = SiteSettings(50.1, 8.7, 120)
    plan = PlanSettings(target="47 Tuc", ra="00h24m05s", dec="-72d04m53s", count=10)
    w = schedule.plan_window(plan, site, datetime(2026, 12, 7, 20, tzinfo=UTC))
    _, dec_of_date = noaa.precess(plan.ra_deg, plan.dec_deg, datetime(2026, 12, 7, tzinfo=UTC))
    highest = 90.0 - abs(50.1 - dec_of_date)  # upper culmination, negative: always below the horizon
    assert w.refused and "never rises above 20 deg" in w.refused and "47 Tuc" in w.refused
    assert f"{highest:.1f} deg" in w.refused, w.refused
    # Just above the limit at culmination: it runs (the control shows the 20 deg is the reason).
    ok = PlanSettings(target="low", ra="00h24m05s", dec=-19.0, count=10, min_altitude_deg=20.0)
    assert schedule.plan_window(ok, site, datetime(2026, 12, 7, 17, tzinfo=UTC)).refused is None
    low = PlanSettings(target="low", ra="00h24m05s", dec=-21.0, count=10, min_altitude_deg=20.0)
    highest = 90 - 50.1 + noaa.precess(low.ra_deg, -21.0, datetime(2026, 12, 7, tzinfo=UTC))[1]
    assert f"{highest:.1f} deg" in schedule.plan_window(low, site, datetime(2026, 12, 7, 17, tzinfo=UTC)).refused


def test_horizon_profile_delays_the_rise(tmp_path):
    site = SiteSettings(50.1, 8.7, 120)
    now = datetime(2026, 12, 7, 20, 0, tzinfo=UTC)
    wall = tmp_path / "horizon.txt"
    wall.write_text("# trees to the east\n0 0\n60, 0\n70 45\n130 45\n140 0\n360 0\n")
    assert (70.0, 45.0) in parse_horizon(wall)
    base = dict(target="Arcturus", ra="14h15m40s", dec="+19d10m57s", count=10)
    plain = schedule.plan_window(PlanSettings(**base), site, now)
    walled = schedule.plan_window(PlanSettings(**base, horizon_file=str(wall)), site, now)
    want = _rise_by_trig(PlanSettings(**base).ra_deg, PlanSettings(**base).dec_deg, site, now, 45.0)
    _, az = noaa.altitude_deg(PlanSettings(**base).ra_deg, PlanSettings(**base).dec_deg, want, 50.1, 8.7)
    assert 70 <= az <= 130  # it clears the trees inside the wall, at 45 deg
    assert minutes(walled.rise, want) < 1.0 and walled.rise > plain.rise + timedelta(hours=1)
    assert "horizon profile" in walled.limit


def test_until_dawn_window_ends_at_noaa_dawn_and_lights_wait_for_dark():
    site = SiteSettings(35.0, -111.6, 2100)
    afternoon = datetime(2026, 12, 7, 22, 0, tzinfo=UTC)  # 15:00 local: daylight
    plan = PlanSettings(target="Polaris", ra="02h31m49s", dec="+89d15m51s", count=0, until="dawn")
    w = schedule.plan_window(plan, site, afternoon)
    dusk = noaa.sun_crossing(afternoon, 35.0, -111.6, -18.0, rising=False)
    dawn = noaa.sun_crossing(dusk, 35.0, -111.6, -18.0, rising=True)
    assert w.start_reason == "dark" and minutes(w.start, dusk) < 2.0
    assert w.end_reason == "dawn" and minutes(w.end, dawn) < 2.0
    # Darks need no dark sky: they start now, and until a named dawn still ends them.
    darks = PlanSettings(target="", frame_type="dark", count=5, until="civil-dawn")
    wd = schedule.plan_window(darks, site, afternoon)
    assert wd.start == afternoon and wd.end_reason == "dawn"
    assert minutes(wd.end, noaa.sun_crossing(afternoon, 35.0, -111.6, -6.0, rising=True)) < 2.0
    # start = "dusk": flats at nautical dusk.
    flats = PlanSettings(target="", frame_type="flat", count=5, start="nautical-dusk")
    wf = schedule.plan_window(flats, site, afternoon)
    assert wf.start_reason == "dusk"
    assert minutes(wf.start, noaa.sun_crossing(afternoon, 35.0, -111.6, -12.0, rising=False)) < 2.0


def test_setting_target_ends_the_window():
    site = SiteSettings(50.1, 8.7, 120)
    now = datetime(2026, 12, 7, 18, 0, tzinfo=UTC)
    plan = PlanSettings(target="Altair", ra="19h50m47s", dec="+08d52m06s", count=0)
    w = schedule.plan_window(plan, site, now)
    alt, _ = noaa.altitude_deg(plan.ra_deg, plan.dec_deg, now, 50.1, 8.7)
    assert alt > 20 and w.start == now and w.end_reason == "target sets"
    t = now
    while noaa.altitude_deg(plan.ra_deg, plan.dec_deg, t, 50.1, 8.7)[0] >= 20:
        t += timedelta(seconds=20)
    assert minutes(w.end, t) < 1.0


def test_without_a_site_only_clock_times_count():
    plan = PlanSettings(target="x", ra=10, dec=-80, count=3, until="2026-12-08T05:00:00")
    now = datetime(2026, 12, 7, 12, tzinfo=UTC)
    w = schedule.plan_window(plan, None, now)
    assert w.refused is None and w.start == now and w.end == datetime(2026, 12, 8, 5, tzinfo=UTC)


def test_flip_time():
    now = datetime(2026, 12, 7, 22, tzinfo=UTC)
    t = schedule.flip_time(-0.5, now, 5.0)  # 2 min east, flip 5 min past: 7 min of hour angle
    assert (t - now).total_seconds() == pytest.approx(7 * 60 * 0.99727, abs=0.5)
    assert schedule.flip_time(3.0, now, 5.0) < now  # 12 min past already: due


def test_offline_and_the_tables_warning():
    from astropy.utils import data, iers

    assert iers.conf.auto_download is False and data.conf.allow_internet is False
    assert sky.tables_warning(datetime.now(UTC)) is None or "astropy-iers-data" in sky.tables_warning()
    far = datetime(2040, 1, 1, tzinfo=UTC)
    note = sky.tables_warning(far)
    assert note and "IERS-A table ends" in note and "2040-01-01" in note
    # Far past the tables it still computes (extrapolated), without trying the network.
    assert -180 <= sky.hour_angle_deg(10.0, 70.0, SiteSettings(50, 8), far) < 180


@pytest.mark.parametrize("kwargs, key", [
    (dict(until="dusk"), "[plan] until = 'dusk'"),
    (dict(start="dawn"), "[plan] start = 'dawn'"),
    (dict(start="tonight"), "[plan] start = 'tonight'"),
    (dict(min_altitude_deg=95.0), "[plan] min_altitude_deg"),
    (dict(max_faults=0), "[plan] max_faults"),
    (dict(horizon_file="/nonexistent/horizon.txt"), "[plan] horizon_file"),
])
def test_plan_settings_refuse_bad_values(kwargs, key):
    with pytest.raises(SettingsError) as err:
        PlanSettings(target="x", **kwargs)
    assert key in str(err.value)


def test_site_and_mount_settings(tmp_path):
    assert SiteSettings(10.0, 350.0).longitude == pytest.approx(-10.0)  # INDI's 0..360 accepted
    with pytest.raises(SettingsError, match=r"\[site\] latitude"):
        SiteSettings(91.0, 0.0)
    with pytest.raises(SettingsError, match=r"\[mount\] flip_after_min"):
        MountSettings(flip_after_min=-1.0)
    bad = tmp_path / "h.txt"
    bad.write_text("0 0\n90 twenty\n")
    with pytest.raises(SettingsError, match="line 2"):
        parse_horizon(bad)
    assert PlanSettings(target="x", until="nautical-dawn").until_sun_alt_deg == -12.0
    assert PlanSettings(target="x", start="civil-dusk").start_sun_alt_deg == -6.0
    assert math.isclose(PlanSettings(target="x").min_altitude_deg, 20.0)


def test_config_sections(tmp_path):
    from daemon.config import ConfigError, config_from_dict

    base = {"capture": {"dir": str(tmp_path / "capture")}, "state": {"dir": str(tmp_path / "state")}}
    cfg = config_from_dict({**base, "site": {"latitude": 50.1, "longitude": 8.7, "elevation_m": 120},
                            "mount": {"flip_after_min": 2.5}})
    assert cfg.site.latitude == 50.1 and cfg.mount.flip_after_min == 2.5 and cfg.mount.meridian_flip
    with pytest.raises(ConfigError, match=r"\[site\] longitude: required key missing"):
        config_from_dict({**base, "site": {"latitude": 50.1}})
    with pytest.raises(ConfigError, match=r"\[mount\] flip_max_wait_min"):
        config_from_dict({**base, "mount": {"flip_max_wait_min": -1}})
