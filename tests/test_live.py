"""The live pipeline end to end on synthetic sessions with known truth: real star detection,
registration, debayering and warping (issue 3's stages), the quality gate and the stack."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pytest

from daemon.pipeline.frame import Frame, FrameMeta
from daemon.pipeline.live import LivePipeline
from daemon.pipeline.live_settings import LiveSettings
from daemon.pipeline.restack import restack
from daemon.simulate import (
    Exposure,
    Sensor,
    Trail,
    expose,
    random_star_field,
    render_trail,
    session_times,
    transform_matrix,
)

SHAPE = (240, 320)
FIELD = random_star_field(SHAPE, 220, seed=11, margin=0.1, flux_range=(300.0, 30000.0))
TRAIL = Trail(-10, 40, 340, 200, adu_per_px=1500.0, width_px=2.5)
TIMES = session_times(datetime(2026, 11, 24, 21, 0, tzinfo=UTC), 10.0, 40)
SENSOR = Sensor(bias_adu=0.0, dark_current_adu_s=0.0, read_noise_adu=3.0)


def dither(i: int) -> np.ndarray:
    """A known pointing per frame: a few px of dither and a little field rotation."""
    if i == 0:
        return np.eye(3)
    rng = np.random.default_rng(1000 + i)
    dx, dy = rng.uniform(-8, 8, 2)
    return transform_matrix(dx, dy, rng.uniform(-0.4, 0.4), center=(SHAPE[1] / 2, SHAPE[0] / 2))


def make_frame(i: int, *, sensor: Sensor = SENSOR, bayer: str | None = None, **exp) -> Frame:
    sensor = Sensor(**{**sensor.__dict__, "bayer": bayer})
    e = Exposure(**{"exposure_s": 10.0, "matrix": dither(i), "fwhm_px": 3.0, "sky_adu_s": 10.0, "seed": 50 + i,
                    **exp})
    data = expose(SHAPE, FIELD, e, sensor, as_uint16=False)
    meta = FrameMeta(path=f"/sim/light_{i:03d}.fits", exposure_s=e.exposure_s, bayer=bayer, date_obs=TIMES[i])
    return Frame(data, meta)


def run(frames, settings: LiveSettings | None = None):
    pipe = LivePipeline(settings or LiveSettings())
    results = [pipe.process(f) for f in frames]
    return pipe, results


def test_satellite_and_hot_pixels_are_rejected_in_a_dithered_colour_session():
    hot = Sensor(**{**SENSOR.__dict__, "n_hot_pixels": 60, "hot_pixel_adu_s": 150.0})
    clean_pipe, clean_results = run([make_frame(i, bayer="RGGB") for i in range(10)])
    pipe, results = run([make_frame(i, bayer="RGGB", sensor=hot, trails=[TRAIL] if i == 3 else [])
                         for i in range(10)])
    assert all(r.accepted for r in results), [r.reason for r in results]
    clean, dirty = clean_pipe.stack_image(), pipe.stack_image()
    assert dirty.shape == SHAPE + (3,)
    # The trail of frame 3, in reference coordinates: render it through the inverse pointing.
    inv = np.linalg.inv(dither(3))
    trail_ref = render_trail(SHAPE, Trail(*_map(inv, TRAIL), adu_per_px=TRAIL.adu_per_px, width_px=TRAIL.width_px))
    mask = (trail_ref > 1.0) & np.isfinite(clean).all(-1) & np.isfinite(dirty).all(-1)
    unrejected = trail_ref[mask].sum() / 10
    kept = (dirty - clean)[mask].mean(-1).sum()
    assert unrejected > 1e4
    assert abs(kept) < 0.05 * unrejected, kept / unrejected
    # The final re-stack of the same registered frames (what the spool keeps): < 1 %.
    final = restack([r.registered for r in results], [r.weight for r in results]).image
    final_clean = restack([r.registered for r in clean_results], [r.weight for r in clean_results]).image
    ok = mask & np.isfinite(final).all(-1) & np.isfinite(final_clean).all(-1)
    kept_final = (final - final_clean)[ok].mean(-1).sum()
    assert abs(kept_final) < 0.01 * trail_ref[ok].sum() / 10, kept_final / (trail_ref[ok].sum() / 10)
    # Hot pixels (1500 ADU, in a new place of the sky in every dithered frame) are gone: look
    # where each one landed in the reference frame, on the sky away from stars (on a star's
    # core the scatter between debayered frames is itself hundreds of ADU) and inside the
    # border that every frame covers.
    hy, hx = np.nonzero(hot.hot_pixel_mask(SHAPE))
    sky = _star_free_mask()
    residual = []
    for i in range(10):
        x, y, _ = np.linalg.inv(dither(i)) @ np.vstack([hx, hy, np.ones_like(hx)])
        yi, xi = np.round(y).astype(int), np.round(x).astype(int)
        keep = (xi > 12) & (xi < SHAPE[1] - 13) & (yi > 12) & (yi < SHAPE[0] - 13)
        keep[keep] &= sky[yi[keep], xi[keep]]
        residual.append(np.abs(dirty - clean)[yi[keep], xi[keep]].max(-1))
    residual = np.concatenate(residual)
    assert residual.size > 150
    # a plain mean leaves 150 ADU (1500 / 10) at each; rejection takes them out
    assert np.percentile(residual, 99) < 10.0, np.percentile(residual, [50, 90, 99, 100])
    assert np.median(residual) < 2.0


def _map(m, trail):
    x, y, _ = m @ np.array([[trail.x0, trail.x1], [trail.y0, trail.y1], [1.0, 1.0]])
    return x[0], y[0], x[1], y[1]


def test_noise_falls_as_one_over_sqrt_n_and_stars_stay_sharp():
    from daemon.pipeline.stars import measure

    pipe, results = run([make_frame(i) for i in range(12)])
    assert all(r.accepted for r in results)
    stack = pipe.stack_image()
    star_free = _star_free_mask()
    # Each registered frame's own sky noise (interpolation smooths it by a frame-dependent
    # amount), combined as independent samples: the 1/sqrt(N) law for this weighted mean.
    s_i = np.array([np.nanstd(r.registered[star_free]) for r in results])
    w = np.array([r.weight for r in results])
    expected = np.sqrt(np.sum(w ** 2 * s_i ** 2)) / w.sum()
    assert np.nanstd(stack[star_free]) == pytest.approx(expected, rel=0.05)
    assert expected == pytest.approx(s_i.mean() / np.sqrt(12), rel=0.1)
    ref_fwhm = measure(make_frame(0).data)[1].fwhm_px
    stack_fwhm = measure(np.nan_to_num(stack, nan=float(np.nanmedian(stack))))[1].fwhm_px
    assert stack_fwhm <= 1.05 * ref_fwhm, (stack_fwhm, ref_fwhm)


def _star_free_mask():
    """Pixels further than 10 px from every simulated star, away from the dithered border."""
    yy, xx = np.mgrid[0:SHAPE[0], 0:SHAPE[1]]
    mask = np.ones(SHAPE, bool)
    for x, y in zip(FIELD.x, FIELD.y, strict=True):
        mask &= (xx - x) ** 2 + (yy - y) ** 2 > 100
    mask[:15], mask[-15:], mask[:, :15], mask[:, -15:] = False, False, False, False
    return mask


def test_cloud_trailing_focus_and_moonrise_are_rejected_with_their_reasons():
    frames = [make_frame(i) for i in range(6)]
    cloud = make_frame(6, transmission=0.12)
    trailed = make_frame(7, elongation=2.6, elongation_angle_deg=30.0)
    blurred = make_frame(8, fwhm_px=6.5)
    moonrise = make_frame(10, sky_adu_s=40.0)
    pipe, results = run(frames + [cloud, trailed, blurred, moonrise, make_frame(9)])
    by_path = {r.path: r for r in results}
    assert all(by_path[f.meta.path].accepted for f in frames)
    r = by_path[cloud.meta.path]
    assert not r.accepted and r.reason.startswith("clouds:") and r.registered is None
    r = by_path[trailed.meta.path]
    assert not r.accepted and r.reason.startswith("trailing:"), r.reason
    r = by_path[blurred.meta.path]
    assert not r.accepted and r.reason.startswith("FWHM"), r.reason
    r = by_path[moonrise.meta.path]
    assert not r.accepted and r.reason.startswith("background jump:"), r.reason
    assert by_path["/sim/light_009.fits"].accepted
    assert pipe.n_stacked == 7 and pipe.total_exposure_s == 70.0
    assert [p["path"] for p in pipe.provenance()] == [f.meta.path for f in frames] + ["/sim/light_009.fits"]


def test_registration_recovers_the_dither_and_mismatched_frames_are_rejected():
    pipe, results = run([make_frame(i) for i in range(3)])
    c = np.array([(SHAPE[1] - 1) / 2, (SHAPE[0] - 1) / 2, 1.0])
    for i, r in enumerate(results):
        shift = np.linalg.inv(dither(i)) @ c - c  # where the frame centre lands in the reference
        assert r.dx == pytest.approx(shift[0], abs=0.2) and r.dy == pytest.approx(shift[1], abs=0.2)
    odd = Frame(np.zeros((100, 100), np.float32), FrameMeta(path="/sim/odd.fits", exposure_s=10.0))
    r = pipe.process(odd)
    assert not r.accepted and "does not match the reference" in r.reason
    # another part of the sky (a slew to the wrong target): as many stars, none matching
    other = random_star_field(SHAPE, 220, seed=99, margin=0.1, flux_range=(300.0, 30000.0))
    data = expose(SHAPE, other, Exposure(exposure_s=10.0, fwhm_px=3.0, seed=7), SENSOR, as_uint16=False)
    r = pipe.process(Frame(data, FrameMeta(path="/sim/elsewhere.fits", exposure_s=10.0)))
    assert not r.accepted and r.reason.startswith("registration failed:"), r.reason
    assert pipe.n_stacked == 3


def test_state_resumes_exactly_and_reset_forgets():
    frames = [make_frame(i) for i in range(9)]
    straight, _ = run(frames)
    first, _ = run(frames[:6])
    state = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in first.state().items()}
    resumed = LivePipeline.from_state(state, LiveSettings())
    for f in frames[6:]:
        resumed.process(f)
    np.testing.assert_array_equal(resumed.stack_image(), straight.stack_image())
    assert resumed.provenance() == straight.provenance()
    assert resumed.n_stacked == 9 and resumed.total_exposure_s == 90.0
    resumed.reset()
    assert resumed.stack_image() is None and resumed.n_stacked == 0


def test_superpixel_stack_is_half_size_and_aligned():
    """debayer="superpixel" (what "auto" picks above 8 Mpx): half the size, and a star at
    full-resolution reference position p sits at (p - 0.5) / 2 in the stack."""
    from daemon.pipeline.stars import detect_stars

    pipe, results = run([make_frame(i, bayer="GRBG") for i in range(6)], LiveSettings(debayer="superpixel"))
    assert all(r.accepted for r in results)
    stack = pipe.stack_image()
    assert stack.shape == (SHAPE[0] // 2, SHAPE[1] // 2, 3)
    lum = np.nan_to_num(stack.mean(-1), nan=float(np.nanmedian(stack)))
    found = detect_stars(lum)
    tx, ty = (FIELD.x - 0.5) / 2, (FIELD.y - 0.5) / 2
    bright = np.argsort(-FIELD.flux)[:40]
    errors = []
    for k in bright:
        if 5 < tx[k] < lum.shape[1] - 5 and 5 < ty[k] < lum.shape[0] - 5:
            errors.append(np.hypot(found.x - tx[k], found.y - ty[k]).min())
    assert len(errors) > 15 and np.median(errors) < 0.15, np.median(errors)


def test_auto_debayer_stacks_at_full_resolution_where_it_fits_else_superpixel_saying_why():
    """debayer "auto" (the default): full resolution unless the stack's statistics would take
    more than a third of the machine's memory; then the superpixel stack (the same, bit for
    bit, as debayer "superpixel" makes) and a note naming the sizes and the setting that
    forces full resolution. "bilinear" forces it; unknown memory means full resolution."""
    from daemon.pipeline.resolution import STACK_MEMORY_SHARE
    from daemon.pipeline.stack import stack_bytes

    frames = [make_frame(i, bayer="RGGB") for i in range(4)]
    need = stack_bytes(SHAPE + (3,), LiveSettings().stack_settings)
    fits, short = int(need / STACK_MEMORY_SHARE) + 1, int(need / STACK_MEMORY_SHARE) - 1

    def stacked(settings: LiveSettings, memory: int | None) -> LivePipeline:
        pipe = LivePipeline(settings, memory_bytes=memory)
        assert all(pipe.process(Frame(f.data.copy(), f.meta)).accepted for f in frames)
        return pipe

    assert LiveSettings().debayer == "auto"
    for settings, memory in ((LiveSettings(), fits), (LiveSettings(), None), (LiveSettings(debayer="bilinear"), short)):
        pipe = stacked(settings, memory)
        assert pipe.stack_image().shape == SHAPE + (3,) and pipe.memory_note(SHAPE) is None and pipe.holds_frames
        assert pipe.resolution_note is None
    pipe = stacked(LiveSettings(), short)
    assert pipe.stack_image().shape == (SHAPE[0] // 2, SHAPE[1] // 2, 3) and not pipe.holds_frames
    note = pipe.memory_note(SHAPE)
    assert pipe.resolution_note == note
    assert stacked(LiveSettings(debayer="superpixel"), short).resolution_note is None  # asked for
    assert "320x240" in note and f"{need / 1e9:.2f} GB" in note and '[stack] debayer = "bilinear"' in note
    np.testing.assert_array_equal(pipe.stack_image(), stacked(LiveSettings(debayer="superpixel"), None).stack_image())
    assert pipe.geometry.scale == 2.0
    # A stack keeps its resolution: restored where full resolution would fit (another memory
    # limit after a restart), its frames go on into it.
    restored = LivePipeline.from_state(pipe.state(), LiveSettings(), memory_bytes=fits)
    assert restored.process(make_frame(5, bayer="RGGB")).accepted and restored.n_stacked == 5
    assert restored.stack_image().shape == (SHAPE[0] // 2, SHAPE[1] // 2, 3) and not restored.holds_frames
    # What the README promises (a Pi's RAM as the kernel reports it, MemTotal): 12 Mpx colour at
    # full resolution on a 2 GB Pi, 26 Mpx on a 4 GB one but not on a 2 GB one.
    pi2, pi4 = LivePipeline(memory_bytes=1_900_000_000), LivePipeline(memory_bytes=3_800_000_000)
    assert pi2.memory_note((2822, 4144)) is None and pi4.memory_note((4176, 6248)) is None
    assert pi2.debayer_method((4176, 6248)) == "superpixel" and pi4.debayer_method((4176, 6248)) == "bilinear"


def test_consumed_colour_frames_stack_the_same_and_free_their_mosaic():
    """process(frame, consume=True) (the service, the bench): a colour frame's mosaic is
    dropped once debayered, the stack is the same bit for bit; a mono frame keeps its pixels
    (they are the warp's input), and a rejected frame's too, but for the reference's: they
    need no warp and become the registered frame (not a copy)."""
    frames = [make_frame(i, bayer="RGGB") for i in range(4)]
    kept_pipe, _ = run([Frame(f.data.copy(), f.meta) for f in frames])
    pipe = LivePipeline(LiveSettings())
    for f in frames:
        assert pipe.process(f, consume=True).accepted
        assert f.data is None
    np.testing.assert_array_equal(pipe.stack_image(), kept_pipe.stack_image())
    mono = make_frame(1)
    assert pipe.process(mono, consume=True).accepted is False  # mono vs a colour reference
    assert mono.data is not None
    mono_pipe, mono_kept = LivePipeline(LiveSettings()), LivePipeline(LiveSettings())
    for i in range(3):
        f = make_frame(i)
        pixels = f.data
        assert mono_kept.process(Frame(f.data.copy(), f.meta)).accepted
        result = mono_pipe.process(f, consume=True)
        assert result.accepted and (f.data is None) == (i == 0)
        assert np.shares_memory(result.registered, pixels) == (i == 0)
    np.testing.assert_array_equal(mono_pipe.stack_image(), mono_kept.stack_image())
