"""`lightbucket stack` through the real loader, calibration, pipeline and FITS writer:
a synthetic session on disk with a raw-dark folder, and the real ALS M27 colour set."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from astropy.io import fits

from daemon.cli import main
from daemon.products import inputs_from_header
from daemon.simulate import Exposure, Sensor, expose, fits_header
from tests.test_live import FIELD, SHAPE, TIMES, dither

SENSOR = Sensor(bias_adu=300.0, dark_current_adu_s=2.0, read_noise_adu=3.0, n_hot_pixels=40,
                hot_pixel_adu_s=300.0)


def write(path: Path, data: np.ndarray, header: dict) -> Path:
    fits.PrimaryHDU(data.astype(np.uint16), fits.Header(header)).writeto(path)
    return path


@pytest.fixture
def session(tmp_path):
    lights = tmp_path / "lights"
    darks = tmp_path / "darks"
    lights.mkdir(), darks.mkdir()
    for i in range(7):
        exp = Exposure(exposure_s=10.0, matrix=dither(i), fwhm_px=3.0, sky_adu_s=10.0, seed=200 + i,
                       transmission=0.1 if i == 4 else 1.0)
        write(lights / f"light_{i:02d}.fits", expose(SHAPE, FIELD, exp, SENSOR),
              fits_header(exposure_s=10.0, date_obs=TIMES[i]))
    (lights / "broken.fits").write_bytes(b"SIMPLE  =                    T" + b" " * 50)  # half-written
    for i in range(5):
        write(darks / f"dark_{i}.fits", expose(SHAPE, None, Exposure(exposure_s=10.0, seed=900 + i), SENSOR,
                                               light=False), fits_header(exposure_s=10.0, frame_type="Dark"))
    return tmp_path


def test_cli_stacks_calibrates_rejects_and_records_provenance(session, capsys, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(session / "cache"))
    out = session / "out" / "stack.fits"
    preview = session / "out" / "stack.jpg"
    code = main(["stack", str(session / "lights"), "--dark", str(session / "darks"), "-o", str(out),
                 "--preview", str(preview), "--final"])
    text = capsys.readouterr().out
    assert code == 0, text
    lines = [ln for ln in text.splitlines() if ln.startswith("[") or "SKIPPED" in ln]
    assert len(lines) == 8
    assert "REJECTED clouds:" in next(ln for ln in lines if "light_04" in ln)
    assert "SKIPPED" in next(ln for ln in lines if "broken" in ln)
    assert "stacked 6 of 8 frames, 60 s total exposure" in text
    with fits.open(out) as hdul:
        h, data = hdul[0].header, hdul[0].data
    assert data.dtype == np.dtype(">f4") and data.shape == SHAPE
    assert h["NCOMBINE"] == 6 and h["EXPTIME"] == 10.0 and h["LIVETIME"] == 60.0
    assert h["DATE-OBS"].startswith(TIMES[0].strftime("%Y-%m-%dT%H:%M:%S"))
    assert h["DATE-END"].startswith(TIMES[6].replace(second=TIMES[6].second + 10).strftime("%Y-%m-%dT%H:%M:%S"))
    inputs = inputs_from_header(h)
    assert len(inputs) == 6 and all("light_04" not in p["path"] for p in inputs)
    assert all(p["path"].startswith(str(session / "lights")) and p["weight"] > 0.9 for p in inputs)
    # the reference is the best early frame: one of the clear ones, never the cloudy light_04
    assert "darks" in h["DARKFRM"] and h["REFFRAME"].startswith("light_0") and h["REFFRAME"] != "light_04.fits"
    assert h["STACKMTH"] == "winsorized sigma clipping" and h["LB KAPPA_HIGH"] == 3.0
    # calibrated: the dark (300 ADU/s hot pixels and 20 ADU of dark current) is gone
    sky = np.nanmedian(data)
    assert abs(sky - 100.0) < 5.0, sky
    assert np.nanmax(np.abs(data[20:-20, 20:-20] - sky)) < 3e4  # stars, no 3000 ADU hot pixels left unmasked
    img = cv2.imread(str(preview))
    assert img is not None and img.shape[:2] == SHAPE
    # the dark folder became a cached master, found again by the next run
    assert len(list((session / "cache" / "lightbucket" / "masters").glob("dark-*.fits"))) == 1
    assert main(["stack", str(session / "lights" / "light_00.fits"), "--dark", str(session / "darks"),
                 "-o", str(session / "one.fits")]) == 0
    assert "cached" in capsys.readouterr().out


def test_cli_reports_bad_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["stack", str(tmp_path), "-o", str(tmp_path / "x.fits"), "--set", "kapa=3"])
    assert "kapa" in str(exc.value)
    assert main(["stack", str(tmp_path), "-o", str(tmp_path / "x.fits")]) == 2
    # a folder's other files are named, not dropped without a word (a frame's sidecar is no file of its own)
    (tmp_path / "thumb.jpg").write_bytes(b"\xff\xd8")
    (tmp_path / "light.tif.json").write_text("{}")
    capsys.readouterr()
    assert main(["stack", str(tmp_path), "-o", str(tmp_path / "x.fits")]) == 2
    err = capsys.readouterr().err
    assert "1 files not read (not a frame format: thumb.jpg)" in err and "json" not in err


@pytest.mark.realdata
def test_real_m27_stacks_to_round_stars_and_the_nebula_shows(als_m27, tmp_path, capsys):
    from daemon.io.load import load_frame
    from daemon.pipeline.stars import measure

    out, preview = tmp_path / "m27.fits", tmp_path / "m27.png"
    assert main(["stack", str(als_m27), "-o", str(out), "--preview", str(preview)]) == 0
    text = capsys.readouterr().out
    with fits.open(out) as hdul:
        h, data = hdul[0].header, hdul[0].data.astype(np.float32)
    assert h["NCOMBINE"] == 6 and h["EXPTIME"] == 6.0 and h["LIVETIME"] == 36.0, text
    assert h["DATE-OBS"].startswith("2018-09-07T22:31:45") and h["REFFRAME"] == "Light_1069.fits"
    assert data.shape == (3, 976, 1304) and np.isfinite(data[:, 40:-40, 40:-40]).all()
    lum = np.nanmean(data, axis=0)
    lum = np.nan_to_num(lum, nan=float(np.nanmedian(lum)))
    _, stacked = measure(lum)
    single = load_frame(sorted(Path(als_m27).glob("*.fits"))[0])
    _, first = measure(single.data, bayer=single.meta.bayer)
    assert stacked.n_stars > 100
    # Round stars: no trailing from a bad registration (a single frame has 0.40-0.42).
    assert stacked.eccentricity < 0.5 and stacked.eccentricity < first.eccentricity + 0.05, stacked
    assert stacked.fwhm_px <= 1.05 * first.fwhm_px, (stacked.fwhm_px, first.fwhm_px)
    # The nebula: with the stars median-filtered away, the brightest part of the central
    # region of the preview stands far above the sky.
    img = cv2.imread(str(preview), cv2.IMREAD_GRAYSCALE)
    smooth = cv2.medianBlur(img, 21).astype(np.float32)
    hh, ww = smooth.shape
    nebula = smooth[int(0.3 * hh):int(0.7 * hh), int(0.3 * ww):int(0.7 * ww)].max()
    assert nebula > np.median(smooth) + 50, (nebula, np.median(smooth))


def test_write_stack_from_a_running_pipeline_names_its_masters(tmp_path):
    """What the daemon writes after every frame: the pipeline's own provenance and masters."""
    from daemon.pipeline.calibrate import Masters
    from daemon.pipeline.frame import FrameMeta
    from daemon.pipeline.live import LivePipeline
    from daemon.products import inputs_from_header, write_stack
    from tests.test_live import make_frame

    masters = Masters(dark=np.zeros(SHAPE, np.float32), dark_exposure_s=10.0,
                      sources={"dark": FrameMeta(path="/masters/dark_10s.fits")})
    pipe = LivePipeline(masters=masters)
    for i in range(3):
        assert pipe.process(make_frame(i)).accepted
    write_stack(tmp_path / "live.fits", pipe)
    h = fits.getheader(tmp_path / "live.fits")
    assert h["DARKFRM"] == "/masters/dark_10s.fits" and h["NCOMBINE"] == 3
    assert h["REFPATH"] == "/sim/light_000.fits" and h["LB KAPPA"] == 3.0
    inputs = inputs_from_header(h)
    assert [p["path"] for p in inputs] == [f"/sim/light_{i:03d}.fits" for i in range(3)]
    assert [p["weight"] for p in inputs] == [round(p["weight"], 4) for p in pipe.provenance()]
    assert inputs[1]["date_obs"] == TIMES[1].strftime("%Y-%m-%dT%H:%M:%S.000") and inputs[2]["exposure_s"] == 10.0


def test_mixed_exposures_give_one_stack_each_and_keep_the_deep_frames(tmp_path, capsys):
    """2 s, 3 s and 60 s frames of one field in one folder: one stack per exposure, named
    after -o, none thrown away as a "background jump" against another exposure; the
    reference of each stack is its best frame (the 60 s one: light_06, sharper than the
    first, light_05, in poor seeing)."""
    lights = tmp_path / "lights"
    lights.mkdir()
    plan = [(2.0, 3.0)] * 3 + [(3.0, 3.0)] * 2 + [(60.0, 4.5), (60.0, 2.6), (60.0, 3.0)]
    sensor = Sensor(bias_adu=300.0, dark_current_adu_s=0.0, read_noise_adu=3.0)
    for i, (exposure, fwhm) in enumerate(plan):
        exp = Exposure(exposure_s=exposure, matrix=dither(i), fwhm_px=fwhm, sky_adu_s=10.0, seed=300 + i)
        write(lights / f"light_{i:02d}.fits", expose(SHAPE, FIELD, exp, sensor),
              fits_header(exposure_s=exposure, date_obs=TIMES[i]))
    out = tmp_path / "out" / "m.fits"
    assert main(["stack", str(lights), "-o", str(out), "--preview", str(tmp_path / "out" / "m.jpg")]) == 0
    text = capsys.readouterr().out
    assert "background jump" not in text and "REJECTED" not in text, text
    expected = {"m_60s.fits": (3, 180.0, "light_06.fits"), "m_3s.fits": (2, 6.0, None), "m_2s.fits": (3, 6.0, None)}
    assert not out.exists()
    for name, (n, total, ref) in expected.items():
        with fits.open(out.parent / name) as hdul:
            h = hdul[0].header
        assert (h["NCOMBINE"], h["TOTEXP"]) == (n, total), (name, text)
        assert ref is None or h["REFFRAME"] == ref, (name, h["REFFRAME"])
        assert (out.parent / name.replace(".fits", ".jpg")).exists()
    assert "3 x 2s, 2 x 3s, 3 x 60s" in text
