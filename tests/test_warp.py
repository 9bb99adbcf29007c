"""Warping onto the reference grid: stars land on their reference positions, no-data is NaN."""

from __future__ import annotations

import numpy as np
import pytest

from daemon.pipeline.cubic import cubic_rows, near_axes
from daemon.pipeline.stars import measure
from daemon.pipeline.warp import INTERPOLATIONS, own_cubic, source_rows, warp, warp_rows
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


@pytest.mark.parametrize("interpolation,turn", [("bilinear", 23.0), ("bicubic", 23.0), ("lanczos", 23.0),
                                                 ("bicubic", 0.4), ("bicubic", 180.3)])
def test_warped_stars_land_on_reference_positions(interpolation, turn):
    """Through OpenCV (23 degrees) and our bicubic kernel (a session's small turn, a flip)."""
    truth = transform_matrix(14.3, -9.6, turn, 1.006 if turn == 23.0 else 1.0002, center=CENTER)  # reference -> frame
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


@pytest.mark.parametrize("turn", [0.0, 0.3, -0.9, 180.0, 179.6])
def test_own_bicubic_kernel_is_opencvs_cubic_at_exact_coordinates(turn):
    """Near the axes (a session's turns, a meridian flip) `warp` resamples with
    `daemon.pipeline.cubic`: OpenCV's cubic kernel, without OpenCV's rounding of the source
    coordinates to 1/32 px. So against OpenCV it differs by at most the image's change over
    1/64 px, and against the exact kernel sum (float64, here) by float32 rounding; NaN exactly
    where a footprint leaves the frame; bands equal the whole image; mono and colour alike."""
    import cv2

    rng = np.random.default_rng(5)
    img = cv2.GaussianBlur(rng.normal(1000, 300, (90, 130, 3)).astype(np.float32), (0, 0), 1.2)
    m = transform_matrix(2.6, -1.7, turn, center=(64.5, 44.5))
    inv = np.linalg.inv(m)
    assert own_cubic(m, "bicubic") and near_axes(inv) and not own_cubic(m, "bilinear")
    out = warp(img, m, img.shape[:2])
    # The exact kernel sum, per pixel, in float64.
    a = -0.75

    def weights(t):
        t = np.asarray(t, np.float64)
        return np.stack([((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a,
                         ((a + 2) * t - (a + 3)) * t * t + 1,
                         ((a + 2) * (1 - t) - (a + 3)) * (1 - t) ** 2 + 1,
                         ((a * (2 - t) - 5 * a) * (2 - t) + 8 * a) * (2 - t) - 4 * a], axis=-1)

    yy, xx = np.mgrid[0:90, 0:130]
    u = inv[0, 0] * xx + inv[0, 1] * yy + inv[0, 2]
    v = inv[1, 0] * xx + inv[1, 1] * yy + inv[1, 2]
    iu, iv = np.floor(u).astype(int), np.floor(v).astype(int)
    inside = (iu >= 1) & (iu + 2 <= 129) & (iv >= 1) & (iv + 2 <= 89)
    assert inside.mean() > 0.85
    np.testing.assert_array_equal(np.isnan(out).any(axis=2), ~inside)
    wx, wy = weights(u - iu)[inside], weights(v - iv)[inside]
    exact = np.zeros((inside.sum(), 3))
    for j in range(4):
        for i in range(4):
            exact += (wy[:, j] * wx[:, i])[:, None] * img[iv[inside] - 1 + j, iu[inside] - 1 + i]
    np.testing.assert_allclose(out[inside], exact, rtol=2e-6, atol=2e-3)
    cv = np.empty_like(img)
    cv2.warpAffine(img, m[:2], (130, 90), dst=cv, flags=cv2.INTER_CUBIC)
    step = np.abs(np.gradient(img, axis=(0, 1))).max()  # ADU per px
    assert np.abs(out[inside] - cv[inside]).max() <= step / 64 * 1.5
    for c in range(3):  # mono warps like a colour plane
        np.testing.assert_array_equal(warp(img[..., c], m, img.shape[:2]), out[..., c])
    planes = np.ascontiguousarray(np.moveaxis(img, 2, 0))
    band = np.full((20, 130, 3), -1.0, np.float32)
    s0 = max(0, int(np.floor(v[30:50].min())) - 3)
    cubic_rows(planes[:, s0:], s0, inv, 30, band)
    np.testing.assert_array_equal(np.isnan(band), np.isnan(out[30:50]) | np.isnan(band))
    finite = ~np.isnan(out[30:50])
    np.testing.assert_array_equal(band[finite], out[30:50][finite])
    for parallel in (False, True):  # the same rows written as planes (what the running stack takes)
        band_planes = np.full((3, 20, 130), -1.0, np.float32)
        cubic_rows(planes[:, s0:], s0, inv, 30, band_planes, planar_out=True, parallel=parallel)
        np.testing.assert_array_equal(band_planes, np.moveaxis(band, 2, 0))


@pytest.mark.parametrize("turn", [0.3, 12.0])
def test_warp_rows_as_planes_equal_the_interleaved_rows(turn):
    """warp_rows(planar_out=True) gives the interleaved rows' values as planes, through our
    kernel (a session's small turn) and through OpenCV (a large one)."""
    rng = np.random.default_rng(5)
    img = rng.normal(500, 40, (90, 130, 3)).astype(np.float32)
    m = transform_matrix(1.5, -2.0, turn, center=(65, 45))
    assert own_cubic(m, "bicubic") == (turn < 1)
    s0, s1 = source_rows(m, 30, 50, 130, 90)
    planes = np.ascontiguousarray(np.moveaxis(img[s0:s1], 2, 0))
    rows = warp_rows(img[s0:s1], s0, (90, 130), m, 30, 50, 130)
    for src, planar in ((img[s0:s1], False), (planes, True)):
        as_planes = warp_rows(src, s0, (90, 130), m, 30, 50, 130, planar=planar, planar_out=True)
        assert as_planes.shape == (3, 20, 130)
        np.testing.assert_array_equal(as_planes, np.moveaxis(rows, 2, 0))


def test_own_bicubic_kernel_keeps_nan_local_and_leaves_far_turns_to_opencv():
    src = _frame()
    src[150, 200] = np.nan
    m = transform_matrix(0.5, 0.5, 0.2, center=CENTER)
    assert own_cubic(m, "bicubic")
    out, clean = warp(src, m, SHAPE), warp(_frame(), m, SHAPE)
    bad = np.argwhere(np.isnan(out) & ~np.isnan(clean))  # the NaN's own footprint, not the edges
    assert 1 <= len(bad) <= 16 and np.abs(bad - [150.5, 200.5]).max() <= 3
    far = ~np.isnan(out)
    far[140:162, 190:212] = False
    np.testing.assert_array_equal(out[far], clean[far])
    for far in (transform_matrix(3e9, -2e9, 0.1), transform_matrix(0.0, 5e8, 0.1)):  # nothing of the frame lands
        assert own_cubic(far, "bicubic")
        assert np.isnan(warp(np.stack([src] * 3, axis=-1), far, SHAPE)).all()
        assert np.isnan(warp(src, far, SHAPE)).all()
    assert not own_cubic(transform_matrix(0.5, 0.5, 3.0, center=CENTER), "bicubic")  # runs too short: OpenCV
    assert not own_cubic(transform_matrix(0.5, 0.5, 0.2, 1.05, center=CENTER), "bicubic")
