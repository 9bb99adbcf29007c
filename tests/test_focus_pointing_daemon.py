"""Autofocus, centring, the refocus trigger and the pointing check through the real daemon
(`Service` in-process: watcher, worker, supervisor, commands) on INDI's simulators drawing the
real sky (Tycho-2), with real solve-field.

One indiserver and one daemon session for all of it (the indiserver outside the daemon, like a
rig's, so the focuser keeps its position between the command and the plan):
1. the `autofocus` command with no plan running, from 12000 steps off;
2. a plan with center = true (the mount misses by [300, -200]"), autofocus = true (the focuser
   knocked 10000 steps off first) and a pointing check;
3. during that plan the focuser is knocked off again: the FWHM of its frames rises, the refocus
   trigger fires, an autofocus runs between two frames; then the focuser's temperature probe
   drops 2.5 C: the trigger fires again;
4. the stack's WCS (the daemon's reference solve) is centred on the target.
The simulator's best HFR is measured first at its best position (where indi_simulator_focus's
FWHM equals its seeing), with the same sensor and binning.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from astropy.io import fits
from astropy.wcs import WCS

from daemon.autofocus import hfr_of
from daemon.config import config_from_dict
from daemon.service import Service
from daemon.settings import CameraSettings
from daemon.upkeep import REAL_SKY_SENSOR
from daemon.wcs import separation_arcsec
from drivers.camera import Camera
from drivers.focuser import Focuser
from drivers.indi_client import IndiClient
from drivers.indiserver import IndiServer, free_port
from drivers.mount import Mount
from tests.conftest import require_tools

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("indi_installed")]

CCD, FOCUSER, MOUNT = "CCD Simulator", "Focuser Simulator", "Telescope Simulator"
RA, DEC = 10.0, 70.0
ERROR = (300.0, -200.0)
COUNT = 14
KEYS = {"event", "ok", "position", "hfr_px", "hfr_px_start", "curve", "trigger", "temperature_c"}


def _config(tmp_path, port: int):
    return config_from_dict({
        "capture": {"dir": str(tmp_path / "capture")},
        "state": {"dir": str(tmp_path / "state"), "checkpoint_every_s": 0},
        "indi": {"port": port, "focuser": FOCUSER, "filter_wheel": CCD, "sim_sky": "real",
                 "sim_pointing_error_arcsec": list(ERROR)},
        "camera": {"binning": 2, "gain": 90},
        "focus": {"step": 8000, "points": 5, "exposure_s": 0.5, "refocus_min_frames": 2},
        "plan": {"target": "Cas field", "ra": RA, "dec": DEC, "filter": "Luminance", "exposure_s": 1.0,
                 "count": COUNT, "settle_s": 0.2, "center": True, "center_exposure_s": 1.0, "autofocus": True,
                 "pointing_check_s": 600},
    }, "test.toml")


async def _until(predicate, timeout: float, what: str, task: asyncio.Task | None = None):
    deadline = time.monotonic() + timeout
    while not predicate():
        if task is not None and task.done():
            task.result()
            raise AssertionError(f"the daemon ended waiting for {what}")
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        await asyncio.sleep(0.2)


class Probe:
    """The test's own INDI client: the simulator's best focus, and knocking the focuser off."""

    def __init__(self, port: int, folder):
        self.client = IndiClient("127.0.0.1", port)
        self.folder = folder

    async def best(self) -> dict:
        c = self.client
        await c.connect()
        cam, focuser, mount = Camera(c, CCD), Focuser(c, FOCUSER), Mount(c, MOUNT)
        for device in (cam, focuser, mount):
            await device.connect()
        await cam.set_simulator_sensor(*REAL_SKY_SENSOR)
        await cam.configure(CameraSettings(binning=2, gain=90), self.folder, "probe")
        await cam.set_frame_type("light")
        await mount.slew(RA, DEC, timeout=60)
        fwhm = c.prop(FOCUSER, "FWHM").values["SIM_FWHM"]
        seeing = c.prop(FOCUSER, "SEEING_SETTINGS").values["SIM_SEEING"]
        start = focuser.position()
        best_pos = round(start - ((fwhm - seeing) / 0.5625) ** 0.5 * 5000)  # FWHM = 0.5625 t^2 + seeing
        await focuser.move_to(best_pos)
        path = await cam.expose(0.5, "best")
        hfr, _ = hfr_of(path)
        path.unlink()
        await focuser.move_to(start)
        self.focuser = focuser
        return {"position": best_pos, "hfr_px": hfr, "start": start}

    async def knock(self, steps: int) -> int:
        return await self.focuser.move_to(self.focuser.position() + steps)

    async def cool(self, by_c: float) -> float:
        c = self.client
        to = c.prop(FOCUSER, "FOCUS_TEMPERATURE").values["TEMPERATURE"] - by_c
        c.send_number(FOCUSER, "FOCUS_TEMPERATURE", {"TEMPERATURE": to})
        await c.wait_for(FOCUSER, "FOCUS_TEMPERATURE", lambda p: p.values["TEMPERATURE"] == to, 10)
        return to


@pytest.mark.timeout(660)
def test_autofocus_centring_refocus_and_pointing_through_the_daemon(tmp_path):
    require_tools("solve-field", "query-starkd")
    srv = IndiServer(["indi_simulator_telescope", "indi_simulator_ccd", "indi_simulator_focus"], free_port(),
                     log_path=tmp_path / "indiserver.log",
                     env={"LIGHTBUCKET_GSC_SKY": "real", "HOME": str(tmp_path)})
    cfg = _config(tmp_path, srv.port)
    (tmp_path / "capture").mkdir()
    acq: list[dict] = []
    frames: list[str] = []
    out: dict = {}

    async def scenario():
        await srv.start()
        probe = Probe(srv.port, tmp_path / "probe")
        out["best"] = await probe.best()
        service = Service(cfg, acquire_at_start=False)
        service.subscribe(lambda kind, payload: acq.append(payload) if kind == "acquisition" else
                          frames.append(payload["path"]) if kind == "frame" else None)
        run = asyncio.create_task(service.run())
        await _until(lambda: service.state == "running", 120, "the daemon running", run)

        # 1. The command, no plan running: its own INDI session; refused offsets first.
        out["refused"] = await service.command({"id": 1, "action": "autofocus", "start_offset_steps": 10**7})
        out["command"] = await service.command({"id": 2, "action": "autofocus", "start_offset_steps": 12000})
        out["status_focus"] = service.status()["focus"]

        # 2./3. The plan; once it has stacked two frames after its start focus, knock the focus.
        await probe.knock(10000)
        service.plans.start(cfg.plan)
        autofocus = lambda: [e for e in acq if e.get("event") == "autofocus"]  # noqa: E731
        await _until(lambda: len(autofocus()) >= 2, 240, "the plan's start focus", run)
        mark = service.snapshot.counts["stacked"]
        await _until(lambda: service.snapshot.counts["stacked"] >= mark + 2, 120, "2 frames in focus", run)
        out["knocked_at"] = await probe.knock(9000)
        await _until(lambda: len(autofocus()) >= 3, 240, "the refocus", run)
        mark = service.snapshot.counts["stacked"]
        await _until(lambda: service.snapshot.counts["stacked"] >= mark + 1, 120, "a frame after it", run)
        out["cooled_to"] = await probe.cool(2.5)
        await _until(lambda: len(autofocus()) >= 4, 240, "the refocus for the cold", run)
        out["summary"] = await asyncio.wait_for(service.plans.wait(), 240)
        await _until(lambda: service.status()["solve"] is not None, 120, "the reference solve", run)
        await _until(lambda: service.status()["pointing"] is not None, 60, "the pointing check", run)
        out["status"] = service.status()
        out["stack"] = service.snapshot.current
        service.request_stop()
        assert await asyncio.wait_for(run, 60) == 0
        await probe.client.close()

    try:
        asyncio.run(asyncio.wait_for(scenario(), 600))
    finally:
        srv.kill()
    best = out["best"]["hfr_px"]

    # 1. The command: a bad offset refused with the reason, then a focus from 12000 steps off.
    assert not out["refused"]["ok"] and "start_offset_steps" in out["refused"]["error"]
    reply = out["command"]
    assert reply["ok"] and reply["queued"] is False and reply["focused"], reply
    first = [e for e in acq if e.get("event") == "autofocus"][0]
    assert KEYS <= set(first) and first["ok"] and first["trigger"] == "command", first
    assert (reply["position"], reply["hfr_px"]) == (first["position"], first["hfr_px"])
    assert first["hfr_px_start"] > 2.0 * best  # it did start far off
    assert first["hfr_px"] <= 1.2 * best, (first, best)  # within 20 % of the simulator's best
    assert out["status_focus"]["position"] == first["position"]

    # 2. The plan: centring from the mount's miss to within 30", then its start focus.
    plan = [e for e in acq if e.get("event") == "plan"]
    states = [e["state"] for e in plan]
    centering = [e for e in plan if e["state"] == "centering"]
    assert centering[0]["error_arcsec"] == pytest.approx((ERROR[0] ** 2 + ERROR[1] ** 2) ** 0.5, rel=0.1)
    centered = [e for e in plan if e["state"] == "centered"]
    assert len(centered) == 1 and centered[0]["error_arcsec"] <= 30.0
    focus_runs = [e for e in acq if e.get("event") == "autofocus"]
    start = focus_runs[1]
    assert start["trigger"] == "plan start" and start["ok"], start
    assert start["hfr_px"] <= 1.2 * best and start["hfr_px_start"] > 1.3 * start["hfr_px"]
    assert states.index("centered") < states.index("running")  # centred, focused, then the frames
    assert acq.index(start) < acq.index(next(e for e in plan if e["state"] == "running"))

    # 3. The refocus: the knocked frames' FWHM fired the trigger; a run between two frames.
    assert len(focus_runs) == 4, [e["trigger"] for e in focus_runs]  # frames from before a run: ignored
    refocus = focus_runs[2]
    assert refocus["trigger"].startswith("FWHM") and "best since the last focus" in refocus["trigger"], refocus
    assert refocus["ok"] and refocus["hfr_px"] <= 1.2 * best and refocus["hfr_px_start"] > 1.3 * best
    i = acq.index(refocus)
    assert any(e.get("state") == "running" for e in acq[i:] if e.get("event") == "plan")  # frames went on
    cold = focus_runs[3]
    assert "2.5 C below the last focus" in cold["trigger"] and cold["temperature_c"] == out["cooled_to"], cold
    assert out["summary"]["state"] == "done" and out["summary"]["frames"] == COUNT

    # 4. The stack's WCS from the daemon's reference solve, centred on the target; the check.
    status = out["status"]
    assert status["solve"]["ok"] and status["focus"]["trigger"] == cold["trigger"]
    pointing = status["pointing"]
    assert pointing["ok"] and pointing["error_arcsec"] <= 60.0 and not pointing["far"], pointing
    header = fits.getheader(tmp_path / "state" / "output" / f"{out['stack']}.fits")
    assert header["PLTSOLVD"] is True
    ra, dec = WCS(header).celestial.pixel_to_world_values((header["NAXIS1"] - 1) / 2, (header["NAXIS2"] - 1) / 2)
    assert separation_arcsec(float(ra), float(dec), RA, DEC) <= 120.0
    # The centring and focus frames were hidden from the watcher (and removed): only the plan's
    # lights reached the stack, its reference one of them.
    assert not list((tmp_path / "capture").glob("*lightbucket-*"))
    assert len(frames) == COUNT and all(Path(f).name.startswith("light_Cas-field_") for f in frames), frames
    assert Path(status["solve"]["path"]).name.startswith("light_Cas-field_")
    assert header["NCOMBINE"] == status["stacked_current"] <= COUNT
    print({"best_hfr": best, "command": (first["hfr_px_start"], first["hfr_px"]),
           "start": (start["hfr_px_start"], start["hfr_px"]), "refocus": (refocus["hfr_px_start"], refocus["hfr_px"]),
           "cold": cold["trigger"],
           "centering": [e["error_arcsec"] for e in centering], "pointing": pointing["error_arcsec"],
           "wcs_centre_arcsec": separation_arcsec(float(ra), float(dec), RA, DEC)})
