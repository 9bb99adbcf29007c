"""The fused colour path (issue 19): band by band debayer -> warp -> stack equals the whole-frame
path; the default colour stack is full resolution, as sharp as bilinear + bicubic, trails
rejected; the spool keeps the mosaic (the raw frame's size) and re-makes the registered frame."""

from __future__ import annotations

import numpy as np
import pytest

from daemon.pipeline.debayer import debayer, debayer_rows
from daemon.pipeline.frame import Frame, FrameMeta
from daemon.pipeline.fused import RegisteredMosaic, registered_band
from daemon.pipeline.live import LivePipeline
from daemon.pipeline.live_settings import LiveSettings
from daemon.pipeline.stack import RunningStack, StackSettings
from daemon.pipeline.warp import own_cubic, warp
from daemon.simulate import Exposure, Sensor, Trail, expose, random_star_field, render_trail, transform_matrix
from daemon.spool import Spool
from tests.test_live import SENSOR, TRAIL, make_frame, run


def test_debayer_rows_and_banded_stack_are_bit_for_bit_the_whole_frame():
    rng = np.random.default_rng(3)
    mosaic = rng.normal(100, 10, (41, 57)).astype(np.float32)
    for pattern in ("RGGB", "GBRG"):
        full = debayer(mosaic, pattern)
        for r0, r1 in ((0, 7), (6, 20), (33, 41), (40, 41)):
            d0, d1 = max(0, r0 - 1), min(41, r1 + 1)
            for parallel in (True, False):
                part = debayer_rows(mosaic[d0:d1], pattern, r0, r1, d0=d0, full_h=41, parallel=parallel)
                np.testing.assert_array_equal(part, full[r0:r1])
    with pytest.raises(ValueError, match="needs mosaic rows"):
        debayer_rows(mosaic[5:10], "RGGB", 5, 9, d0=5, full_h=41)
    # add_banded (6-row bands on two threads, in any order) == add (a 64-row frame: one band),
    # through the warm-up, its re-check and the steady state, with a trail and NaN borders.
    a, b = (RunningStack((64, 48, 3), StackSettings(warmup=4)) for _ in range(2))
    for k in range(14):
        x = rng.normal(200, 5, (64, 48, 3)).astype(np.float32)
        x[:, : k % 5] = np.nan
        if k in (2, 9):
            x[20:23] += 800
        ra = a.add(x, 1 + 0.1 * k)
        rb = b.add_banded(lambda r0, r1, x=x: x[r0:r1].copy(), 6, 1 + 0.1 * k, threads=2)
        assert ra == rb
    for name in ("mean", "m2", "wsum", "count"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert a.rejected_pixels == b.rejected_pixels > 0


def test_registered_band_matches_debayer_then_warp():
    shape = (120, 160)
    field = random_star_field(shape, 60, seed=4, margin=0.1, flux_range=(500.0, 20000.0))
    sensor = Sensor(bias_adu=0.0, dark_current_adu_s=0.0, read_noise_adu=3.0, bayer="RGGB")
    mosaic = expose(shape, field, Exposure(exposure_s=10.0, seed=1), sensor, as_uint16=False)
    # The reference frame (identity): its debayered rows, also as planes.
    np.testing.assert_array_equal(registered_band(mosaic, "RGGB", np.eye(3), 16, 40),
                                  debayer(mosaic, "RGGB")[16:40])
    np.testing.assert_array_equal(registered_band(mosaic, "RGGB", np.eye(3), 16, 40, planar=True),
                                  np.moveaxis(debayer(mosaic, "RGGB")[16:40], 2, 0))
    for m in (transform_matrix(3.3, -4.6, 0.3, center=(80, 60)), transform_matrix(-2.2, 1.7, 180.0, center=(80, 60)),
              transform_matrix(1.1, 0.4, 12.0, center=(80, 60))):
        whole = warp(debayer(mosaic, "RGGB"), m, shape)
        for parallel in (False, True):
            bands = np.concatenate([registered_band(mosaic, "RGGB", m, r0, min(r0 + 16, 120), parallel=parallel)
                                    for r0 in range(0, 120, 16)])
            planes = np.concatenate([registered_band(mosaic, "RGGB", m, r0, min(r0 + 16, 120), parallel=parallel,
                                                     planar=True) for r0 in range(0, 120, 16)], axis=1)
            np.testing.assert_array_equal(planes, np.moveaxis(bands, 2, 0))  # (what the stack takes)
            if own_cubic(m, "bicubic"):  # a session's turns (and a flip): our kernel, bit for bit
                np.testing.assert_array_equal(bands, whole)
            else:  # OpenCV computes source coordinates from each band's own origin in float32
                np.testing.assert_array_equal(np.isnan(bands), np.isnan(whole))
                np.testing.assert_allclose(bands, whole, rtol=1e-4, atol=1e-3)


def test_fused_stack_equals_the_unfused_one():
    """A dithered colour session with hot pixels and a trail: the fused stack (default) and the
    whole-frame one (fused=False) are the same, and reject the same samples."""
    hot = Sensor(**{**SENSOR.__dict__, "n_hot_pixels": 60, "hot_pixel_adu_s": 150.0})

    def frames():
        return [make_frame(i, bayer="RGGB", sensor=hot, trails=[TRAIL] if i == 3 else []) for i in range(8)]

    fused_pipe, fused = run(frames())
    plain_pipe, plain = run(frames(), LiveSettings(fused=False))
    assert all(r.accepted for r in fused) and all(r.accepted for r in plain)
    assert isinstance(fused[1].registered, RegisteredMosaic) and isinstance(plain[1].registered, np.ndarray)
    a, b = fused_pipe.stack_image(), plain_pipe.stack_image()
    # The dithers turn the frames by tenths of a degree: the bicubic kernel of both paths is
    # `daemon.pipeline.cubic`, whose rows do not depend on the band: the same stack, bit for bit.
    assert all(own_cubic(r.registered.matrix, "bicubic") for r in fused[1:])
    np.testing.assert_array_equal(a, b)
    assert [r.rejected_pixels for r in fused] == [r.rejected_pixels for r in plain]
    assert sum(r.rejected_pixels for r in fused) > 1000
    # The registered frame the spool gets back from the mosaic == the unfused registered frame.
    np.testing.assert_allclose(fused[5].registered[0:240], plain[5].registered, rtol=1e-4, atol=1e-2)


def test_spool_keeps_the_mosaic_and_remakes_the_registered_frame(tmp_path):
    pipe, results = run([make_frame(i, bayer="GRBG") for i in range(3)])
    reg = results[2].registered
    spool = Spool(tmp_path)
    spool.append(reg, weight=results[2].weight, path="/sim/2")
    file = tmp_path / spool.entries[0]["file"]
    assert file.stat().st_size <= reg.data.size * 2 + 256  # float16 mosaic: the raw frame's bytes
    again = Spool(tmp_path)
    view = again.open(again.entries[0])
    assert view.shape == reg.shape
    made = view[10:200] * again.entries[0]["scale"]
    np.testing.assert_allclose(made, reg[10:200], rtol=2e-3, atol=0.5)  # float16 rounding of the mosaic


def test_default_colour_stack_of_a_4144x2822_session_is_full_resolution_and_sharp():
    """Issue 19: the default stack of a 4144x2822 colour session is 4144x2822, its stars as
    sharp as bilinear + bicubic stacked whole-frame (FWHM within 2 %), the trail rejected."""
    from daemon.pipeline.stars import measure

    shape = (2822, 4144)
    field = random_star_field(shape, 500, seed=9, margin=0.05, flux_range=(3000.0, 60000.0))
    sensor = Sensor(bias_adu=0.0, dark_current_adu_s=0.0, read_noise_adu=3.0, bayer="RGGB")
    trail = Trail(0, 600, 4143, 2200, adu_per_px=2000.0, width_px=3.0)
    dithers = ((6.3, -4.1, 0.1), (-5.2, 7.7, -0.15), (9.1, 3.3, 0.05), (-3.4, -8.8, 0.2))
    mats = [np.eye(3)] + [transform_matrix(dx, dy, rot, center=(2072, 1411)) for dx, dy, rot in dithers]

    def frame(i):
        exp = Exposure(exposure_s=10.0, matrix=mats[i], fwhm_px=3.0, sky_adu_s=10.0, seed=70 + i,
                       trails=[trail] if i == 2 else [], star_rgb=(0.9, 1.0, 0.8))
        return Frame(expose(shape, field, exp, sensor, as_uint16=False),
                     FrameMeta(path=f"/sim/big_{i}.fits", exposure_s=10.0, bayer="RGGB"))

    settings = LiveSettings(warmup=4)
    pipe = LivePipeline(settings)
    plain = LivePipeline(LiveSettings(warmup=4, fused=False))
    for i in range(5):
        f = frame(i)
        assert plain.process(Frame(f.data.copy(), f.meta)).accepted
        assert pipe.process(f, consume=True).accepted
    stack = pipe.stack_image()
    assert stack.shape == (2822, 4144, 3)
    lum = np.nan_to_num(stack.mean(-1), nan=float(np.nanmedian(stack)))
    ref = plain.stack_image()
    lum_ref = np.nan_to_num(ref.mean(-1), nan=float(np.nanmedian(ref)))
    fwhm, fwhm_ref = measure(lum)[1].fwhm_px, measure(lum_ref)[1].fwhm_px
    assert fwhm == pytest.approx(fwhm_ref, rel=0.02), (fwhm, fwhm_ref)
    assert fwhm < 3.6
    # The trail of frame 2 in reference coordinates, away from stars: nothing of it is left
    # (a plain mean of 5 frames would keep 2000 / 5 = 400 ADU on its core).
    inv = np.linalg.inv(mats[2])
    (x0, x1), (y0, y1) = (inv @ np.array([[0, 4143], [600, 2200], [1, 1]]))[:2]
    core = render_trail(shape, Trail(x0, y0, x1, y1, adu_per_px=2000.0, width_px=3.0)) > 1000
    stars = measure(lum)[0]
    star_free = np.ones(shape, bool)
    for x, y in zip(stars.x.astype(int), stars.y.astype(int), strict=True):
        star_free[max(0, y - 12): y + 13, max(0, x - 12): x + 13] = False
    sel = core & star_free & np.isfinite(stack).all(-1)
    sky = np.nanmedian(lum[::7, ::7])
    assert sel.sum() > 5000
    assert abs(np.median(lum[sel]) - sky) < 0.05 * 400, np.median(lum[sel]) - sky


def test_bands_run_on_as_many_threads_as_numba_has_cores_for():
    """add_banded (and so `add` and the fused path) runs its bands on numba's thread count, one
    per core unless set lower: with 1, every band on the calling thread; with 2, on the band
    threads; the same statistics either way."""
    import threading

    import numba

    x = np.random.default_rng(5).normal(100, 3, (40, 24, 3)).astype(np.float32)
    seen: dict[int, set] = {}
    stacks = {}
    before = numba.get_num_threads()
    try:
        for n in (1, 2):
            numba.set_num_threads(n)
            seen[n] = set()
            stacks[n] = RunningStack(x.shape, StackSettings(warmup=4))

            def band(r0, r1, n=n):
                seen[n].add(threading.get_ident())
                return x[r0:r1].copy()

            stacks[n].add_banded(band, 4, 1.0)
    finally:
        numba.set_num_threads(before)
    assert seen[1] == {threading.get_ident()}
    # (which of the two threads takes which band is up to them: at least one, none the caller)
    assert 1 <= len(seen[2]) <= 2 and threading.get_ident() not in seen[2]
    np.testing.assert_array_equal(stacks[1].mean, stacks[2].mean)
