"""Acquisition against a real indiserver running Debian's CCD and telescope simulators.

Each test starts its own indiserver on a free port (PATH with our deterministic `gsc`, so the CCD
simulator renders a real star field) and kills it in teardown. Frames: 640x512 (binning 2),
0.5-1 s exposures, target RA 10 deg Dec +70 deg (near the simulator's start at the pole, in the
Milky Way, so the field is rich and slews are short).
"""

from __future__ import annotations

import asyncio
import types
from pathlib import Path

import numpy as np
import pytest
import sep
from astropy.io import fits
from scipy.spatial import cKDTree

from daemon.acquisition import run_acquisition
from daemon.settings import CameraSettings, IndiSettings, PlanSettings
from drivers.camera import Camera
from drivers.indi_client import IndiClient
from drivers.indiserver import IndiServer, free_port
from drivers.mount import Mount

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("indi_installed")]

DRIVERS = ["indi_simulator_telescope", "indi_simulator_ccd"]
RA, DEC = 10.0, 70.0
CCD, SCOPE = "CCD Simulator", "Telescope Simulator"


@pytest.fixture
def server(tmp_path):
    srv = IndiServer(DRIVERS, free_port(), log_path=tmp_path / "indiserver.log")
    asyncio.run(srv.start())
    yield srv
    srv.kill()


class Recorder:
    def __init__(self):
        self.events: list[tuple[str, dict]] = []

    async def publish(self, kind, payload):
        self.events.append((kind, payload))

    def plan(self, state=None):
        return [p for k, p in self.events if k == "plan" and (state is None or p["state"] == state)]


def stars(path: Path, n: int = 40) -> np.ndarray:
    """(x, y) of the n brightest 5-sigma sources."""
    data = fits.getdata(path).astype(np.float32)
    bkg = sep.Background(data)
    obj = sep.extract(data - bkg, 5.0, err=bkg.globalrms)
    obj = obj[np.argsort(-obj["flux"])][:n]
    return np.c_[obj["x"], obj["y"]]


def shift(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, int]:
    """Translation taking star list b onto a (pairwise-offset vote, then median of matches)."""
    d = (a[None, :, :] - b[:, None, :]).reshape(-1, 2)
    h, xe, ye = np.histogram2d(d[:, 0], d[:, 1], bins=[np.arange(-100, 101, 2)] * 2)
    i, j = np.unravel_index(h.argmax(), h.shape)
    guess = np.array([xe[i] + 1, ye[j] + 1])
    dist, idx = cKDTree(a).query(b + guess)
    ok = dist < 3
    return np.median(a[idx[ok]] - b[ok], axis=0), int(ok.sum())


async def until(condition, timeout: float = 60.0, task=None) -> None:
    """Wait for condition() (polling the test's own event list), failing after timeout s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert task is None or not task.done(), task
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


def config(capture: Path, port: int, drivers=(), **plan):
    return types.SimpleNamespace(
        indi=IndiSettings(port=port, drivers=tuple(drivers), filter_wheel=CCD),  # built-in wheel
        camera=CameraSettings(binning=2, gain=90, upload_prefix="light"),
        plan=PlanSettings(**{"target": "Cas field", "ra": RA, "dec": DEC, "filter": "Luminance",
                             "exposure_s": 0.5, "count": 3, "settle_s": 0.2, **plan}),
        capture=types.SimpleNamespace(dir=str(capture)))


def test_connect_slew_track_and_expose_star_frames(server, tmp_path):
    async def main():
        client = IndiClient("127.0.0.1", server.port)
        await client.connect()
        cam, mount = Camera(client, CCD), Mount(client, SCOPE)
        await cam.connect()
        await mount.connect()
        await cam.configure(CameraSettings(binning=2, gain=90), tmp_path, "test")
        await mount.slew(RA, DEC, timeout=60)
        err = mount.error_arcsec(RA, DEC)
        track = client.prop(SCOPE, "TELESCOPE_TRACK_STATE").on()
        await cam.set_frame_type("light")
        paths = [await cam.expose(1.0, "light_test") for _ in range(3)]
        # Sync: the mount now believes it points 0.2 deg further east, without moving.
        await mount.sync(RA + 0.2, DEC)
        synced = mount.error_arcsec(RA + 0.2, DEC), mount.error_arcsec(RA, DEC)
        await client.close()
        return err, track, mount.pier_side(), paths, synced

    err, track, pier, paths, (err_synced, err_old) = asyncio.run(main())
    assert err < 5.0 and track == ["TRACK_ON"] and pier in ("east", "west")
    assert err_synced < 5.0 and err_old > 0.2 * 3600 * np.cos(np.radians(DEC)) - 5.0
    assert [p.parent for p in paths] == [tmp_path] * 3 and len(set(paths)) == 3
    assert list(tmp_path.glob(".lightbucket-upload_*")) == []  # nothing half-written left behind
    ref = stars(paths[0])
    assert len(ref) == 40  # a rich field: at least 40 stars at 5 sigma in 1 s
    for p in paths[1:]:
        hdr = fits.getheader(p)
        assert (hdr["NAXIS1"], hdr["NAXIS2"], hdr["XBINNING"]) == (640, 512, 2)
        (dx, dy), matched = shift(ref, stars(p))
        assert matched >= 30 and abs(dx) < 0.5 and abs(dy) < 0.5  # tracking: same stars, same place


def test_plan_parks_the_mount_at_its_end(server, tmp_path):
    events = Recorder()
    cfg = config(tmp_path, server.port, count=1, park=True)
    summary = asyncio.run(asyncio.wait_for(run_acquisition(cfg, events, asyncio.Event()), 120))

    async def park_state():
        client = IndiClient("127.0.0.1", server.port)
        await client.connect()
        snap = await client.wait_for(SCOPE, "TELESCOPE_PARK")
        await client.close()
        return snap.on()

    assert summary["state"] == "done" and summary["parked"] is True
    assert [p["state"] for p in events.plan()][-2:] == ["parking", "done"]
    assert asyncio.run(park_state()) == ["PARK"]  # the simulator itself says so


def test_plan_of_eight_dithered_frames(tmp_path):
    """run_acquisition starts its own indiserver ([indi] drivers), 8 frames dithered every 2."""
    events, stop = Recorder(), asyncio.Event()
    cfg = config(tmp_path, free_port(), DRIVERS, count=8, dither_every=2, dither_px=8, settle_s=1.0)
    summary = asyncio.run(asyncio.wait_for(run_acquisition(cfg, events, stop), 120))

    assert summary["state"] == "done" and summary["frames"] == 8 and summary["faults"] == 0
    files = sorted(tmp_path.glob("light_Cas-field_Luminance_0.5s_*.fits"))
    assert [str(f) for f in files] == sorted(summary["paths"]) and len(files) == 8
    running = events.plan("running")
    assert [p["frame"] for p in running] == list(range(1, 9))
    assert all(p["count"] == 8 for p in running)
    assert running[-1]["eta_s"] == 0 and running[0]["eta_s"] > 0
    assert events.plan()[-1]["state"] == "done"
    hdr = fits.getheader(files[0])
    assert (hdr["OBJECT"], hdr["FILTER"], hdr["EXPTIME"], hdr["FRAME"]) == (
        "Cas field", "Luminance", 0.5, "Light")
    assert hdr["RA"] == pytest.approx(RA, abs=0.01) and hdr["DEC"] == pytest.approx(DEC, abs=0.01)
    # Dithers at frames 2, 4, 6; measured shifts between frames follow the commanded offsets.
    dithers = {p["frame"]: p["dither"] for p in running if "dither" in p}
    assert sorted(dithers) == [3, 5, 7]
    paths = [Path(p) for p in summary["paths"]]
    ref = stars(paths[0])
    offset = {1: np.zeros(2)}
    for k in range(2, 9):
        (dx, dy), matched = shift(ref, stars(paths[k - 1]))
        assert matched >= 15, f"frame {k}: only {matched} stars matched"
        offset[k] = np.array([dx, dy])
    commanded = {1: np.zeros(2)}
    for k in range(2, 9):
        d = dithers.get(k)
        commanded[k] = np.array([d["dx_px"], d["dy_px"]]) if d else commanded[k - 1]
    for k in range(2, 9):  # the sensor is rotated against RA/Dec: compare lengths of the moves
        measured = np.hypot(*(offset[k] - offset[k - 1]))
        wanted = np.hypot(*(commanded[k] - commanded[k - 1]))
        assert measured == pytest.approx(wanted, abs=1.0), f"frame {k}"
    assert max(np.hypot(*offset[k]) for k in offset) > 2.0  # the dithers really moved the field


def test_indiserver_killed_mid_plan_and_restarted(server, tmp_path):
    events, stop = Recorder(), asyncio.Event()
    cfg = config(tmp_path, server.port, count=6)

    async def main():
        task = asyncio.ensure_future(run_acquisition(cfg, events, stop, backoff_s=(0.5, 2.0)))
        await until(lambda: len(events.plan("running")) >= 2, task=task)
        server.kill()  # server and drivers die mid-plan (the next exposure is in flight)
        await until(lambda: events.plan("retrying"), task=task)
        await server.start()
        await until(lambda: len(events.plan("running")) >= 4, task=task)
        # Now the camera alone drops off (someone switches it off) mid-exposure.
        other = IndiClient("127.0.0.1", server.port)
        await other.connect()
        await other.wait_for(CCD, "CONNECTION")
        # Mid-exposure, for certain: only once the camera reports an exposure in progress.
        await other.wait_for(CCD, "CCD_EXPOSURE", lambda p: p.state == "Busy", 20)
        other.send_switch(CCD, "CONNECTION", ["DISCONNECT"])
        await other.wait_for(CCD, "CONNECTION", lambda p: p.values["DISCONNECT"], 5)
        await other.close()
        return await asyncio.wait_for(task, 90)

    summary = asyncio.run(main())
    assert summary["state"] == "done" and summary["frames"] == 6 and summary["faults"] >= 2, (
        summary, [p.get("error") for p in events.plan("retrying")])
    assert len(list(tmp_path.glob("light_*.fits"))) == 6
    assert [p["frame"] for p in events.plan("running")] == list(range(1, 7))
    errors = [p["error"] for p in events.plan("retrying")]
    assert any("not connected" in e for e in errors)  # the server went away
    assert any("went away" in e for e in errors), errors  # the camera went away
    # Every frame whole, with stars: the restarted devices were set up again. A 0.5 s frame of
    # this field holds 19-21 sources above 5 sigma (measured): half of that is the bar, not 20.
    for p in summary["paths"]:
        assert fits.getdata(p).shape == (512, 640) and len(stars(Path(p))) >= 10


def test_example_config_runs_through_the_daemon_config(tmp_path):
    """config/simulators.toml as the daemon loads it (daemon.config), with test overrides: its
    own indiserver, the real sky, the mount missing until centred, a focus at the start."""
    from daemon.config import load_config

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "config" / "simulators.toml", [
        f"capture.dir={tmp_path / 'capture'}", f"state.dir={tmp_path / 'state'}",
        f"indi.port={free_port()}", "plan.count=2", "plan.exposure_s=0.5", "plan.ra=10.0",
        "plan.dec=70.0", "plan.dither_every=1", "plan.settle_s=0"])
    assert cfg.indi.sim_sky == "real" and any(cfg.indi.sim_pointing_error_arcsec) and cfg.plan.center
    events = Recorder()
    summary = asyncio.run(asyncio.wait_for(run_acquisition(cfg, events, asyncio.Event()), 240))
    assert summary["state"] == "done" and summary["frames"] == 2
    files = sorted((tmp_path / "capture").glob("light_NGC-7789_Luminance_0.5s_*.fits"))
    assert len(files) == 2 and fits.getheader(files[0])["XBINNING"] == cfg.camera.binning
    assert fits.getdata(files[0]).shape == (2048 // cfg.camera.binning, 2560 // cfg.camera.binning)
    assert [p["frame"] for p in events.plan("running")] == [1, 2]
    centering = events.plan("centering")
    assert centering[0]["error_arcsec"] > 300 and events.plan("centered")[0]["error_arcsec"] <= 30
    (focus,) = [p for k, p in events.events if k == "autofocus"]
    assert focus["ok"] and focus["trigger"] == "plan start" and focus["hfr_px"] < focus["hfr_px_start"], focus


def test_calibration_plans_darks_and_bias_and_stop_mid_exposure(tmp_path):
    """Darks and bias: no slew, own folder, right frame type, no stars. Stop aborts an exposure."""
    port = free_port()

    def run(stop=None, **plan):
        events = Recorder()
        cfg = config(tmp_path, port, DRIVERS, **plan)
        return asyncio.run(asyncio.wait_for(run_acquisition(cfg, events, stop or asyncio.Event()),
                                            60)), events

    darks, events = run(frame_type="dark", count=2, exposure_s=0.5)
    bias, _ = run(frame_type="bias", count=1)
    assert darks["frames"] == 2 and bias["frames"] == 1
    assert not any(p["state"] == "slewing" for p in events.plan())
    assert events.plan()[-1]["paths"] == darks["paths"]  # for building the master
    for summary, kind, frame in ((darks, "dark", "Dark"), (bias, "bias", "Bias")):
        assert summary["folder"] == str(tmp_path / "calibration" / kind)
        for p in summary["paths"]:
            assert Path(p).parent == tmp_path / "calibration" / kind
            assert fits.getheader(p)["FRAME"] == frame
            assert len(stars(Path(p))) < 3  # the simulator draws no sky in darks and bias
    assert fits.getheader(bias["paths"][0])["EXPTIME"] == pytest.approx(0.01)  # the sim's minimum
    assert not list(tmp_path.glob("*.fits"))  # nothing for the light pipeline

    async def stop_soon():
        stop = asyncio.Event()
        events = Recorder()
        cfg = config(tmp_path, port, DRIVERS, frame_type="dark", count=1, exposure_s=20)
        task = asyncio.ensure_future(run_acquisition(cfg, events, stop))
        await until(lambda: events.plan("starting"), task=task)
        await asyncio.sleep(3.0)  # let the exposure start
        stop.set()
        return await asyncio.wait_for(task, 10)  # far less than the 20 s exposure

    summary = asyncio.run(stop_soon())
    assert summary["state"] == "stopped" and summary["frames"] == 0
    assert len(list((tmp_path / "calibration" / "dark").glob("*.fits"))) == 2


def test_own_indiserver_dying_is_restarted_by_the_plan(tmp_path):
    """With [indi] drivers the plan owns the server: when it dies, the plan starts it again."""
    from daemon.acquisition import PlanRunner

    events, stop = Recorder(), asyncio.Event()
    cfg = config(tmp_path, free_port(), DRIVERS, count=3, dec=85.0)  # near the park: short slews
    srv = IndiServer(DRIVERS, cfg.indi.port)

    async def main():
        runner = PlanRunner(cfg.indi, cfg.camera, cfg.plan, cfg.capture.dir, events, stop, srv,
                            backoff_s=(0.2, 1.0))
        await srv.start()
        task = asyncio.ensure_future(runner.run())
        await until(lambda: len(events.plan("running")) >= 1, task=task)
        srv.kill()
        try:
            return await asyncio.wait_for(task, 60)
        finally:
            await runner.client.close()

    try:
        summary = asyncio.run(main())
    finally:
        srv.kill()
    assert summary["state"] == "done" and summary["frames"] == 3 and summary["faults"] >= 1
    assert len(list(tmp_path.glob("light_*.fits"))) == 3


def test_focuser_moves_absolute_and_relative(tmp_path):
    from drivers.focuser import Focuser

    srv = IndiServer(["indi_simulator_focus"], free_port())

    async def main():
        await srv.start()
        client = IndiClient("127.0.0.1", srv.port)
        await client.connect()
        foc = Focuser(client, "Focuser Simulator")
        await foc.connect()
        at = [await foc.move_to(36700), await foc.move_by(-200)]
        with pytest.raises(Exception, match="outside"):
            await foc.move_to(10**9)
        await client.close()
        return at

    try:
        assert asyncio.run(main()) == [36700, 36500]
    finally:
        srv.kill()


def test_cooler_reaches_the_set_point(tmp_path):
    srv = IndiServer(["indi_simulator_ccd"], free_port())

    async def main():
        await srv.start()
        client = IndiClient("127.0.0.1", srv.port)
        await client.connect()
        cam = Camera(client, CCD)
        await cam.connect()
        start = cam.temperature()
        reached = await cam.cool(start - 1.5, tolerance_c=0.3, timeout=30)
        await client.close()
        return start, reached

    try:
        start, reached = asyncio.run(main())
    finally:
        srv.kill()
    assert reached == pytest.approx(start - 1.5, abs=0.3)
