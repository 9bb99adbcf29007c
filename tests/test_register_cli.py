"""`lightbucket register` on FITS files written from the simulator (known transforms)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from daemon.cli import main
from daemon.simulate import Exposure, Sensor, apply_matrix, expose, fits_header, random_star_field, transform_matrix

SHAPE = (300, 400)
CENTER = ((SHAPE[1] - 1) / 2, (SHAPE[0] - 1) / 2)
FIELD = random_star_field(SHAPE, 300, seed=21, margin=0.3, flux_range=(200.0, 30000.0))


def _write(path: Path, matrix=None, bayer=None, seed=1, field=FIELD) -> Path:
    data = expose(SHAPE, field, Exposure(matrix=matrix, seed=seed), Sensor(bayer=bayer))
    hdu = fits.PrimaryHDU(data)
    for k, v in fits_header(exposure_s=10.0, bayer=bayer).items():
        hdu.header[k] = v
    hdu.writeto(path)
    return path


def _truth_error(matrix, truth) -> float:
    """px RMS of the CLI's matrix against the truth, over the true stars inside the frame."""
    fx, fy = apply_matrix(truth, FIELD.x, FIELD.y)
    inside = (fx >= 0) & (fx <= SHAPE[1] - 1) & (fy >= 0) & (fy <= SHAPE[0] - 1)
    rx, ry = apply_matrix(np.array(matrix), fx[inside], fy[inside])
    return float(np.sqrt(np.mean((rx - FIELD.x[inside]) ** 2 + (ry - FIELD.y[inside]) ** 2)))


@pytest.mark.parametrize("bayer", [None, "RGGB"])
def test_json_lines_give_the_true_matrix_and_reasons(tmp_path, capsys, bayer):
    truth = transform_matrix(23.4, -17.8, 31.0, 1.005, center=CENTER)
    ref = _write(tmp_path / "ref.fits", bayer=bayer, seed=1)
    moved = _write(tmp_path / "moved.fits", truth, bayer=bayer, seed=2)
    blank = _write(tmp_path / "blank.fits", bayer=bayer, seed=3, field=random_star_field(SHAPE, 0))
    broken = tmp_path / "broken.fits"
    broken.write_bytes(ref.read_bytes()[:5000])  # half-written
    rc = main(["register", "--json", str(ref), str(moved), str(blank), str(broken)])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rc == 1  # some frames failed
    assert [rec["path"] for rec in lines] == [str(ref), str(moved), str(blank), str(broken)]
    r0, r1, r2, r3 = lines
    assert r0["ok"] and np.allclose(r0["matrix"], np.eye(3), atol=1e-9)
    assert r1["ok"] and r1["reason"] is None and not r1["mirrored"]
    assert _truth_error(r1["matrix"], truth) < 0.05
    c = np.array([CENTER[0]]), np.array([CENTER[1]])
    ex, ey = apply_matrix(np.linalg.inv(truth), *c)
    assert r1["dx"] == pytest.approx(ex[0] - CENTER[0], abs=0.1)
    assert r1["dy"] == pytest.approx(ey[0] - CENTER[1], abs=0.1)
    assert r1["rotation_deg"] == pytest.approx(-31.0, abs=0.02)
    assert r1["scale"] == pytest.approx(1 / 1.005, abs=2e-4)
    assert r1["n_matched"] >= 20 and r1["rms_px"] < 0.3
    assert r1["metrics"]["n_stars"] >= 20 and 2.0 < r1["metrics"]["fwhm_px"] < 4.0
    assert not r2["ok"] and "too few stars" in r2["reason"] and r2["matrix"] is None
    assert r2["metrics"]["n_stars"] == 0
    assert not r3["ok"] and r3["reason"].startswith("unreadable") and r3["matrix"] is None


def test_text_output_and_explicit_reference(tmp_path, capsys):
    truth = transform_matrix(-12.0, 8.0, 180.0, center=CENTER)  # a meridian flip
    a = _write(tmp_path / "a.fits", seed=1)
    b = _write(tmp_path / "b.fits", truth, seed=2)
    rc = main(["register", "--reference", str(b), str(a)])
    out = capsys.readouterr().out
    assert rc == 0
    assert f"reference {b}" in out
    line = [ln for ln in out.splitlines() if ln.startswith("a.fits:")][0]
    # a -> b is the truth itself: rotation 180 degrees.
    rot = float(line.split("rot ")[1].split()[0])
    assert abs(abs(rot) - 180.0) < 0.02
    assert "matched" in line and "rms" in line and "FWHM" in line


def test_unreadable_reference_exits_2(tmp_path, capsys):
    good = _write(tmp_path / "good.fits")
    rc = main(["register", "--reference", str(tmp_path / "missing.fits"), str(good)])
    assert rc == 2
    assert "missing.fits" in capsys.readouterr().err


def test_installed_command_runs(tmp_path):
    truth = transform_matrix(5.5, 3.25, 0.0, center=CENTER)
    a = _write(tmp_path / "a.fits", seed=1)
    b = _write(tmp_path / "b.fits", truth, seed=2)
    exe = Path(sys.executable).with_name("lightbucket")
    module = [sys.executable, "-c", "import sys; from daemon.cli import main; sys.exit(main())"]
    cmd = [str(exe)] if exe.exists() else module
    proc = subprocess.run(cmd + ["register", "--json", str(a), str(b)],
                          capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr
    rec = json.loads(proc.stdout.splitlines()[1])
    assert rec["ok"] and _truth_error(rec["matrix"], truth) < 0.05
    assert rec["dx"] == pytest.approx(-5.5, abs=0.05) and rec["dy"] == pytest.approx(-3.25, abs=0.05)
