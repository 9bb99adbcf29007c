"""Auto stretch: background at the target grey, neutral sky, gradients removed, size capped."""

import cv2
import numpy as np
import pytest

from daemon.pipeline.stretch import StretchSettings, _median, background_model, downscale, midtones_for, mtf, stretch
from daemon.products import preview_jpeg


def sky(shape=(300, 400), tint=(1.3, 1.0, 0.7), seed=0):
    rng = np.random.default_rng(seed)
    img = rng.normal(100.0, 3.0, shape + (3,)).astype(np.float32) * np.asarray(tint, np.float32)
    img[140:160, 190:210] += 40.0  # a faint 'nebula' just above the sky
    img[50, 60] += 5000.0  # a star
    return img


def test_mtf_maps_the_median_to_the_target():
    m = midtones_for(0.02, 0.25)
    assert mtf(m, np.array([0.0, 0.02, 1.0])) == pytest.approx([0.0, 0.25, 1.0])


def test_background_goes_grey_and_neutral_and_faint_signal_shows():
    out = stretch(sky())
    bg = [np.median(out[..., c]) for c in range(3)]
    assert bg == pytest.approx([0.25] * 3, abs=0.01)
    neb = out[142:158, 192:208].mean()
    assert neb > np.median(out) + 0.2  # 40 ADU over a 100 ADU sky is plainly visible
    # without neutralisation (linked) the red tint of the sky stays
    tinted = stretch(sky(), StretchSettings(neutralize=False, linked=True))
    assert np.median(tinted[..., 0]) > np.median(tinted[..., 2]) + 0.1


def test_gradient_removal_flattens_the_sky():
    img = sky()
    ramp = np.linspace(0, 60, img.shape[1], dtype=np.float32)[None, :, None]
    img += ramp
    model = background_model(img[..., 1])
    assert np.abs(model - (100 + ramp[0, :, 0])[None, :]).max() < 6
    flat = stretch(img, StretchSettings(gradient=True))
    plain = stretch(img)
    left, right = np.s_[:, :50], np.s_[:, -50:]
    assert abs(np.median(flat[left]) - np.median(flat[right])) < 0.03
    assert abs(np.median(plain[left]) - np.median(plain[right])) > 0.2


def test_preview_is_capped_nan_safe_and_encodes():
    img = sky((600, 900))
    img[:20] = np.nan  # unstacked border
    before = img.copy()
    img.setflags(write=False)  # as LivePipeline.stack_image() hands it out
    data = preview_jpeg(img, max_edge=300)
    np.testing.assert_array_equal(np.isnan(img), np.isnan(before))  # input untouched
    dec = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert dec.shape == (200, 300, 3)
    mono = cv2.imdecode(np.frombuffer(preview_jpeg(img[..., 1], fmt="png"), np.uint8), cv2.IMREAD_UNCHANGED)
    assert mono.shape == (600, 900) and mono.dtype == np.uint8


def test_uint8_lookup_path_matches_the_float_stretch():
    from daemon.pipeline.stretch import stretch_uint8, to_uint8

    img = sky()
    img[:5] = np.nan
    faint = img.copy()
    faint[60, 80] = 1e6  # a white point far above the sky: a steep MTF (m ~ 3e-5) in the shadows
    for im, s in ((img, StretchSettings()), (img, StretchSettings(linked=True, neutralize=False)),
                  (img, StretchSettings(gradient=True, max_edge=150)), (faint, StretchSettings())):
        a = to_uint8(stretch(im, s)).astype(int)
        b = stretch_uint8(im, s).astype(int)
        assert np.abs(a - b).max() <= 1
        assert (b[:2] == 0).all()  # no data: black


def test_downscale_is_opencv_area_average_with_nan_footprint():
    rng = np.random.default_rng(1)
    for shape, edge in (((1000, 1517), 300), ((411, 290, 3), 128), ((64, 48), 32), ((9, 700, 3), 50)):
        img = rng.normal(100, 10, shape).astype(np.float32)
        img[: shape[0] // 7] = np.nan
        img[:, -3:] = np.nan
        ours = downscale(img, edge)
        h, w = shape[:2]
        f = edge / max(h, w)
        ref = cv2.resize(img, (round(w * f), round(h * f)), interpolation=cv2.INTER_AREA)
        assert ours.shape == ref.shape and ours.dtype == np.float32
        np.testing.assert_array_equal(np.isnan(ours), np.isnan(ref))
        np.testing.assert_allclose(ours[~np.isnan(ref)], ref[~np.isnan(ref)], rtol=1e-5)
        if img.ndim == 3:  # the running stack's image is a view of planes: read as such, same values
            view = np.ascontiguousarray(np.moveaxis(img, 2, 0)).transpose(1, 2, 0)
            assert not view.flags.c_contiguous
            np.testing.assert_array_equal(downscale(view, edge), ours)
            same = downscale(view, max(shape))  # no downscaling: the planes interleaved
            assert same.flags.c_contiguous
            np.testing.assert_array_equal(same, img)


def test_median_is_numpys():
    rng = np.random.default_rng(2)
    for n in (1, 2, 3, 4, 1001, 70_000):
        for v in (rng.normal(800, 7, n).astype(np.float32), np.round(rng.normal(800, 2, n)).astype(np.float32)):
            assert _median(v.copy()) == np.median(v)  # bit for bit: odd, even, ties
