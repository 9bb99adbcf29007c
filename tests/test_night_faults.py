"""A night on INDI's real simulators, when it goes wrong: a flip that does not flip, repeated
camera faults, a plan resumed after a stop or a kill -9, a queue with a target it refuses.
(tests/test_night.py has the simulators' behaviour and the helpers; these tests are a file of
their own so that the suite's workers share the long ones.)"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from daemon.acquisition import AcquisitionError, PlanRunner, run_acquisition
from daemon.settings import MountSettings, PlanSettings
from drivers.indi_client import IndiClient, IndiError
from tests.test_night import CCD, SCOPE, Recorder, config, mount_state, night_site, scope_and_camera, target_at, until

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("indi_installed")]


@pytest.fixture
def server(tmp_path):
    yield from scope_and_camera(tmp_path)


def test_flip_that_does_not_change_pier_side_stops_and_parks(server, tmp_path):
    """The simulator set to flip only 5 deg (20 min) past the meridian: our flip goto leaves the
    pier side as it was; the plan stops, says why and parks."""
    site = night_site()

    async def set_flip_ha():
        client = IndiClient("127.0.0.1", server.port)
        await client.connect()
        await client.wait_for(SCOPE, "FLIP_HA", timeout=10)
        gen = client.send_number(SCOPE, "FLIP_HA", {"FLIP_HA": 5.0})
        await client.wait_for(SCOPE, "FLIP_HA", lambda p: p.values["FLIP_HA"] == 5.0, 10, gen)
        await client.close()

    asyncio.run(set_flip_ha())
    ra, dec = target_at(site, -0.6, site.latitude - 10.0 if site.latitude > 0 else site.latitude + 10.0)
    events = Recorder()
    cfg = config(tmp_path, server.port, site, MountSettings(flip_after_min=0.1, settle_s=0.5), ra=ra, dec=dec,
                 count=0)
    with pytest.raises(AcquisitionError, match="pier side did not change"):
        asyncio.run(asyncio.wait_for(run_acquisition(cfg, events, asyncio.Event()), 240))
    assert events.states()[-3:] == ["flipping", "parking", "failed"], events.states()
    final = events.events[-1]
    assert final["parked"] is True and final["ended"] == "flip failed" and "west" in final["error"]
    assert asyncio.run(mount_state(server.port))["parked"] is True


class FaultyCamera(IndiClient):
    """The real client, whose camera refuses every exposure once `broken` (a device fault)."""

    broken = False

    def send_number(self, device, name, values):
        if self.broken and device == CCD and name == "CCD_EXPOSURE":
            raise IndiError(f"{device} refused the exposure (injected fault)")
        return super().send_number(device, name, values)


def test_repeated_faults_park_the_mount_and_a_failed_park_stops_tracking(server, tmp_path):
    site = night_site()
    ra, dec = target_at(site, -60.0, site.latitude)
    cfg = config(tmp_path, server.port, site, ra=ra, dec=dec, count=10, max_faults=2)

    async def main(park_fails: bool):
        events = Recorder()
        client = FaultyCamera("127.0.0.1", server.port)
        runner = PlanRunner(cfg.indi, cfg.camera, cfg.plan, tmp_path, events, asyncio.Event(), client=client,
                            site=site, mount_settings=cfg.mount, backoff_s=(0.1, 0.2))
        if park_fails:
            async def park(timeout=0):
                raise IndiError("park refused (injected)")
            runner.mount.park = park
        task = asyncio.ensure_future(runner.run())
        await until(lambda: len(events.plan("running")) >= 2, 120, task)
        client.broken = True
        with pytest.raises(AcquisitionError, match="2 faults"):
            await asyncio.wait_for(task, 120)
        await client.close()
        return events, await mount_state(server.port)

    events, mount = asyncio.run(main(park_fails=False))
    assert events.states()[-2:] == ["parking", "failed"] and "retrying" in events.states()
    assert events.events[-1]["parked"] is True and mount["parked"] is True
    assert events.plan("parking")[0]["reason"] == "faults"

    async def unpark():
        client = IndiClient("127.0.0.1", server.port)
        await client.connect()
        await client.wait_for(SCOPE, "TELESCOPE_PARK", timeout=10)
        gen = client.send_switch(SCOPE, "TELESCOPE_PARK", ["UNPARK"])
        await client.wait_state(SCOPE, "TELESCOPE_PARK", gen, 10)
        await client.close()

    asyncio.run(unpark())
    events, mount = asyncio.run(main(park_fails=True))
    failed = events.plan("park failed")
    assert len(failed) == 1 and failed[0]["tracking"] is False and "tracking switched off" in failed[0]["note"]
    assert "park refused" in failed[0]["error"]
    assert events.events[-1]["parked"] is False
    assert mount["parked"] is False and mount["tracking"] is False  # the simulator itself says so


def test_resume_takes_only_the_frames_left_and_parks_at_the_end(server, tmp_path):
    """A restarted plan given the frames it took before (done_paths) takes only the rest."""
    site = night_site()
    ra, dec = target_at(site, -60.0, site.latitude)
    earlier = [str(tmp_path / f"light_T_1s_{i:04d}.fits") for i in range(2)]
    cfg = config(tmp_path, server.port, site, ra=ra, dec=dec, count=3, park=True)
    events = Recorder()
    summary = asyncio.run(asyncio.wait_for(
        run_acquisition(cfg, events, asyncio.Event(), done_paths=earlier), 120))
    assert summary["state"] == "done" and summary["frames"] == 3 and summary["paths"][:2] == earlier
    assert [p["frame"] for p in events.plan("running")] == [3]
    assert len(list(tmp_path.glob("light_*.fits"))) == 1
    assert summary["parked"] is True and asyncio.run(mount_state(server.port))["parked"] is True
    assert events.plan("parking")[0]["reason"] == "end of plan"


def test_queue_refuses_one_target_runs_the_next_and_survives_kill_9(server, tmp_path):
    """A queue of two: the first never rises (refused, the queue moves on), the second takes 6
    frames; the process running it is killed (SIGKILL) after 2 frames and started again: the
    plan goes on with the frames it has and ends with 6, none taken twice."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    from daemon.plan_queue import PlanQueue

    site = night_site()
    ra, dec = target_at(site, -60.0, site.latitude)
    never = -abs(site.latitude) - 60.0 if site.latitude > 0 else abs(site.latitude) + 60.0
    plans = [dict(target="Never", ra=10.0, dec=never, count=3, exposure_s=0.5, center=False),
             dict(target="Good", ra=ra, dec=dec, count=6, exposure_s=1.0, center=False, settle_s=0.2)]
    qfile = tmp_path / "queue.json"
    args = json.dumps({"port": server.port, "capture": str(tmp_path), "queue_file": str(qfile),
                       "site": [site.latitude, site.longitude, 100.0], "plans": plans})
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}

    def recorded() -> list[str]:
        try:
            return json.loads(qfile.read_text())["entries"][1]["paths"]
        except (OSError, ValueError, IndexError, KeyError):
            return []

    child = subprocess.Popen([sys.executable, "-m", "tests.queue_child", args], env=env)
    try:
        deadline = time.monotonic() + 180
        while len(recorded()) < 2:
            assert child.poll() is None and time.monotonic() < deadline, "the queue did not get going"
            time.sleep(0.2)
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        before = recorded()
        assert 2 <= len(before) < 6
        child = subprocess.Popen([sys.executable, "-m", "tests.queue_child", args], env=env)
        assert child.wait(timeout=180) == 0
    finally:
        if child.poll() is None:
            child.kill()
    queue = PlanQueue.load(qfile, [PlanSettings(**p) for p in plans])
    first, second = queue.entries
    assert first.state == "refused" and "never rises above 20 deg" in first.reason
    assert second.state == "done" and len(second.paths) == 6 and len(set(second.paths)) == 6
    assert second.paths[:len(before)] == before  # the frames from before the kill kept, not retaken
    on_disk = sorted(tmp_path.glob("light_Good_*.fits"))
    # At most one more on disk than recorded: a frame the driver finished as the process died.
    assert set(second.paths) <= {str(p) for p in on_disk} and len(on_disk) <= 7
