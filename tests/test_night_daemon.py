"""`lightbucket run` killed with SIGKILL mid-plan and started again: the plan goes on where it
was, through the daemon's own supervisor (its queue in <state.dir>/queue.json).

The indiserver runs outside the daemon (INDI's simulators, HOME in the test's folder), so it
survives the kill like a rig's would. The site is put at local midnight and the target an hour
east of the meridian, so the test passes at any hour.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from astropy.io import fits

from drivers.indiserver import IndiServer, free_port
from tests import solar_noaa as noaa
from tests.test_night import target_at

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("indi_installed")]

ROOT = Path(__file__).resolve().parents[1]
COUNT = 6


def test_daemon_killed_mid_plan_resumes_it_without_retaking_frames(tmp_path):
    from daemon.settings import SiteSettings

    srv = IndiServer(["indi_simulator_telescope", "indi_simulator_ccd"], free_port(),
                     log_path=tmp_path / "indiserver.log", env={"HOME": str(tmp_path)})
    asyncio.run(srv.start())
    lat, lon = noaa.night_site(datetime.now(UTC))
    site = SiteSettings(lat, lon, 100.0)
    ra, dec = target_at(site, -60.0, lat)
    capture, state = tmp_path / "capture", tmp_path / "state"
    config = tmp_path / "night.toml"
    config.write_text(f'''
[capture]
dir = "{capture}"
[state]
dir = "{state}"
checkpoint_every_s = 0
[indi]
port = {srv.port}
[camera]
binning = 2
[site]
latitude = {lat}
longitude = {lon}
[plan]
target = "Resume"
ra = {ra}
dec = {dec}
exposure_s = 1.0
count = {COUNT}
settle_s = 0.2
center = false
''')
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-c", "import sys; from daemon.cli import main; sys.exit(main())", "run", "--config",
           str(config)]
    log = open(tmp_path / "daemon.log", "ab")
    qfile = state / "queue.json"

    def recorded() -> dict:
        try:
            return json.loads(qfile.read_text())["entries"][0]
        except (OSError, ValueError, IndexError, KeyError):
            return {}

    def wait(condition, timeout, what):
        deadline = time.monotonic() + timeout
        while not condition():
            assert proc.poll() is None, f"daemon exited ({proc.returncode}) waiting for {what}"
            assert time.monotonic() < deadline, f"no {what} in {timeout} s"
            time.sleep(0.2)

    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait(lambda: len(recorded().get("paths", [])) >= 2, 240, "2 frames")
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(10) == -signal.SIGKILL
        before = recorded()["paths"]
        assert 2 <= len(before) < COUNT and recorded()["state"] == "running"
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        wait(lambda: recorded().get("state") == "done", 240, "the plan done")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
        srv.kill()
    entry = recorded()
    assert len(entry["paths"]) == COUNT and len(set(entry["paths"])) == COUNT
    assert entry["paths"][:len(before)] == before  # kept, not taken again
    on_disk = sorted(capture.glob("light_Resume_*.fits"))
    # At most one more on disk than recorded: a frame the driver finished as the daemon died.
    assert set(entry["paths"]) <= {str(p) for p in on_disk} and len(on_disk) <= COUNT + 1
    # Every frame on disk in the one stack, once.
    (stack,) = [p for p in (state / "output").glob("*.fits") if "_final" not in p.name]
    assert fits.getheader(stack)["NCOMBINE"] == len(on_disk)
