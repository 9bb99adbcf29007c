"""Units of the daemon: atomic checkpoint, ledger, watcher (close events, rename, size-stable)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from pathlib import Path

import numpy as np
import pytest

from daemon import checkpoint
from daemon.ledger import QUARANTINED, InHand, Ledger, quarantine_left_over
from daemon.watcher import FolderWatcher, backlog, is_candidate

PATTERNS = ("*.fits", "*.fit", "*.cr2")


def test_checkpoint_round_trip_nested_arrays():
    state = {"stacks": {"a": {"pipeline": {"stack.mean": np.arange(6, dtype=np.float32).reshape(2, 3),
                                           "n": 3, "nan": float("nan"), "prov": [{"path": "x"}],
                                           "ref": None, "t": (1, 2)}}},
             "ledger": {"entries": {}}}
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        checkpoint.save(Path(d), state)
        back = checkpoint.load(Path(d))
    p = back["stacks"]["a"]["pipeline"]
    assert p["stack.mean"].dtype == np.float32
    assert np.array_equal(p["stack.mean"], state["stacks"]["a"]["pipeline"]["stack.mean"])
    assert p["n"] == 3 and np.isnan(p["nan"]) and p["prov"] == [{"path": "x"}] and p["ref"] is None and p["t"] == [1, 2]


def test_checkpoint_crash_during_write_keeps_the_old_one(tmp_path, monkeypatch):
    checkpoint.save(tmp_path, {"n": 1, "a": np.ones(3)})

    def boom(*a, **k):
        raise OSError("power cut")

    monkeypatch.setattr(checkpoint.os, "replace", boom)
    with pytest.raises(OSError):
        checkpoint.save(tmp_path, {"n": 2, "a": np.zeros(3)})
    monkeypatch.undo()
    back = checkpoint.load(tmp_path)
    assert back["n"] == 1 and back["a"].tolist() == [1, 1, 1]
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.npz"]  # no temp left behind
    (tmp_path / "checkpoint.npz").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="damaged checkpoint"):
        checkpoint.load(tmp_path)


def test_ledger_errors_are_retried_only_when_the_file_changes(tmp_path):
    f, g = tmp_path / "a.fits", tmp_path / "b.fits"
    f.write_bytes(b"x" * 10)
    g.write_bytes(b"y" * 10)
    led = Ledger(tmp_path)
    assert not led.done(f)
    led.record(f, "stacked", stack="s")
    led.record(g, "error", reason="truncated")
    assert led.done(f) and led.done(g)
    g.write_bytes(b"y" * 2880)  # completed later
    assert not led.done(g)
    back = Ledger.from_json(led.to_json(), tmp_path)
    assert back.done(tmp_path / "a.fits") and back.entries["a.fits"].stack == "s"


def test_a_file_in_hand_at_two_deaths_is_quarantined_once_unless_decided_or_changed(tmp_path):
    state, capture = tmp_path / "state", tmp_path / "capture"
    state.mkdir()
    capture.mkdir()
    bad, good, later = (capture / n for n in ("bad.fits", "good.fits", "later.fits"))
    for f in (bad, good, later):
        f.write_bytes(b"SIMPLE  = T" + bytes(100))
    led = Ledger(capture)
    InHand(state).begin(bad)  # the process dies here: no end()
    second = InHand(state)
    assert quarantine_left_over(led, second) is None  # one death: read once more
    assert "bad.fits" not in led.entries and second.left_over() is None
    second.begin(good)  # another file in between starts its own count
    assert second.left_over()["deaths"] == 0
    second.begin(bad)  # and the process dies with it in hand again
    assert second.left_over()["deaths"] == 1
    assert quarantine_left_over(led, InHand(state)) == str(bad)
    assert led.entries["bad.fits"].outcome == "error" and led.entries["bad.fits"].reason == QUARANTINED
    assert led.done(bad) and InHand(state).left_over() is None
    assert quarantine_left_over(led, InHand(state)) is None  # marker gone: nothing twice
    # died after the checkpoint recorded it: already decided, left alone
    led.record(good, "stacked", stack="s")
    InHand(state).begin(good)
    assert quarantine_left_over(led, InHand(state)) is None and led.entries["good.fits"].outcome == "stacked"
    # rewritten since: a new version gets its own answer
    InHand(state).begin(later)
    time.sleep(0.01)
    later.write_bytes(b"SIMPLE  = T" + bytes(200))
    assert quarantine_left_over(led, InHand(state)) is None and "later.fits" not in led.entries
    # control: a clean end leaves no marker
    hand = InHand(state)
    hand.begin(later)
    hand.end()
    assert hand.left_over() is None


def test_candidate_names_and_backlog(tmp_path):
    assert is_candidate("M27_001.FITS", PATTERNS) and is_candidate("x.cr2", PATTERNS)
    for name in ("a.fits.tmp", "a.fits.part", ".a.fits", "~a.fits", "a.fits.crdownload", "a.txt", "a.fits~"):
        assert not is_candidate(name, PATTERNS), name
    (tmp_path / "sub").mkdir()
    for i, name in enumerate(["b.fits", "a.fits", "sub/c.fits", "d.tmp"]):
        (tmp_path / name).write_bytes(b"x")
        os.utime(tmp_path / name, (1000 + i, 1000 + i))
    assert [p.name for p in backlog(tmp_path, PATTERNS, recursive=False)] == ["b.fits", "a.fits"]
    assert [p.name for p in backlog(tmp_path, PATTERNS, recursive=True)] == ["b.fits", "a.fits", "c.fits"]
    # Hidden staging folders and calibration plans' folders never hold lights.
    for sub in (".incoming", "calibration/dark"):
        (tmp_path / sub).mkdir(parents=True)
        (tmp_path / sub / "x.fits").write_bytes(b"x")
    assert [p.name for p in backlog(tmp_path, PATTERNS, recursive=True)] == ["b.fits", "a.fits", "c.fits"]


async def _collect(watcher_kwargs, root: Path, writer):
    got: list[tuple[float, str]] = []
    w = FolderWatcher(root, lambda p: got.append((time.monotonic(), p.name)), patterns=PATTERNS, **watcher_kwargs)
    w.start()
    try:
        last_write = await writer()
        deadline = time.monotonic() + 10
        while not got and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.6)  # no second hand-over for the same write
    finally:
        w.stop()
    return got, last_write, w


def test_inotify_close_after_write_and_rename_into_place(tmp_path):
    async def writer():
        with open(tmp_path / "slow.fits", "wb") as fh:
            fh.write(b"a" * 5000)
            fh.flush()
            await asyncio.sleep(0.8)  # a pause mid-write must not hand the file on
            fh.write(b"b" * 5000)
            t = time.monotonic()
        (tmp_path / "moved.fits.part").write_bytes(b"c" * 100)
        os.rename(tmp_path / "moved.fits.part", tmp_path / "moved.fits")
        # Moved in from a folder nobody watches (a hidden staging folder): no close event follows.
        (tmp_path / ".incoming").mkdir()
        (tmp_path / ".incoming" / "indi.fits").write_bytes(b"d" * 100)
        os.rename(tmp_path / ".incoming" / "indi.fits", tmp_path / "indi.fits")
        await asyncio.sleep(1.5)  # > settle_s: the size-stable check hands it on
        return t

    got, closed_at, w = asyncio.run(_collect({"settle_s": 0.5}, tmp_path, writer))
    assert w.close_events  # Linux: inotify observer
    names = [n for _, n in got]
    assert sorted(set(names)) == ["indi.fits", "moved.fits", "slow.fits"]
    assert min(t for t, n in got if n == "slow.fits") >= closed_at
    assert names.count("slow.fits") == 1  # the pause mid-write did not hand it on early


def test_recursive_watch_ignores_incoming_and_calibration_folders(tmp_path):
    """A capture program writes into .incoming/ and renames into place; calibration plans write
    into calibration/<type>/: only the renamed light and a light in a sub-folder count."""
    for sub in (".incoming", "calibration/dark", "night2"):
        (tmp_path / sub).mkdir(parents=True)

    async def writer():
        (tmp_path / "calibration/dark/dark_1.fits").write_bytes(b"d" * 100)
        (tmp_path / ".incoming/light_1.fits").write_bytes(b"l" * 100)
        os.rename(tmp_path / ".incoming/light_1.fits", tmp_path / "light_1.fits")
        (tmp_path / "night2/light_2.fits").write_bytes(b"l" * 100)
        return time.monotonic()

    got, _, _ = asyncio.run(_collect({"recursive": True}, tmp_path, writer))
    assert sorted({n for _, n in got}) == ["light_1.fits", "light_2.fits"]


def test_size_stable_fallback_waits_for_the_writer(tmp_path):
    async def writer():
        with open(tmp_path / "share.fits", "wb") as fh:
            for _ in range(4):  # grows for ~1.2 s, longer than one polling period
                fh.write(b"z" * 4000)
                fh.flush()
                await asyncio.sleep(0.3)
            return time.monotonic()

    got, last_write, w = asyncio.run(_collect({"force_polling": True, "settle_s": 0.5}, tmp_path, writer))
    assert not w.close_events
    assert [n for _, n in got] == ["share.fits"]
    assert got[0][0] >= last_write  # handed on only after the last write, once
    assert (tmp_path / "share.fits").stat().st_size == 16000


@pytest.mark.parametrize("polling", [False, True])
def test_a_file_seen_being_written_is_reported_once_before_it_is_handed_on(tmp_path, polling):
    """on_sight: once per file, at its first event, while it is being written (what its header
    says can be read then); inotify and the size-stable fallback alike."""
    seen: list[tuple[float, str, int]] = []

    def sight(path: Path) -> None:
        seen.append((time.monotonic(), path.name, path.stat().st_size))

    async def writer():
        with open(tmp_path / "slow.fits", "wb") as fh:
            for _ in range(3):
                fh.write(b"h" * 2880)
                fh.flush()
                await asyncio.sleep(0.4)
            return time.monotonic()

    got, last_write, _ = asyncio.run(_collect({"force_polling": polling, "settle_s": 0.5, "on_sight": sight},
                                              tmp_path, writer))
    assert [n for _, n in got] == ["slow.fits"]
    assert [n for _, n, _ in seen] == ["slow.fits"]
    assert seen[0][0] < last_write <= got[0][0]  # seen while written, handed on once written
    assert seen[0][2] < 3 * 2880


def test_systemd_unit_is_notify_watchdog_hardened_and_verifies(tmp_path):
    import configparser
    import shutil
    import subprocess

    text = (Path(__file__).resolve().parents[1] / "systemd" / "lightbucket.service").read_text()
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str
    unit.read_string(text)
    svc = unit["Service"]
    assert svc["Type"] == "notify" and int(svc["WatchdogSec"]) > 0 and svc["Restart"] == "on-failure"
    assert "lightbucket run --config" in svc["ExecStart"]
    # `lightbucket run` exits 2 for a refused config/folder (test_daemon_process): not retried.
    assert svc["RestartPreventExitStatus"] == "2"
    # A cold numba cache is compiled before READY (daemon.warmup): minutes on a Pi, not 90 s.
    assert int(svc["TimeoutStartSec"]) >= 300
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
                       "PrivateTmp": "yes", "StateDirectory": "lightbucket"}.items():
        assert svc[key] == value, key
    assert svc["ReadWritePaths"].strip() == "/srv/lightbucket/capture"  # the capture folder only
    if shutil.which("systemd-analyze"):
        # verify needs an existing executable: point ExecStart at /bin/true for the check.
        copy = tmp_path / "lightbucket.service"
        copy.write_text(text.replace("/opt/lightbucket/.venv/bin/lightbucket", "/bin/true"))
        out = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True, text=True)
        assert out.returncode == 0 and "lightbucket.service" not in out.stderr, out.stderr


def test_plan_command_takes_defaults_from_the_config_and_refuses_bad_keys(tmp_path):
    from daemon.commands import CommandError, plan_from_command, validate_command
    from daemon.config import config_from_dict
    from daemon.service import Service

    cfg = config_from_dict({
        "capture": {"dir": str(tmp_path / "c")}, "state": {"dir": str(tmp_path / "s")},
        "indi": {"drivers": []},
        "plan": {"target": "M 27", "ra": "19h59m36s", "dec": "+22d43m16s", "filter": "L",
                 "exposure_s": 120.0, "count": 30, "dither_every": 3}})

    def plan(**given):
        return plan_from_command(validate_command(
            json.dumps({"id": 1, "action": "plan", **given}).encode()), cfg.plan)

    darks = plan(frame_type="dark", count=20)  # darks matching the lights
    assert (darks.frame_type, darks.exposure_s, darks.count, darks.dither_every) == ("dark", 120.0, 20, 0)
    assert plan(frame_type="bias").count == 10  # calibration default, not the lights' 30
    other = plan(target="M 31", ra=10.68, dec=41.27, count=5)
    assert (other.target, other.ra, other.exposure_s, other.dither_every) == ("M 31", 10.68, 120.0, 3)
    for given, message in (({"exposure": 5}, "[plan] exposure: unknown key"),
                           ({"count": "many"}, "[plan] count: expected an integer"),
                           ({"dec": "+95d"}, "outside -90..+90"),
                           ({"ra": "noon"}, "not an angle"),
                           ({"frame_type": "sky"}, "frame_type = 'sky'")):
        with pytest.raises(CommandError, match=re.escape(message)):
            plan(**given)
    with pytest.raises(CommandError, match="target: required key missing"):
        plan_from_command({"id": 1, "action": "plan", "ra": 1.0}, None)  # no [plan] to fill in from

    # Through the service: refused without [indi], and nothing starts.
    watch_only = config_from_dict({"capture": {"dir": str(tmp_path / "c")}, "state": {"dir": str(tmp_path / "s")}})
    service = Service(watch_only)
    reply = asyncio.run(service.handle_command(b'{"id": "p", "action": "plan", "target": "x"}'))
    assert reply == {"id": "p", "ok": False, "error": "plan: no [indi] section in the config: nothing to acquire with"}
    assert not service.plans.running
