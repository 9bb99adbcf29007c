"""Checkpoints at full resolution (issue 19): a stack's statistics go to a snapshot written at
most every snapshot_every_s; checkpoints in between are small, and on resume the frames since
the snapshot are replayed from the spool: the same stack to float16 rounding of the spool."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from daemon import checkpoint
from daemon.pipeline.live import LivePipeline, LiveSettings
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
        # The checkpoint after the snapshot holds no statistics: a few kB, not the stack.
        assert sizes[1] < 0.01 * snapshots[0].stat().st_size
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
    checkpoint.save(tmp_path, {"p": other.state()}, snapshot_every_s=0)  # due: rewritten
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
        checkpoint.save(tmp_path, {"p": pipe.state()}, snapshot_every_s=0)  # a new snapshot is due
    monkeypatch.undo()
    back = checkpoint.load(tmp_path)["p"]
    assert back["stack.n_frames"] == back["n_stacked"] == 4 and back[checkpoint.REPLAY_KEY] == []
    # The snapshot of the failed save is gone again (a full disk gets its space back).
    (old,) = tmp_path.glob("stack-*.npz")
    old_bytes = old.read_bytes()
    # The next save succeeds; the old snapshot goes once the new checkpoint names the new one.
    checkpoint.save(tmp_path, {"p": pipe.state()}, snapshot_every_s=0)
    (snap,) = tmp_path.glob("stack-*.npz")
    back = checkpoint.load(tmp_path)["p"]
    assert back["stack.n_frames"] == 7 and back[checkpoint.REPLAY_KEY] == []
    # A snapshot that does not hold what the checkpoint says is refused, not resumed from.
    snap.write_bytes(old_bytes)
    with pytest.raises(ValueError, match="does not hold the 7 frames"):
        checkpoint.load(tmp_path)
