"""Plate solving: xylist, WCS arithmetic, and real frames solved by astrometry.net."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from daemon import wcs as wcsmath
from daemon.io.load import load_frame
from daemon.solve import SolveHints, hints_from_meta, solve_field_args, solve_frame, solve_stars, write_xylist
from tests.conftest import require_tools

CARDS = {"CTYPE1": "RA---TAN", "CTYPE2": "DEC--TAN", "CRVAL1": 299.9, "CRVAL2": 22.7,
         "CRPIX1": 652.5, "CRPIX2": 488.5, "CD1_1": 2.244e-4, "CD1_2": 3.454e-4,
         "CD2_1": -3.447e-4, "CD2_2": 2.252e-4}


def test_xylist_is_one_based_brightest_first(tmp_path):
    n = write_xylist(tmp_path / "a.xyls", [0.0, 10.0, np.nan], [5.0, 20.0, 1.0], [1.0, 9.0, 5.0], 64, 48)
    with fits.open(tmp_path / "a.xyls") as hdul:
        t, h = hdul[1].data, hdul[1].header
        assert n == 2 and list(t["X"]) == [11.0, 1.0] and list(t["Y"]) == [21.0, 6.0]
        assert (h["IMAGEW"], h["IMAGEH"]) == (64, 48)


def test_wcs_summary_follows_astrometry_net_conventions():
    # The CD of a real M27 solve: astrometry.net said "up is 56.92 deg E of N, parity neg".
    assert wcsmath.rotation_deg(CARDS) == pytest.approx(56.9, abs=0.1)
    assert wcsmath.parity(CARDS) == "neg"
    assert wcsmath.scale_arcsec(CARDS) == pytest.approx(1.482, abs=0.002)
    mirrored = dict(CARDS, CD1_1=-CARDS["CD1_1"], CD2_1=-CARDS["CD2_1"])
    assert wcsmath.parity(mirrored) == "pos"


def test_transform_maps_the_same_sky_onto_the_new_grid():
    rng = np.random.default_rng(1)
    x, y = rng.uniform(0, 640, 50), rng.uniform(0, 480, 50)
    # new pixel -> old pixel: 2x superpixel grid, rows flipped (old height 976), a shift
    m = np.array([[2.0, 0.0, 0.5 + 3.0], [0.0, -2.0, 975.0 - 0.5], [0, 0, 1]])
    new = wcsmath.transform(CARDS, m)
    old_x, old_y = (m @ np.vstack([x, y, np.ones_like(x)]))[:2]
    ra0, dec0 = wcsmath.pixel_to_sky(CARDS, old_x, old_y)
    ra1, dec1 = wcsmath.pixel_to_sky(new, x, y)
    sep = [wcsmath.separation_arcsec(a, b, c, d) for a, b, c, d in zip(ra0, dec0, ra1, dec1, strict=True)]
    assert max(sep) < 1e-6
    assert wcsmath.scale_arcsec(new) == pytest.approx(2 * wcsmath.scale_arcsec(CARDS))
    assert wcsmath.parity(new) != wcsmath.parity(CARDS)  # a row flip mirrors


def test_command_line_carries_the_hints():
    args = solve_field_args("s.xyls", "/t", 100, 80, SolveHints(10.0, 70.0, 2.0, 1.5, 0.1), 5)
    joined = " ".join(args)
    assert "--scale-low 1.3500 --scale-high 1.6500" in joined and "--ra 10.000000 --dec 70.000000" in joined
    assert "--cpulimit 5" in joined and "--width 100 --height 80" in joined


def _reference(path, tmp_path, scale):
    """astrometry.net's own answer on the image (its own source extraction): (ra, dec, scale)."""
    out = tmp_path / "ref"
    subprocess.run(["solve-field", str(path), "--dir", str(out), "--overwrite", "--no-plots",
                    "--downsample", "2", "--scale-units", "arcsecperpix", "--scale-low", str(scale * 0.85),
                    "--scale-high", str(scale * 1.15), "--cpulimit", "30", "--new-fits", "none"],
                   check=True, capture_output=True, timeout=90)
    header = fits.getheader(out / (path.stem + ".wcs"))
    w, h = header["IMAGEW"], header["IMAGEH"]
    sky = WCS(header).pixel_to_world((w - 1) / 2, (h - 1) / 2)
    scale = float(np.sqrt(abs(np.linalg.det(WCS(header).pixel_scale_matrix))) * 3600)
    return sky.ra.deg, sky.dec.deg, scale


@pytest.mark.parametrize("name", ["Light_1114.fits", "Light_1283.fits"])
def test_real_frames_solve_where_astrometry_net_says(als_m27, tmp_path, name):
    require_tools("solve-field")
    path = als_m27 / name
    frame = load_frame(path)
    hints = hints_from_meta(frame.meta)
    sol = solve_frame(frame, hints, time_limit_s=15)
    assert sol.ok, sol.reason
    ra, dec, scale = _reference(path, tmp_path, hints.scale_arcsec_px)
    assert wcsmath.separation_arcsec(sol.ra_deg, sol.dec_deg, ra, dec) < 60.0
    assert sol.scale_arcsec_px == pytest.approx(scale, rel=0.005)
    assert sol.parity == "neg" and sol.rotation_deg == pytest.approx(56.9, abs=0.5)
    # The header's own (INDI) guess is 1.517"/px and a centre 40" away: the solve is not the hint.
    assert abs(sol.scale_arcsec_px - hints.scale_arcsec_px) > 0.02


def test_a_frame_without_stars_fails_with_a_reason(tmp_path):
    flat = np.random.default_rng(0).normal(1000, 10, (400, 600)).astype(np.float32)
    sol = solve_stars(*_detect(flat), 600, 400, SolveHints(10, 70, 2, 1.5), time_limit_s=3)
    assert not sol.ok and "stars detected" in sol.reason and sol.elapsed_s < 3


def test_a_star_list_that_matches_no_sky_fails_within_the_time_limit():
    require_tools("solve-field")
    rng = np.random.default_rng(2)
    x, y, f = rng.uniform(0, 1304, 80), rng.uniform(0, 976, 80), rng.uniform(1, 100, 80)
    sol = solve_stars(x, y, f, 1304, 976, SolveHints(None, None, 5, 1.5, 0.5), time_limit_s=3)
    assert not sol.ok and ("no solution" in sol.reason) and sol.elapsed_s < 3 + 4


def _detect(image):
    from daemon.pipeline.stars import measure

    stars, _ = measure(image)
    return stars.x, stars.y, stars.flux


def test_cli_json_has_exactly_the_documented_keys(als_m27, tmp_path):
    require_tools("solve-field")
    bad = tmp_path / "not-a-frame.fits"
    bad.write_text("nothing")
    cli = [sys.executable, "-c", "import sys; from daemon.cli import main; sys.exit(main())"]
    out = subprocess.run([*cli, "solve", "--json", "--time-limit", "10", str(als_m27 / "Light_1069.fits"),
                          str(bad)], capture_output=True, text=True)
    recs = [json.loads(line) for line in out.stdout.splitlines()]
    keys = {"path", "ok", "ra_deg", "dec_deg", "scale_arcsec_px", "rotation_deg", "parity", "reason"}
    assert [set(r) for r in recs] == [keys, keys] and out.returncode == 1
    assert recs[0]["ok"] and abs(recs[0]["dec_deg"] - 22.71) < 0.02 and recs[0]["reason"] is None
    assert not recs[1]["ok"] and "unreadable" in recs[1]["reason"]
