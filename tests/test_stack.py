"""Running stack: rejection of trails (also early ones), noise scaling, exact resume."""

import numpy as np
import pytest

from daemon.pipeline.stack import RunningStack, StackSettings, stack_bytes
from daemon.simulate import Exposure, Sensor, Trail, expose, random_star_field, render_trail

SHAPE = (96, 128)
SENSOR = Sensor(bias_adu=0.0, dark_current_adu_s=0.0, read_noise_adu=3.0)
TRAIL = Trail(-5, 20, 140, 80, adu_per_px=2000.0, width_px=2.5)


def frames(n, trail_at=(), colour=False):
    field = random_star_field(SHAPE, 40, seed=5)
    out = []
    for i in range(n):
        exp = Exposure(exposure_s=10, fwhm_px=3.0, sky_adu_s=10, seed=100 + i,
                       trails=[TRAIL] if i in trail_at else [])
        img = expose(SHAPE, field, exp, SENSOR, as_uint16=False)
        if colour:  # three planes with different noise realisations and levels
            img2 = expose(SHAPE, field, Exposure(**{**exp.__dict__, "seed": 500 + i}), SENSOR, as_uint16=False)
            img = np.stack([img, img2 * 0.8, (img + img2) / 2], axis=-1)
        out.append(img)
    return out


def stack_of(images, **kw):
    s = RunningStack(images[0].shape, StackSettings(**kw))
    for im in images:
        s.add(im)
    return s


@pytest.mark.parametrize("trail_frame", [1, 7])
def test_trail_in_one_of_ten_frames_is_rejected(trail_frame):
    """An early trail (inside the warm-up) and a late one both keep < 5 % of their strength."""
    clean = stack_of(frames(10)).image()
    dirty = stack_of(frames(10, trail_at={trail_frame})).image()
    trail = render_trail(SHAPE, TRAIL)
    mask = trail > 1.0
    unrejected = trail[mask].sum() / 10  # what a plain mean would keep
    kept = (dirty - clean)[mask].sum()
    assert unrejected > 1e4
    assert abs(kept) < 0.05 * unrejected, kept / unrejected
    # a plain mean keeps all of it (the test can fail)
    plain = stack_of(frames(10, trail_at={trail_frame}), reject=False).image()
    plain_clean = stack_of(frames(10), reject=False).image()
    assert (plain - plain_clean)[mask].sum() == pytest.approx(unrejected, rel=0.02)


def test_hot_pixels_moving_between_frames_are_rejected():
    rng = np.random.default_rng(3)
    imgs = frames(10)
    truth = stack_of(frames(10)).image()
    for im in imgs:  # hot pixels land elsewhere in every (dithered, registered) frame
        idx = rng.choice(im.size, 30, replace=False)
        im.flat[idx] += 3000.0
    out = stack_of(imgs).image()
    assert np.abs(out - truth).max() < 20.0  # a plain mean would leave 300 ADU spikes


def test_background_noise_falls_as_one_over_sqrt_n():
    """Equal frames: the stack's pixel noise is sigma_1 / sqrt(N) within 5 % (rejection on)."""
    rng = np.random.default_rng(1)
    sigma, n = 10.0, 16
    s = RunningStack((200, 200, 3), StackSettings())
    for _ in range(n):
        s.add(rng.normal(100.0, sigma, (200, 200, 3)).astype(np.float32))
    measured = s.image().std()
    assert measured == pytest.approx(sigma / np.sqrt(n), rel=0.05)
    assert s.rejected_pixels < 0.05 * 200 * 200 * n


def test_weighted_mean_without_rejection_is_exact_and_nan_is_no_data():
    rng = np.random.default_rng(2)
    imgs = [rng.normal(50, 5, (20, 30)).astype(np.float32) for _ in range(6)]
    imgs[2][:5] = np.nan  # outside the warped area of frame 2
    w = [1.0, 0.5, 2.0, 1.0, 0.25, 1.5]
    s = RunningStack((20, 30), StackSettings(reject=False))
    for im, wi in zip(imgs, w, strict=True):
        s.add(im, wi)
    arr = np.ma.masked_invalid(np.stack(imgs))
    expect = np.ma.average(arr, axis=0, weights=np.array(w)[:, None, None] * np.ones_like(imgs[0]))
    np.testing.assert_allclose(s.image(), expect.filled(np.nan), rtol=1e-5)


def test_colour_stack_rejects_in_all_planes_and_memory_does_not_grow():
    imgs = frames(10, trail_at={0}, colour=True)
    clean = stack_of(frames(10, colour=True)).image()
    s = RunningStack(imgs[0].shape)
    sizes = []
    for im in imgs:
        s.add(im)
        sizes.append(sum(v.nbytes for v in s.state().values() if isinstance(v, np.ndarray)))
    mask = render_trail(SHAPE, TRAIL) > 1.0
    unrejected = render_trail(SHAPE, TRAIL)[mask].sum() / 10
    for c in range(3):
        assert abs((s.image() - clean)[..., c][mask].sum()) < 0.05 * unrejected * (1, 0.8, 0.9)[c]
    assert sizes[-1] <= sizes[0]  # the warm-up buffer is freed, nothing grows with N


def test_state_resumes_exactly():
    imgs = frames(9, trail_at={2})
    full = stack_of(imgs)
    for cut in (3, 7):  # inside and after the warm-up
        part = stack_of(imgs[:cut])
        resumed = RunningStack.from_state({k: (v.copy() if isinstance(v, np.ndarray) else v)
                                           for k, v in part.state().items()})
        for im in imgs[cut:]:
            resumed.add(im)
        np.testing.assert_array_equal(resumed.image(), full.image())
        assert resumed.n_frames == full.n_frames == 9


def test_warmup_samples_are_kept_as_exact_half_floats():
    """The kernel's own float32 -> float16 conversion matches numpy bit for bit."""
    rng = np.random.default_rng(7)
    img = rng.normal(0, 3000, (64, 64, 3)).astype(np.float32)
    img[0, 0] = [4e-7, 65535.0, 70000.0]  # subnormal, a saturated 16-bit pixel, above it
    img[0, 1] = [-3e5, 262000.0, 3e5]  # beyond the range: saturates, never inf
    s = RunningStack(img.shape)
    s.add(img)
    expect = (img * np.float32(0.25)).clip(-65504, 65504).astype(np.float16).view(np.uint16)
    np.testing.assert_array_equal(s.state()["top1"], np.moveaxis(expect, 2, 0))  # (kept as planes)


def test_saturated_star_cores_stay_finite_through_the_warm_up_recheck():
    rng = np.random.default_rng(8)
    s = RunningStack((8, 8, 3))
    for _ in range(8):
        img = rng.normal(100, 5, (8, 8, 3)).astype(np.float32)
        img[3:5, 3:5] = 65534.0  # a saturated core, identical in every frame
        s.add(img)
    out = s.image()
    assert np.isfinite(out).all() and np.allclose(out[3:5, 3:5], 65534.0)


def test_stack_shapes_other_than_mono_and_rgb_are_refused_naming_the_shape():
    for shape in ((4, 5, 2), (4, 5, 4), (4,), (2, 3, 4, 5)):
        with pytest.raises(ValueError, match=r"stack shape must be .*got \(" + str(shape[0])):
            RunningStack(shape)
    assert RunningStack((4, 5, 1)).shape == (4, 5, 1)


def test_planes_in_and_out_equal_the_interleaved_frame():
    """The stack keeps its statistics as planes: bands given as planes (the fused path's) give
    the same stack, bit for bit, as the interleaved frame; `image` and `planes` are views of
    the same mean; a saved state of the interleaved layout (older versions) resumes to the
    same stack."""
    rng = np.random.default_rng(11)
    shape = (40, 52, 3)
    a, b = RunningStack(shape, StackSettings(warmup=4)), RunningStack(shape, StackSettings(warmup=4))
    frames = [rng.normal(300, 8, shape).astype(np.float32) for _ in range(16)]
    frames[2][10:12] += 900  # a trail
    for k, x in enumerate(frames[:14]):
        if k == 2:  # in the warm-up bookkeeping: interleaved rows given as planes are refused, and
            with pytest.raises(ValueError, match="planar"):  # the next frames' weights are kept
                a.add_banded(lambda r0, r1: frames[0][r0:r1], 7, 5.0, planar=True)
            assert a.n_frames == 2
        planes = np.ascontiguousarray(np.moveaxis(x, 2, 0))
        assert a.add(x, 1 + 0.05 * k) == b.add_banded(lambda r0, r1, p=planes: p[:, r0:r1], 7, 1 + 0.05 * k,
                                                       planar=True)
    np.testing.assert_array_equal(a.image(), b.image())
    assert a.rejected_pixels == b.rejected_pixels > 0
    np.testing.assert_array_equal(a.planes(), np.moveaxis(a.image(), 2, 0))
    assert np.shares_memory(a.planes(), a.image()) and not a.image().flags.writeable
    mono = RunningStack((40, 52))
    mono.add(frames[0][..., 0])
    assert mono.image().shape == (40, 52) and mono.image().flags.c_contiguous
    np.testing.assert_array_equal(a.sigma(), b.sigma())
    # Resume from the interleaved layout (no "layout" key) after the warm-up (m2 float32).
    a.add(frames[14], 0.7), b.add(frames[14], 0.7)
    np.testing.assert_array_equal(a.image(), b.image())
    state = a.state()
    assert state["layout"] == "planes" and "m2" in state
    old = {k: (np.ascontiguousarray(np.moveaxis(v, 0, 2)) if k in ("mean", "m2") else v)
           for k, v in state.items() if k != "layout"}
    resumed = RunningStack.from_state(old)
    for s in (a, resumed):
        s.add(frames[15], 0.9)
    np.testing.assert_array_equal(resumed.image(), a.image())
    np.testing.assert_array_equal(resumed.sigma(), a.sigma())


def test_background_sigma_is_never_nan_when_m2_rounds_below_zero():
    """m2 of (nearly) identical samples can round a hair below 0 (a frame given twice): the
    background sigma is then 0, not the NaN a square root of a negative mean gives, which would
    make every rejection threshold NaN."""
    h, w = 200, 200
    stack = RunningStack((h, w), StackSettings(reject=False))
    state = stack.state()
    m2 = np.full((1, h, w), 1e-9, np.float32)
    m2[0, ::3, ::3] = -1e-3  # sampled by the sparse grid, under 4x the median: the mean is < 0
    state.update(mean=np.full((1, h, w), 100.0, np.float32), m2=m2, wsum=np.full((h, w), 2.0, np.float32),
                 count=np.full((h, w), 2, np.uint16), n_frames=2, total_weight=2.0)
    resumed = RunningStack.from_state(state, StackSettings())
    resumed.add(np.full((h, w), 100.0, np.float32))  # the same value again: m2 stays as it is
    noise = resumed.state()["noise"]
    assert np.isfinite(noise).all() and (noise >= 0).all()


def test_the_end_of_the_bookkeeping_puts_m2_in_the_brightest_samples_memory():
    """float32 m2 takes the bytes of the two brightest samples' buffers when the warm-up
    bookkeeping ends: that frame needs no new memory (313 MB on a 26 Mpx colour sensor), and
    the process's memory does not step up where malloc keeps freed buffers."""
    images = frames(13, colour=True)
    s = RunningStack(images[0].shape, StackSettings(warmup=4))
    for im in images[:11]:
        s.add(im)
    top = s.state()["top1"]
    assert s.m2 is None
    s.add(images[11])  # the twelfth (3 x warmup): the bookkeeping ends
    assert s.m2 is not None and np.shares_memory(s.m2, top) and "top1" not in s.state()
    s.add(images[12])
    assert np.isfinite(s.image()).all()


@pytest.mark.parametrize("shape", [(50, 60), (50, 60, 3)])
@pytest.mark.parametrize("reject", [True, False])
def test_stack_bytes_is_what_a_stack_holds_at_its_largest(shape, reject):
    """`stack_bytes` (what debayer "auto" weighs against the machine's memory) is the bytes of
    a new stack's arrays, warm-up bookkeeping included, and no less than what it holds later."""
    settings = StackSettings(reject=reject)
    stack = RunningStack(shape, settings)

    def held() -> int:
        arrays = [stack._mean, stack._m2, stack._m2_bf16, stack.wsum, stack.count]  # noqa: SLF001
        if stack._top is not None:  # noqa: SLF001
            arrays += [stack._top[0].base, *stack._top_idx]  # noqa: SLF001
        return sum(a.nbytes for a in arrays if a is not None)

    assert held() == stack_bytes(shape, settings)
    rng = np.random.default_rng(0)
    for _ in range(3 * settings.warmup):
        stack.add(rng.normal(100, 5, shape).astype(np.float32))
    assert stack._top is None and held() <= stack_bytes(shape, settings)  # noqa: SLF001
