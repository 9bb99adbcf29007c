"""Plate solving: xylist, WCS arithmetic, and real frames solved by astrometry.net."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from daemon import wcs as wcsmath
from daemon.io.load import load_frame
from daemon.solve import SolveHints, hints_from_meta, solve_field_args, solve_frame, solve_stars, write_xylist
from tests.conftest import require_tools, shared_set

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


M27_FRAMES = ["Light_1069.fits", "Light_1114.fits", "Light_1171.fits", "Light_1254.fits", "Light_1264.fits",
              "Light_1283.fits"]


def astrometry_net_answer(path, out_dir, scale, width=None, height=None):
    """astrometry.net's own answer on an image file, with its own source extraction (the
    independent reference): (ra, dec of the centre, scale "/px, parity, cards) of the file's
    pixel grid (FITS: the first stored row is pixel row 1)."""
    subprocess.run(["solve-field", str(path), "--dir", str(out_dir), "--overwrite", "--no-plots",
                    "--downsample", "2", "--scale-units", "arcsecperpix", "--scale-low", str(scale * 0.85),
                    "--scale-high", str(scale * 1.15), "--cpulimit", "30", "--new-fits", "none",
                    "--no-verify"], check=True, capture_output=True, timeout=120)
    solved = out_dir / (path.stem + ".wcs")
    assert solved.exists(), f"astrometry.net did not solve {path} by itself"
    header = fits.getheader(solved)
    cards = {k: header[k] for k in ("CRVAL1", "CRVAL2", "CRPIX1", "CRPIX2", "CD1_1", "CD1_2", "CD2_1", "CD2_2")}
    ra, dec = wcsmath.center(cards, width or header["IMAGEW"], height or header["IMAGEH"])
    return ra, dec, wcsmath.scale_arcsec(cards), wcsmath.parity(cards), cards


@pytest.fixture(scope="module")
def m27_reference(tmp_path_factory):
    """astrometry.net's own answers for every M27 frame, computed once for the module."""
    require_tools("solve-field")
    root = shared_set("als_m27")
    out = tmp_path_factory.mktemp("m27-reference")
    return {name: astrometry_net_answer(root / name, out / name, 1.517) for name in M27_FRAMES}


@pytest.mark.realdata
@pytest.mark.parametrize("name", M27_FRAMES)
def test_real_frames_solve_where_astrometry_net_says(als_m27, m27_reference, name):
    frame = load_frame(als_m27 / name)
    hints = hints_from_meta(frame.meta)
    sol = solve_frame(frame, hints, time_limit_s=15)
    assert sol.ok, sol.reason
    ra, dec, scale, parity, _ = m27_reference[name]
    error = wcsmath.separation_arcsec(sol.ra_deg, sol.dec_deg, ra, dec)
    assert error < 60.0  # the issue's 1'; in fact about a pixel or better:
    assert error < 1.5, error
    assert sol.scale_arcsec_px == pytest.approx(scale, rel=0.002) and sol.parity == parity
    # The header's own (INDI) guess is 1.517"/px and a centre 40" away: the solve is not the hint.
    assert abs(sol.scale_arcsec_px - hints.scale_arcsec_px) > 0.02


@pytest.mark.realdata
def test_the_m27_frames_differ_by_more_than_the_solve_error(m27_reference):
    """A control for the test above: the frames drifted 10-30 px (15-46") during the session,
    so a solve that gave one frame's answer for another would fail its 1.5" bound."""
    centres = [m27_reference[n][:2] for n in M27_FRAMES]
    drift = [wcsmath.separation_arcsec(*centres[0], *c) for c in centres[1:]]
    assert min(drift) > 10.0, drift


ARP145_CENTRE = (35.7904, 41.3701)  # the set's info.json: 02h 23m 09.7s +41d 22' 12.5"


@pytest.mark.realdata
def test_arp145_cannot_solve_with_tycho2_and_says_so_in_time(jocular_arp145, tmp_path):
    """The Arp 145 set (SX Lodestar on an 8" f/4: 752 x 580 px at 2.1"/px, a 26' x 20' field)
    does NOT solve with the Tycho-2 index files the project installs: the index holds only a
    handful of stars in so small a field (counted here with query-starkd), too few for its
    22'-30' quads. Run directly, astrometry.net's own solve-field with the same hints and 60 s
    of CPU did not solve it either (checked once by hand: 200 sources tried in 7 minutes; not
    repeated here). What this set can show: the failure is an answer, with a reason, within the
    time limit. The M27 set above is the one that shows solves against astrometry.net's."""
    require_tools("solve-field", "query-starkd")
    index = sorted(Path("/usr/share/astrometry").glob("index-tycho2-07*.fits"))[0]
    cat = tmp_path / "cat.fits"
    subprocess.run(["query-starkd", "-r", str(ARP145_CENTRE[0]), "-d", str(ARP145_CENTRE[1]), "-R", "0.25",
                    "-o", str(cat), str(index)], check=True, capture_output=True)
    t = fits.getdata(cat, 1)
    east = (t["RA"] - ARP145_CENTRE[0]) * np.cos(np.radians(ARP145_CENTRE[1])) * 60
    north = (t["DEC"] - ARP145_CENTRE[1]) * 60
    in_field = int(np.count_nonzero((abs(east) < 13.2) & (abs(north) < 10.2)))
    assert in_field < 15, in_field
    frame = load_frame(sorted(jocular_arp145.glob("*.fit"))[0])
    t0 = time.monotonic()
    sol = solve_frame(frame, SolveHints(*ARP145_CENTRE, radius_deg=2.0, scale_arcsec_px=2.1, scale_error=0.2),
                      time_limit_s=5)
    took = time.monotonic() - t0
    assert not sol.ok and "no solution within 5 s" in sol.reason and sol.n_stars >= 30, sol
    assert took < 5 + 1.0, took


def _starless(path=None):
    """A 1304 x 976 frame of sky noise with the M27 frames' hints, and no star."""
    sky = np.random.default_rng(0).normal(1000, 10, (976, 1304)).astype(np.float32)
    if path is not None:
        header = fits.Header({"FOCALLEN": 510.0, "XPIXSZ": 3.75, "YPIXSZ": 3.75, "EXPTIME": 6.0,
                              "RA": 299.92, "DEC": 22.72})
        fits.writeto(path, sky, header)
    return sky


def test_a_frame_without_stars_fails_with_a_reason_within_the_time_limit(tmp_path):
    _starless(tmp_path / "empty.fits")
    frame = load_frame(tmp_path / "empty.fits")
    assert frame.meta.plate_scale_arcsec and frame.meta.ra_deg  # hinted like a real frame
    t0 = time.monotonic()
    sol = solve_frame(frame, time_limit_s=3)
    assert not sol.ok and "stars detected, at least 6 needed" in sol.reason
    assert time.monotonic() - t0 < 3


def test_a_star_list_that_matches_no_sky_fails_within_the_time_limit():
    require_tools("solve-field")
    rng = np.random.default_rng(2)
    x, y, f = rng.uniform(0, 1304, 80), rng.uniform(0, 976, 80), rng.uniform(1, 100, 80)
    t0 = time.monotonic()
    sol = solve_stars(x, y, f, 1304, 976, SolveHints(None, None, 5, 1.5, 0.5), time_limit_s=3)
    assert not sol.ok and sol.reason.startswith("no solution"), sol.reason
    assert time.monotonic() - t0 < 3 + 1.0


@pytest.mark.realdata
def test_cli_json_has_exactly_the_documented_keys(als_m27, m27_reference, tmp_path):
    require_tools("solve-field")
    bad = tmp_path / "not-a-frame.fits"
    bad.write_text("nothing")
    empty = tmp_path / "empty.fits"
    _starless(empty)
    cli = [sys.executable, "-c", "import sys; from daemon.cli import main; sys.exit(main())"]
    out = subprocess.run([*cli, "solve", "--json", "--time-limit", "10", str(als_m27 / "Light_1069.fits"),
                          str(bad), str(empty)], capture_output=True, text=True)
    recs = [json.loads(line) for line in out.stdout.splitlines()]
    keys = {"path", "ok", "ra_deg", "dec_deg", "scale_arcsec_px", "rotation_deg", "parity", "reason"}
    assert [set(r) for r in recs] == [keys] * 3 and out.returncode == 1
    ra, dec, scale, parity, _ = m27_reference["Light_1069.fits"]
    good = recs[0]
    assert good["ok"] and good["reason"] is None and good["path"] == str(als_m27 / "Light_1069.fits")
    assert wcsmath.separation_arcsec(good["ra_deg"], good["dec_deg"], ra, dec) < 60.0
    assert good["scale_arcsec_px"] == pytest.approx(scale, rel=0.002) and good["parity"] == parity
    assert good["rotation_deg"] == pytest.approx(56.9, abs=0.5)
    assert not recs[1]["ok"] and "unreadable" in recs[1]["reason"] and recs[1]["ra_deg"] is None
    assert not recs[2]["ok"] and "stars detected" in recs[2]["reason"]
