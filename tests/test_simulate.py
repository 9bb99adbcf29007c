"""The simulator is the ground truth of many tests: check that its truth is true."""

import numpy as np
import sep

from daemon.simulate import Exposure, Sensor, StarField, apply_matrix, expose, transform_matrix


def test_stars_land_where_the_matrix_says():
    shape = (200, 240)
    field = StarField(np.array([50.0, 120.0, 180.0]), np.array([60.0, 100.0, 150.0]), np.array([5e3, 5e3, 5e3]))
    m = transform_matrix(7.25, -3.5, 12.0, center=(120, 100))
    img = expose(shape, field, Exposure(exposure_s=10, matrix=m, fwhm_px=3.0, seed=3), Sensor(read_noise_adu=1))
    data = img.astype(np.float32)
    bkg = sep.Background(data)
    objs = sep.extract(data - bkg, 10, err=bkg.globalrms)
    assert len(objs) == 3
    tx, ty = apply_matrix(m, field.x, field.y)
    for x, y in zip(tx, ty, strict=True):
        d = np.hypot(objs["x"] - x, objs["y"] - y).min()
        assert d < 0.05


def test_hot_pixels_are_fixed_per_sensor_and_dark_scales_with_exposure():
    sensor = Sensor(n_hot_pixels=10, bias_adu=100, dark_current_adu_s=1.0, read_noise_adu=0.5)
    d10 = expose((64, 64), None, Exposure(exposure_s=10, seed=1), sensor, light=False, as_uint16=False)
    d20 = expose((64, 64), None, Exposure(exposure_s=20, seed=2), sensor, light=False, as_uint16=False)
    hot = sensor.hot_pixel_mask((64, 64))
    assert hot.sum() == 10
    assert np.all(d10[hot] > 1000) and np.all(d20[hot] > 2 * 1000)
    assert abs(np.median(d20[~hot]) - 100 - 2 * (np.median(d10[~hot]) - 100)) < 0.5


def test_colour_ratios_follow_the_bayer_pattern():
    sensor = Sensor(bayer="GRBG", read_noise_adu=0.0, dark_current_adu_s=0.0, bias_adu=0.0)
    img = expose((32, 32), None, Exposure(exposure_s=1.0, sky_rgb=(2.0, 1.0, 0.5)), sensor,
                 flat_level_adu=10000.0, as_uint16=False)
    # GRBG: (0,0)=G (0,1)=R (1,0)=B (1,1)=G
    assert abs(img[0::2, 1::2].mean() / img[0::2, 0::2].mean() - 2.0) < 0.01
    assert abs(img[1::2, 0::2].mean() / img[1::2, 1::2].mean() - 0.5) < 0.01
