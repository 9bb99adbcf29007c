"""The deterministic `gsc` stand-in the CCD simulator reads its stars from."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

GSC = Path(__file__).resolve().parents[1] / "drivers" / "simulators" / "gsc"


def gsc(ra, dec, radius, mag_max=17.0, n=3000):
    out = subprocess.run([sys.executable, str(GSC), "-c", f"{ra:8.6f}", f"{dec:+8.6f}", "-r",
                          f"{radius:4.1f}", "-m", "0", f"{mag_max:4.2f}", "-n", str(n)],
                         capture_output=True, text=True, check=True).stdout
    return [line.split() for line in out.splitlines()]


def test_lines_parse_as_the_simulator_reads_them():
    rows = gsc(10.0, 70.0, 16.0)
    assert len(rows) > 100
    for f in rows:
        # sscanf("%10s %f %f %f %f %f %d %d %4s %2s %f %d"): widths matter, ints must be ints
        assert len(f) == 12 and len(f[0]) <= 10 and len(f[8]) <= 4 and len(f[9]) <= 2
        int(f[6]), int(f[7]), int(f[11])
        assert float(f[10]) <= 16.0 and float(f[4]) <= 17.0
    mags = [float(f[4]) for f in rows]
    assert mags == sorted(mags)  # brightest first, so -n keeps the bright ones


def test_overlapping_fields_show_the_same_stars():
    a = {f[0]: f[1:6] for f in gsc(10.0, 70.0, 16.0)}
    b = {f[0]: f[1:6] for f in gsc(10.05, 70.03, 16.0)}  # a dither-sized move (~2 arcmin)
    common = set(a) & set(b)
    assert len(common) > 0.7 * len(a)
    assert all(a[k] == b[k] for k in common)  # same id -> same position and magnitude


def test_pole_and_ra_wrap_are_handled():
    assert len(gsc(123.0, 89.95, 10.0)) > 20
    east, west = gsc(0.01, 0.0, 10.0), gsc(359.99, 0.0, 10.0)
    assert {f[0] for f in east} & {f[0] for f in west}  # the same stars across RA 0


def test_star_counts_rise_by_the_expected_slope_and_toward_the_milky_way():
    mags = np.array([float(f[4]) for f in gsc(180.0, 30.0, 60.0, 17.0)])
    m = np.arange(12.0, 17.0, 0.5)
    counts = np.array([(mags < x).sum() for x in m])
    slope = np.polyfit(m, np.log10(counts), 1)[0]
    assert slope == pytest.approx(0.35, abs=0.04)  # log10 N(<m) rises 0.35 dex per magnitude
    area = math.pi * (60 / 60.0) ** 2
    high_lat = len(mags) / area
    plane = len(gsc(299.9, 22.72, 20.0)) / (math.pi * (20 / 60.0) ** 2)  # M27, b = -3.6 deg
    assert plane > 4 * high_lat


# --- the real sky (Tycho-2 through astrometry.net's query-starkd) ---------------------------

def _catalogue(ra, dec, radius_deg, tmp_path):
    """The Tycho-2 index's own stars around (ra, dec): (ra, dec, mag) rows, read with astropy."""
    from astropy.io import fits

    index = sorted(Path("/usr/share/astrometry").glob("index-tycho2-07*.fits"))[0]
    subprocess.run(["query-starkd", "-r", str(ra), "-d", str(dec), "-R", str(radius_deg), "-t", "MAG_VT",
                    "-o", str(tmp_path / "cat.fits"), str(index)], capture_output=True, check=True)
    t = fits.getdata(tmp_path / "cat.fits", 1)
    return np.c_[t["RA"], t["DEC"], t["MAG_VT"]]


def test_bright_stars_are_the_catalogues_at_their_real_positions(tmp_path):
    from tests.conftest import require_tools

    require_tools("query-starkd")
    rows = [f for f in gsc_env({"LIGHTBUCKET_GSC_SKY": "real"}, 10.0, 70.0, 30.0) if float(f[4]) < 11.0]
    cat = _catalogue(10.0, 70.0, 0.5, tmp_path)
    cat = cat[cat[:, 2] < 11.0]
    assert len(rows) == len(cat) >= 5
    got = np.array([[float(f[1]), float(f[2])] for f in rows])
    for ra, dec, _ in cat:  # every catalogue star is there, to the printed precision (0.004")
        d = np.hypot((got[:, 0] - ra) * np.cos(np.radians(dec)), got[:, 1] - dec).min() * 3600
        assert d < 0.01
    synthetic = gsc(10.0, 70.0, 20.0)
    assert {f[0] for f in synthetic}.isdisjoint(f[0] for f in rows)  # a control: not the old sky


def gsc_env(env, ra, dec, radius):
    import os

    out = subprocess.run([sys.executable, str(GSC), "-c", f"{ra:8.6f}", f"{dec:+8.6f}", "-r", f"{radius:4.1f}",
                          "-m", "0", "17", "-n", "3000"], capture_output=True, text=True, check=True,
                         env={**os.environ, **env}).stdout
    return [line.split() for line in out.splitlines()]


def test_a_pointing_offset_shows_the_sky_that_far_away():
    real = {"LIGHTBUCKET_GSC_SKY": "real"}
    plain = {f[0]: f for f in gsc_env(real, 10.0, 70.0, 15.0)}
    moved = {f[0]: f for f in gsc_env({**real, "LIGHTBUCKET_GSC_OFFSET": "300 -120"}, 10.0, 70.0, 15.0)}
    common = [k for k in moved if k in plain and float(moved[k][4]) < 11.5]
    assert len(common) >= 3
    for k in common:  # each star moved by the offset's opposite: west 300", north 120"
        ra0, dec0, ra1, dec1 = (float(plain[k][1]), float(plain[k][2]), float(moved[k][1]), float(moved[k][2]))
        east = (ra1 - ra0) * np.cos(np.radians(dec0)) * 3600
        assert east == pytest.approx(-300, abs=3) and (dec1 - dec0) * 3600 == pytest.approx(120, abs=3)
