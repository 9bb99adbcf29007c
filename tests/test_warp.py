"""Warping onto the reference grid: stars land on their reference positions, no-data is NaN."""

from __future__ import annotations

import numpy as np
import pytest

from daemon.pipeline.stars import measure
from daemon.pipeline.warp import INTERPOLATIONS, warp
from daemon.simulate import apply_matrix, random_star_field, render_stars, transform_matrix

SHAPE = (300, 400)
CENTER = ((SHAPE[1] - 1) / 2, (SHAPE[0] - 1) / 2)
FIELD = random_star_field(SHAPE, 120, seed=3, margin=0.2, flux_range=(3000.0, 30000.0))
SKY = 100.0


def _frame(matrix=None, fwhm=3.0) -> np.ndarray:
    return render_stars(SHAPE, FIELD, matrix=matrix, fwhm_px=fwhm) + np.float32(SKY)


def _isolated_truth() -> np.ndarray:
    """Reference positions of true stars with no other star within 10 px (blends have
    centroids between their members, which says nothing about the warp)."""
    xy = np.column_stack([FIELD.x, FIELD.y])
    d = np.hypot(xy[:, None, 0] - xy[None, :, 0], xy[:, None, 1] - xy[None, :, 1])
    np.fill_diagonal(d, np.inf)
    return xy[d.min(axis=1) > 10]


def _star_match(image: np.ndarray) -> tuple[np.ndarray, float]:
    """Distances (px) of measured stars to the nearest isolated true reference star, for
    stars at least 8 px from any no-data pixel, and the frame's FWHM."""
    nodata = ~np.isfinite(image)
    stars, m = measure(np.where(nodata, np.float32(SKY), image), bin_factor=1)
    truth = _isolated_truth()
    d = np.hypot(stars.x[:, None] - truth[None, :, 0], stars.y[:, None] - truth[None, :, 1]).min(axis=1)
    bad = np.argwhere(nodata)
    if len(bad):
        from scipy.spatial import cKDTree

        near, _ = cKDTree(bad[:, ::-1]).query(stars.xy)
        d = d[near > 8]
    return d[d < 3], m.fwhm_px  # d >= 3: a star whose isolated truth is not the nearest


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "lanczos"])
def test_warped_stars_land_on_reference_positions(interpolation):
    truth = transform_matrix(14.3, -9.6, 23.0, 1.006, center=CENTER)  # reference -> frame
    out = warp(_frame(truth), np.linalg.inv(truth), SHAPE, interpolation)
    assert out.dtype == np.float32 and out.shape == SHAPE
    d, fwhm = _star_match(out)
    assert len(d) > 25
    assert np.sqrt(np.mean(d**2)) < 0.05
    _, fwhm0 = _star_match(_frame())
    # Measured cost in FWHM (see warp.py): bilinear blurs a few per cent, the others do not.
    limit = 1.12 if interpolation == "bilinear" else 1.02
    assert fwhm / fwhm0 < limit


def test_pixels_without_data_are_nan_and_flux_is_kept():
    shift = transform_matrix(40.0, 25.0)  # frame pixel p lands on p + (40, 25)
    src = _frame()
    out = warp(src, shift, SHAPE, "bilinear")
    assert np.isnan(out[:25]).all() and np.isnan(out[:, :40]).all()
    assert np.isfinite(out[26:, 41:]).all()
    # An integer shift is a pure copy.
    np.testing.assert_allclose(out[25:, 40:], src[:-25, :-40], rtol=1e-5)


def test_nan_in_the_source_stays_local():
    src = _frame()
    src[150, 200] = np.nan  # a masked defect
    m = transform_matrix(0.5, 0.5)
    out = warp(src, m, SHAPE, "bilinear")
    bad = np.argwhere(np.isnan(out[1:-1, 1:-1])) + 1
    assert 1 <= len(bad) <= 4 and np.abs(bad - [150.5, 200.5]).max() <= 1
    cubic = warp(src, m, SHAPE, "bicubic")
    bad = np.argwhere(np.isnan(cubic[2:-2, 2:-2])) + 2
    # OpenCV's cubic with a NaN *border* value sprinkles NaN over the whole frame; ours not.
    assert 1 <= len(bad) <= 16 and np.abs(bad - [150.5, 200.5]).max() <= 2
    # And no zero padding leaks in at the edges: on a flat sky every finite pixel is sky.
    flat = np.full(SHAPE, SKY, np.float32)
    rot = transform_matrix(3.3, -2.2, 17.0, center=CENTER)
    for interpolation in INTERPOLATIONS:
        out = warp(flat, rot, SHAPE, interpolation)
        assert np.nanmax(np.abs(out - SKY)) < 1e-3 and np.isnan(out).mean() < 0.5


def test_colour_planes_warp_like_mono():
    rgb = np.stack([_frame(), 0.5 * _frame(), 2.0 * _frame()], axis=-1)
    m = np.linalg.inv(transform_matrix(7.25, -3.5, 2.0, center=CENTER))
    out = warp(rgb, m, SHAPE)
    assert out.shape == SHAPE + (3,)
    for c in range(3):
        np.testing.assert_allclose(out[..., c], warp(rgb[..., c], m, SHAPE), rtol=1e-5, equal_nan=True)


def test_homography_uses_the_projective_mapping():
    truth = transform_matrix(5.0, -4.0, 3.0, center=CENTER) @ np.array([[1, 0, 0], [0, 1, 0], [4e-5, -3e-5, 1.0]])
    frame = render_stars(SHAPE, FIELD, matrix=truth, fwhm_px=3.0) + np.float32(SKY)
    inv = np.linalg.inv(truth)
    d, _ = _star_match(warp(frame, inv / inv[2, 2], SHAPE))
    assert np.sqrt(np.mean(d**2)) < 0.05
    # The affine part alone would leave the corners off by pixels: the test can tell.
    affine = inv / inv[2, 2]
    affine[2] = [0, 0, 1]
    d_aff, _ = _star_match(warp(frame, affine, SHAPE))
    assert np.sqrt(np.mean(d_aff**2)) > 0.5


def test_bad_arguments_name_the_problem():
    with pytest.raises(ValueError, match="3x3"):
        warp(_frame(), np.eye(2), SHAPE)
    with pytest.raises(ValueError, match="sinc"):
        warp(_frame(), np.eye(3), SHAPE, "sinc")
    with pytest.raises(ValueError, match="2-D"):
        warp(np.zeros(5, np.float32), np.eye(3), SHAPE)
    assert set(INTERPOLATIONS) >= {"bilinear", "bicubic", "lanczos"}
    assert apply_matrix(np.eye(3), np.array([1.0]), np.array([2.0]))[0][0] == 1.0
