"""Centring end to end: INDI simulators drawing the real sky (Tycho-2), a mount that misses.

The CCD simulator's sensor is made 2560x2048 (1280x1024 binned, 51' x 41' at 2.38"/px) so
that its field holds enough Tycho-2 stars to solve; the mount misses by 300" E, 200" S until
synced (`PointingErrorMount`).
"""

from __future__ import annotations

import asyncio
import types

import pytest

from daemon.acquisition import run_acquisition
from daemon.settings import CameraSettings, IndiSettings, PlanSettings
from daemon.centering import CenterSettings, solve_path
from daemon.wcs import separation_arcsec
from drivers.indi_client import IndiClient
from drivers.indiserver import IndiServer, free_port
from tests.conftest import require_tools

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("indi_installed")]

CCD = "CCD Simulator"
RA, DEC = 10.0, 70.0
ERROR = (300.0, -200.0)


class Recorder:
    def __init__(self):
        self.events: list[tuple[str, dict]] = []

    async def publish(self, kind, payload):
        self.events.append((kind, payload))

    def plan(self, state):
        return [p for k, p in self.events if k == "plan" and p["state"] == state]


@pytest.fixture
def real_sky_server(tmp_path):
    require_tools("solve-field", "query-starkd")
    # The focuser simulator sets the stars' FWHM (7.5" where it starts): without it they are so
    # sharp (peak 66 % of the flux) that the star detection takes them for hot pixels.
    srv = IndiServer(["indi_simulator_telescope", "indi_simulator_ccd", "indi_simulator_focus"], free_port(),
                     log_path=tmp_path / "indiserver.log", env={"LIGHTBUCKET_GSC_SKY": "real"})

    async def start():
        await srv.start()
        client = IndiClient("127.0.0.1", srv.port)
        await client.connect()
        await client.connect_device(CCD, 10)
        await client.connect_device("Focuser Simulator", 10)
        await client.wait_for(CCD, "SIMULATOR_SETTINGS", timeout=10)
        client.send_number(CCD, "SIMULATOR_SETTINGS", {"SIM_XRES": 2560, "SIM_YRES": 2048})
        await client.wait_for(CCD, "SIMULATOR_SETTINGS", lambda p: p.values["SIM_XRES"] == 2560, 10)
        await client.close()

    asyncio.run(start())
    yield srv
    srv.kill()


def test_plan_centres_the_target_despite_the_mount_missing(real_sky_server, tmp_path):
    events = Recorder()
    cfg = types.SimpleNamespace(
        indi=IndiSettings(port=real_sky_server.port, drivers=(), filter_wheel=CCD, sim_sky="real",
                          sim_pointing_error_arcsec=ERROR),
        camera=CameraSettings(binning=2, gain=90, upload_prefix="light"),
        plan=PlanSettings(target="Cas field", ra=RA, dec=DEC, filter="Luminance", exposure_s=1.0, count=2,
                          settle_s=0.2, center=True, center_tolerance_arcsec=30.0, center_exposure_s=1.0),
        capture=types.SimpleNamespace(dir=str(tmp_path)))
    summary = asyncio.run(asyncio.wait_for(run_acquisition(cfg, events, asyncio.Event()), 240))
    assert summary["state"] == "done"
    centering = events.plan("centering")
    first = centering[0]["error_arcsec"]
    assert first == pytest.approx((ERROR[0] ** 2 + ERROR[1] ** 2) ** 0.5, rel=0.1)  # the miss, measured
    centered = events.plan("centered")
    assert len(centered) == 1 and centered[0]["error_arcsec"] <= 30.0 and len(centering) >= 2
    assert not list(tmp_path.glob(".lightbucket-center*"))  # centring frames cleaned up
    # The plan's own light frames, solved independently, are centred on the target.
    lights = sorted(tmp_path.glob("light*.fits"))
    assert len(lights) == 2
    sol = solve_path(lights[-1], RA + 1.0, DEC, CenterSettings(radius_deg=5.0))
    assert sol.ok, sol.reason
    assert separation_arcsec(sol.ra_deg, sol.dec_deg, RA, DEC) <= 30.0

