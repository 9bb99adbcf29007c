"""`lightbucket run` as a real subprocess with the real pipeline, a real mosquitto and our own
sd_notify socket: READY/WATCHDOG, kill -9 mid-session and resume exactly, SIGTERM -> exit 0."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from astropy.io import fits

from daemon import checkpoint
from daemon.simulate import Exposure, Sensor, expose, fits_header, random_star_field, session_times, transform_matrix
from tests.mqtt_broker import Subscriber

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
LIGHTBUCKET = ROOT / ".venv" / "bin" / "lightbucket"
SHAPE = (256, 256)
N_FRAMES = 8



def write_frames(stage: Path) -> list[Path]:
    """Mono 256x256 light frames of one field with known shifts (dx, dy) = (1.3 i, -0.8 i) px."""
    field = random_star_field(SHAPE, 120, seed=7, margin=0.1)
    times = session_times(datetime(2026, 11, 24, 21, tzinfo=UTC), 10.0, N_FRAMES)
    paths = []
    for i in range(N_FRAMES):
        exp = Exposure(exposure_s=10.0, matrix=transform_matrix(1.3 * i, -0.8 * i), seed=100 + i)
        data = expose(SHAPE, field, exp, Sensor())
        hdr = fits.Header(fits_header(exposure_s=10.0, filter_name="L", target="M 27", date_obs=times[i]))
        path = stage / f"light_{i:03d}.fits"
        fits.writeto(path, data, hdr)
        paths.append(path)
    return paths


class NotifySocket:
    """Our stand-in for systemd's notify socket: a thread reads every datagram, as pid 1 does."""

    def __init__(self, path: Path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.seen: list[str] = []
        self._closed = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._closed:
            try:
                self.seen.append(self.sock.recv(4096).decode())
            except TimeoutError:
                pass

    def count(self, line: str) -> int:
        return sum(m.split("\n").count(line) for m in list(self.seen))

    def wait(self, line: str, timeout: float, count: int = 1) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.count(line) >= count:
                return
            time.sleep(0.05)
        raise AssertionError(f"no {count}x {line} on the notify socket; got {self.seen[-10:]}")

    def close(self) -> None:
        self._closed = True
        self._thread.join()
        self.sock.close()


def start_daemon(config: Path, notify: NotifySocket, log: Path) -> subprocess.Popen:
    # As systemd starts it: notify socket, watchdog, output to the journal (JOURNAL_STREAM).
    env = {**os.environ, "NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "1000000", "PYTHONUNBUFFERED": "1",
           "PYTHONFAULTHANDLER": "1", "JOURNAL_STREAM": "8:4242"}
    env.pop("WATCHDOG_PID", None)
    return subprocess.Popen([str(LIGHTBUCKET), "run", "--config", str(config)], env=env,
                            stdout=log.open("ab"), stderr=subprocess.STDOUT)


def test_notify_ready_watchdog_last_will_and_sigterm_exit0(broker, tmp_path):
    """No frames needed: the protocol as systemd sees it, and MQTT availability."""
    capture, state = tmp_path / "capture", tmp_path / "state"
    config = tmp_path / "lb.toml"
    config.write_text(f'[capture]\ndir = "{capture}"\n[state]\ndir = "{state}"\n'
                      f'[mqtt]\nhost = "127.0.0.1"\nport = {broker.port}\nrig = "notify"\n')
    notify = NotifySocket(tmp_path / "notify.sock")
    log = tmp_path / "daemon.log"
    sub = Subscriber(broker.port, "notify")
    proc = start_daemon(config, notify, log)
    try:
        notify.wait("READY=1", 60)
        # READY only once the MQTT loop runs: 'online' is (about to be) on the broker.
        sub.wait(lambda: sub.raw("availability") == [b"online"], 10, "online")
        pings = notify.count("WATCHDOG=1")
        notify.wait("WATCHDOG=1", 5, count=pings + 3)  # every WATCHDOG_USEC/2 = 0.5 s
        assert any(m.startswith("READY=1\nSTATUS=running") for m in notify.seen)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        sub.wait(lambda: sub.raw("availability")[-1] == b"offline", 10, "last will")

        proc = start_daemon(config, notify, log)
        notify.wait("READY=1", 60, count=2)
        sub.wait(lambda: sub.raw("availability")[-1] == b"online", 10, "online again")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        notify.wait("STOPPING=1", 5)
        sub.wait(lambda: sub.raw("availability")[-1] == b"offline", 10, "offline on clean exit")
        assert sub.json("status")[-1]["state"] == "stopped"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        sub.close()
        notify.close()
    assert (state / "checkpoint.npz").exists()
    # The journal time-stamps each line: no second time stamp of our own.
    lines = log.read_text().splitlines()
    assert any(line.startswith("INFO lightbucket: backlog: 0 frames") for line in lines), lines[:5]
    # Before READY, start-up's objects left the garbage collector's passes (daemon.memory).
    frozen = [int(line.rsplit(" ", 1)[1]) for line in lines
              if line.startswith("INFO lightbucket: start-up objects kept out of the garbage collector")]
    assert len(frozen) == 2 and min(frozen) > 10_000, frozen


def test_bad_config_key_exits_2_naming_key_and_file(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text(f'[capture]\ndir = "{tmp_path}"\n[state]\ndir = "{tmp_path}"\n[mqtt]\nprot = 1\n')
    out = subprocess.run([str(LIGHTBUCKET), "run", "--config", str(config), "--set", "mqtt.port=1"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert f"{config}: [mqtt] prot: unknown key" in out.stderr


def test_kill9_resume_exactly_sigterm_exit0(broker, tmp_path):
    stage, capture, state = tmp_path / "stage", tmp_path / "capture", tmp_path / "state"
    for d in (stage, capture):
        d.mkdir()
    frames = write_frames(stage)
    config = tmp_path / "lb.toml"
    # Checkpoints at most every 2 s: frames stacked after the last checkpoint are lost by
    # kill -9 together with the stack and must be stacked again, exactly once.
    config.write_text(f'[capture]\ndir = "{capture}"\n[state]\ndir = "{state}"\ncheckpoint_every_s = 2\n'
                      f'[mqtt]\nhost = "127.0.0.1"\nport = {broker.port}\nrig = "proc"\n')
    notify = NotifySocket(tmp_path / "notify.sock")
    log = tmp_path / "daemon.log"
    sub = Subscriber(broker.port, "proc")
    proc = start_daemon(config, notify, log)
    try:
        notify.wait("READY=1", 60)
        shutil.copy(frames[0], capture / frames[0].name)
        sub.wait(lambda: sub.json("frame"), 60, "first frame event")
        sub.wait(lambda: (state / "checkpoint.npz").exists(), 10, "periodic checkpoint")
        for p in frames[1:5]:
            shutil.copy(p, capture / p.name)
        sub.wait(lambda: len(sub.json("frame")) >= 3, 60, "3 frame events")
        proc.send_signal(signal.SIGKILL)  # mid-session: frames still queued or in hand
        assert proc.wait(10) == -signal.SIGKILL
        # The broker publishes the last will for the dead client.
        sub.wait(lambda: sub.raw("availability")[-1] == b"offline", 10, "last will")
        before = checkpoint.load(state)  # what survived the kill: frame 0 at least, consistently
        assert "light_000.fits" in before["ledger"]["entries"]
        (survived,) = before["stacks"].values()
        assert survived["pipeline"]["n_stacked"] == len(before["ledger"]["entries"])

        for p in frames[5:]:
            shutil.copy(p, capture / p.name)
        (capture / "truncated.fits").write_bytes(frames[0].read_bytes()[:40000])  # half a frame
        proc = start_daemon(config, notify, log)
        notify.wait("READY=1", 60, count=2)
        names = {p.name for p in frames}
        sub.wait(lambda: {Path(e["path"]).name for e in sub.json("frame")} >= names | {"truncated.fits"}, 120,
                 "all frames")
        sub.wait(lambda: sub.json("status")[-1]["queue"] == 0, 10, "queue drained")

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        notify.wait("STOPPING=1", 5)
    finally:
        if proc.poll() is None:  # test failed with the daemon running: dump its threads
            proc.send_signal(signal.SIGABRT)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        sub.close()
        notify.close()
        sys.stdout.write(log.read_text()[-6000:])

    final = {Path(e["path"]).name: e for e in sub.json("frame")}  # last word per file
    st = checkpoint.load(state)
    ledger = st["ledger"]["entries"]
    ledger_outcomes = {k: v["outcome"] for k, v in ledger.items()}
    assert sorted(ledger) == sorted(names | {"truncated.fits"})
    accepted = sorted(n for n, e in final.items() if e["accepted"])
    assert len(accepted) >= N_FRAMES - 1, final  # clear frames of one field: (nearly) all stacked
    # Registration recovered the known shifts (frame i vs the reference frame 0).
    for n in accepted:  # registration maps the frame onto the reference: (-1.3 i, +0.8 i)
        i = int(n[6:9])
        assert final[n]["dx"] == pytest.approx(-1.3 * i, abs=0.15)
        assert final[n]["dy"] == pytest.approx(0.8 * i, abs=0.15)
    # The truncated copy is reported with a reason and skipped, once.
    assert final["truncated.fits"]["accepted"] is False and final["truncated.fits"]["reason"]
    assert ledger_outcomes["truncated.fits"] == "error"

    (stack_name,) = st["stacks"]
    pipe = st["stacks"][stack_name]["pipeline"]
    stacked_paths = [Path(p["path"]).name for p in pipe["provenance"]]
    assert sorted(stacked_paths) == accepted  # each accepted frame exactly once
    # The spool for the final re-stack (written by its own thread) holds each of them once too.
    from daemon.spool import Spool

    spooled = [Path(e["path"]).name for e in Spool(state / "spool" / stack_name).entries]
    assert sorted(spooled) == accepted
    header = fits.getheader(state / "output" / f"{stack_name}.fits")
    assert header["NCOMBINE"] == len(accepted) == pipe["n_stacked"]
    assert header["EXPTIME"] == pytest.approx(10.0)  # one sub, as Siril writes it
    assert header["LIVETIME"] == pytest.approx(10.0 * len(accepted)) and header["STACKCNT"] == len(accepted)
    status = sub.json("status")[-1]
    assert status["frames"]["stacked"] == len(accepted) and status["state"] == "stopped"
    twice = sorted(n for n in names if sum(Path(e["path"]).name == n for e in sub.json("frame")) > 1)
    print(f"processed again after kill -9 (not yet checkpointed): {twice}")
    meta = sub.json("preview/meta")[-1]
    assert meta["frames"] == len(accepted) and sub.raw("preview")[-1][:2] == b"\xff\xd8"  # JPEG


MOUNT_FAILED = 97


def run_with_read_only(folders: list[Path], cmd: list[str], env: dict, timeout: float = 120, *,
                       empty: bool = False):
    """`cmd` in a private mount namespace where `folders` are read-only, as systemd's
    ProtectSystem=strict leaves all but ReadWritePaths= (unshare -rm: any user): read-only bind
    mounts of themselves, or with `empty` an empty read-only tmpfs each (which also works
    where a bind mount cannot be made read-only in a user namespace: a nosuid/nodev /tmp, as
    in a container). The test is skipped if the mounts cannot be made here."""
    if empty:
        mounts = " && ".join(f'mount -t tmpfs -o ro tmpfs "{f}"' for f in folders)
    else:
        mounts = " && ".join(f'mount --bind -o ro "{f}" "{f}"' for f in folders)
    out = subprocess.run(["unshare", "-rm", "sh", "-c", f'{{ {mounts}; }} || exit {MOUNT_FAILED}; exec "$@"', "sh",
                          *cmd], env=env, capture_output=True, text=True, timeout=timeout)
    if out.returncode == MOUNT_FAILED:
        pytest.skip(f"cannot make read-only mounts here: {out.stderr.strip()[-300:]}")
    return out


def _no_mount_namespaces() -> bool:
    try:
        return subprocess.run(["unshare", "-rm", "true"], capture_output=True, timeout=10).returncode != 0
    except (OSError, subprocess.TimeoutExpired):
        return True


needs_unshare = pytest.mark.skipif(_no_mount_namespaces(), reason="no user/mount namespaces (unshare -rm)")


@needs_unshare
def test_read_only_install_without_a_home_still_compiles_kernels(tmp_path):
    """A root-owned install run by a system user without a home (`lightbucket run` by hand
    next to the unit): numba can cache neither beside the code nor in ~/.cache and used to
    refuse to define the kernels ("no locator available"). The CLI now points it at a private
    temp folder, and the compiled kernel lands there."""
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CACHE_DIR", "XDG_CACHE_HOME")}
    env.update(HOME="/proc/no-such-home", TMPDIR=str(tmp_path))
    code = ("import os, numpy as np; from daemon.cli import ensure_numba_cache; ensure_numba_cache(); "
            "from daemon.pipeline.debayer import debayer; debayer(np.ones((8, 8), np.float32), 'RGGB'); "
            "print(os.environ['NUMBA_CACHE_DIR'])")
    out = run_with_read_only([ROOT / "daemon"], [str(ROOT / ".venv" / "bin" / "python"), "-c", code], env)
    assert out.returncode == 0, out.stderr[-2000:]
    cache = Path(out.stdout.strip())
    assert cache.parent == tmp_path and cache.stat().st_mode & 0o077 == 0
    assert list(cache.rglob("debayer*.nbi")), sorted(cache.rglob("*"))
    # Without it, the very import fails (the condition the fallback is for really holds here).
    bare = run_with_read_only([ROOT / "daemon"], [str(ROOT / ".venv" / "bin" / "python"), "-c",
                                                  "import daemon.pipeline.debayer"], env)
    assert bare.returncode != 0 and "no locator available" in bare.stderr


@needs_unshare
def test_state_dir_not_writable_exits_2_before_ready(tmp_path):
    """state.dir outside the unit's ReadWritePaths= (read-only): refused at start, naming the
    setting, instead of a healthy-looking service whose checkpoints and spool all fail."""
    state = tmp_path / "ro" / "state"
    state.parent.mkdir()
    config = tmp_path / "lb.toml"
    config.write_text(f'[capture]\ndir = "{tmp_path / "capture"}"\n[state]\ndir = "{state}"\n')
    out = run_with_read_only([tmp_path / "ro"], [str(LIGHTBUCKET), "run", "--config", str(config)],
                             dict(os.environ), timeout=60, empty=True)
    assert out.returncode == 2, out.stderr[-2000:]
    assert f"state.dir = '{state}': cannot write to it (Read-only file system)" in out.stderr
    assert "ReadWritePaths=" in out.stderr
