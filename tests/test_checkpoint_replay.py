"""Checkpoints at full resolution (issue 19): a stack's statistics go to a snapshot written at
most every snapshot_every_s; checkpoints in between are small, and on resume the frames since
the snapshot are replayed from the spool: the same stack to float16 rounding of the spool."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from daemon import checkpoint
from daemon.pipeline.live import LivePipeline
from daemon.pipeline.live_settings import LiveSettings
from daemon.spool import Spool, replay_stack
from tests.test_live import TRAIL, make_frame


def _session(tmp_path, bayer):
    frames = [make_frame(i, bayer=bayer, trails=[TRAIL] if i == 6 else []) for i in range(9)]
    spool = Spool(tmp_path / "spool" / "s")
    pipe = LivePipeline(LiveSettings(warmup=4))
    state_dir = tmp_path / "state"
    sizes = []
    for i, f in enumerate(frames):
        r = pipe.process(f)
        assert r.accepted
        spool.append(r.registered, weight=r.weight, path=r.path)
        if i in (3, 8):
            path = checkpoint.save(state_dir, {"stacks": {"s": {"pipeline": pipe.state()}}}, snapshot_every_s=3600)
            sizes.append(path.stat().st_size)
    return pipe, state_dir, sizes


def test_resume_replays_the_frames_since_the_snapshot(tmp_path):
    for bayer in ("RGGB", None):
        pipe, state_dir, sizes = _session(tmp_path / (bayer or "mono"), bayer)
        snapshots = list(state_dir.glob("stack-*.npz"))
        assert len(snapshots) == 1
        # The checkpoint after the snapshot holds no statistics: a few kB (the ledger and each
        # frame's provenance, its transform included), not the stack (1.4 MB at this size).
        assert sizes[1] < 0.02 * snapshots[0].stat().st_size
        state = checkpoint.load(state_dir)
        pst = state["stacks"]["s"]["pipeline"]
        assert pst[checkpoint.REPLAY_KEY] == [f"/sim/light_{i:03d}.fits" for i in range(4, 9)]
        resumed = LivePipeline.from_state(pst, LiveSettings(warmup=4))
        spool_dir = tmp_path / (bayer or "mono") / "spool" / "s"
        done, missing = replay_stack(resumed, pst[checkpoint.REPLAY_KEY], spool_dir)
        assert (done, missing) == (5, [])
        a, b = resumed.stack_image(), pipe.stack_image()
        assert resumed.n_stacked == pipe.n_stacked == 9
        np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
        diff = np.abs(np.nan_to_num(a - b))
        # float16 spool: ~0.05 % of a value; the trail of frame 6 rejected in both
        assert np.percentile(diff, 99.9) < 1.0 and np.median(diff) < 0.05, np.percentile(diff, [50, 99.9, 100])
        rejected = [p.state()["stack.rejected_pixels"] for p in (resumed, pipe)]
        assert abs(rejected[0] - rejected[1]) < 0.02 * rejected[1]


def test_snapshot_is_rewritten_for_another_stack_and_when_due(tmp_path):
    pipe = LivePipeline(LiveSettings(warmup=4))
    for i in range(3):
        pipe.process(make_frame(i))
    checkpoint.save(tmp_path, {"p": pipe.state()}, snapshot_every_s=3600)
    other = LivePipeline(LiveSettings(warmup=4))
    for i in (5, 6, 7, 8):
        other.process(make_frame(i))
    checkpoint.save(tmp_path, {"p": other.state()}, snapshot_every_s=3600)  # not the same frames
    back = checkpoint.load(tmp_path)["p"]
    assert back[checkpoint.REPLAY_KEY] == [] and back["stack.n_frames"] == 4
    checkpoint.save(tmp_path, {"p": other.state()}, snapshot_every_s=0, snapshot_every_frames=0)  # due: rewritten
    assert checkpoint.load(tmp_path)["p"][checkpoint.REPLAY_KEY] == []


def test_state_disk_use_counts_every_file_below_the_state_folder(tmp_path):
    from daemon.spool import folder_bytes

    (tmp_path / "spool" / "a").mkdir(parents=True)
    (tmp_path / "spool" / "a" / "frame_000001.npy").write_bytes(b"x" * 1000)
    (tmp_path / "checkpoint.npz").write_bytes(b"y" * 234)
    (tmp_path / "link").symlink_to(tmp_path / "checkpoint.npz")  # not counted twice
    assert folder_bytes(tmp_path) == 1234
    assert folder_bytes(tmp_path / "missing") == 0


def test_crash_between_a_new_snapshot_and_its_checkpoint_keeps_the_old_pair(tmp_path, monkeypatch):
    """A new snapshot is written before the checkpoint that names it. A crash (or a full disk)
    between the two must leave the old checkpoint with the snapshot it names, holding exactly
    its frames: were the snapshot rewritten in place, the old checkpoint would resume a stack
    of 7 frames and replay frames 4..6 into it a second time."""
    pipe = LivePipeline(LiveSettings(warmup=4))
    for i in range(4):
        pipe.process(make_frame(i))
    checkpoint.save(tmp_path, {"p": pipe.state()}, snapshot_every_s=3600)
    for i in range(4, 7):
        pipe.process(make_frame(i))
    real_replace = checkpoint.os.replace

    def crash_on_checkpoint(src, dst):
        if Path(dst).name == checkpoint.FILENAME:
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", crash_on_checkpoint)
    with pytest.raises(OSError):
        checkpoint.save(tmp_path, {"p": pipe.state()}, snapshot_every_s=0, snapshot_every_frames=0)  # due
    monkeypatch.undo()
    back = checkpoint.load(tmp_path)["p"]
    assert back["stack.n_frames"] == back["n_stacked"] == 4 and back[checkpoint.REPLAY_KEY] == []
    # The snapshot of the failed save is gone again (a full disk gets its space back).
    (old,) = tmp_path.glob("stack-*.npz")
    old_bytes = old.read_bytes()
    # The next save succeeds; the old snapshot goes once the new checkpoint names the new one.
    checkpoint.save(tmp_path, {"p": pipe.state()}, snapshot_every_s=0, snapshot_every_frames=0)
    (snap,) = tmp_path.glob("stack-*.npz")
    back = checkpoint.load(tmp_path)["p"]
    assert back["stack.n_frames"] == 7 and back[checkpoint.REPLAY_KEY] == []
    # A snapshot that does not hold what the checkpoint says is refused, not resumed from.
    snap.write_bytes(old_bytes)
    with pytest.raises(ValueError, match="does not hold the 7 frames"):
        checkpoint.load(tmp_path)


def _pipe_state(n: int, shape=(64, 64, 3)) -> dict:
    """A pipeline state as LivePipeline.state() shapes it: n frames, statistics arrays."""
    rng = np.random.default_rng(n)
    return {"n_stacked": n, "provenance": [{"path": f"/f/{i}"} for i in range(n)],
            "stack.n_frames": n, "stack.mean": rng.random(shape, dtype=np.float32),
            "stack.m2": rng.random(shape, dtype=np.float32), "stack.count": np.full(shape[:2], n, np.uint16)}


def _age(folder, seconds: float) -> None:
    for p in folder.glob("stack-*.npz"):
        t = p.stat().st_mtime - seconds
        os.utime(p, (t, t))


def test_a_due_snapshot_waits_for_the_gaps_between_frames(tmp_path, monkeypatch):
    """With frames waiting, a due snapshot is put off (or abandoned between slices) while the
    newest one is at most DEFER_FACTOR intervals old: the checkpoint names the older one and
    the frames since are replayed. Older than that, or with none at all, it is written."""
    every = 100.0

    def save(n: int, frames_waiting) -> None:
        checkpoint.save(tmp_path, {"p": _pipe_state(n)}, snapshot_every_s=every, snapshot_every_frames=0,
                        frames_waiting=frames_waiting)

    save(3, lambda: True)
    assert checkpoint.load(tmp_path)["p"]["stack.n_frames"] == 3  # none yet: written though frames wait
    _age(tmp_path, 1.5 * every)  # due, within DEFER_FACTOR intervals
    save(5, lambda: True)
    back = checkpoint.load(tmp_path)["p"]
    assert back["stack.n_frames"] == 3 and back[checkpoint.REPLAY_KEY] == ["/f/3", "/f/4"]
    assert back["n_stacked"] == 5
    # A frame arriving while the snapshot is being written: given up between slices, no temp left.
    monkeypatch.setattr(checkpoint, "_SLICE_BYTES", 4096)
    asked = []

    def arrives_during_the_write() -> bool:
        asked.append(1)
        return len(asked) > 3

    save(6, arrives_during_the_write)
    assert len(asked) > 3  # asked between slices, not only before
    back = checkpoint.load(tmp_path)["p"]
    assert back["stack.n_frames"] == 3 and len(back[checkpoint.REPLAY_KEY]) == 3
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".npz", ".npz"]  # checkpoint + one snapshot
    # Idle: the due snapshot is written.
    save(6, lambda: False)
    back = checkpoint.load(tmp_path)["p"]
    assert back["stack.n_frames"] == 6 and back[checkpoint.REPLAY_KEY] == []
    np.testing.assert_array_equal(back["stack.mean"], _pipe_state(6)["stack.mean"])
    # Put off too long (older than DEFER_FACTOR intervals): written whatever waits.
    _age(tmp_path, (checkpoint.DEFER_FACTOR + 0.5) * every)
    save(8, lambda: True)
    assert checkpoint.load(tmp_path)["p"]["stack.n_frames"] == 8


def test_snapshot_is_streamed_without_a_copy_of_the_statistics(tmp_path):
    """At full resolution the statistics are most of the process's memory: writing them must
    not allocate a copy (the old writer held each array's bytes once more in a buffer), and
    reading them back allocates the arrays once."""
    import tracemalloc

    state = {"p": _pipe_state(2, shape=(1000, 1000, 3))}  # 12 MB per array
    tracemalloc.start()
    try:
        checkpoint.save(tmp_path, state, snapshot_every_s=0, snapshot_every_frames=0)
        _, peak_save = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        back = checkpoint.load(tmp_path)["p"]
        current, peak_load = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak_save < 2e6, peak_save
    arrays = sum(v.nbytes for k, v in back.items() if k.startswith("stack.") and isinstance(v, np.ndarray))
    assert arrays > 24e6 and peak_load < arrays + 2e6, (peak_load, arrays)
    np.testing.assert_array_equal(back["stack.m2"], state["p"]["stack.m2"])


def test_with_long_exposures_a_snapshot_waits_for_enough_frames(tmp_path):
    """A snapshot is due only when it is both old enough and enough frames behind: with long
    exposures half an hour is a few frames, and a snapshot per few frames would cost each
    frame far more bytes than the frame itself."""
    def save(n: int) -> dict:
        checkpoint.save(tmp_path, {"p": _pipe_state(n)}, snapshot_every_s=0, snapshot_every_frames=3)
        return checkpoint.load(tmp_path)["p"]

    assert save(2)["stack.n_frames"] == 2  # the first one
    back = save(4)
    assert back["stack.n_frames"] == 2 and back[checkpoint.REPLAY_KEY] == ["/f/2", "/f/3"]  # 2 behind: not due
    assert save(5)["stack.n_frames"] == 5  # 3 behind: due
    assert len(list(tmp_path.glob("stack-*.npz"))) == 1
