"""Calibration against synthetic truth: bias, scaled dark, vignetting flat, colour, hot pixels, CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from daemon import simulate as sim
from daemon.cli import main as cli
from daemon.io.fits import write_fits
from daemon.io.load import load_frame
from daemon.masters import build_master, load_masters
from daemon.pipeline.calibrate import Masters, calibrate, dark_scale, mismatch_warnings, normalise_flat
from daemon.pipeline.defects import repair_defects
from daemon.pipeline.frame import FrameMeta

SHAPE = (96, 128)
SENSOR = sim.Sensor(bias_adu=500.0, dark_current_adu_s=2.0, read_noise_adu=3.0, n_hot_pixels=40,
                    hot_pixel_adu_s=50.0, vignetting=0.4, bayer="RGGB")
DARK_S = 60.0


def _frames(tmp: Path, kind: str, n: int, exposure: float, seed: int, sensor=SENSOR, **kw) -> list[Path]:
    paths = []
    for i in range(n):
        exp = sim.Exposure(exposure_s=exposure, seed=seed + i, sky_rgb=kw.get("sky_rgb", (1, 1, 1)))
        if kind == "flat":
            data = sim.expose(SHAPE, None, exp, sensor, flat_level_adu=kw.get("level", 20000.0))
        else:
            data = sim.expose(SHAPE, None, exp, sensor, light=False)
        path = tmp / f"{kind}{i:02d}.fits"
        write_fits(path, data, sim.fits_header(exposure_s=exposure, frame_type=kind.capitalize(), bayer=sensor.bayer))
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def masters_dir(tmp_path_factory) -> Path:
    """Masters of SENSOR built through the real band-wise builder: bias, 60 s dark, coloured flat."""
    d = tmp_path_factory.mktemp("masters")
    build_master("bias", _frames(d, "bias", 15, 0.0, 100), d / "bias.fits", memory_mb=0.5)
    build_master("dark", _frames(d, "dark", 15, DARK_S, 200), d / "dark.fits", bias=d / "bias.fits", memory_mb=0.5)
    build_master("flat", _frames(d, "flat", 15, 1.0, 300, sky_rgb=(0.6, 1.0, 1.5)), d / "flat.fits",
                 bias=d / "bias.fits", memory_mb=0.5)
    return d


def _masters(d: Path) -> Masters:
    return load_masters(bias=d / "bias.fits", dark=d / "dark.fits", flat=d / "flat.fits")


NO_STARS = sim.StarField(np.zeros(0), np.zeros(0), np.zeros(0))


def _flat_scale() -> np.ndarray:
    """What a perfect flat leaves: each CFA plane's median vignetting (flats are normalised per plane)."""
    v = SENSOR.flat_field(SHAPE)
    out = np.empty_like(v)
    for r in (0, 1):
        for c in (0, 1):
            out[r::2, c::2] = np.median(v[r::2, c::2])
    return out


def _light(exposure: float, seed: int, sky_rgb=(1.0, 1.0, 1.0)):
    """A star-free light of uniform sky (so truth is simple) and its truth after calibration:
    the sky (ADU) times the flat's normalisation."""
    exp = sim.Exposure(exposure_s=exposure, sky_adu_s=20.0, sky_rgb=sky_rgb, seed=seed)
    raw = sim.expose(SHAPE, NO_STARS, exp, SENSOR, light=True).astype(np.float32)
    sky = np.float32(exp.sky_adu_s * exposure) * np.asarray(sky_rgb, np.float32)[SENSOR.channel_map(SHAPE)]
    return raw, sky * _flat_scale()


def test_calibrated_light_matches_truth_within_noise(masters_dir):
    masters = _masters(masters_dir)
    raw, sky = _light(DARK_S, 1)
    out = calibrate(raw, DARK_S, masters)
    resid = out - sky
    # Noise of one light: shot (sky + dark) and read noise, divided by the flat.
    expected = np.sqrt(sky.mean() + SENSOR.dark_current_adu_s * DARK_S + SENSOR.read_noise_adu**2)
    assert abs(float(resid.mean())) < 4 * expected / np.sqrt(resid.size)
    assert float(resid.std()) < 1.25 * expected
    # Without calibration the same frame is off by bias + dark and bent by 40 % vignetting.
    assert abs(float((raw - sky).mean())) > 500
    # Hot pixels are gone: their calibrated values are as close to truth as the others.
    hot = SENSOR.hot_pixel_mask(SHAPE)
    assert masters.defects is not None and masters.defects[hot].all()
    assert np.abs(resid[hot]).max() < 5 * expected
    assert int(masters.defects.sum()) < 3 * SENSOR.n_hot_pixels


def test_dark_of_another_exposure_is_scaled(masters_dir):
    masters = _masters(masters_dir)
    assert masters.dark_exposure_s == DARK_S
    for exposure in (15.0, 120.0):
        raw, sky = _light(exposure, 2)
        assert dark_scale(exposure, masters) == pytest.approx(exposure / DARK_S)
        resid = calibrate(raw, exposure, masters) - sky
        # Within 4 standard errors of zero (sky noise over the 12 288 pixels).
        assert abs(float(resid.mean())) < 4 * float(resid.std()) / np.sqrt(resid.size), exposure
        # Unscaled, the dark current error is |t - 60| * 2 ADU/s (30 and 120 ADU before the flat).
        unscaled = calibrate(raw, DARK_S, masters) - sky
        assert abs(float(np.median(unscaled))) > 0.5 * abs(exposure - DARK_S) * SENSOR.dark_current_adu_s


def test_flat_keeps_colour_ratios_within_one_percent(masters_dir):
    masters = _masters(masters_dir)
    truth_rgb = (1.3, 1.0, 0.55)
    raw, _ = _light(DARK_S, 3, sky_rgb=truth_rgb)
    out = calibrate(raw, DARK_S, masters)
    chans = SENSOR.channel_map(SHAPE)
    h, w = SHAPE
    for region in (np.s_[: h // 4, : w // 4], np.s_[3 * h // 8: 5 * h // 8, 3 * w // 8: 5 * w // 8]):  # corner, centre
        means = [float(out[region][chans[region] == c].mean()) for c in range(3)]
        assert means[0] / means[1] == pytest.approx(truth_rgb[0], rel=0.01)
        assert means[2] / means[1] == pytest.approx(truth_rgb[2], rel=0.01)
    # Normalising the flat as a whole (not per channel) would have shifted the colours.
    from daemon.pipeline.calibrate import FLAT_FLOOR  # noqa: F401  (same module under test)
    flat = load_frame(masters_dir / "flat.fits").data
    for sl in ((slice(0, None, 2), slice(0, None, 2)), (slice(1, None, 2), slice(1, None, 2))):
        assert float(np.median(flat[sl])) == pytest.approx(1.0, abs=1e-3)


def test_flat_guards_zero_and_negative_pixels():
    flat = np.full((8, 8), 1000.0, np.float32)
    flat[2, 3], flat[5, 5], flat[6, 1] = 0.0, -20.0, np.nan
    norm, bad = normalise_flat(flat, "RGGB")
    assert bad.sum() == 3 and bad[2, 3] and bad[5, 5] and bad[6, 1]
    assert np.isfinite(norm).all() and (norm > 0).all()
    light = np.full((8, 8), 500.0, np.float32)
    out = calibrate(light, 1.0, Masters(flat=norm, defects=bad, bayer="RGGB"))
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, 500.0)


def test_defect_repair_uses_same_colour_neighbours():
    rgb = (100.0, 200.0, 300.0)
    chans = sim.Sensor(bayer="GRBG").channel_map((10, 10))
    data = np.asarray(rgb, np.float32)[chans]
    bad = np.zeros_like(data, dtype=bool)
    bad[4, 4] = bad[4, 5] = bad[0, 0] = True  # two neighbours, and one in a corner
    broken = data.copy()
    broken[bad] = 65535.0
    np.testing.assert_array_equal(repair_defects(broken, bad, "GRBG"), data)
    mono = np.arange(25, dtype=np.float32).reshape(5, 5)
    hole = np.zeros((5, 5), bool)
    hole[2, 2] = True
    assert repair_defects(np.where(hole, 1e6, mono), hole, None)[2, 2] == 12.0


def _reference_calibration(light, exposure, m: Masters) -> np.ndarray:
    """The calibration formula written out in numpy (the implementation before the fused
    in-place kernel), with the defect repair done by the plain per-pixel rule."""
    out = np.array(light, dtype=np.float32, copy=True)
    if m.bias is not None:
        out -= m.bias
    if m.dark is not None:
        scale = exposure / m.dark_exposure_s if (m.bias is not None and m.dark_exposure_s) else 1.0
        out -= m.dark if scale == 1.0 else m.dark * np.float32(scale)
    if m.flat is not None:
        np.divide(out, m.flat, out=out, where=m.flat > 0)
    if m.defects is not None:
        src = out.copy()
        h, w = out.shape
        step = 2 if m.bayer else 1
        for y, x in zip(*np.nonzero(m.defects), strict=True):
            for reach in (step, 2 * step):
                vals = [src[y + dy, x + dx] for dy in (-reach, 0, reach) for dx in (-reach, 0, reach)
                        if (dy or dx) and 0 <= y + dy < h and 0 <= x + dx < w and not m.defects[y + dy, x + dx]]
                if vals:
                    out[y, x] = np.median(np.asarray(vals, np.float32))
                    break
    return out


@pytest.mark.parametrize("bayer", ["RGGB", None])
@pytest.mark.parametrize("exposure", [DARK_S, 45.0])
def test_fused_in_place_calibration_equals_the_formula(bayer, exposure):
    rng = np.random.default_rng(5)
    shape = (64, 80)
    defects = rng.random(shape) < 0.03
    defects[:3, :3] = True  # a corner block: some need the 2-step reach, one has no neighbour
    flat = rng.uniform(0.6, 1.3, shape).astype(np.float32)
    flat[7, 9] = 0.0  # never divided by
    m = Masters(bias=rng.normal(500, 3, shape).astype(np.float32), dark=rng.gamma(2, 3, shape).astype(np.float32),
                dark_exposure_s=DARK_S, flat=flat, defects=defects, bayer=bayer)
    light = rng.normal(1500, 40, shape).astype(np.float32)
    truth = _reference_calibration(light, exposure, m)
    copy = calibrate(light, exposure, m)
    assert copy is not light
    np.testing.assert_allclose(copy, truth, rtol=1e-6, atol=1e-4)  # float32 rounding at most
    frame = light.copy()
    inplace = calibrate(frame, exposure, m, in_place=True)
    assert inplace is frame
    np.testing.assert_array_equal(inplace, copy)
    # Not float32 (or not contiguous): a new array even when in place is asked for.
    as64 = light.astype(np.float64)
    out = calibrate(as64, exposure, m, in_place=True)
    assert out is not as64 and out.dtype == np.float32
    np.testing.assert_array_equal(out, copy)
    # The repair plan is cached on the masters and rebuilt for a new map.
    plan = m.defect_repair()
    assert m.defect_repair() is plan
    m.defects = np.zeros(shape, bool)
    assert m.defect_repair() is not plan


@pytest.mark.parametrize("exposure", [DARK_S, 45.0, 120.0])
def test_compact_masters_calibrate_as_the_full_ones(exposure):
    rng = np.random.default_rng(8)
    shape = (64, 80)
    defects = rng.random(shape) < 0.03
    dark = rng.gamma(2, 20, shape).astype(np.float32)  # dark current, ~40 ADU
    bias = rng.normal(500, 3, shape).astype(np.float32)
    m = Masters(bias=bias, dark=dark, dark_exposure_s=DARK_S,
                flat=rng.uniform(0.6, 1.3, shape).astype(np.float32), defects=defects, bayer="RGGB")
    light = rng.normal(1500, 40, shape).astype(np.float32)
    full = calibrate(light, exposure, m)
    summary, scale = m.summary(), dark_scale(exposure, m)
    m.compact()
    assert m.bias is None and m.dark is None and m.flat is None and m.defects is None  # released
    assert m.summary() == summary and m.shape == shape and dark_scale(exposure, m) == scale
    compact = calibrate(light, exposure, m)
    # The flat as 16-bit fixed point: relative error <= step / 2 / flat, step = max / 65535.
    step = m.compacted.flat_step
    assert m.compacted.flat is None and m.compacted.flat16.dtype == np.uint16
    assert step == pytest.approx(1.3 / 65535, rel=1e-3)
    flat_rel = step / 2 / 0.6  # flat >= 0.6
    # float32 rounding, plus float16 rounding of the dark current times |t / t_dark - 1| and
    # of the pedestal's difference from its median (at most the largest such difference).
    spread = float(np.abs(bias + dark - np.median(bias + dark)).max())
    tol = 2e-3 + (abs(scale - 1.0) * float(dark.max()) + spread) * 2.0 ** -11 / 0.6 + np.abs(full) * flat_rel
    err = np.abs(compact - full)
    assert np.all(err <= tol)  # repairs mix neighbours: the same bound holds for them
    assert np.median(err / np.abs(full)) < 0.5 * flat_rel  # and rounding is not a bias
    with pytest.raises(ValueError, match="masters are 80x64 px but the light is 81x64 px"):
        calibrate(np.zeros((64, 81), np.float32), exposure, m)
    # Unscaled dark (no bias: the pedestal, rounded as above) and a lone flat compact too; a
    # flat beyond FLAT16_MAX (not a real response) stays float32, exactly.
    flat = rng.uniform(0.6, 1.3, shape).astype(np.float32)
    dark_spread = float(np.abs(dark - np.median(dark)).max()) * 2.0 ** -11
    for kw, rtol, atol in ((dict(dark=dark + 500), 0.0, 1e-3 + dark_spread),
                           (dict(flat=flat), 1.3 / 65535 / 2 / 0.6 + 1e-7, 1e-3),
                           (dict(flat=np.where(defects, 5.0, flat).astype(np.float32)), 0.0, 1e-3)):
        m2 = Masters(**kw, dark_exposure_s=DARK_S)
        ref = calibrate(light, exposure, m2)
        m2.compact()
        np.testing.assert_allclose(calibrate(light, exposure, m2), ref, rtol=rtol, atol=atol)


def test_live_pipeline_calibrates_the_loaded_frame_once():
    from daemon.pipeline.frame import Frame
    from daemon.pipeline.live import LivePipeline

    masters = Masters(bias=np.full(SHAPE, 100.0, np.float32))
    raw = np.full(SHAPE, 400.0, np.float32)
    frame = Frame(raw, FrameMeta(path="/x.fits", exposure_s=1.0))
    pipe = LivePipeline(masters=masters)
    first = pipe._calibrate(frame)  # noqa: SLF001 - the in-place contract of the step itself
    assert first is raw and frame.calibrated and float(first[0, 0]) == 300.0
    assert float(pipe._calibrate(frame)[0, 0]) == 300.0  # noqa: SLF001 - not calibrated twice


def test_size_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="master bias is 4x3 px but the light is 5x3 px"):
        calibrate(np.zeros((3, 5)), 1.0, Masters(bias=np.zeros((3, 4), np.float32)))


def test_mismatch_warnings_name_gain_temperature_binning():
    masters = Masters(dark=np.zeros((2, 2)), dark_exposure_s=60.0, bayer="RGGB",
                      sources={"dark": FrameMeta(gain=100, sensor_temp_c=-10.0, binning=(1, 1))})
    light = FrameMeta(gain=200, sensor_temp_c=-2.0, binning=(2, 2), bayer="RGGB", exposure_s=30.0)
    notes = " | ".join(mismatch_warnings(light, masters))
    assert "gain 100 differs" in notes and "-10.0 C" in notes and "binning 1x1" in notes
    assert "unscaled" in notes  # no bias: the dark cannot be scaled to 30 s
    same = FrameMeta(gain=100, sensor_temp_c=-10.5, binning=(1, 1), bayer="RGGB", exposure_s=60.0)
    assert mismatch_warnings(same, masters) == []


def test_cli_master_and_calibrate(tmp_path, masters_dir):
    darks = _frames(tmp_path, "dark", 4, DARK_S, 400)
    assert cli(["master", "dark", *map(str, darks), "--bias", str(masters_dir / "bias.fits"),
                "-o", str(tmp_path / "md.fits"), "--method", "median"]) == 0
    raw, sky = _light(30.0, 5)
    light = tmp_path / "light_001.fits"
    write_fits(light, raw, sim.fits_header(exposure_s=30.0, bayer="RGGB"))
    bad = tmp_path / "broken.fits"
    bad.write_bytes(b"SIMPLE  =                    T" + b" " * 50)
    rc = cli(["calibrate", str(light), str(bad), "--bias", str(masters_dir / "bias.fits"),
              "--dark", str(tmp_path / "md.fits"), "--flat", str(masters_dir / "flat.fits"),
              "-o", str(tmp_path / "out")])
    assert rc == 1  # the broken file is reported, the good one still calibrated
    out = load_frame(tmp_path / "out" / "light_001.fits")
    assert out.meta.exposure_s == 30.0 and out.meta.bayer == "RGGB"
    assert abs(float(np.median(out.data - sky))) < 1.0
    assert cli(["master", "dark", str(darks[0]), str(light), "-o", str(tmp_path / "x.fits")]) == 1  # 60 s + 30 s


def test_flat_defects_found_despite_vignetting():
    sensor = sim.Sensor(vignetting=0.5, bayer="BGGR")
    flat = sensor.flat_field(SHAPE) * np.asarray((0.5, 1.0, 1.6), np.float32)[sensor.channel_map(SHAPE)]
    dead = [(0, 0), (10, 17), (50, 64), (95, 127)]
    for y, x in dead:
        flat[y, x] *= 0.3
    flat[40, 41] *= 1.6  # over-sensitive
    from daemon.pipeline.defects import defects_from_flat

    found = defects_from_flat(normalise_flat(flat, "BGGR")[0], "BGGR")
    assert sorted(zip(*np.nonzero(found), strict=True)) == sorted(dead + [(40, 41)])


def test_darkflat_is_subtracted_from_flats(tmp_path):
    """Flats built with a dark flat, and a foreign (unnormalised) flat loaded with one, both flat-field."""
    exposure = 5.0
    darkflats = _frames(tmp_path, "darkflat", 6, exposure, 500)
    flats = _frames(tmp_path, "flat", 6, exposure, 600, level=15000.0)
    build_master("darkflat", darkflats, tmp_path / "mdf.fits")
    build_master("flat", flats, tmp_path / "mf.fits", darkflat=tmp_path / "mdf.fits")
    raw_flat = load_frame(flats[0]).data
    write_fits(tmp_path / "foreign_flat.fits", raw_flat, {"IMAGETYP": "Flat", "BAYERPAT": "RGGB"})
    truth = _flat_scale() / SENSOR.flat_field(SHAPE)  # 1 / (vignetting, normalised per plane)
    for flat_path, darkflat in ((tmp_path / "mf.fits", None), (tmp_path / "foreign_flat.fits", tmp_path / "mdf.fits")):
        m = load_masters(flat=flat_path, darkflat=darkflat, find_defects=False)
        ratio = (1.0 / m.flat) / truth
        assert abs(float(ratio[:16, :16].mean()) - 1) < 0.004  # the darkest corner, 60 % vignetted
    no_df = load_masters(flat=tmp_path / "foreign_flat.fits", find_defects=False)
    # Without the dark flat its ~500 ADU offset stays in: the corner is under-corrected by ~1.5 %.
    assert abs(float(((1.0 / no_df.flat) / truth)[:16, :16].mean()) - 1) > 0.008
