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
