"""Autofocus end to end: INDI's focuser simulator sets the CCD simulator's star FWHM.

indi_simulator_focus publishes FWHM = 0.5625 t^2 + seeing (t = the distance from its best
position in units of 5000 steps); the CCD simulator draws its stars with that FWHM. One
session: an autofocus from far off (the command's start_offset_steps), then a night's refocus
triggers on the real frames: the FWHM rising after the focus is knocked off (the pipeline's
own measurement), and the focuser's temperature probe dropping.
"""

from __future__ import annotations

import asyncio

import pytest

from daemon.autofocus import autofocus_command, hfr_of, run_autofocus
from daemon.focus import RefocusTrigger
from daemon.io.load import load_frame
from daemon.pipeline.live import LivePipeline
from daemon.settings import CameraSettings, FocusSettings
from drivers.camera import Camera
from drivers.focuser import Focuser
from drivers.indi_client import IndiClient
from drivers.indiserver import IndiServer, free_port
from drivers.mount import Mount

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("indi_installed")]

CCD, FOCUSER = "CCD Simulator", "Focuser Simulator"
EVENT_KEYS = {"event", "ok", "position", "hfr_px", "hfr_px_start", "curve"}


def test_autofocus_from_far_off_and_the_refocus_triggers(tmp_path):
    srv = IndiServer(["indi_simulator_telescope", "indi_simulator_ccd", "indi_simulator_focus"], free_port(),
                     log_path=tmp_path / "indiserver.log")
    events: list[tuple[str, dict]] = []

    async def publish(kind, payload):
        events.append((kind, payload))

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
        fwhm_sim = lambda: client.prop(FOCUSER, "FWHM").values["SIM_FWHM"]  # noqa: E731
        seeing = client.prop(FOCUSER, "SEEING_SETTINGS").values["SIM_SEEING"]
        # The simulator's best: where its own FWHM equals the seeing (it starts at 7.5" at 50000).
        best_pos = round(focuser.position() - ((fwhm_sim() - seeing) / 0.5625) ** 0.5 * 5000)
        await focuser.move_to(best_pos)
        await asyncio.sleep(0.5)
        assert fwhm_sim() == pytest.approx(seeing, abs=0.05)
        best_hfr, _ = hfr_of(await cam.expose(0.5, "best"))
        out = {"best_pos": best_pos, "best_hfr": best_hfr, "seeing": seeing}

        # 1. {"action": "autofocus", "start_offset_steps": 12000} from 50000: 25300 steps off.
        await focuser.move_to(50000)
        settings = FocusSettings(step=8000, points=5, exposure_s=0.5)
        offset = autofocus_command({"action": "autofocus", "start_offset_steps": 12000})
        out["first"] = await run_autofocus(focuser, cam, settings, publish, start_offset_steps=offset)
        out["first_fwhm"] = fwhm_sim()

        # 2. The night: the pipeline measures each frame, the trigger watches.
        trigger = RefocusTrigger(fwhm_factor=1.3, temp_drop_c=2.0, min_frames=3)
        trigger.focused(focuser.temperature())
        pipe = LivePipeline()

        async def frame() -> str | None:
            r = pipe.process(load_frame(await cam.expose(0.5, "light")))
            return trigger.frame(r.fwhm_px, focuser.temperature())

        out["in_focus"] = [await frame() for _ in range(3)]
        await focuser.move_to(focuser.position() + 9000)  # the tube cooled: focus moved
        knocked = [await frame() for _ in range(4)]
        out["knocked"] = knocked
        reason = next(r for r in knocked if r)
        out["second"] = await run_autofocus(focuser, cam, settings, publish, reason=reason)
        out["second_fwhm"] = fwhm_sim()
        trigger.focused(focuser.temperature())
        out["after"] = [await frame() for _ in range(3)]
        client.send_number(FOCUSER, "FOCUS_TEMPERATURE", {"TEMPERATURE": -2.5})
        await client.wait_for(FOCUSER, "FOCUS_TEMPERATURE", lambda p: p.values["TEMPERATURE"] == -2.5, 10)
        out["cooled"] = await frame()
        await client.close()
        return out

    try:
        out = asyncio.run(asyncio.wait_for(main(), 400))
    finally:
        srv.kill()
    best_hfr, seeing = out["best_hfr"], out["seeing"]
    first = out["first"]
    assert EVENT_KEYS <= set(first) and first["event"] == "autofocus" and first["ok"], first
    assert first["hfr_px_start"] > 2.5 * best_hfr  # it did start far out of focus
    assert first["hfr_px"] <= 1.2 * best_hfr  # within 20 % of the best the simulator allows
    assert abs(first["position"] - out["best_pos"]) < 2500 and out["first_fwhm"] < 1.2 * seeing
    assert len(first["curve"]) >= 5 and all({"position", "hfr_px"} <= set(c) for c in first["curve"])
    assert [k for k, _ in events].count("autofocus") == 2
    assert sum(k == "focusing" for k, _ in events) == len(first["curve"]) + len(out["second"]["curve"])
    # The triggers: quiet in focus, the FWHM rise after the knock, the temperature drop.
    assert out["in_focus"] == [None] * 3
    assert any(r and "FWHM" in r and "best since the last focus" in r for r in out["knocked"]), out["knocked"]
    second = out["second"]
    assert second["ok"] and second["trigger"].startswith("FWHM") and second["hfr_px"] <= 1.2 * best_hfr
    assert out["second_fwhm"] < 1.2 * seeing
    assert out["after"] == [None] * 3
    assert out["cooled"] is not None and "2.5 C below the last focus" in out["cooled"]
    assert not list(tmp_path.glob("*lightbucket-focus*"))
