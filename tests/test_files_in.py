"""Every file in the watched folder gets an answer, through `lightbucket run` as a real process
with a real mosquitto: one error event per unsupported file version, none for a frame's
companions, a frame over the decode limit refused without the daemon's memory growing and
the frame after it stacked; a file in hand at kill -9 is quarantined at restart, not a crash
loop."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from astropy.io import fits

from daemon import checkpoint
from daemon.ledger import InHand
from daemon.service import Service
from tests.mqtt_broker import Subscriber
from tests.test_daemon_process import NotifySocket, start_daemon, write_frames
from tests.test_daemon_service import idle, make_config, make_frame, wait_for

pytestmark = pytest.mark.slow


def unsupported_files(folder: Path) -> dict[str, str]:
    """One file of each kind a capture folder may hold that lightbucket does not read, a few
    broken frames, and the text each one's error reason must hold."""
    folder.mkdir(parents=True, exist_ok=True)
    img = np.zeros((40, 60, 3), np.uint8)
    files = {
        "snapshot.jpg": (cv2.imencode(".jpg", img)[1].tobytes(), "unsupported file type (.jpg)"),
        "screen.png": (cv2.imencode(".png", img)[1].tobytes(), "unsupported file type (.png)"),
        "planet.ser": (b"LUCAM-RECORDER" + bytes(164) + bytes(60 * 40 * 2), "unsupported file type (.ser)"),
        "clip.avi": (b"RIFF\x24\x00\x00\x00AVI LIST" + bytes(64), "unsupported file type (.avi)"),
        "notes.txt": (b"seeing 2/5, dew at 23:10\n", "unsupported file type (.txt)"),
        "session_log": (b"21:04 started\n", "unsupported file type (no suffix)"),
        # a frame format, broken: the fault is named
        "broken.xisf": (b"XISF0100\x10\x00\x00\x00" + bytes(4) + b"<xisf>", "truncated XISF header"),
        "broken.cr2": (b"II*\x00" + bytes(100), "not a readable camera raw file"),
        "broken.fits.gz": (b"\x1f\x8b\x08\x00garbage", "corrupt or truncated gzip stream"),
        "empty.fits": (b"", "empty file (0 bytes)"),
    }
    for name, (data, _) in files.items():
        (folder / name).write_bytes(data)
    return {name: reason for name, (_, reason) in files.items()}


def companions(folder: Path) -> list[str]:
    """A frame's companion files: never answered on their own."""
    (folder / "light_000.fits.json").write_text('{"GAIN": 120}')
    (folder / "info.json").write_text('{"n_subs": 3, "sub_type": "light"}')
    (folder / "light_000.fits.CameraSettings.txt").write_text("[ZWO ASI224MC]\nGain=120\n")
    return ["light_000.fits.json", "info.json", "light_000.fits.CameraSettings.txt"]


def compressed_bomb(path: Path, side: int = 8000) -> Path:
    """A tile-compressed FITS of zeros, ~1 MB on disk, side x side int16 once decoded."""
    subprocess.run([sys.executable, "-c", "import sys, numpy as np; from astropy.io import fits; "
                    "fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(np.zeros((int(sys.argv[2]),) * 2, np.int16), "
                    "compression_type='RICE_1')]).writeto(sys.argv[1])", str(path), str(side)], check=True)
    return path


def reset_peak_rss(pid: int) -> None:
    """Set the process's peak (VmHWM) to its current RSS (Linux: "5" to clear_refs), so that
    a later peak is what came after; without it the peak so far stays (a weaker check)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss(pid: int) -> int:
    """The process's peak resident memory so far (VmHWM, bytes)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def events_for(sub: Subscriber, name: str) -> list[dict]:
    return [e for e in sub.json("frame") if Path(e["path"]).name == name]


def _config(tmp_path: Path, port: int, rig: str, max_frame_bytes: int) -> Path:
    capture, state = tmp_path / "capture", tmp_path / "state"
    capture.mkdir(exist_ok=True)
    config = tmp_path / "lb.toml"
    config.write_text(f'[capture]\ndir = "{capture}"\nmax_frame_bytes = {max_frame_bytes}\n'
                      f'[state]\ndir = "{state}"\n'
                      f'[mqtt]\nhost = "127.0.0.1"\nport = {port}\nrig = "{rig}"\n')
    return config


def _stop(proc: subprocess.Popen, log: Path) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    sys.stdout.write(log.read_text()[-4000:])


def test_each_unsupported_kind_one_error_event_bomb_refused_next_frame_stacked(broker, tmp_path):
    stage, capture = tmp_path / "stage", tmp_path / "capture"
    stage.mkdir()
    frames = write_frames(stage)[:3]
    config = _config(tmp_path, broker.port, "files", 64 << 20)
    bomb = compressed_bomb(stage / "bomb.fits.fz")  # 8000x8000: 244 MiB as float32, over 64 MiB
    notify = NotifySocket(tmp_path / "notify.sock")
    log = tmp_path / "daemon.log"
    sub = Subscriber(broker.port, "files")
    proc = start_daemon(config, notify, log)
    try:
        notify.wait("READY=1", 90)
        shutil.copy(frames[0], capture / frames[0].name)
        sub.wait(lambda: events_for(sub, frames[0].name), 60, "first frame")
        reset_peak_rss(proc.pid)
        before = peak_rss(proc.pid)

        shutil.copy(bomb, capture / bomb.name)
        sub.wait(lambda: events_for(sub, bomb.name), 60, "the bomb's answer")
        grown = peak_rss(proc.pid) - before
        print(f"daemon peak RSS growth while refusing the bomb: {grown / 2**20:.1f} MiB")
        shutil.copy(bomb, capture / "bomb_2.fits.fz")
        shutil.copy(frames[1], capture / frames[1].name)  # a frame queued behind another one
        sub.wait(lambda: events_for(sub, frames[1].name), 60, "the frame after the bomb")
        (refused,) = events_for(sub, bomb.name)
        assert refused["error"] is True and "8000x8000 pixels would decode to 244 MiB" in refused["reason"]
        assert bomb.name in refused["path"]
        assert events_for(sub, frames[1].name)[0]["accepted"] is True
        assert grown < 16 << 20, f"the daemon's peak RSS grew by {grown / 2**20:.0f} MiB"
        assert events_for(sub, "bomb_2.fits.fz")[0]["error"] is True

        reasons = unsupported_files(capture)
        quiet = companions(capture)
        shutil.copy(frames[2], capture / frames[2].name)
        sub.wait(lambda: all(events_for(sub, n) for n in [*reasons, frames[2].name]), 60, "every file answered")
        time.sleep(3)  # a second event would come now (settle, duplicate close events)
        for name, reason in reasons.items():
            (event,) = events_for(sub, name)
            assert event["error"] is True and event["accepted"] is False and reason in event["reason"], event
        assert not [e for e in sub.json("frame") if Path(e["path"]).name in quiet]
        log_lines = log.read_text()
        assert all(log_lines.count(f"frame {capture / n}: not stacked") == 1 for n in reasons), log_lines[-3000:]

        # a new version of a file is a new answer; the same version never twice, also after a restart
        time.sleep(0.05)
        (capture / "notes.txt").write_text("seeing 3/5 now\n")
        sub.wait(lambda: len(events_for(sub, "notes.txt")) == 2, 30, "second version answered")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        seen = len(sub.json("frame"))
        proc = start_daemon(config, notify, log)
        notify.wait("READY=1", 90, count=2)
        sub.wait(lambda: sub.json("status") and sub.json("status")[-1]["state"] == "running", 30, "running")
        time.sleep(3)
        assert len(sub.json("frame")) == seen, sub.json("frame")[seen:]
    finally:
        _stop(proc, log)
        sub.close()
        notify.close()
    st = checkpoint.load(tmp_path / "state")
    (stack,) = st["stacks"].values()
    assert sorted(Path(p["path"]).name for p in stack["pipeline"]["provenance"]) == [f.name for f in frames]


def test_kill9_with_a_file_in_hand_reads_it_again_once_then_quarantines_it(broker, tmp_path):
    """A file in hand at kill -9 is read again at the next start; in hand at a second kill -9 in
    a row, it is quarantined at the start after (one error event, no crash loop), and the frames
    behind it are stacked."""
    stage, capture, state = tmp_path / "stage", tmp_path / "capture", tmp_path / "state"
    stage.mkdir()
    frames = write_frames(stage)[:2]
    config = _config(tmp_path, broker.port, "inhand", 2 << 30)
    # A gzip FITS that takes the worker a few seconds (60 Mpx), as a file that kills the
    # process would: it is in hand when kill -9 comes.
    slow = stage / "huge.fits.gz"
    header = fits.Header([("SIMPLE", True), ("BITPIX", 16), ("NAXIS", 2), ("NAXIS1", 7740), ("NAXIS2", 7740),
                          ("EXPTIME", 10.0)])
    with gzip.open(slow, "wb", compresslevel=1) as gz:
        gz.write(header.tostring().encode())
        rows = np.random.default_rng(0).integers(0, 4000, (1, 7740)).astype(">i2").tobytes()
        for _ in range(7740):
            gz.write(rows)
        gz.write(bytes(-(7740 * 7740 * 2) % 2880))
    marker = state / InHand.NAME
    notify = NotifySocket(tmp_path / "notify.sock")
    log = tmp_path / "daemon.log"
    sub = Subscriber(broker.port, "inhand")
    proc = start_daemon(config, notify, log)

    def kill_with_it_in_hand(deaths_before: int) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                mark = json.loads(marker.read_text())
            except (OSError, ValueError):
                mark = {}
            if mark.get("path", "").endswith(slow.name) and mark.get("deaths") == deaths_before:
                break
            assert not events_for(sub, slow.name), "answered without ever being marked in hand"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(10) == -signal.SIGKILL
        assert not events_for(sub, slow.name)

    try:
        notify.wait("READY=1", 90)
        shutil.copy(slow, capture / slow.name)
        kill_with_it_in_hand(0)
        proc = start_daemon(config, notify, log)  # reads it once more ...
        notify.wait("READY=1", 90, count=2)
        kill_with_it_in_hand(1)  # ... and dies with it in hand again

        shutil.copy(frames[0], capture / frames[0].name)  # a frame waiting behind it
        proc = start_daemon(config, notify, log)
        notify.wait("READY=1", 90, count=3)
        sub.wait(lambda: events_for(sub, frames[0].name), 60, "the frame behind it")
        (event,) = events_for(sub, slow.name)
        assert event["error"] is True and event["reason"].startswith("quarantined"), event
        assert events_for(sub, frames[0].name)[0]["accepted"] is True
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        proc = start_daemon(config, notify, log)  # quarantined stays quarantined, no event
        notify.wait("READY=1", 90, count=4)
        shutil.copy(frames[1], capture / frames[1].name)
        sub.wait(lambda: events_for(sub, frames[1].name), 60, "a later frame")
        assert len(events_for(sub, slow.name)) == 1
    finally:
        _stop(proc, log)
        sub.close()
        notify.close()
    assert not marker.exists()
    entry = checkpoint.load(state)["ledger"]["entries"][slow.name]
    assert entry["outcome"] == "error" and entry["reason"].startswith("quarantined")


def test_bad_header_values_warn_and_the_frame_goes_where_one_without_the_value_goes(tmp_path, caplog):
    cfg = make_config(tmp_path, None, "x")
    stage = tmp_path / "stage"
    stage.mkdir()
    cards = {"no_exptime": {"EXPTIME": None}, "abc": {"EXPTIME": "abc"}, "negative": {"EXPTIME": -5.0},
             "absurd": {"EXPTIME": 1e9}, "no_binning": {}, "bad_binning": {"XBINNING": "two", "YBINNING": 0}}
    for i, (name, changes) in enumerate(cards.items()):
        path = make_frame(stage / f"{name}.fits", i)
        with fits.open(path, mode="update") as hdul:
            for key, value in changes.items():
                if value is None:
                    del hdul[0].header[key]
                else:
                    hdul[0].header[key] = value
        shutil.copy(path, cfg.capture.dir / path.name)

    events: dict[str, dict] = {}

    async def session():
        service = Service(cfg)
        service.subscribe(lambda kind, p: events.update({Path(p["path"]).stem: p}) if kind == "frame" else None)
        run = asyncio.create_task(service.run())
        await wait_for(lambda: len(service.snapshot.files) == len(cards) and idle(service), timeout=90,
                       what="every frame answered")
        service.request_stop()
        assert await asyncio.wait_for(run, 60) == 0
        return service

    with caplog.at_level(logging.WARNING, logger="lightbucket.io"):
        asyncio.run(session())
    entries = checkpoint.load(cfg.state.dir)["ledger"]["entries"]
    assert all(e["outcome"] != "error" and e["stack"] for e in entries.values()), entries
    stack_of = {Path(k).stem: e["stack"] for k, e in entries.items()}
    assert stack_of["abc"] == stack_of["negative"] == stack_of["absurd"] == stack_of["no_exptime"]
    assert stack_of["bad_binning"] == stack_of["no_binning"] != stack_of["no_exptime"]
    warnings = [r.getMessage() for r in caplog.records if r.name == "lightbucket.io"]
    for name, key in (("abc", "EXPTIME='abc'"), ("negative", "EXPTIME=-5.0"), ("absurd", "EXPTIME=1000000000.0"),
                      ("bad_binning", "XBINNING='two'"), ("bad_binning", "YBINNING=0")):
        assert any(key in w and str(cfg.capture.dir / f"{name}.fits") in w for w in warnings), (key, warnings)
    assert not any("no_exptime" in w or "no_binning" in w for w in warnings)  # absent is not bad
    # The frame events carry them too (the page's frame log shows them).
    assert any("EXPTIME='abc'" in w for w in events["abc"]["warnings"]), events["abc"]
    assert "warnings" not in events["no_exptime"]
