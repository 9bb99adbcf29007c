"""Final re-stack over the spool: winsorized sigma clipping in row bands, against ground truth."""

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest

from daemon.pipeline.restack import RestackSettings, restack
from daemon.simulate import render_trail
from daemon.spool import Spool
from tests.test_stack import SHAPE, TRAIL, frames, stack_of


def spooled(tmp_path, images, weights=None):
    spool = Spool(tmp_path)
    for i, im in enumerate(images):
        spool.append(im, weight=1.0 if weights is None else weights[i], path=f"f{i}.fits", exposure_s=10.0)
    return Spool(tmp_path)  # reopened from its index, as after a restart


@pytest.mark.parametrize("trail_frame", [0, 6])
def test_trail_keeps_under_one_percent_after_final_restack(tmp_path, trail_frame):
    clean = restack(*spooled(tmp_path / "c", frames(10)).restack_inputs()).image
    dirty_frames = frames(10, trail_at={trail_frame})
    dirty = restack(*spooled(tmp_path / "d", dirty_frames).restack_inputs()).image
    trail = render_trail(SHAPE, TRAIL)
    mask = trail > 1.0
    unrejected = trail[mask].sum() / 10
    kept = (dirty - clean)[mask].sum()
    assert abs(kept) < 0.01 * unrejected, kept / unrejected
    # at least as good as the live stack, on the trail and on the background noise
    live = stack_of(dirty_frames).image() - stack_of(frames(10)).image()
    assert abs(kept) <= abs(live[mask].sum()) + 0.002 * unrejected
    sky = np.s_[70:, 100:]  # a star-poor corner
    assert np.std(clean[sky]) <= 1.02 * np.std(stack_of(frames(10)).image()[sky])


def test_noise_and_band_size_do_not_change_the_answer():
    rng = np.random.default_rng(4)
    imgs = [rng.normal(100.0, 10.0, (60, 50, 3)).astype(np.float32) for _ in range(16)]
    imgs[3][10:20] = np.nan  # no data there in frame 3
    big = restack(imgs)
    tiny = restack(imgs, settings=RestackSettings(band_bytes=1))  # one row per band
    np.testing.assert_array_equal(big.image, tiny.image)
    assert np.std(big.image) == pytest.approx(10 / 4, rel=0.05)
    assert big.rejected_high + big.rejected_low < 0.02 * 16 * 60 * 50 * 3


@pytest.mark.parametrize("n, bayer", [(3, None), (4, None), (8, None), (3, "RGGB"), (8, "RGGB")])
def test_few_frames_are_not_noisier_than_the_live_stack(n, bayer):
    """The clipping is chosen by the number of samples: below 5 none (a plain weighted mean,
    as the live stack is then), above it winsorized clipping with an unbiased sigma. With 3
    frames the old clipping (from 3 samples) was 10 % noisier than the live stack. Colour
    frames are re-stacked from their spooled mosaics, as the daemon keeps them."""
    from tests.test_live import _star_free_mask, make_frame, run

    pipe, results = run([make_frame(i, bayer=bayer) for i in range(n)])
    sky = _star_free_mask()
    live = np.nanstd(pipe.stack_image()[sky], axis=0)
    registered, weights = [r.registered for r in results], [r.weight for r in results]
    final = np.nanstd(restack(registered, weights).image[sky], axis=0)
    assert np.all(final <= (1.0 if n < 5 else 1.025) * live + 1e-6), (final, live)
    if n == 3:  # control: the measure sees what clipping 3 samples costs
        tight = RestackSettings(min_frames=3, kappa_low=1.5, kappa_high=1.5)
        clipped = np.nanstd(restack(registered, weights, settings=tight).image[sky], axis=0)
        assert np.all(clipped > 1.02 * final), (clipped, final)


def test_weights_are_applied_when_nothing_is_clipped():
    a = np.full((4, 4), 10.0, np.float32)
    b = np.full((4, 4), 20.0, np.float32)
    r = restack([a, b], [3.0, 1.0])
    np.testing.assert_allclose(r.image, 12.5)


def test_spool_scales_big_values_and_survives_reopen(tmp_path):
    img = np.linspace(-50, 90000, 400, dtype=np.float32).reshape(20, 20)
    img[0, 0] = np.nan
    sp = Spool(tmp_path)
    sp.append(img, weight=0.5, path="/x/a.fits", date_obs="2026-11-24T21:00:00")
    sp2 = Spool(tmp_path)
    assert len(sp2) == 1 and "/x/a.fits" in sp2
    frames_, weights, scales = sp2.restack_inputs()
    back = frames_[0].astype(np.float32) * scales[0]
    assert np.isnan(back[0, 0]) and weights == [0.5]
    np.testing.assert_allclose(back[1:], img[1:], rtol=2e-3, atol=0.05)
    (tmp_path / sp2.entries[0]["file"]).unlink()  # a lost frame file is dropped from the index
    assert len(Spool(tmp_path)) == 0
    sp2.clear()
    assert not list(tmp_path.glob("frame_*"))


def test_spool_file_is_exactly_the_float16_array(tmp_path):
    """Band-wise conversion and writing: the stored .npy is np.save of astype(float16) (NaN,
    tiny, negative values, colour, a non-contiguous input), with the power-of-two scale applied."""
    rng = np.random.default_rng(3)
    img = rng.normal(300.0, 10.0, (700, 900, 3)).astype(np.float32)
    img[0, :3] = np.nan
    img[1, :4, 0] = [1e-7, -3e-5, 0.0, -250.0]
    spool = Spool(tmp_path / "s")
    e = spool.append(img, weight=1.0, path="a")
    np.save(tmp_path / "ref.npy", img.astype(np.float16))
    assert (tmp_path / "s" / e["file"]).read_bytes() == (tmp_path / "ref.npy").read_bytes()
    big = (img[:, ::2] * 1000.0).astype(np.float32)  # beyond float16: scaled by 1/2**k
    e = spool.append(big, weight=1.0, path="b")
    assert e["scale"] > 1.0
    stored = spool.open(e)
    np.testing.assert_array_equal(stored, (big / np.float32(e["scale"])).astype(np.float16))


def test_spool_writer_thread_runs_below_the_stacking_threads_priority():
    """The spool is background work: its thread must not compete with the live stack."""
    import threading

    from daemon.spool import WRITER_NICE, writer_thread

    base = os.getpriority(os.PRIO_PROCESS, 0)
    with writer_thread() as pool:
        nice = pool.submit(lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id())).result()
    assert nice == min(19, base + WRITER_NICE)
    assert os.getpriority(os.PRIO_PROCESS, 0) == base  # the caller's own priority is untouched


def test_spool_writer_encodes_each_frame_into_the_last_written_copy(tmp_path, monkeypatch):
    """One frame's float16 copy alive at a time: `SpoolWriter.encode` waits for the write in
    flight (slowed here) and encodes into its array, unless somebody still holds that frame's
    copy; every file is the frame it was given, whatever array it went through."""
    import time

    from daemon.spool import SpoolWriter

    append = Spool.append

    def slow_append(self, image, **kw):
        time.sleep(0.05)
        return append(self, image, **kw)

    monkeypatch.setattr(Spool, "append", slow_append)
    rng = np.random.default_rng(5)
    images = [rng.normal(300.0, 10.0, (60, 80)).astype(np.float32) for _ in range(4)]
    images[2][0, 0] = 70000.0  # a frame scaled down by 2: same array, another scale
    writer = SpoolWriter(tmp_path)
    arrays = []
    held = None
    for i, img in enumerate(images):
        enc = writer.encode(img)
        assert len(Spool(writer.folder("s"))) == i  # the write in flight was done first
        arrays.append(enc.data.__array_interface__["data"][0])
        writer.submit("s", f"f{i}.fits", enc, weight=1.0)
        if i == 2:
            held = enc  # the caller keeps this one: the next frame must not overwrite it
        del enc
    writer.drain()
    assert arrays[1] == arrays[0] and arrays[2] == arrays[1]  # written, so reused
    assert arrays[3] != arrays[2]  # held: a new array, the held copy intact
    np.testing.assert_array_equal(held.data, (images[2] / np.float32(2.0)).astype(np.float16))
    spool = writer.open("s")
    writer.shutdown()
    assert [e["path"] for e in spool.entries] == [f"f{i}.fits" for i in range(4)]
    for img, entry in zip(images, spool.entries, strict=True):
        np.testing.assert_array_equal(spool.open(entry), (img / np.float32(entry["scale"])).astype(np.float16))


def _cached_fraction(path) -> float:
    """Fraction of a file's pages in the page cache (mincore on a read-only mapping)."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    size = os.path.getsize(path)
    pages = -(-size // mmap.PAGESIZE)
    with open(path, "rb") as fh:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fh.fileno(), 0)
        try:
            vec = (ctypes.c_ubyte * pages)()
            assert libc.mincore(ctypes.c_void_p(addr), size, vec) == 0, ctypes.get_errno()
            return sum(v & 1 for v in vec) / pages
        finally:
            libc.munmap(ctypes.c_void_p(addr), size)


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="Linux page cache advice")
def test_spooled_frames_leave_the_page_cache_once_on_disk(tmp_path):
    """A spooled frame is fsync'ed, then dropped from the page cache (read again only by the
    final re-stack); a file written the plain way stays cached (the control)."""
    if Path("/var/tmp").is_dir() and os.access("/var/tmp", os.W_OK):  # on disk where /tmp is tmpfs
        with tempfile.TemporaryDirectory(dir="/var/tmp", prefix="lb-pagecache-") as d:
            _check_spool_leaves_page_cache(Path(d))
    else:
        _check_spool_leaves_page_cache(tmp_path)


def _check_spool_leaves_page_cache(tmp_path: Path) -> None:
    img = np.random.default_rng(5).normal(300.0, 10.0, (1024, 1280)).astype(np.float32)
    entry = Spool(tmp_path / "s").append(img, weight=1.0, path="a")
    plain = tmp_path / "plain.bin"
    with open(plain, "wb") as fh:
        fh.write(img.astype(np.float16).tobytes())
        fh.flush()
        os.fsync(fh.fileno())
    assert _cached_fraction(plain) > 0.9
    # A file system whose pages ARE the files (tmpfs: /tmp in a container, or by default on
    # newer distributions) cannot drop them: there the advice has nothing to show.
    dropped = tmp_path / "dropped.bin"
    dropped.write_bytes(plain.read_bytes())
    with open(dropped, "rb") as fh:
        os.fsync(fh.fileno())
        os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    if _cached_fraction(dropped) > 0.5:
        pytest.skip(f"{tmp_path} is on a file system that keeps its pages in memory (tmpfs?)")
    assert _cached_fraction(tmp_path / "s" / entry["file"]) < 0.1
