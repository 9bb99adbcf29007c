"""The service in-process with the real loader and LivePipeline, a real mosquitto and a real
watchdog observer: watching, complete-file detection, the ledger, per-key stacks, commands,
MQTT catching up after a broker outage. (`lightbucket run` as a subprocess, kill -9 and
systemd notify are in tests/test_daemon_process.py.)
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil
import time
from pathlib import Path

import pytest
from astropy.io import fits

from daemon import checkpoint
from daemon.commands import CommandError, validate_command
from daemon.config import config_from_dict
from daemon.service import Service
from daemon.simulate import Exposure, expose, fits_header, random_star_field, transform_matrix
from tests.conftest import require_tools
from tests.mqtt_broker import Subscriber

SHAPE = (160, 160)


def make_frame(path: Path, i: int, *, filter_name="L", transmission=1.0, target="SIM FIELD") -> Path:
    """A small simulated light frame written with astropy (staged outside the watched folder);
    frame i is shifted by (0.7 i, -0.4 i) px; transmission < 1 is cloud."""
    field = random_star_field(SHAPE, 150, seed=3, margin=0.1)
    exp = Exposure(exposure_s=10.0, matrix=transform_matrix(i * 0.7, -i * 0.4), transmission=transmission, seed=i)
    data = expose(SHAPE, field, exp)
    hdr = fits.Header(fits_header(exposure_s=10.0, filter_name=filter_name, target=target))
    fits.writeto(path, data, hdr, overwrite=True)
    return path


def make_config(tmp_path: Path, port: int | None, rig: str, **state):
    raw = {"capture": {"dir": str(tmp_path / "capture")}, "state": {"dir": str(tmp_path / "state"), **state}}
    if port is not None:
        raw["mqtt"] = {"host": "127.0.0.1", "port": port, "rig": rig, "preview_interval_s": 0.5}
    (tmp_path / "capture").mkdir(exist_ok=True)
    return config_from_dict(raw, "test.toml")


async def wait_for(predicate, timeout=20.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def idle(service: Service) -> bool:
    """Nothing queued and nothing in the worker's hands: every file received is answered."""
    frames = service.status()["frames"]
    return frames["received"] == frames["stacked"] + frames["rejected"] + frames["errors"]


def events_by_name(sub: Subscriber) -> dict[str, dict]:
    return {Path(e["path"]).name: e for e in sub.json("frame")}


def test_watch_stack_publish_partial_corrupt_commands(broker, tmp_path):
    cfg = make_config(tmp_path, broker.port, "svc")
    stage = tmp_path / "stage"
    stage.mkdir()
    capture = cfg.capture.dir
    for i in range(3):
        make_frame(stage / f"L_{i}.fits", i)
    make_frame(stage / "R_0.fits", 10, filter_name="R")
    make_frame(stage / "cloudy.fits", 11, transmission=0.05)
    (stage / "corrupt.fits").write_bytes(b"SIMPLE  = this is not a FITS file" * 50)
    big = make_frame(stage / "slow.fits", 12).read_bytes()

    async def scenario():
        service = Service(cfg)
        run = asyncio.create_task(service.run())
        sub = await asyncio.to_thread(Subscriber, broker.port, "svc")
        await wait_for(lambda: service.mqtt and service.mqtt.connected.is_set(), what="mqtt")

        # Ignored names: temp/partial/hidden files never reach the queue; another kind of file
        # (notes.txt) is answered: an error event naming its kind.
        for name in ("x.fits.tmp", "x.fits.part", ".x.fits", "~x.fits", "x.fits.crdownload"):
            shutil.copy(stage / "L_0.fits", capture / name)
        (capture / "notes.txt").write_text("seeing 2/5, dew at 23:10\n")

        for name in ("L_0.fits", "L_1.fits", "R_0.fits", "cloudy.fits", "corrupt.fits"):
            shutil.copy(stage / name, capture / name)
        await wait_for(lambda: len(sub.json("frame")) >= 6, what="6 frame events")

        # A file still being written (writer pauses 1.5 s mid-file) is not picked early.
        with open(capture / "slow.fits", "wb") as fh:
            fh.write(big[: len(big) // 2])
            fh.flush()
            await asyncio.sleep(1.5)
            assert "slow.fits" not in events_by_name(sub)
            assert "slow.fits" not in service.snapshot.files
            fh.write(big[len(big) // 2:])
        await wait_for(lambda: "slow.fits" in events_by_name(sub), what="slow.fits event")

        ev = events_by_name(sub)
        assert set(ev) == {"L_0.fits", "L_1.fits", "R_0.fits", "cloudy.fits", "corrupt.fits", "slow.fits",
                           "notes.txt"}
        assert ev["notes.txt"]["error"] is True and "unsupported file type (.txt)" in ev["notes.txt"]["reason"]
        assert ev["slow.fits"]["accepted"] is True
        assert ev["corrupt.fits"]["accepted"] is False and ev["corrupt.fits"]["error"] is True
        assert "corrupt.fits" in ev["corrupt.fits"]["reason"] or "FITS" in ev["corrupt.fits"]["reason"]
        assert ev["cloudy.fits"]["accepted"] is False and ev["cloudy.fits"]["reason"].startswith("clouds")
        assert ev["L_1.fits"]["dx"] == pytest.approx(-0.7, abs=0.1)
        assert ev["L_1.fits"]["dy"] == pytest.approx(0.4, abs=0.1)
        assert ev["L_0.fits"]["stack"] == "SIM-FIELD_L_10s_bin1" and ev["R_0.fits"]["stack"] == "SIM-FIELD_R_10s_bin1"
        # Separate stacks per filter; the R frame never entered the L stack.
        assert service.snapshot.stacks["SIM-FIELD_L_10s_bin1"].frames == 3
        assert service.snapshot.stacks["SIM-FIELD_R_10s_bin1"].frames == 1

        await wait_for(lambda: sub.json("status") and sub.json("status")[-1]["frames"]["stacked"] == 4
                       and sub.json("status")[-1]["queue"] == 0, what="status")
        status = sub.json("status")[-1]
        assert status["frames"] == {"received": 7, "stacked": 4, "rejected": 1, "errors": 2}
        assert status["state"] == "running" and status["disk_free_bytes"] > 0 and isinstance(status["state_bytes"], int)

        # Malformed commands: error replies with the id, and nothing changes.
        before = json.dumps(service.status()["frames"]), service.state
        bad = [b"{not json", b'{"action": "pause"}', b'{"id": 7, "action": "explode"}',
               b'{"id": 8, "action": "pause", "force": true}', b'{"id": 9, "action": "set_reference"}',
               b'{"id": 10, "action": "reset", "stack": "nope"}', b"[1, 2]",
               b'{"id": 11, "action": "set_reference", "path": "../stage/L_0.fits"}']  # outside capture
        for raw in bad:
            sub.send("cmd", raw)
        await wait_for(lambda: len(sub.json("cmd/result")) >= len(bad), what="command replies")
        results = sub.json("cmd/result")
        assert all(r["ok"] is False and r["error"] for r in results)
        assert {r["id"] for r in results} == {None, 7, 8, 9, 10, 11}
        assert "not under the capture folder" in next(r for r in results if r["id"] == 11)["error"]
        assert "unknown action 'explode'" in next(r for r in results if r["id"] == 7)["error"]
        assert "'force'" in next(r for r in results if r["id"] == 8)["error"]
        assert (json.dumps(service.status()["frames"]), service.state) == before

        # pause: a new frame waits in the queue (published); resume: it is stacked.
        sub.send("cmd", json.dumps({"id": "p", "action": "pause"}))
        await wait_for(lambda: service.state == "paused", what="paused")
        shutil.copy(stage / "L_2.fits", capture / "L_2.fits")
        await wait_for(lambda: sub.json("status")[-1]["queue"] == 1, what="queue 1 published")
        await asyncio.sleep(0.3)
        assert "L_2.fits" not in events_by_name(sub)
        sub.send("cmd", json.dumps({"id": "r", "action": "resume"}))
        await wait_for(lambda: "L_2.fits" in events_by_name(sub), what="L_2 after resume")
        assert service.snapshot.stacks["SIM-FIELD_L_10s_bin1"].frames == 4

        sub.send("cmd", json.dumps({"id": "ref", "action": "set_reference", "path": "L_1.fits"}))
        sub.send("cmd", json.dumps({"id": "z", "action": "reset", "stack": "SIM-FIELD_R_10s_bin1"}))
        await wait_for(lambda: {r["id"] for r in sub.json("cmd/result")} >= {"p", "r", "ref", "z"}, what="replies")
        ok = {r["id"]: r for r in sub.json("cmd/result")}
        assert ok["ref"]["ok"] and ok["ref"]["stack"] == "SIM-FIELD_L_10s_bin1"
        assert ok["ref"]["requeued"] == 5  # 4 stacked + cloudy
        assert service.snapshot.stacks["SIM-FIELD_L_10s_bin1"].reference.endswith("L_1.fits")
        # The L frames are stacked again against the new reference: L_0 now sits at +0.7, -0.4.
        await wait_for(lambda: sum(Path(e["path"]).name == "L_0.fits" for e in sub.json("frame")) == 2,
                       what="L re-stacked")
        await asyncio.wait_for(service.idle(), 20)
        redo = [e for e in sub.json("frame") if Path(e["path"]).name == "L_0.fits"][-1]
        assert redo["dx"] == pytest.approx(0.7, abs=0.1) and redo["dy"] == pytest.approx(-0.4, abs=0.1)
        assert ok["z"]["ok"] and service.snapshot.stacks["SIM-FIELD_R_10s_bin1"].frames == 0
        # Destructive commands say what they removed: R had one frame, spooled; L four.
        assert ok["z"]["removed"]["frames"] == 1 and ok["z"]["removed"]["spooled_frames"] == 1
        assert ok["ref"]["removed"]["frames"] == 4 and ok["ref"]["removed"]["spooled_frames"] == 4

        # Final re-stack from the spool (the 4 L frames registered against L_1), then stop/start.
        sub.send("cmd", json.dumps({"id": "final", "action": "restack"}))
        sub.send("cmd", json.dumps({"id": "stop", "action": "stop"}))
        await wait_for(lambda: {"final", "stop"} <= {r["id"] for r in sub.json("cmd/result")}, what="restack")
        res = {r["id"]: r for r in sub.json("cmd/result")}
        assert res["final"]["ok"], res["final"]
        final = fits.getheader(res["final"]["path"])
        assert final["NCOMBINE"] == 4 and final["STACKMTH"] == "winsorized sigma clipping"
        assert res["stop"]["ok"] and service.state == "stopped"
        await wait_for(lambda: sub.json("status")[-1]["state"] == "stopped", what="stopped published")
        sub.send("cmd", json.dumps({"id": "go", "action": "resume"}))  # refused: use start
        sub.send("cmd", json.dumps({"id": "go2", "action": "start"}))
        await wait_for(lambda: {"go", "go2"} <= {r["id"] for r in sub.json("cmd/result")}, what="start")
        res = {r["id"]: r for r in sub.json("cmd/result")}
        assert not res["go"]["ok"] and "use start" in res["go"]["error"] and res["go2"]["ok"]
        assert service.state == "running"

        service.request_stop()
        assert await asyncio.wait_for(run, 20) == 0
        sub.close()

    asyncio.run(scenario())
    # Checkpoint on disk agrees with what was published: each file once.
    state = checkpoint.load(cfg.state.dir)
    ledger = state["ledger"]["entries"]
    assert {k: v["outcome"] for k, v in ledger.items()} == {
        "L_0.fits": "stacked", "L_1.fits": "stacked", "L_2.fits": "stacked", "R_0.fits": "stacked",
        "slow.fits": "stacked", "cloudy.fits": "rejected", "corrupt.fits": "error", "notes.txt": "error"}
    lstack = state["stacks"]["SIM-FIELD_L_10s_bin1"]["pipeline"]
    stacked = sorted(Path(p["path"]).name for p in lstack["provenance"])
    assert stacked == ["L_0.fits", "L_1.fits", "L_2.fits", "slow.fits"]
    assert fits.getheader(cfg.output_dir / "SIM-FIELD_L_10s_bin1.fits")["NCOMBINE"] == 4


def test_broker_down_then_up_no_frame_lost_status_catches_up(broker, tmp_path):
    cfg = make_config(tmp_path, broker.port, "down")
    stage = tmp_path / "stage"
    stage.mkdir()
    for i in range(4):
        make_frame(stage / f"f{i}.fits", i)

    async def scenario():
        service = Service(cfg)
        run = asyncio.create_task(service.run())
        await wait_for(lambda: service.mqtt and service.mqtt.connected.is_set(), what="mqtt")
        broker.stop()
        await wait_for(lambda: not service.mqtt.connected.is_set(), what="disconnect")
        for i in range(4):
            shutil.copy(stage / f"f{i}.fits", cfg.capture.dir / f"f{i}.fits")
        # Stacking goes on while the broker is away.
        def frame_events_queued() -> int:
            return sum(topic.endswith("/frame") for topic, _ in service.mqtt.queued())

        await wait_for(lambda: service.snapshot.counts["stacked"] == 4 and frame_events_queued() == 4,
                       what="4 stacked and their events queued with the broker down")
        await asyncio.sleep(1.0)
        broker.start()
        sub = await asyncio.to_thread(Subscriber, broker.port, "down")
        await wait_for(lambda: len(sub.json("frame")) == 4, what="4 buffered frame events")
        await wait_for(lambda: sub.json("status") and sub.json("status")[-1]["frames"]["stacked"] == 4,
                       what="status caught up")
        assert sorted(Path(e["path"]).name for e in sub.json("frame")) == [f"f{i}.fits" for i in range(4)]
        # Previews are a latest-value slot: one preview (of all 4 frames) catches up, not 4.
        await wait_for(lambda: sub.json("preview/meta"), what="preview")
        await asyncio.sleep(0.3)
        assert [m["frames"] for m in sub.json("preview/meta")] == [4] and len(sub.raw("preview")) == 1
        assert sub.raw("availability")[-1] == b"online"
        service.request_stop()
        assert await asyncio.wait_for(run, 20) == 0
        sub.close()

    asyncio.run(scenario())


def test_backlog_and_restart_without_mqtt_never_stacks_twice(tmp_path):
    cfg = make_config(tmp_path, None, "x")
    for i in range(3):
        make_frame(cfg.capture.dir / f"a{i}.fits", i)

    async def session(expect: int):
        service = Service(cfg)
        run = asyncio.create_task(service.run())
        await wait_for(lambda: service.snapshot.counts["stacked"] == expect, what=f"{expect}")
        await asyncio.wait_for(service.idle(), 20)
        service.request_stop()
        assert await asyncio.wait_for(run, 20) == 0
        return service

    asyncio.run(session(3))  # the backlog at start
    make_frame(cfg.capture.dir / "a3.fits", 3)  # arrives while the daemon is down
    svc = asyncio.run(session(4))
    assert svc.snapshot.stacks["SIM-FIELD_L_10s_bin1"].frames == 4
    pipe = checkpoint.load(cfg.state.dir)["stacks"]["SIM-FIELD_L_10s_bin1"]["pipeline"]
    assert sorted(Path(p["path"]).name for p in pipe["provenance"]) == ["a0.fits", "a1.fits", "a2.fits", "a3.fits"]


def test_periodic_checkpoint_saves_when_frames_stop_coming(tmp_path):
    """Also runs the watcher in polling mode (capture.poll, network mounts)."""
    cfg = make_config(tmp_path, None, "x", checkpoint_every_s=1.0)
    cfg = dataclasses.replace(cfg, capture=dataclasses.replace(cfg.capture, poll=True, settle_s=0.3))

    async def scenario():
        service = Service(cfg)
        run = asyncio.create_task(service.run())
        await asyncio.sleep(0.2)
        for i in range(2):
            make_frame(cfg.capture.dir / f"p{i}.fits", i)
        await wait_for(lambda: service.snapshot.counts["stacked"] == 2, what="2 stacked")
        assert service.watcher.close_events is False  # polling observer, size-stable completion

        def saved() -> int:
            st = checkpoint.load(cfg.state.dir)
            return 0 if st is None else len(st["ledger"]["entries"])

        await wait_for(lambda: saved() == 2, timeout=10, what="checkpoint without a further frame")
        assert not run.done()
        service.request_stop()
        assert await asyncio.wait_for(run, 20) == 0

    asyncio.run(scenario())


def test_failing_checkpoint_disk_does_not_stop_stacking(tmp_path, monkeypatch):
    cfg = make_config(tmp_path, None, "x", checkpoint_every_s=0)  # a checkpoint per frame
    real_save = checkpoint.save
    calls = {"n": 0}

    def flaky_save(state_dir, state, **options):
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError(28, "No space left on device")
        return real_save(state_dir, state, **options)

    monkeypatch.setattr(checkpoint, "save", flaky_save)
    for i in range(2):
        make_frame(cfg.capture.dir / f"d{i}.fits", i)

    async def scenario():
        service = Service(cfg)
        run = asyncio.create_task(service.run())
        await wait_for(lambda: service.snapshot.counts["stacked"] == 2, what="both stacked despite the failure")
        service.request_stop()
        assert await asyncio.wait_for(run, 20) == 0

    asyncio.run(scenario())
    assert calls["n"] >= 2
    assert sorted(checkpoint.load(cfg.state.dir)["ledger"]["entries"]) == ["d0.fits", "d1.fits"]


def test_unusable_state_or_output_folder_is_refused_at_start_naming_the_setting(tmp_path):
    (tmp_path / "afile").write_text("not a folder")
    with pytest.raises(OSError, match=r"state\.dir = '.*afile': cannot write to it"):
        Service(config_from_dict({"capture": {"dir": str(tmp_path / "capture")},
                                  "state": {"dir": str(tmp_path / "afile")}}, "t.toml"))
    cfg = config_from_dict({"capture": {"dir": str(tmp_path / "capture")},
                            "state": {"dir": str(tmp_path / "state"), "output_dir": str(tmp_path / "afile" / "out")}},
                           "t.toml")
    with pytest.raises(OSError, match=r"state\.output_dir = .*: cannot write to it"):
        Service(cfg)
    # Usable folders are created as needed.
    Service(config_from_dict({"capture": {"dir": str(tmp_path / "new" / "capture")},
                              "state": {"dir": str(tmp_path / "new" / "state")}}, "t.toml"))
    assert (tmp_path / "new" / "state" / "output").is_dir() and (tmp_path / "new" / "capture").is_dir()


def test_validate_command():
    assert validate_command(b'{"id": "a", "action": "set_reference", "path": "x.fits"}')["path"] == "x.fits"
    for raw, msg in [(b'{"id": true, "action": "stop"}', "id"), (b'{"id": 1, "action": "reset", "stack": 3}', "str"),
                     (b"\xff", "JSON"), (b'{"id": 1}', "unknown action None")]:
        with pytest.raises(CommandError, match=msg):
            validate_command(raw)


@pytest.mark.realdata
def test_real_colour_frames_from_a_live_stacker(als_m27, broker, tmp_path):
    """ALS's six colour M27 frames copied into the folder: stacked as one colour stack,
    FITS with NCOMBINE = accepted frames, a colour JPEG preview over MQTT; the stack's grid
    frame plate-solved off the stacking path, its WCS in
    the stack written afterwards, the solve on MQTT and in the status."""
    require_tools("solve-field")
    cfg = make_config(tmp_path, broker.port, "m27")
    frames = sorted(als_m27.glob("*.fits"))

    async def scenario():
        service = Service(cfg)
        run = asyncio.create_task(service.run())
        sub = await asyncio.to_thread(Subscriber, broker.port, "m27")
        for f in frames:
            shutil.copy(f, cfg.capture.dir / f.name)
        await wait_for(lambda: len(sub.json("frame")) == len(frames), timeout=60, what="all frame events")
        await wait_for(lambda: sub.json("preview/meta") and sub.json("preview/meta")[-1]["frames"]
                       == service.snapshot.counts["stacked"], timeout=20, what="final preview")
        await wait_for(lambda: [e for e in sub.json("acquisition") if e.get("event") == "solve"], timeout=90,
                       what="the reference plate solve")
        await wait_for(lambda: service.status()["solve"] is not None, what="solve in the status")
        service.request_stop()
        assert await asyncio.wait_for(run, 30) == 0
        sub.close()
        return service, sub

    service, sub = asyncio.run(scenario())
    accepted = [e for e in sub.json("frame") if e["accepted"]]
    assert len(accepted) >= 5 and len(service.snapshot.stacks) == 1
    (name,) = service.snapshot.stacks
    header = fits.getheader(cfg.output_dir / f"{name}.fits")
    assert header["NCOMBINE"] == len(accepted) and header["NAXIS3"] == 3  # colour planes
    import cv2
    import numpy as np

    jpeg = cv2.imdecode(np.frombuffer(sub.raw("preview")[-1], np.uint8), cv2.IMREAD_COLOR)
    assert jpeg.shape[2] == 3 and max(jpeg.shape[:2]) <= cfg.mqtt.preview_max_edge
    b, g, r = (jpeg[..., c].astype(float) for c in range(3))
    assert np.abs(r - g).mean() > 1.0  # really colour, not grey in three planes
    # The solve: of the grid frame (the first), ok, and the stack written since carries it.
    (solve,) = [e for e in sub.json("acquisition") if e.get("event") == "solve"]
    assert solve["ok"] and solve["stack"] == name and Path(solve["path"]).name == frames[0].name, solve
    assert solve["scale_arcsec_px"] == pytest.approx(1.4815, rel=0.01)
    assert header["PLTSOLVD"] is True
    from astropy.wcs import WCS

    first = fits.getheader(frames[0])
    wcs = WCS(header).celestial  # the stack grid is the first frame's, rows stored bottom-up
    ra, dec = wcs.pixel_to_world_values((first["NAXIS1"] - 1) / 2, (first["NAXIS2"] - 1) / 2)
    from daemon.wcs import separation_arcsec

    assert separation_arcsec(float(ra), float(dec), solve["ra_deg"], solve["dec_deg"]) < 1.5


def test_mixed_exposures_get_a_stack_each_and_keep_the_deep_frames(tmp_path):
    """A night of 2 s, 3 s and 60 s frames of one target, as a capture program writes them:
    the daemon keeps one stack per exposure, so none of the 60 s frames is thrown away as a
    "background jump" against the 2 s frames. Control: one pipeline fed the same frames
    in the same order rejects every 60 s frame so."""
    from daemon.io.load import load_frame
    from daemon.pipeline.live import LivePipeline

    cfg = make_config(tmp_path, None, "x")
    field = random_star_field(SHAPE, 150, seed=3, margin=0.1)
    plan = [2.0, 2.0, 2.0, 3.0, 3.0, 60.0, 60.0, 60.0]
    paths = []
    for i, exposure_s in enumerate(plan):
        exp = Exposure(exposure_s=exposure_s, matrix=transform_matrix(i * 0.7, -i * 0.4), sky_adu_s=10.0, seed=i)
        path = tmp_path / "stage" / f"m_{i:02d}.fits"
        path.parent.mkdir(exist_ok=True)
        fits.writeto(path, expose(SHAPE, field, exp), fits.Header(fits_header(exposure_s=exposure_s, filter_name="L")))
        paths.append(path)

    async def scenario():
        service = Service(cfg)
        run = asyncio.create_task(service.run())
        await asyncio.sleep(0.2)
        for path in paths:  # in the order they were taken
            shutil.copy(path, cfg.capture.dir / path.name)
            await asyncio.sleep(0.05)
        def judged() -> int:
            return service.snapshot.counts["stacked"] + service.snapshot.counts["rejected"]

        await wait_for(lambda: judged() == len(plan) and service.status()["queue"] == 0, timeout=60,
                       what="all frames judged")
        service.request_stop()
        assert await asyncio.wait_for(run, 20) == 0
        return service

    svc = asyncio.run(scenario())
    assert svc.snapshot.counts["rejected"] == 0
    stacks = {name: (s.frames, s.total_exposure_s) for name, s in svc.snapshot.stacks.items()}
    assert stacks == {"SIM-FIELD_L_2s_bin1": (3, 6.0), "SIM-FIELD_L_3s_bin1": (2, 6.0),
                      "SIM-FIELD_L_60s_bin1": (3, 180.0)}, stacks
    one = LivePipeline()
    results = [one.process(load_frame(p)) for p in paths]
    assert [r.accepted for r in results[5:]] == [False] * 3
    assert all(r.reason.startswith("background jump") for r in results[5:]), [r.reason for r in results]
