"""`lightbucket demo`, the README's main command, as a user runs it: a real subprocess.

With INDI's simulators: darks -> master dark, dithered lights through indiserver, live stack,
final re-stack and preview. --synthetic: the watch-folder path with generated frames."""

from __future__ import annotations

import json
import re
import subprocess
import threading
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
LIGHTBUCKET = ROOT / ".venv" / "bin" / "lightbucket"

pytestmark = pytest.mark.slow


def run_demo(out: Path, *args: str) -> str:
    proc = subprocess.run([str(LIGHTBUCKET), "demo", "--out", str(out), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    return proc.stdout


def check_products(out: Path, stack_name: str, n: int) -> fits.Header:
    live = fits.getheader(out / f"{stack_name}.fits")
    final = fits.open(out / f"{stack_name}_final.fits")[0]
    assert live["NCOMBINE"] == n and final.header["NCOMBINE"] == n
    assert final.header["BITPIX"] == -32 and np.isfinite(final.data).all()  # 32-bit float
    with Image.open(out / "preview.jpg") as im:
        assert im.format == "JPEG" and im.size[0] == final.data.shape[-1]
        pixels = np.asarray(im)
    assert 5 < pixels.mean() < 200 and pixels.std() > 5  # stretched: neither black nor blown out
    return live


@pytest.mark.usefixtures("indi_installed")
def test_demo_with_indi_simulators(tmp_path):
    stdout = run_demo(tmp_path, "--frames", "4", "--darks", "2", "--exposure", "1")
    assert "4 stacked, 0 rejected, 0 errors" in stdout
    live = check_products(tmp_path, "NGC-7789_Luminance_1s_bin1", 4)
    master = Path(live["DARKFRM"])  # the lights were calibrated with the dark plan's master
    assert master.parent == tmp_path / "state" / "masters" and fits.getheader(master)["NCOMBINE"] == 2
    assert len(list((tmp_path / "capture" / "calibration" / "dark").glob("*.fits"))) == 2


def test_demo_synthetic_watch_folder(tmp_path):
    # The page's address is printed first, and the page answers while the demo runs.
    proc = subprocess.Popen([str(LIGHTBUCKET), "demo", "--out", str(tmp_path), "--synthetic", "--frames", "6",
                             "--web", "127.0.0.1:0"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    url, seen = None, []
    for line in proc.stderr:
        seen.append(line)
        if m := re.search(r"live page at (http://\S+) while the demo runs", line):
            url = m.group(1)
            break
    assert url and url.startswith("http://127.0.0.1:"), seen
    threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep the pipe drained
    states = set()
    while proc.poll() is None:
        try:
            with urllib.request.urlopen(url + "api/status", timeout=5) as r:
                states.add(json.loads(r.read())["state"])
            with urllib.request.urlopen(url, timeout=5) as r:
                assert b"lightbucket" in r.read()
        except OSError:
            pass  # not up yet, or already stopped
    proc.wait(240)
    stdout = proc.stdout.read()
    assert proc.returncode == 0 and "6 stacked, 0 rejected, 0 errors" in stdout
    assert "running" in states  # the page was reachable during the run
    check_products(tmp_path, "Synthetic-field_L_2s_bin1", 6)
    # Run again into the same folder: a fresh session, not a resumed one.
    stdout = run_demo(tmp_path, "--synthetic", "--frames", "5")
    assert "5 stacked" in stdout
    check_products(tmp_path, "Synthetic-field_L_2s_bin1", 5)
