"""Autofocus end to end: INDI's focuser simulator sets the CCD simulator's star FWHM.

indi_simulator_focus publishes FWHM = 0.5625 t^2 + seeing (t = the distance from its best
position in units of 5000 steps); the CCD simulator draws its stars with that FWHM.
"""

from __future__ import annotations

import asyncio

import pytest

from daemon.autofocus import Autofocus, AutofocusSettings, hfr_of
from daemon.settings import CameraSettings
from drivers.camera import Camera
from drivers.focuser import Focuser
from drivers.indi_client import IndiClient
from drivers.indiserver import IndiServer, free_port
from drivers.mount import Mount

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("indi_installed")]

CCD, FOCUSER = "CCD Simulator", "Focuser Simulator"


def test_autofocus_from_far_off_reaches_the_simulators_best(tmp_path):
    srv = IndiServer(["indi_simulator_telescope", "indi_simulator_ccd", "indi_simulator_focus"], free_port(),
                     log_path=tmp_path / "indiserver.log")

    async def main():
        await srv.start()
        client = IndiClient("127.0.0.1", srv.port)
        await client.connect()
        cam, mount, focuser = Camera(client, CCD), Mount(client, "Telescope Simulator"), Focuser(client, FOCUSER)
        await cam.connect()
        await mount.connect()
        await focuser.connect()
        await cam.configure(CameraSettings(binning=1, gain=90), tmp_path, "focus")
        await cam.set_frame_type("light")
        await mount.slew(10.0, 70.0, timeout=60)
        seeing = client.prop(FOCUSER, "SEEING_SETTINGS").values["SIM_SEEING"]
        # The simulator's best: where its own FWHM equals the seeing (it starts at 7.5" at 50000).
        fwhm0 = client.prop(FOCUSER, "FWHM").values["SIM_FWHM"]
        best_pos = round(focuser.position() - ((fwhm0 - seeing) / 0.5625) ** 0.5 * 5000)
        await focuser.move_to(best_pos)
        await asyncio.sleep(0.5)
        assert client.prop(FOCUSER, "FWHM").values["SIM_FWHM"] == pytest.approx(seeing, abs=0.05)
        best_hfr, _ = hfr_of(await cam.expose(0.5, "best"))
        await focuser.move_to(50000)
        af = Autofocus(focuser, cam, AutofocusSettings(step=8000, points=5, exposure_s=0.5))
        result = await af.run(start_offset_steps=12000)  # 25300 steps from the best: FWHM ~17"
        final_fwhm = client.prop(FOCUSER, "FWHM").values["SIM_FWHM"]
        await client.close()
        return result, best_pos, best_hfr, final_fwhm, seeing

    try:
        result, best_pos, best_hfr, final_fwhm, seeing = asyncio.run(asyncio.wait_for(main(), 240))
    finally:
        srv.kill()
    assert result["event"] == "autofocus" and result["ok"], result
    assert result["hfr_px_start"] > 2.5 * best_hfr  # it did start far out of focus
    assert result["hfr_px"] <= 1.2 * best_hfr
    assert abs(result["position"] - best_pos) < 2500 and final_fwhm < 1.2 * seeing
    assert len(result["curve"]) >= 5 and all({"position", "hfr_px"} <= set(c) for c in result["curve"])
    assert not list(tmp_path.glob(".lightbucket-focus*"))
