"""Debayer and luminance against mosaics built with the simulator's CFA convention."""

from __future__ import annotations

import numpy as np
import pytest

from daemon.pipeline.debayer import bin_mean, debayer, luminance, reduction
from daemon.pipeline.frame import BAYER_PATTERNS
from daemon.simulate import Sensor


def _smooth_rgb(h: int, w: int) -> np.ndarray:
    """Three different linear ramps: bilinear interpolation reproduces them exactly."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    return np.stack([100 + 3 * xx + 1 * yy, 400 - 2 * xx + 5 * yy, 50 + 0.5 * xx + 0.25 * yy], axis=-1)


def _mosaic(rgb: np.ndarray, pattern: str) -> np.ndarray:
    chans = Sensor(bayer=pattern).channel_map(rgb.shape[:2])
    return np.take_along_axis(rgb, chans[..., None].astype(np.intp), axis=2)[..., 0]


@pytest.mark.parametrize("pattern", BAYER_PATTERNS)
def test_bilinear_reproduces_smooth_colour_and_keeps_samples(pattern):
    rgb = _smooth_rgb(40, 52)
    cfa = _mosaic(rgb, pattern)
    out = debayer(cfa, pattern)
    assert out.shape == (40, 52, 3) and out.dtype == np.float32
    # Interior: exact for linear ramps in every channel (a swapped pattern would be off by >> 1).
    np.testing.assert_allclose(out[1:-1, 1:-1], rgb[1:-1, 1:-1], atol=1e-3)
    # Every measured sample is kept exactly, borders included.
    chans = Sensor(bayer=pattern).channel_map(cfa.shape)
    kept = np.take_along_axis(out, chans[..., None].astype(np.intp), axis=2)[..., 0]
    np.testing.assert_array_equal(kept, cfa)
    # Borders are interpolated from the right colour: within one ramp step of the truth.
    assert np.abs(out - rgb).max() < 6.0


@pytest.mark.parametrize("pattern", BAYER_PATTERNS)
@pytest.mark.parametrize("shape", [(2, 2), (3, 5), (5, 4), (7, 9), (8, 10), (11, 33)])
def test_bilinear_is_the_per_colour_convolution_at_every_width(pattern, shape):
    """Any pattern, odd and even widths, the smallest mosaics: the kernel (its interior taken
    two columns at a time) equals one 3x3 convolution of each colour's sparse samples with
    the borders mirrored (reflect-101), to float32 rounding; a row band is bit for bit the
    whole frame's rows."""
    from scipy.ndimage import convolve

    from daemon.pipeline.debayer import debayer_rows

    cfa = np.random.default_rng(7).normal(1000, 100, shape).astype(np.float32)
    chans = Sensor(bayer=pattern).channel_map(shape)
    green = np.array([[0, 1, 0], [1, 4, 1], [0, 1, 0]], np.float64) / 4
    red_blue = np.array([[1, 2, 1], [2, 4, 2], [1, 2, 1]], np.float64) / 4
    want = np.stack([convolve(np.where(chans == c, cfa, 0).astype(np.float64), green if c == 1 else red_blue,
                              mode="mirror") for c in range(3)], axis=-1)
    out = debayer(cfa, pattern)
    np.testing.assert_allclose(out, want, rtol=1e-6)
    r0, r1 = shape[0] // 2, shape[0]
    band = debayer_rows(cfa[max(0, r0 - 1):], pattern, r0, r1, d0=max(0, r0 - 1), full_h=shape[0], parallel=False)
    np.testing.assert_array_equal(band, out[r0:r1])


@pytest.mark.parametrize("pattern", BAYER_PATTERNS)
def test_superpixel_gives_each_cells_colours(pattern):
    h, w = 31, 45  # odd: the incomplete last row/column is dropped
    rgb = np.zeros((h, w, 3), np.float32)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 1000.0, 500.0, 250.0
    rng = np.random.default_rng(3)
    cfa = _mosaic(rgb, pattern) + rng.normal(0, 1, (h, w)).astype(np.float32)
    out = debayer(cfa, pattern, method="superpixel")
    assert out.shape == (15, 22, 3)
    np.testing.assert_allclose(out.mean(axis=(0, 1)), [1000, 500, 250], atol=0.5)
    # Green is the mean of the cell's two green samples.
    chans = Sensor(bayer=pattern).channel_map((h, w))
    g = np.where(chans[:30, :44] == 1, cfa[:30, :44], 0).reshape(15, 2, 22, 2).sum(axis=(1, 3)) / 2
    np.testing.assert_allclose(out[..., 1], g, rtol=1e-6)


def test_bad_pattern_and_method_name_the_problem():
    cfa = np.zeros((4, 4), np.float32)
    with pytest.raises(ValueError, match="XGGB"):
        debayer(cfa, "XGGB")
    with pytest.raises(ValueError, match="vng"):
        debayer(cfa, "RGGB", method="vng")
    with pytest.raises(ValueError, match="2-D"):
        debayer(np.zeros((4, 4, 3), np.float32), "RGGB")


def test_luminance_mono_colour_and_binning():
    rng = np.random.default_rng(0)
    mono = rng.normal(100, 5, (21, 30)).astype(np.float32)
    assert luminance(mono, None) is mono or np.shares_memory(luminance(mono, None), mono)
    b = luminance(mono, None, bin_factor=2)
    assert b.shape == (10, 15)
    np.testing.assert_allclose(b, mono[:20, :30].reshape(10, 2, 15, 2).mean(axis=(1, 3)), rtol=1e-6)
    # A colour mosaic always comes back as the 2x2 superpixel mean (no colour weighting).
    c = luminance(mono, "GBRG")
    np.testing.assert_allclose(c, b, rtol=1e-6)
    assert reduction("RGGB") == 2 and reduction("RGGB", 2) == 4 and reduction(None, 2) == 2
    assert reduction(None) == 1 and luminance(mono, "RGGB", bin_factor=2).shape == (5, 7)
    np.testing.assert_allclose(bin_mean(mono, 3), mono[:21, :30].reshape(7, 3, 10, 3).mean(axis=(1, 3)), rtol=1e-5)
