"""A watch-only daemon needs no INDI: `pip install .` without the [indi] extra stacks frames.

PyIndi is made unimportable in the daemon's process (a `sitecustomize` that refuses it, as a
venv without the extra would), then `lightbucket run` watches a folder and stacks what lands
in it; a config with [indi] is refused at start with the install line.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
from astropy.io import fits

from daemon.simulate import Exposure, Sensor, expose, fits_header, random_star_field, transform_matrix

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
LIGHTBUCKET = ROOT / ".venv" / "bin" / "lightbucket"
BLOCKER = '''
import sys

class _NoIndi:
    """As in a venv without lightbucket[indi]: PyIndi and dbus are not installed."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("PyIndi", "dbus"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, _NoIndi())
'''


def env_without_indi(tmp_path: Path) -> dict:
    site = tmp_path / "no-indi"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER)
    path = [str(site), str(ROOT), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p), "PYTHONUNBUFFERED": "1"}


def test_pyindi_is_an_extra_not_a_dependency():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not any(d.lower().startswith("pyindi") for d in project["dependencies"])
    assert any(d.lower().startswith("pyindi-client") for d in project["optional-dependencies"]["indi"])


def test_config_and_service_import_without_pyindi(tmp_path):
    code = ("import sys, daemon.config, daemon.service, daemon.cli, daemon.web.server\n"
            "assert 'PyIndi' not in sys.modules, 'PyIndi loaded'\n"
            "import PyIndi\n")
    out = subprocess.run([sys.executable, "-c", code], env=env_without_indi(tmp_path), capture_output=True,
                         text=True, timeout=120)
    # The imports went through; only the explicit `import PyIndi` at the end fails (the control).
    assert out.returncode == 1 and "No module named 'PyIndi'" in out.stderr, out.stderr
    assert "PyIndi loaded" not in out.stderr


def _frame(path: Path, i: int) -> None:
    shape = (160, 160)
    field = random_star_field(shape, 150, seed=3, margin=0.1)
    data = expose(shape, field, Exposure(exposure_s=10.0, matrix=transform_matrix(0.7 * i, -0.4 * i), seed=i))
    fits.writeto(path, data, fits.Header(fits_header(exposure_s=10.0, filter_name="L", target="NO INDI")))


def test_watch_only_daemon_stacks_without_pyindi_and_indi_config_is_refused(tmp_path):
    env = env_without_indi(tmp_path)
    capture, state = tmp_path / "capture", tmp_path / "state"
    capture.mkdir()
    config = tmp_path / "watch.toml"
    config.write_text(f'[capture]\ndir = "{capture}"\n[state]\ndir = "{state}"\n')
    log = tmp_path / "daemon.log"
    proc = subprocess.Popen([str(LIGHTBUCKET), "run", "--config", str(config)], env=env,
                            stdout=log.open("wb"), stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while "backlog:" not in log.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            time.sleep(0.2)
        stage = tmp_path / "stage"
        stage.mkdir()
        for i in range(3):
            _frame(stage / f"f{i}.fits", i)
            os.replace(stage / f"f{i}.fits", capture / f"f{i}.fits")
        while "stacked #3" not in log.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            time.sleep(0.2)
        assert "stacked #3" in log.read_text(), log.read_text()[-2000:]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    (stack,) = (state / "output").glob("NO-INDI_*.fits")
    assert fits.getheader(stack)["NCOMBINE"] == 3

    config.write_text(config.read_text() + '[indi]\nport = 7999\n')
    out = subprocess.run([str(LIGHTBUCKET), "run", "--config", str(config)], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert "[indi]: device control is not installed" in out.stderr and "lightbucket[indi]" in out.stderr


def test_a_frame_of_another_program_finds_its_stack_made_while_it_was_written(tmp_path):
    """A polled folder (a network share: no inotify), frames written by another program: the
    watcher sees the file at its header, and the daemon makes the colour stack then
    (`Session.prepare_for`), while the rest of the file arrives; the frame takes it."""
    capture, state = tmp_path / "capture", tmp_path / "state"
    capture.mkdir()
    config = tmp_path / "watch.toml"
    config.write_text(f'[capture]\ndir = "{capture}"\npoll = true\nsettle_s = 1.0\n[state]\ndir = "{state}"\n')
    shape = (240, 320)
    field = random_star_field(shape, 150, seed=3, margin=0.1)
    data = expose(shape, field, Exposure(exposure_s=10.0, seed=0), Sensor(bayer="RGGB"))
    fits.writeto(tmp_path / "whole.fits", data,
                 fits.Header(fits_header(exposure_s=10.0, filter_name="L", target="SHARE", bayer="RGGB")))
    raw = (tmp_path / "whole.fits").read_bytes()
    log = tmp_path / "daemon.log"
    proc = subprocess.Popen([str(LIGHTBUCKET), "run", "--config", str(config)], env=env_without_indi(tmp_path),
                            stdout=log.open("wb"), stderr=subprocess.STDOUT)

    def wait_for(text: str) -> None:
        deadline = time.monotonic() + 120
        while text not in log.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            time.sleep(0.1)
        assert text in log.read_text(), log.read_text()[-2000:]

    try:
        wait_for("backlog:")
        with open(capture / "f0.fits", "wb") as fh:
            fh.write(raw[:2880])  # the header: the capture program is still writing
            fh.flush()
            wait_for("stack of 320x240 colour made ahead of its first frame")
            fh.write(raw[2880:])
        wait_for("stacked #1")
        assert "new stack SHARE_L_10s_bin1 (made ahead)" in log.read_text(), log.read_text()[-2000:]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
