"""A full disk never stops live stacking (issue 19), on a real full file system: the state
folder is a small tmpfs (a private mount namespace, `unshare -rm`) filled to the last byte
while the real service stacks full-resolution colour frames from the capture folder (only
the service's public face is used: status(), preview(), request_stop()). The
spool and the checkpoint fail (logged, retried); every frame is stacked; once space is freed
the next checkpoint holds them all. Skipped where mount namespaces are not available."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_daemon_process import needs_unshare

ROOT = Path(__file__).resolve().parents[1]
N_FRAMES = 6
MOUNT_FAILED = 97

SCRIPT = r"""
import asyncio, json, logging, sys, time
from pathlib import Path

from astropy.io import fits

from daemon import checkpoint
from daemon.config import config_from_dict
from daemon.service import Service
from daemon.simulate import Exposure, Sensor, expose, fits_header, random_star_field, transform_matrix

root, state, n = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
capture = root / "capture"
capture.mkdir()
shape = (192, 256)
field = random_star_field(shape, 120, seed=5, margin=0.1, flux_range=(3000.0, 30000.0))
for i in range(n):
    m = transform_matrix(1.3 * i, -0.9 * i, 0.05 * i, center=(128, 96))
    data = expose(shape, field, Exposure(exposure_s=10.0, matrix=m, seed=i), Sensor(read_noise_adu=3.0, bayer="RGGB"))
    fits.writeto(capture / f"light_{i:03d}.fits", data, fits.Header(fits_header(exposure_s=10.0, bayer="RGGB")))

errors = []
class Errors(logging.Handler):
    def emit(self, record):
        if record.levelno >= logging.ERROR:
            errors.append(record.getMessage())
logging.getLogger().addHandler(Errors())
logging.getLogger().setLevel(logging.INFO)

def fill(path):
    # Every byte of the file system taken (a file written until ENOSPC).
    with open(path, "wb", buffering=0) as fh:
        block = b"\0" * 65536
        try:
            while True:
                fh.write(block)
        except OSError:
            pass
        try:
            while True:
                fh.write(b"\0")
        except OSError:
            pass

def saved():
    st = checkpoint.load(state)
    return [] if st is None else sorted(st["ledger"]["entries"])

async def wait_for(pred, timeout=120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        await asyncio.sleep(0.05)
    return False

facts = {}
cfg = config_from_dict({"capture": {"dir": str(capture)},
                        "state": {"dir": str(state), "checkpoint_every_s": 1.0}}, "full-disk.toml")

async def scenario():
    service = Service(cfg, force_polling=True)  # checks the state folder is writable: it still is
    ballast = state / "ballast"
    fill(ballast)
    run = asyncio.create_task(service.run())
    facts["all_stacked_while_full"] = await wait_for(lambda: service.status()["frames"].get("stacked") == n)
    status = service.status()
    facts["counts_while_full"] = {k: status["frames"].get(k) for k in ("stacked", "rejected", "errors")}
    facts["stacks_while_full"] = status["stacks"]
    await asyncio.sleep(2.5)  # periodic checkpoints retried against the full disk
    facts["errors_while_full"] = list(errors)
    preview = service.preview()
    facts["preview_frames_while_full"] = preview[1]["frames"] if preview else 0
    facts["state_bytes"] = service.status().get("state_bytes")
    facts["spool_tmp_left"] = sorted(p.name for p in state.rglob("*.tmp"))
    ballast.unlink()  # space again: the next checkpoint (every 1 s) holds every frame
    facts["saved_after_freeing"] = await wait_for(lambda: len(saved()) == n, timeout=30)
    facts["ledger_after_freeing"] = saved()
    fill(ballast)  # full again, then stop: the frame in hand is finished, exit 0
    service.request_stop()
    try:
        facts["exit"] = await asyncio.wait_for(run, 60)
    except Exception as exc:
        facts["exit"] = f"{type(exc).__name__}: {exc}"

asyncio.run(scenario())
print("FACTS " + json.dumps(facts))
"""


@pytest.fixture(scope="module")
def full_disk_facts(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("full-disk")
    state = root / "state"
    state.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run(
        ["unshare", "-rm", "sh", "-c",
         f'mount -t tmpfs -o size=16m tmpfs "$2" || exit {MOUNT_FAILED}; exec "$0" -c "$1" "$3" "$2" "$4"',
         sys.executable, SCRIPT, str(state), str(root), str(N_FRAMES)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if out.returncode == MOUNT_FAILED:
        pytest.skip(f"cannot mount a tmpfs here: {out.stderr.strip()[-300:]}")
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("FACTS ")), None)
    assert out.returncode == 0 and line, out.stderr[-4000:]
    return json.loads(line[len("FACTS "):])


@needs_unshare
def test_full_disk_does_not_stop_live_stacking(full_disk_facts):
    f = full_disk_facts
    # Every frame stacked at full resolution while no byte could be written.
    assert f["all_stacked_while_full"], f["counts_while_full"]
    assert f["counts_while_full"] == {"stacked": N_FRAMES, "rejected": 0, "errors": 0}
    assert list(f["stacks_while_full"].values()) == [N_FRAMES]
    # The spool and the checkpoint did fail, saying so (control: the disk really was full).
    assert any("spooling" in e and "No space left" in e for e in f["errors_while_full"]), f["errors_while_full"]
    assert any("checkpoint" in e and "No space left" in e for e in f["errors_while_full"]), f["errors_while_full"]
    # No half-written temp files hold on to the space.
    assert f["spool_tmp_left"] == []
    assert f["state_bytes"] > 15_000_000  # status counts the ballast: the disk use is visible
    # Space again: the retried checkpoint holds every frame.
    assert f["saved_after_freeing"], f["ledger_after_freeing"]


@needs_unshare
def test_full_disk_does_not_stop_the_live_preview(full_disk_facts):
    assert full_disk_facts["preview_frames_while_full"] == N_FRAMES


@needs_unshare
def test_stop_on_a_full_disk_exits_0(full_disk_facts):
    assert full_disk_facts["exit"] == 0
