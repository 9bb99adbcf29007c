"""Defect maps that hold on any master: integer (quantised) masters, one raw dark, a dark
without its bias, a dark with amp glow; a map flagging too much of the sensor is a warning,
not applied. Truth: the hot pixels daemon.simulate injects."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from daemon import simulate as sim
from daemon.io.fits import write_fits
from daemon.masters import load_masters
from daemon.pipeline.live import LivePipeline
from daemon.pipeline.live_settings import LiveSettings
from daemon.pipeline.stars import measure
from tests.test_live import SHAPE, make_frame

#: A master of 30 darks of this sensor has 0.55 ADU of noise, below the 1 ADU step of an
#: integer master: most of its pixels equal the median, so their MAD is 0.
SENSOR = sim.Sensor(bias_adu=500.0, dark_current_adu_s=0.01, read_noise_adu=3.0, n_hot_pixels=150,
                    hot_pixel_adu_s=6.0)
DARK_S = 10.0


def amp_glow(peak_adu: float) -> np.ndarray:
    """Amp glow as CMOS darks show it: bright at the middle of the right edge, falling off
    over ~40 px (ADU)."""
    h, w = SHAPE
    yy, xx = np.mgrid[0:h, 0:w]
    return peak_adu * np.exp(-np.hypot(xx - w, yy - h / 2) / 40.0)


def _darks(n: int, sensor=SENSOR) -> np.ndarray:
    return np.stack([sim.expose(SHAPE, None, sim.Exposure(exposure_s=DARK_S, seed=900 + i), sensor, light=False,
                                as_uint16=False) for i in range(n)])


@pytest.fixture(scope="module")
def masters(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("defects")
    darks = _darks(30)
    mean = darks.mean(axis=0)
    bias = np.stack([sim.expose(SHAPE, None, sim.Exposure(exposure_s=0.0, seed=700 + i), SENSOR, light=False,
                                as_uint16=False) for i in range(30)]).mean(axis=0)
    arrays = {
        "float": mean.astype(np.float32),
        "uint16": np.round(mean).astype(np.uint16),
        "single": np.round(darks[0]).astype(np.uint16),
        "biasfree": np.clip(np.round(mean - bias), 0, None).astype(np.uint16),
        # 300 ADU of glow at the edge, 5x the hot pixels' 60 ADU
        "glow": np.round(mean + amp_glow(300.0)).astype(np.uint16),
    }
    out = {}
    for name, data in arrays.items():  # the darks of the colour camera of the sessions below
        out[name] = d / f"dark_{name}.fits"
        write_fits(out[name], data, sim.fits_header(exposure_s=DARK_S, frame_type="Dark", bayer="RGGB"))
    return out


@pytest.mark.parametrize("kind", ["uint16", "single", "biasfree", "glow", "float"])
def test_defect_map_of_any_master_finds_the_hot_pixels(masters, kind):
    truth = SENSOR.hot_pixel_mask(SHAPE)
    m = load_masters(dark=masters[kind])
    assert m.warnings == []
    found = m.defects
    assert 0.5 * truth.sum() <= found.sum() <= 2 * truth.sum(), (kind, int(found.sum()))
    assert (found & truth).sum() >= 0.9 * truth.sum()


def test_mad_alone_fails_on_the_integer_master(masters):
    """Control: the old scale (1.4826 MAD, which is 0 on this master) flags a third of it."""
    from daemon.io.load import load_frame

    d = load_frame(masters["uint16"]).data.astype(np.float64)
    dev = d - np.median(d)
    sigma = max(1.4826 * np.median(np.abs(dev)), 1e-3)
    assert np.mean(np.abs(dev) > 8 * sigma) > 0.25


def test_glow_hides_hot_pixels_from_the_frame_median(masters):
    """Control: judged against the frame's median (not the local level), the glow inflates
    the noise scale until the hot pixels hide below it, or passes for hot pixels itself."""
    from daemon.io.load import load_frame
    from daemon.pipeline.defects import DARK_KAPPA, noise_scale

    truth = SENSOR.hot_pixel_mask(SHAPE)
    d = load_frame(masters["glow"]).data
    med, sigma = noise_scale(d)
    found = np.abs(d - med) > DARK_KAPPA * sigma
    assert (found & truth).sum() < 0.5 * truth.sum() or found.sum() > 2 * truth.sum(), int(found.sum())


def test_a_map_flagging_too_much_is_a_warning_not_applied(tmp_path, caplog):
    """2 % of the pixels hot (a master of the wrong kind, a failing sensor): the map is not
    applied, and the warning names the master and the fraction."""
    many = sim.Sensor(**{**SENSOR.__dict__, "n_hot_pixels": int(0.02 * SHAPE[0] * SHAPE[1])})
    path = tmp_path / "dark_bad.fits"
    write_fits(path, np.round(_darks(5, many).mean(axis=0)).astype(np.uint16),
               sim.fits_header(exposure_s=DARK_S, frame_type="Dark"))
    with caplog.at_level(logging.WARNING):
        m = load_masters(dark=path)
    assert not m.defects.any()
    assert len(m.warnings) == 1 and str(path) in m.warnings[0] and "2.0" in m.warnings[0], m.warnings
    assert any(str(path) in r.getMessage() and "not applied" in r.getMessage() for r in caplog.records)


def _stack_fwhm(masters) -> float:
    """FWHM (px) of a 4-frame colour session's stack calibrated with `masters`."""
    pipe = LivePipeline(LiveSettings(), masters)
    for i in range(4):
        assert pipe.process(make_frame(i, sensor=SENSOR, bayer="RGGB")).accepted
    lum = np.nanmean(pipe.stack_image(), axis=-1)
    return measure(np.nan_to_num(lum, nan=float(np.nanmedian(lum))))[1].fwhm_px


@pytest.fixture(scope="module")
def float_fwhm(masters) -> float:
    return _stack_fwhm(load_masters(dark=masters["float"]))


@pytest.mark.parametrize("kind", ["uint16", "single", "biasfree", "glow"])
def test_stack_with_an_integer_master_is_as_sharp_as_with_a_float_one(masters, float_fwhm, kind):
    """A colour session calibrated with an integer master dark: the stack's stars are as
    sharp as with the float master (2 %)."""
    assert _stack_fwhm(load_masters(dark=masters[kind])) <= 1.02 * float_fwhm


def test_a_map_flagging_a_third_of_the_sensor_widens_the_stars(masters, float_fwhm):
    """Control for the sharpness test: the map of the old noise scale (1.4826 MAD, 0 on the
    uint16 master), applied, replaces a third of the pixels by their neighbours' median and
    widens the stacked stars by more than the test's 2 %."""
    m = load_masters(dark=masters["uint16"])
    dev = m.dark - np.median(m.dark)
    m.defects = np.abs(dev) > 8 * max(1.4826 * float(np.median(np.abs(dev))), 1e-3)
    assert m.defects.mean() > 0.25
    assert _stack_fwhm(m) > 1.04 * float_fwhm


def test_flat_with_dust_flags_its_dead_pixels_not_the_dust(tmp_path):
    """One raw uint16 flat (shot noise, vignetting) with three dust donuts, 15-50 % deep,
    and 100 pixels at 20 % response: the dead pixels are found, the dust is left to the flat
    (the map stays within 2x of the truth)."""
    rng = np.random.default_rng(1)
    h, w = 400, 600
    yy, xx = np.mgrid[0:h, 0:w]
    flat = 20000.0 * (1 - 0.6 * (((xx - w / 2) / w) ** 2 + ((yy - h / 2) / h) ** 2))
    dust = np.zeros((h, w), bool)
    for cx, cy, r, depth in [(100, 100, 12, 0.3), (300, 200, 25, 0.15), (500, 300, 6, 0.5)]:
        d = np.hypot(xx - cx, yy - cy)
        flat *= 1 - (np.exp(-0.5 * ((d - r) / 2.0) ** 2) * depth + (d < r) * depth * 0.5)
        dust |= d < r + 6
    dead = np.zeros(h * w, bool)
    dead[rng.choice(np.flatnonzero(~dust.ravel()), 100, replace=False)] = True
    dead = dead.reshape(h, w)
    flat[dead] *= 0.2
    raw = np.round(flat + rng.normal(0.0, np.sqrt(flat))).astype(np.uint16)
    path = tmp_path / "flat.fits"
    write_fits(path, raw, sim.fits_header(exposure_s=1.0, frame_type="Flat"))
    m = load_masters(flat=path)
    assert m.warnings == []
    assert (m.defects & dead).sum() == 100 and m.defects.sum() <= 200, int(m.defects.sum())
    assert (m.defects & dust).sum() <= 0.01 * dust.sum()
