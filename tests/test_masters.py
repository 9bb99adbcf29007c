"""Master building: outlier rejection, chunked (bounded-memory) combine, refusals, provenance."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from daemon.io.fits import write_fits
from daemon.io.load import load_frame
from daemon.masters import MasterError, build_master, load_masters
from daemon.pipeline.combine import band_rows, median_combine, sigma_clip_mean

RNG = np.random.default_rng(11)


def _write_set(tmp: Path, n: int, shape=(40, 60), level=500.0, noise=5.0, name="bias",
               header: dict | None = None, dtype=np.uint16) -> tuple[list[Path], np.ndarray]:
    """n noisy frames around a fixed pattern (the truth), one with a bright trail."""
    truth = level + RNG.normal(0, 20, shape).astype(np.float32)
    paths = []
    for i in range(n):
        data = truth + RNG.normal(0, noise, shape).astype(np.float32)
        if i == 1:
            data[shape[0] // 2, :] += 5000.0  # satellite trail in one frame
        if i == 2:
            data[3, 4] = 60000.0  # cosmic ray
        p = tmp / f"{name}{i:03d}.fits"
        hdr = {"IMAGETYP": "Bias Frame", "EXPTIME": 0.0, "GAIN": 100, "CCD-TEMP": -10.0 + 0.1 * i,
               "XBINNING": 1, "YBINNING": 1, **(header or {})}
        fits.PrimaryHDU(np.round(data).astype(dtype), header=fits.Header(list(hdr.items()))).writeto(p)
        paths.append(p)
    return paths, truth


def test_sigma_clip_rejects_trails_and_cosmics_median_option(tmp_path):
    paths, truth = _write_set(tmp_path, 12)
    out = tmp_path / "mb.fits"
    summary = build_master("bias", paths, out)
    master = load_frame(out).data
    resid = master - truth
    assert np.abs(resid).max() < 5 * 5.0 / np.sqrt(11)  # trail row and cosmic are gone
    assert float(resid.std()) < 1.2 * 5.0 / np.sqrt(12)  # close to the ideal mean's noise
    assert summary["rejected"] >= 61  # at least the 60 trail pixels and the cosmic ray
    assert summary["rejected"] < 0.02 * 12 * truth.size  # but not much good data
    plain = np.mean([load_frame(p).data for p in paths], axis=0)
    assert np.abs(plain - truth).max() > 300  # a plain mean keeps the trail
    build_master("bias", paths, tmp_path / "med.fits", method="median")
    med = load_frame(tmp_path / "med.fits").data
    assert np.abs(med - truth).max() < 6 * 1.25 * 5.0 / np.sqrt(12)


def _peak_bytes(fn) -> tuple[object, int]:
    tracemalloc.start()
    try:
        result = fn()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_combine_is_chunked_and_bounded_in_memory(tmp_path):
    n, shape = 20, (200, 240)
    paths, truth = _write_set(tmp_path, n, shape=shape)
    stack_bytes, out_bytes = n * shape[0] * shape[1] * 4, shape[0] * shape[1] * 4
    budget = stack_bytes * 5 // 16  # the working set of ~1/16 of the rows
    chunked, peak = _peak_bytes(lambda: build_master("bias", paths, tmp_path / "chunked.fits",
                                                     memory_mb=budget / 2**20))
    assert chunked["bands"] >= 16 and chunked["band_rows"] == band_rows(n, shape[1], budget)
    # Peak numpy allocations: the band working set plus the output and its FITS copy, not the stack.
    assert peak < 1.1 * budget + 4 * out_bytes, (peak, budget)
    whole, whole_peak = _peak_bytes(lambda: build_master("bias", paths, tmp_path / "whole.fits", memory_mb=4096))
    assert whole["bands"] == 1 and whole_peak > 3 * peak  # one band: the whole stack in memory
    np.testing.assert_array_equal(load_frame(tmp_path / "chunked.fits").data, load_frame(tmp_path / "whole.fits").data)


def test_band_rows_scale_for_the_26mp_case():
    rows = band_rows(50, 6248, 512 * 2**20)
    assert rows % 2 == 0 and 50 < rows < 200  # 512 MiB for 50 frames of 6248 px rows
    assert band_rows(5, 100, 10) == 2  # never below one CFA row pair


def test_mixed_frames_are_refused_with_names(tmp_path):
    a, _ = _write_set(tmp_path, 3, shape=(20, 30), name="a")
    b, _ = _write_set(tmp_path, 2, shape=(20, 32), name="b")
    with pytest.raises(MasterError, match=r"different sizes: 30x20 px: a000.fits.*32x20 px: b000.fits"):
        build_master("bias", a + b, tmp_path / "x.fits")
    c, _ = _write_set(tmp_path, 2, shape=(20, 30), name="c", header={"XBINNING": 2, "YBINNING": 2})
    with pytest.raises(MasterError, match="different binning"):
        build_master("bias", a + c, tmp_path / "x.fits")
    d, _ = _write_set(tmp_path, 2, shape=(20, 30), name="d", header={"BAYERPAT": "RGGB"})
    with pytest.raises(MasterError, match="different Bayer patterns: mono"):
        build_master("bias", a + d, tmp_path / "x.fits")
    e, _ = _write_set(tmp_path, 3, shape=(20, 30), name="e", header={"IMAGETYP": "Dark", "EXPTIME": 30.0})
    f, _ = _write_set(tmp_path, 3, shape=(20, 30), name="f", header={"IMAGETYP": "Dark", "EXPTIME": 60.0})
    with pytest.raises(MasterError, match="different exposures"):
        build_master("dark", e + f, tmp_path / "x.fits")
    assert not (tmp_path / "x.fits").exists()


def test_provenance_and_dark_bias_subtraction(tmp_path):
    biases, bias_truth = _write_set(tmp_path, 5, name="bias")
    build_master("bias", biases, tmp_path / "mb.fits")
    darks, dark_truth = _write_set(tmp_path, 5, level=800.0, name="dark",
                                   header={"IMAGETYP": "Dark Frame", "EXPTIME": 120.0})
    build_master("dark", darks, tmp_path / "md.fits", bias=tmp_path / "mb.fits")
    hdr = fits.getheader(tmp_path / "md.fits")
    assert hdr["IMAGETYP"] == "Master Dark" and hdr["NCOMBINE"] == 5 and hdr["BIASSUB"] is True
    assert hdr["EXPTIME"] == 120.0 and hdr["GAIN"] == 100 and hdr["CCD-TEMP"] == pytest.approx(-9.8)
    assert [hdr[f"SRC{i:04d}"] for i in range(1, 6)] == [p.name for p in darks]
    m = load_masters(bias=tmp_path / "mb.fits", dark=tmp_path / "md.fits")
    # Dark current only: master dark minus master bias, not subtracted twice.
    assert float(np.median(m.dark - (dark_truth - bias_truth))) == pytest.approx(0, abs=2.0)
    assert m.dark_exposure_s == 120.0 and m.sources["dark"].gain == 100
    # A dark from elsewhere (no BIASSUB card) gets the bias removed on load.
    write_fits(tmp_path / "foreign_dark.fits", dark_truth, {"EXPTIME": 120.0})
    m2 = load_masters(bias=tmp_path / "mb.fits", dark=tmp_path / "foreign_dark.fits", find_defects=False)
    assert float(np.median(m2.dark - (dark_truth - bias_truth))) == pytest.approx(0, abs=2.0)


def test_masters_from_raw_files(tmp_path):
    from tests.test_load import _write_dng

    truth = RNG.integers(1000, 3000, (24, 32)).astype(np.float32)
    paths = []
    for i in range(5):
        frame = np.round(truth + RNG.normal(0, 10, truth.shape)).astype(np.uint16)
        paths.append(_write_dng(tmp_path / f"dark{i}.dng", frame, "GBRG", 256))
    build_master("dark", paths, tmp_path / "md.fits", memory_mb=0.01)
    master = load_frame(tmp_path / "md.fits")
    assert master.meta.bayer == "GBRG"
    assert np.abs(master.data - (truth - 256)).max() < 40
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".lb-master")]  # spill removed


def test_sigma_clip_is_unbiased_on_pure_noise():
    x = RNG.normal(100, 5, (10, 50, 50)).astype(np.float32)
    res = sigma_clip_mean(x)
    assert res.rejected < 0.01 * x.size
    assert float(res.data.std()) < 1.1 * 5 / np.sqrt(10)
    assert abs(float(res.data.mean()) - 100) < 0.1
    x[3] = np.nan  # a frame without data there (e.g. after a shift)
    assert np.isfinite(sigma_clip_mean(x).data).all() and np.isfinite(median_combine(x).data).all()


def test_few_frames_still_reject_a_single_outlier():
    """With 5 frames a plain kappa-sigma cannot reject anything (max |z| = 4/sqrt(5) = 1.79):
    the robust first pass (median, MAD with a band floor) must."""
    x = RNG.normal(500, 3, (5, 20, 20)).astype(np.float32)
    x[2, 5, 5] = 30000.0
    x[4, 10, :] += 800.0  # a trail in the last frame
    res = sigma_clip_mean(x)
    clean = np.delete(x, [2], axis=0)[:, 5, 5].mean()
    assert res.data[5, 5] == pytest.approx(clean, abs=3.0)
    assert np.abs(res.data[10] - 500).max() < 10


def test_saturated_flats_are_refused_good_ones_kept(tmp_path):
    """A flat exposed too long is clipped at the sensor's maximum: refused, naming the file,
    instead of a master that flattens nothing. A bright but unclipped flat is fine."""
    flat_hdr = {"IMAGETYP": "Flat Frame", "EXPTIME": 1.0}
    good, truth = _write_set(tmp_path, 3, level=40000.0, name="good", header=flat_hdr)
    summary = build_master("flat", good, tmp_path / "flat.fits")
    assert summary["n_frames"] == 3
    master = fits.getdata(tmp_path / "flat.fits")
    # The master keeps the pixel-to-pixel pattern of the truth (normalised), not a flat 1.0.
    assert np.corrcoef(master.ravel(), truth.ravel())[0, 1] > 0.9
    clipped = []
    ramp = np.linspace(1.0, 2.0, truth.shape[1])[None, :]  # a gradient across the panel
    for i in range(3):  # a third of the sensor at full well, as a too-long flat looks
        data = np.clip(truth * ramp + RNG.normal(0, 5, truth.shape), 0, 65535).astype(np.uint16)
        clipped.append(tmp_path / f"clipped{i:03d}.fits")
        fits.PrimaryHDU(data, header=fits.Header(list(flat_hdr.items()))).writeto(clipped[-1])
    assert 0.2 < np.mean(fits.getdata(clipped[0]) == 65535) < 0.5
    with pytest.raises(MasterError, match=r"clipped000\.fits: flat is saturated \(\d+ % of pixels at 65535 ADU\)"):
        build_master("flat", clipped, tmp_path / "bad.fits")
    assert not (tmp_path / "bad.fits").exists()
