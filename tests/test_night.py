"""A night on INDI's real simulators: meridian flip, altitude limits, dawn (faults, safe ends and
resume: test_night_faults.py).

The sky clock is the real one: each test puts its site where it is the middle of the night now
(tests/solar_noaa.py `night_site`) and picks its target from the current sidereal time, so they
pass at any hour. Each indiserver runs with HOME in the test's folder: the telescope simulator
saves the site it is told in ~/.indi, which would move every later simulator's sky.

What INDI 1.9.9's telescope simulator does (read from its source and seen here): it is a German
equatorial mount (MOUNT_TYPE EQ_GEM, SIM_PIER_SIDE on); each goto picks the pier side from the
target's hour angle against FLIP_HA (deg, 0 by default): west (looking east) before it, east
after. Tracking alone never flips it: only a goto past FLIP_HA does. The CCD simulator draws
its field turned by 180 deg while the mount reports pier side east (its base class follows
TELESCOPE_PIER_SIDE; seen: frames of one target at west and east register at -179.9 deg), as a
real camera on a German mount turns with the tube.
"""

from __future__ import annotations

import asyncio
import types
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from daemon import sky
from daemon.acquisition import run_acquisition
from daemon.io.load import load_frame
from daemon.pipeline.align import register
from daemon.pipeline.live import LivePipeline
from daemon.pipeline.stars import measure
from daemon.routing import StackKey
from daemon.settings import CameraSettings, IndiSettings, MountSettings, PlanSettings, SiteSettings
from drivers.indi_client import IndiClient
from drivers.indiserver import IndiServer, free_port
from tests import solar_noaa as noaa

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("indi_installed")]

DRIVERS = ["indi_simulator_telescope", "indi_simulator_ccd"]
CCD, SCOPE = "CCD Simulator", "Telescope Simulator"


def scope_and_camera(tmp_path: Path):
    """An indiserver with the telescope and CCD simulators, HOME in the test's folder (see
    above), killed afterwards: the body of this file's and test_night_faults.py's fixture."""
    srv = IndiServer(DRIVERS, free_port(), log_path=tmp_path / "indiserver.log", env={"HOME": str(tmp_path)})
    asyncio.run(srv.start())
    yield srv
    srv.kill()


@pytest.fixture
def server(tmp_path):
    yield from scope_and_camera(tmp_path)


class Recorder:
    def __init__(self):
        self.events: list[dict] = []

    async def publish(self, kind, payload):
        if kind == "plan":
            self.events.append(payload)

    def states(self) -> list[str]:
        return [p["state"] for p in self.events]

    def plan(self, state: str) -> list[dict]:
        return [p for p in self.events if p["state"] == state]


async def until(condition, timeout: float, task=None) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert task is None or not task.done(), task.result() if not task.exception() else task.exception()
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.1)


def night_site() -> SiteSettings:
    lat, lon = noaa.night_site(datetime.now(UTC))
    return SiteSettings(lat, lon, 100.0)


def target_at(site: SiteSettings, hour_angle_min: float, dec_deg: float) -> tuple[float, float]:
    """J2000 (ra, dec) of a target at hour angle `hour_angle_min` (minutes of time) now."""
    now = datetime.now(UTC)
    want = (float(sky.local_sidereal_deg(site, now)) - hour_angle_min / 4.0) % 360.0
    ra = want
    for _ in range(3):  # apparent place of date -> J2000
        app, _ = sky.apparent_radec(ra, dec_deg, now)
        ra = (ra + (want - app + 180.0) % 360.0 - 180.0) % 360.0
    return ra, dec_deg


def config(capture: Path, port: int, site: SiteSettings | None, mount: MountSettings | None = None, **plan):
    return types.SimpleNamespace(
        indi=IndiSettings(port=port), camera=CameraSettings(binning=1, gain=90, upload_prefix="light"),
        plan=PlanSettings(**{"target": "T", "exposure_s": 1.0, "settle_s": 0.2, "center": False, **plan}),
        site=site, mount=mount or MountSettings(settle_s=1.0), capture=types.SimpleNamespace(dir=str(capture)))


async def mount_state(port: int) -> dict:
    client = IndiClient("127.0.0.1", port)
    await client.connect()
    try:
        park = await client.wait_for(SCOPE, "TELESCOPE_PARK", timeout=10)
        track = await client.wait_for(SCOPE, "TELESCOPE_TRACK_STATE", timeout=10)
        geo = await client.wait_for(SCOPE, "GEOGRAPHIC_COORD", timeout=10)
        return {"parked": park.values["PARK"], "tracking": track.values["TRACK_ON"], "site": geo.values}
    finally:
        await client.close()


def test_meridian_flip_keeps_the_stack_and_until_dawn_is_noaa_dawn(server, tmp_path):
    """A target 1.5 min east of the meridian, flip 0.25 min past it: the plan flips, the pier
    side changes, and frames after it register onto those before with the 180 deg turn, with
    round stars. `until = "dawn"` in every event is NOAA's astronomical dawn within 2 min."""
    site = night_site()
    # Dec 85 on the site's side: at |latitude| 30 it stays above 25 deg all night (circumpolar
    # above the limit), so dawn and not its setting ends the plan.
    ra, dec = target_at(site, -1.5, 85.0 if site.latitude > 0 else -85.0)
    events, stop = Recorder(), asyncio.Event()
    cfg = config(tmp_path, server.port, site, MountSettings(flip_after_min=0.25, flip_max_wait_min=1.0, settle_s=1.0),
                 ra=ra, dec=dec, until="dawn", count=0, exposure_s=3.0)

    async def main():
        task = asyncio.ensure_future(run_acquisition(cfg, events, stop))
        await until(lambda: len([p for p in events.plan("running") if p["pier_side"] == "east"]) >= 3, 300, task)
        stop.set()
        return await asyncio.wait_for(task, 60), await mount_state(server.port)

    summary, mount = asyncio.run(main())
    assert summary["state"] == "stopped", summary
    assert mount["site"]["LAT"] == pytest.approx(site.latitude)  # the plan told the mount its site
    assert mount["site"]["LONG"] == pytest.approx(site.longitude % 360.0)
    flips = events.plan("flipping")
    assert len(flips) == 1 and flips[0]["pier_side"] == "west" and flips[0]["hour_angle_min"] >= 0.25
    running = events.plan("running")
    sides = [p["pier_side"] for p in running]
    k = sides.index("east")
    assert k >= 1 and set(sides[:k]) == {"west"} and set(sides[k:]) == {"east"}, sides
    assert running[k].get("flipped") is True
    order = events.states()
    assert order.index("flipping") < order.index("running", order.index("flipping"))
    # until: the astronomical dawn at this site, by NOAA's equations.
    dawn = noaa.sun_crossing(datetime.now(UTC) - timedelta(minutes=10), site.latitude, site.longitude, -18.0, True)
    iso = {p["until"] for p in events.events[1:]}  # from the first event after "starting"
    assert events.events[0]["state"] == "starting" and len(iso) == 1
    assert abs((datetime.fromisoformat(iso.pop()) - dawn).total_seconds()) < 120
    # The frames: the last before the flip is the reference; after the flip the field is turned
    # by 180 deg and registers onto it (what the live stack does), stars still round.
    before, after = Path(running[k - 1]["path"]), [Path(p["path"]) for p in running[k:]]

    def stars(path):
        return measure(fits.getdata(path).astype(np.float32), None)

    ref, ref_m = stars(before)
    assert len(ref) >= 40  # 3 s near the pole at binning 1: 77-79 stars (seen)
    for path in after:
        st, m = stars(path)
        reg = register(st, ref)
        assert reg.ok, reg.reason
        assert abs(abs(reg.rotation_deg) - 180.0) < 0.5 and reg.n_matched >= 15, reg.as_dict()
        assert reg.scale == pytest.approx(1.0, abs=0.01) and reg.rms_px < 0.5
        assert m.fwhm_px == pytest.approx(ref_m.fwhm_px, rel=0.15)
        # As round as before the flip (seen: eccentricity 0.26-0.30, elongation 1.03-1.05 both sides).
        assert m.eccentricity < ref_m.eccentricity + 0.1 and m.elongation < 1.1, m.as_dict()
    # The control: a frame from before the flip registers with no turn.
    reg0 = register(stars(Path(running[k - 2]["path"]))[0], ref)
    assert reg0.ok and abs(reg0.rotation_deg) < 0.5
    # Stacked as the daemon stacks them (its routing and live pipeline): every frame, before
    # and after the flip, into one stack, whose stars are as round as a single frame's.
    frames = [load_frame(p["path"]) for p in running]
    assert len({StackKey.of(f.meta) for f in frames}) == 1
    pipe = LivePipeline()
    results = [pipe.process(f) for f in frames]
    assert all(r.accepted for r in results), [r.reason for r in results]
    assert pipe.n_stacked == len(running) and any(abs(abs(r.rotation_deg) - 180.0) < 0.5 for r in results)
    _, stacked = measure(np.nan_to_num(pipe.stack_image()), None)
    assert stacked.eccentricity < ref_m.eccentricity + 0.1 and stacked.elongation < 1.1, stacked.as_dict()


def test_target_that_never_rises_is_refused_and_nothing_moves(server, tmp_path):
    site = SiteSettings(50.0, noaa.night_site(datetime.now(UTC))[1], 100.0)
    events = Recorder()
    cfg = config(tmp_path, server.port, site, ra=6.0, dec=-72.0, count=3, park=True)
    summary = asyncio.run(asyncio.wait_for(run_acquisition(cfg, events, asyncio.Event()), 60))
    assert summary["state"] == "refused" and summary["frames"] == 0 and summary["parked"] is None
    assert "never rises above 20 deg" in summary["reason"] and "highest altitude is -" in summary["reason"]
    assert events.states() == ["starting", "refused", "refused"]
    assert events.plan("refused")[0]["reason"] == summary["reason"]
    assert not list(tmp_path.glob("*.fits"))


def test_target_below_the_limit_waits_with_its_rise_time(server, tmp_path):
    """At lower culmination now (12 h from the meridian), dec chosen to clear 20 deg later:
    the plan waits, saying when the target rises; stop ends the wait at once."""
    site = night_site()
    lat = site.latitude
    dec = 45.0 if lat > 0 else -45.0  # lower culmination at |lat| - 45 < 0: below now, up later
    ra, dec = target_at(site, 12 * 60.0, dec)
    events, stop = Recorder(), asyncio.Event()
    cfg = config(tmp_path, server.port, site, ra=ra, dec=dec, count=3)

    async def main():
        task = asyncio.ensure_future(run_acquisition(cfg, events, stop))
        await until(lambda: events.plan("waiting"), 60, task)
        stop.set()
        return await asyncio.wait_for(task, 20)

    summary = asyncio.run(main())
    waiting = events.plan("waiting")[0]
    assert summary["state"] == "stopped" and summary["frames"] == 0
    assert waiting["reason"] == "target rises" and waiting["start"] == waiting["rise"]
    rise = datetime.fromisoformat(waiting["rise"])
    # Independently: step the NOAA/Meeus altitude until it passes 20 deg.
    t = datetime.now(UTC)
    while noaa.altitude_deg(ra, dec, t, site.latitude, site.longitude)[0] < 20.0:
        t += timedelta(seconds=15)
    assert abs((rise - t).total_seconds()) < 60, (rise, t)
    assert "slewing" not in events.states()
