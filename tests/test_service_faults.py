"""The faults found by probing the daemon (issue 13), each against the service in-process:
a status read while the worker creates stacks, hostile commands, stale checkpoint temp files,
a re-stack that lacks frames, counters that count files, a file that killed the process.

Fast fakes stand in for the pipeline where the point is the service's plumbing; the real
pipeline is used where the point is what ends up on disk.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from daemon import checkpoint
from daemon.config import config_from_dict
from daemon.ledger import QUARANTINED, InHand, Ledger, quarantine_left_over
from daemon.pipeline.frame import Frame, FrameMeta
from daemon.service import Service
from daemon.simulate import Exposure, expose, fits_header, random_star_field, transform_matrix
from daemon.spool import Spool


def make_config(tmp_path: Path, **state):
    (tmp_path / "capture").mkdir(exist_ok=True)
    return config_from_dict({"capture": {"dir": str(tmp_path / "capture")},
                             "state": {"dir": str(tmp_path / "state"), **state}}, "test.toml")


async def wait_for(predicate, timeout=30.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


# ----------------------------------------------------------------- fakes
@dataclass
class FakeResult:
    accepted: bool = True
    reason: str | None = None
    stars: int = 50
    fwhm_px: float = 2.5
    eccentricity: float = 0.3
    dx: float = 0.0
    dy: float = 0.0
    rotation_deg: float = 0.0
    background: float = 100.0
    weight: float = 1.0
    processing_ms: float = 0.1
    registered: np.ndarray | None = None


@dataclass
class FakePipeline:
    n_stacked: int = 0
    total_exposure_s: float = 0.0
    reference_path: str | None = None
    provenance_: list = field(default_factory=list)

    def process(self, frame, consume=False):
        time.sleep(0.001)  # the worker is busy while the loop reads the status
        self.n_stacked += 1
        self.total_exposure_s += frame.meta.exposure_s or 0.0
        return FakeResult(registered=np.zeros((4, 4), np.float32))

    def state(self):
        return {"n": self.n_stacked}

    def reset(self):
        self.n_stacked = 0


class FakeFactory:
    def new(self, masters):
        return FakePipeline()

    def restore(self, state, masters):
        return FakePipeline(n_stacked=state["n"])


def target_loader(path: Path) -> Frame:
    """Each file is its own target: every frame makes a new stack."""
    return Frame(np.zeros((4, 4), np.float32), FrameMeta(path=str(path), target=path.stem, exposure_s=1.0))


# ----------------------------------------------------------------- tests
def test_status_read_while_the_worker_creates_stacks_never_raises(tmp_path):
    """300 targets, a new stack each, while the loop builds the status as fast as it can: the
    loop reads only the worker's immutable snapshots, so no dict changes under it."""
    cfg = make_config(tmp_path, checkpoint_every_s=3600)
    n = 300
    for i in range(n):
        (cfg.capture.dir / f"t{i:03d}.fits").write_bytes(b"x")

    async def scenario():
        service = Service(cfg, factory=FakeFactory(), loader=target_loader)
        run = asyncio.create_task(service.run())
        reads = 0
        while service.snapshot.counts["stacked"] < n:
            status = service.status()  # raises if it iterates what the worker changes
            assert len(status["stacks"]) <= n
            reads += 1
            await asyncio.sleep(0)
            assert not run.done(), run
        await asyncio.wait_for(service.idle(), 30)
        assert len(service.status()["stacks"]) == n and reads > n
        service.request_stop()
        assert await asyncio.wait_for(run, 30) == 0

    asyncio.run(scenario())


def test_hostile_commands_are_refused_briefly_and_change_nothing(tmp_path, caplog):
    cfg = make_config(tmp_path)
    service = Service(cfg, factory=FakeFactory(), loader=target_loader)
    huge = "S" * 10_000_000

    async def ask(payload) -> dict:
        raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        return await service.handle_command(raw)

    async def scenario():
        caplog.set_level(logging.INFO, "lightbucket")
        replies = {
            "huge": await ask({"id": "h", "action": "reset", "stack": huge}),
            "long": await ask({"id": "l", "action": "reset", "stack": "S" * 5000}),
            "list": await ask({"id": "a", "action": ["reset", "stop"]}),
            "dict": await ask({"id": "d", "action": {"x": 1}}),
            "nested": await ask(b"[" * 30_000 + b"]" * 30_000),
            "bool": await ask({"id": 1, "action": "reset", "stack": True}),
            "plan": await ask({"id": "p", "action": "plan", "target": "M 1", "count": -1}),
        }
        return replies

    replies = asyncio.run(scenario())
    for name, reply in replies.items():
        assert reply["ok"] is False, name
        assert len(json.dumps(reply)) < 1500, (name, len(json.dumps(reply)))
        assert "Error:" not in reply["error"] or "TypeError" not in reply["error"], reply  # no bare exceptions
    assert "command too large" in replies["huge"]["error"]
    assert "5000 characters long" in replies["long"]["error"]
    assert replies["list"]["error"].startswith("unknown action ['reset', 'stop']")
    assert "nested too deeply" in replies["nested"]["error"]
    assert "[plan] count = -1: must be >= 0" in replies["plan"]["error"]
    # Log lines stay short too (the 10 MB name never reaches the log).
    assert max(len(r.getMessage()) for r in caplog.records) < 2000
    assert service.state == "starting" and not service.plans.running


def test_stale_checkpoint_temp_files_are_removed_at_start(tmp_path):
    cfg = make_config(tmp_path)
    state = Path(cfg.state.dir)
    state.mkdir(parents=True)
    for name in (".checkpoint-abc123.tmp", ".checkpoint-x.tmp"):
        (state / name).write_bytes(b"half a checkpoint")  # what kill -9 mid-write leaves
    (state / "keep.txt").write_text("not ours to remove")

    async def scenario():
        service = Service(cfg, factory=FakeFactory(), loader=target_loader)
        run = asyncio.create_task(service.run())
        await wait_for(lambda: service.state == "running", what="running")
        service.request_stop()
        assert await asyncio.wait_for(run, 30) == 0

    asyncio.run(scenario())
    assert sorted(p.name for p in state.iterdir() if p.name.startswith(".checkpoint")) == []
    assert (state / "keep.txt").exists() and (state / "checkpoint.npz").exists()


def test_counters_count_files_not_attempts(tmp_path):
    """A frame first seen half-written (an error), then complete (stacked): one file received,
    one stacked, no error."""
    cfg = make_config(tmp_path)
    field_ = random_star_field((128, 128), 100, seed=5, margin=0.1)
    stage = tmp_path / "stage"
    stage.mkdir()
    full = stage / "f.fits"
    fits.writeto(full, expose((128, 128), field_, Exposure(exposure_s=5.0, seed=1)),
                 fits.Header(fits_header(exposure_s=5.0, filter_name="L", target="C")))
    data = full.read_bytes()

    async def scenario():
        service = Service(cfg)
        run = asyncio.create_task(service.run())
        await wait_for(lambda: service.state == "running", what="running")
        part = stage / "half.fits"
        part.write_bytes(data[: len(data) // 2])
        shutil.move(part, cfg.capture.dir / "f.fits")  # renamed into place, truncated
        await wait_for(lambda: service.snapshot.counts["errors"] == 1, what="the truncated file's error")
        part.write_bytes(data)
        shutil.move(part, cfg.capture.dir / "f.fits")  # the complete file, same name
        await wait_for(lambda: service.snapshot.counts["stacked"] == 1, what="stacked")
        await asyncio.wait_for(service.idle(), 30)
        frames = service.status()["frames"]
        service.request_stop()
        assert await asyncio.wait_for(run, 30) == 0
        return frames

    assert asyncio.run(scenario()) == {"received": 1, "stacked": 1, "rejected": 0, "errors": 0}


def _real_frames(folder: Path, n: int) -> list[Path]:
    field_ = random_star_field((160, 160), 150, seed=3, margin=0.1)
    paths = []
    for i in range(n):
        exp = Exposure(exposure_s=10.0, matrix=transform_matrix(0.7 * i, -0.4 * i), seed=i)
        path = folder / f"L_{i}.fits"
        fits.writeto(path, expose((160, 160), field_, exp),
                     fits.Header(fits_header(exposure_s=10.0, filter_name="L", target="R")))
        paths.append(path)
    return paths


def test_restack_spools_lost_frames_again_and_names_those_it_cannot(tmp_path, monkeypatch, caplog):
    """A full disk while spooling L_1 and L_2: the live stack has all frames. At the re-stack
    (the disk has room again) L_2 is spooled again from its file, with the transform it was
    stacked with; L_1's file is gone, so the re-stack says it lacks L_1, in its reply and the
    log, instead of replying ok with fewer frames."""
    cfg = make_config(tmp_path)
    real_append = Spool.append
    disk = {"full": True}

    def full_disk(self, image, **kw):
        if disk["full"] and kw.get("path", "").endswith(("L_1.fits", "L_2.fits")):
            raise OSError(28, "No space left on device")
        return real_append(self, image, **kw)

    monkeypatch.setattr(Spool, "append", full_disk)
    frames = _real_frames(cfg.capture.dir, 4)

    async def scenario():
        service = Service(cfg)
        run = asyncio.create_task(service.run())
        await wait_for(lambda: service.snapshot.counts["stacked"] == 4, what="4 stacked")
        await asyncio.wait_for(service.idle(), 30)
        disk["full"] = False
        frames[1].unlink()
        reply = await service.handle_command(b'{"id": 1, "action": "restack"}')
        service.request_stop()
        assert await asyncio.wait_for(run, 30) == 0
        return reply

    caplog.set_level(logging.INFO, "lightbucket")
    reply = asyncio.run(scenario())
    assert reply["ok"] and reply["frames"] == 3 and reply["live_frames"] == 4 and reply["respooled"] == 1
    assert reply["missing"] == {"frames": 1, "first": ["L_1.fits"]}
    final = fits.getheader(reply["path"])
    assert final["NCOMBINE"] == 3
    messages = [r.getMessage() for r in caplog.records]
    assert any("L_2.fits spooled again" in m for m in messages)
    assert any("not in the spool" in m and "L_1.fits" in m for m in messages)


def test_a_frame_spooled_again_is_the_frame_spooled_first(tmp_path):
    """`respool` makes the spool copy from the recorded transform: the same pixels as when
    the frame was stacked (mono and colour, fused mosaic)."""
    from daemon.io.load import load_frame
    from daemon.pipeline.fused import RegisteredMosaic
    from daemon.pipeline.live import LivePipeline
    from daemon.simulate import Sensor

    for bayer in (None, "RGGB"):
        field_ = random_star_field((160, 160), 150, seed=3, margin=0.1)
        pipe = LivePipeline()
        for i in range(3):
            exp = Exposure(exposure_s=10.0, matrix=transform_matrix(0.7 * i, -0.4 * i, 0.3 * i), seed=i)
            path = tmp_path / f"{bayer}_{i}.fits"
            fits.writeto(path, expose((160, 160), field_, exp, Sensor(bayer=bayer)),
                         fits.Header(fits_header(exposure_s=10.0, filter_name="L", target="R", bayer=bayer)))
            result = pipe.process(load_frame(path))
            assert result.accepted
        again, weight = pipe.respool(load_frame(path))
        first = result.registered
        assert weight == result.weight
        if isinstance(first, RegisteredMosaic):
            assert isinstance(again, RegisteredMosaic) and np.array_equal(again.data, first.data)
            assert np.array_equal(again.matrix, first.matrix) and again.offset == first.offset
        else:
            assert np.array_equal(again, first, equal_nan=True)
    with pytest.raises(KeyError, match="not a frame of this stack"):
        pipe.respool(load_frame(tmp_path / "None_0.fits"))


def _start_with_marker(cfg, marker_left) -> list[tuple[str, dict]]:
    """A service started on a state folder where `marker_left(state)` left an in-hand marker,
    run until the capture folder's frames are answered; returns its frame events."""
    state = Path(cfg.state.dir)
    state.mkdir(parents=True)
    marker_left(state)
    events = []

    async def scenario():
        service = Service(cfg)
        service.subscribe(lambda kind, payload: events.append((kind, payload)))
        run = asyncio.create_task(service.run())
        await wait_for(lambda: service.snapshot.counts["stacked"] >= 1, what="a frame stacked")
        await asyncio.wait_for(service.idle(), 30)
        service.request_stop()
        assert await asyncio.wait_for(run, 30) == 0

    asyncio.run(scenario())
    assert not (state / InHand.NAME).exists()
    return [p for k, p in events if k == "frame"]


def test_file_in_hand_at_one_death_is_read_again(tmp_path):
    """kill -9, a power cut or the watchdog stop whatever file is in hand: after one such death
    the file is read again at start and stacked, no frame lost."""
    cfg = make_config(tmp_path)
    in_hand, after = _real_frames(cfg.capture.dir, 2)
    frames = _start_with_marker(cfg, lambda state: InHand(state).begin(in_hand))  # as the dead process left it
    assert sorted((Path(p["path"]).name, p.get("accepted")) for p in frames) == [("L_0.fits", True),
                                                                              ("L_1.fits", True)]
    ledger = checkpoint.load(Path(cfg.state.dir))["ledger"]["entries"]
    assert ledger["L_0.fits"]["outcome"] == ledger["L_1.fits"]["outcome"] == "stacked"


def test_file_in_hand_at_two_deaths_in_a_row_is_quarantined(tmp_path):
    """The process died decoding a file, read it once more at the next start and died with it
    in hand again: the start after records it as an error with the reason and one error event
    (no crash loop), and the frames after it are stacked. A new version of the file (copied
    again) is read again: the quarantine holds that one version only."""
    cfg = make_config(tmp_path)
    killer, after = _real_frames(cfg.capture.dir, 2)

    def died_twice(state: Path) -> None:
        first = InHand(state)
        first.begin(killer)  # the first process died with it in hand
        second = InHand(state)
        assert quarantine_left_over(Ledger(Path(cfg.capture.dir)), second) is None  # read once more
        second.begin(killer)  # and the second died with it in hand too

    frames = _start_with_marker(cfg, died_twice)
    assert [(Path(p["path"]).name, p.get("error", False)) for p in frames] == [("L_0.fits", True), ("L_1.fits", False)]
    assert frames[0]["reason"] == QUARANTINED
    ledger = Ledger.from_json(checkpoint.load(Path(cfg.state.dir))["ledger"], Path(cfg.capture.dir))
    assert ledger.entries["L_0.fits"].outcome == "error" and ledger.entries["L_1.fits"].outcome == "stacked"
    assert ledger.done(killer)
    killer.write_bytes(killer.read_bytes() + bytes(2880))  # a new version of the file
    assert not ledger.done(killer)
