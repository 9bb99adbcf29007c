"""Star detection and frame metrics against simulated frames with known stars."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial import cKDTree

from daemon.pipeline.moments import refine_fullres
from daemon.pipeline.stars import Stars, auto_bin, detect_stars, measure
from daemon.simulate import Exposure, Sensor, expose, random_star_field

SHAPE = (400, 600)


def _frame(fwhm=3.0, seed=1, sensor: Sensor | None = None, n=150, **kw):
    sensor = sensor or Sensor()
    field = random_star_field(SHAPE, n, seed=seed, margin=-0.03, flux_range=(300.0, 20000.0))
    data = expose(SHAPE, field, Exposure(fwhm_px=fwhm, seed=seed, **kw), sensor).astype(np.float32)
    return field, data


def _position_errors(stars: Stars, field, max_flux_rank=60) -> np.ndarray:
    """Distance of each of the brightest detected stars to the nearest true star (px)."""
    d, _ = cKDTree(np.column_stack([field.x, field.y])).query(stars.xy[:max_flux_rank])
    return d


def test_mono_positions_fwhm_background_noise_against_truth():
    field, data = _frame(fwhm=3.0)
    stars, m = measure(data, bin_factor=1)
    assert stars.shape == SHAPE
    # Most true stars above the faint end are found, and nothing is invented.
    assert 80 <= m.n_stars <= 150
    d = _position_errors(stars, field)
    assert np.median(d) < 0.05 and np.sqrt(np.mean(d[:30] ** 2)) < 0.08
    assert np.all(np.diff(stars.flux) <= 0), "brightest first"
    assert m.fwhm_px == pytest.approx(3.0, rel=0.08)
    assert m.hfr_px == pytest.approx(m.fwhm_px / 2)
    # Sky = bias 500 + 10 s x (10 sky + 0.2 dark) ADU/s; noise = sqrt(102 e- shot + 3^2 read).
    assert m.background == pytest.approx(602.0, rel=0.01)
    assert m.noise == pytest.approx(np.sqrt(102 + 9), rel=0.08)
    assert m.fwhm_arcsec is None


def test_seeing_and_trailing_are_measured_in_the_right_order():
    _, sharp = _frame(fwhm=2.5)
    _, soft = _frame(fwhm=5.0)
    _, trailed = _frame(fwhm=3.0, elongation=1.8, elongation_angle_deg=30)
    ms, mf, mt = (measure(d, bin_factor=1)[1] for d in (sharp, soft, trailed))
    assert ms.fwhm_px == pytest.approx(2.5, rel=0.1)
    assert mf.fwhm_px == pytest.approx(5.0, rel=0.1)
    assert mt.eccentricity == pytest.approx(np.sqrt(1 - 1 / 1.8**2), abs=0.03)  # 0.83
    assert ms.eccentricity < 0.35 and mf.eccentricity < 0.35  # round: only the noise floor


def test_plate_scale_gives_arcsec():
    _, data = _frame()
    _, m = measure(data, plate_scale=1.5, bin_factor=1)
    assert m.fwhm_arcsec == pytest.approx(1.5 * m.fwhm_px)


@pytest.mark.parametrize("bayer", [None, "RGGB", "GBRG"])
def test_reduced_detection_reports_full_resolution_pixels(bayer):
    """Binned mono and the CFA superpixel: positions and FWHM in full-resolution pixels."""
    field, data = _frame(fwhm=3.5, sensor=Sensor(bayer=bayer), star_rgb=(0.8, 1.0, 0.6))
    stars, m = measure(data, bayer=bayer, bin_factor=2)
    d = _position_errors(stars, field, 40)
    # A half-pixel slip of the superpixel centre convention would show as ~0.7 px here.
    assert np.median(d) < 0.1
    assert m.fwhm_px == pytest.approx(3.5, rel=0.12)
    assert m.background == pytest.approx(602.0 if bayer is None else 602.0, rel=0.02)


def test_hot_pixels_and_cosmic_rays_are_not_stars():
    sensor = Sensor(n_hot_pixels=300, hot_pixel_adu_s=500.0)
    field, data = _frame(sensor=sensor)
    rng = np.random.default_rng(5)
    cr = np.column_stack([rng.integers(5, SHAPE[0] - 6, 40), rng.integers(5, SHAPE[1] - 6, 40)])
    data[cr[:, 0], cr[:, 1]] += 8000.0  # single-pixel hits
    data[cr[:20, 0], cr[:20, 1] + 1] += 3000.0  # and some two-pixel ones
    stars, _ = measure(data, bin_factor=1)
    hot = np.argwhere(sensor.hot_pixel_mask(SHAPE))
    defects = np.vstack([hot, cr])[:, ::-1].astype(float)  # (x, y)
    true = cKDTree(np.column_stack([field.x, field.y]))
    near_defect, _ = cKDTree(defects).query(stars.xy)
    near_star, _ = true.query(stars.xy)
    fake = (near_defect < 1.5) & (near_star > 2.0)
    assert fake.sum() == 0, f"{fake.sum()} defects detected as stars"
    # The real stars are still found (a defect filter that kills everything would pass above).
    assert len(stars) >= 80 and np.median(near_star) < 0.1


def test_colour_hot_pixels_are_not_stars():
    sensor = Sensor(n_hot_pixels=300, hot_pixel_adu_s=2000.0, bayer="RGGB")
    field, data = _frame(sensor=sensor)
    stars, _ = measure(data, bayer="RGGB")
    near_star, _ = cKDTree(np.column_stack([field.x, field.y])).query(stars.xy)
    near_hot, _ = cKDTree(np.argwhere(sensor.hot_pixel_mask(SHAPE))[:, ::-1]).query(stars.xy)
    assert ((near_hot < 2.0) & (near_star > 2.0)).sum() == 0
    assert len(stars) >= 60 and np.median(near_star) < 0.1


def test_empty_noisy_and_nan_frames_answer_without_exceptions():
    rng = np.random.default_rng(0)
    noise = rng.normal(500.0, 5.0, SHAPE).astype(np.float32)
    stars, m = measure(noise)
    assert m.n_stars == 0 and len(stars) == 0 and m.fwhm_px is None and m.eccentricity is None
    assert m.background == pytest.approx(500.0, abs=0.5) and m.noise == pytest.approx(5.0, rel=0.05)
    field, data = _frame()
    data[:, :100] = np.nan  # e.g. a masked defect column block
    stars, m = measure(data, bin_factor=1)
    assert m.n_stars > 50 and np.all(stars.x > 100)
    assert np.isfinite(m.background)


def test_max_stars_caps_the_list_but_not_the_count():
    _, data = _frame(n=300)
    stars = detect_stars(data, max_stars=25)
    assert len(stars) == 25 and stars.n_total > 100


def test_auto_bin_only_for_big_frames():
    assert auto_bin((1000, 1500), None) == 1
    assert auto_bin((2822, 4144), None) == 2
    assert auto_bin((4176, 6248), None) == 2
    assert auto_bin((2822, 4144), "RGGB") == 1  # the superpixel already quarters it
    assert auto_bin((4176, 6248), "RGGB") == 1


def test_real_trailed_frame_stands_out(jocular_arp145):
    """Jocular's observer rejected frame 00002; it is the most trailed of the first eight."""
    from daemon.io.load import load_frame

    files = sorted(jocular_arp145.glob("*.fit"))[:8]
    ecc = {f.name[-9:-4]: measure(load_frame(f).data)[1].eccentricity for f in files}
    others = np.median([e for k, e in ecc.items() if k != "00002"])
    assert ecc["00002"] > 1.3 * others and max(ecc, key=ecc.get) == "00002"


def test_crowded_blurred_field_keeps_size_and_roundness():
    """Neighbours inside the aperture must not count as the star's own light: a crowded
    field with 6.5-px stars measured FWHM 13 px / e 0.62 before neighbour masking."""
    shape = (240, 320)
    field = random_star_field(shape, 220, seed=11, margin=0.1, flux_range=(300.0, 30000.0))
    sensor = Sensor(bias_adu=0.0, dark_current_adu_s=0.0)
    data = expose(shape, field, Exposure(fwhm_px=6.5, seed=58), sensor, as_uint16=False)
    _, m = measure(data)
    assert m.fwhm_px == pytest.approx(6.5, rel=0.07)
    assert m.eccentricity < 0.45


@pytest.mark.parametrize("bayer, shape", [(None, (1024, 1280)), (None, (1500, 1600)), ("RGGB", (3000, 3000))])
def test_subsampled_background_matches_the_full_background(monkeypatch, bayer, shape):
    """Large detection images (>= 1 Mpx) take the sky map from every other row and column:
    the stars, their positions and the frame metrics must be those of the full-resolution map."""
    import daemon.pipeline.stars as st

    field = random_star_field(shape, 700, seed=4, margin=-0.03, flux_range=(300.0, 20000.0))
    data = expose(shape, field, Exposure(fwhm_px=3.0, seed=4, sky_adu_s=10.0), Sensor(bayer=bayer, vignetting=0.3))
    data = data.astype(np.float32)
    fast, mf = measure(data, bayer=bayer, bin_factor=1)
    monkeypatch.setattr(st, "SUBSAMPLE_BACKGROUND_PIXELS", 10**12)
    full, mfull = measure(data, bayer=bayer, bin_factor=1)
    assert abs(mf.n_stars - mfull.n_stars) <= 0.01 * mfull.n_stars + 1
    assert mf.background == pytest.approx(mfull.background, rel=0.002)
    assert mf.noise == pytest.approx(mfull.noise, rel=0.01)
    assert mf.fwhm_px == pytest.approx(mfull.fwhm_px, rel=0.01)
    # Same stars at the same positions (re-measured on the full frame either way).
    d, _ = cKDTree(full.xy).query(fast.xy)
    assert np.mean(d < 0.01) > 0.95
    assert np.median(_position_errors(fast, field, 200)) < 0.1


def _gaussian_stars(shape, x, y, fwhm, *, elongation=1.0, angle_deg=0.0, seed=0):
    """Point-sampled Gaussian stars (peak 5000 ADU) on a 600 ADU sky with 3 ADU noise: the
    FWHM the pixels sample is exactly `fwhm` (the equal-area one when elongated)."""
    s = fwhm / (2.0 * np.sqrt(2.0 * np.log(2.0)))
    sa, sb = s * np.sqrt(elongation), s / np.sqrt(elongation)
    t = np.radians(angle_deg)
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]].astype(float)
    img = 600.0 + np.random.default_rng(seed).normal(0.0, 3.0, shape)
    for cx, cy in zip(x, y, strict=True):
        u = (xx - cx) * np.cos(t) + (yy - cy) * np.sin(t)
        v = -(xx - cx) * np.sin(t) + (yy - cy) * np.cos(t)
        img += 5000.0 * np.exp(-0.5 * ((u / sa) ** 2 + (v / sb) ** 2))
    return img.astype(np.float32)


@pytest.mark.parametrize("bayer", [None, "RGGB", "GRBG"])
def test_refine_fullres_recovers_known_gaussian_stars(bayer):
    """Centroid to 0.02 px and FWHM to 2 % on the full frame; a mosaic's red and blue pixels
    (here scaled as a star's colour would) must not enter."""
    x, y = np.array([30.3, 70.65, 52.1]), np.array([25.8, 40.2, 62.45])
    img = _gaussian_stars((90, 100), x, y, 3.0)
    if bayer is not None:
        rows, cols = np.indices(img.shape)
        green = (rows + cols) % 2 == (1 if bayer[1] == "G" else 0)
        img = np.where(green, img, 0.4 * img)
    # Detection positions are off by up to ~0.5 px; the guess from the detection image too.
    rx, ry, rf, re = refine_fullres(img, np.round(x), np.round(y), bayer, np.full(3, 3.5))
    assert np.abs(rx - x).max() < 0.02 and np.abs(ry - y).max() < 0.02
    assert rf == pytest.approx(np.full(3, 3.0), rel=0.02)
    assert re.max() < 0.03


def test_refine_fullres_measures_elongation():
    x, y = np.array([40.4, 80.7]), np.array([35.2, 60.9])
    img = _gaussian_stars((100, 120), x, y, 3.5, elongation=1.8, angle_deg=30.0)
    rx, ry, rf, re = refine_fullres(img, x + 0.4, y - 0.3, None, np.full(2, 3.5))
    assert np.abs(rx - x).max() < 0.02 and np.abs(ry - y).max() < 0.02
    assert re == pytest.approx(np.full(2, 1.0 - 1.0 / 1.8), abs=0.02)
    assert rf == pytest.approx(np.full(2, 3.5), rel=0.02)


def test_refine_fullres_leaves_non_finite_pixels_out_of_the_sky():
    """A star boxed in by masked (NaN) defect rows and columns that cover most of its sky
    ring but not its aperture: the sky comes from the finite ring pixels (counted as 0 ADU,
    they pulled the sky to 0 and the FWHM to 4.4 px)."""
    img = _gaussian_stars((80, 100), [40.3], [30.6], 3.0)
    img[:, :35] = np.nan
    img[:25] = np.nan
    img[37:] = np.nan
    rx, ry, rf, _ = refine_fullres(img, np.array([40.0]), np.array([31.0]), None, np.array([3.0]))
    assert abs(rx[0] - 40.3) < 0.02 and abs(ry[0] - 30.6) < 0.02
    assert rf[0] == pytest.approx(3.0, rel=0.02)


def test_detection_sizes_on_demand_equal_those_of_the_full_list():
    """`measure` gets detection sizes for a sample of the stars (its size guess) and later
    for the few the full frame cannot measure: each star's size and windowed centroid must
    be those `detect_stars` gives when it measures every star."""
    _, data = _frame(n=300)
    full = detect_stars(data)
    lazy, _, _, sizes = detect_stars(data, _return_bkg=True, _windowed=False)
    assert len(lazy) == len(full) > 200 and np.isfinite(lazy.fwhm).sum() == 100
    sel = np.array([3, 150, len(full) - 1])
    assert np.array_equal(sizes.fwhm(sel), full.fwhm[sel])
    wx, wy = sizes.windowed(sel)
    assert np.array_equal(wx, full.x[sel]) and np.array_equal(wy, full.y[sel])
    sampled = np.isfinite(lazy.fwhm)
    assert np.array_equal(lazy.fwhm[sampled], full.fwhm[sampled])
