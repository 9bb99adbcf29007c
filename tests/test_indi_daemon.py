"""The whole night through the real parts: `Service` with its own indiserver (Debian's CCD and
telescope simulators, our deterministic `gsc`), a real mosquitto, the real pipeline.

A plan of 8 dithered lights from the config must give 8 FITS in the capture folder, 8 frame
events, plan progress 1..8 of 8 with an ETA, and a live stack whose stars are as round and as
sharp as a single frame's (the dithers of up to 8 px were undone by the registration). A dark
plan sent by MQTT command then ends in a master that calibrates the next stack.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import sep
from astropy.io import fits

from daemon.config import config_from_dict
from daemon.service import Service
from drivers.indiserver import free_port
from tests.mqtt_broker import Subscriber

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("indi_installed")]

RIG = "sim-e2e"


def shape_of_stars(image: np.ndarray) -> tuple[float, float, int]:
    """(median FWHM px, median ellipticity 1-b/a, count) of isolated, unsaturated 10-sigma stars."""
    data = np.ascontiguousarray(image, dtype=np.float32)
    bkg = sep.Background(data)
    obj = sep.extract(data - bkg, 10.0, err=bkg.globalrms, minarea=5)
    obj = obj[(obj["flag"] == 0) & (obj["peak"] < 0.8 * data.max())]
    fwhm = 2.0 * np.sqrt(np.log(2) * (obj["a"] ** 2 + obj["b"] ** 2))
    return float(np.median(fwhm)), float(np.median(1.0 - obj["b"] / obj["a"])), len(obj)


def make_config(tmp_path: Path, mqtt_port: int):
    return config_from_dict({
        "capture": {"dir": str(tmp_path / "capture")},
        "state": {"dir": str(tmp_path / "state")},
        "mqtt": {"host": "127.0.0.1", "port": mqtt_port, "rig": RIG, "preview_interval_s": 1.0},
        "indi": {"port": free_port(), "drivers": ["indi_simulator_telescope", "indi_simulator_ccd"],
                 "filter_wheel": "CCD Simulator"},
        "camera": {"binning": 1, "gain": 90},
        "plan": {"target": "NGC 7789", "ra": "23h57m24s", "dec": "+56d42m30s", "filter": "Luminance",
                 "exposure_s": 1.0, "count": 8, "dither_every": 2, "dither_px": 8.0, "settle_s": 0.5},
    }, source="test")


def test_dithered_plan_stacks_round_stars_and_dark_plan_by_command_builds_a_master(broker, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="lightbucket")
    sub = Subscriber(broker.port, RIG)
    service = Service(make_config(tmp_path, broker.port))

    async def night() -> dict:
        runner = asyncio.create_task(service.run())
        try:
            # 1. The config's light plan starts with the daemon.
            await until(lambda: service.plans.running, 30)
            lights = await asyncio.wait_for(service.plans.wait(), 150)
            assert lights["state"] == "done", lights
            assert await service.wait_processed(lights["paths"], 60)
            await service.write_products(force=True)
            # 2. Darks matching the lights (1 s), asked for over MQTT.
            sub.send("cmd", json.dumps({"id": "d1", "action": "plan", "frame_type": "dark", "count": 3}))
            await until(lambda: any(r["id"] == "d1" for r in sub.json("cmd/result")), 20)
            await until(lambda: service.plans.running, 20)
            darks = await asyncio.wait_for(service.plans.wait(), 60)
            # 2b. Flats: 0.01 s (the simulator's flat field saturates at 0.5 s).
            flats = await service.plans.run(service.config.plan.__class__(
                target="", filter="Luminance", exposure_s=0.01, count=3, frame_type="flat"))
            # 3. A short second light plan: a new stack, calibrated with the new master dark.
            more = await service.plans.run(
                service.config.plan.__class__(**{**service.config.plan.__dict__, "target": "NGC 7789 b",
                                                 "count": 2, "dither_every": 0}))
            assert await service.wait_processed(more["paths"], 60)
            await service.write_products(force=True)
            return {"lights": lights, "darks": darks, "flats": flats, "more": more}
        finally:
            service.request_stop()
            await asyncio.wait_for(runner, 60)

    try:
        out = asyncio.run(night())
    finally:
        sub.close()

    # --- 8 FITS in the capture folder, one frame event each, all stacked --------------------
    lights = out["lights"]
    files = sorted((tmp_path / "capture").glob("light_NGC-7789_Luminance_1s_*.fits"))
    assert len(files) == 8 and sorted(map(str, files)) == sorted(lights["paths"])
    frames = [e for e in sub.json("frame") if e["path"] in lights["paths"]]
    assert sorted(e["path"] for e in frames) == sorted(lights["paths"])
    assert all(e["accepted"] for e in frames), [e["reason"] for e in frames]

    # --- plan progress over MQTT: frame k of 8 with an ETA, then done -------------------------
    plan = [e for e in sub.json("acquisition") if e.get("event") == "plan" and e.get("target") == "NGC 7789"
            and e.get("frame_type") == "light"]
    running = [e for e in plan if e["state"] == "running"]
    assert [e["frame"] for e in running] == list(range(1, 9))
    assert all(e["count"] == 8 for e in running) and running[0]["eta_s"] > 0 and running[-1]["eta_s"] == 0
    assert plan[-1]["state"] == "done"
    in_status = [st["plan"] for st in sub.json("status") if (st.get("plan") or {}).get("target") == "NGC 7789"
                 and st["plan"]["frame_type"] == "light"]
    assert (in_status[-1]["state"], in_status[-1]["frame"]) == ("done", 8)  # retained status has it too
    assert {p["frame"] for p in in_status if p["state"] == "running"} <= set(range(1, 9))
    dithers = [e["dither"] for e in running if "dither" in e]
    assert len(dithers) == 3  # before frames 3, 5 and 7

    # --- each light plan's stack was made while its first exposure ran, for the camera's frame
    # size (CCD_FRAME), and its first frame took it; calibration plans make none ---------------
    log = [r.getMessage() for r in caplog.records]
    h, w = fits.getdata(files[0]).shape
    assert log.count(f"stack of {w}x{h} made ahead of its first frame") == 2, [m for m in log if "ahead" in m]
    assert "new stack NGC-7789_Luminance_1s_bin1 (made ahead)" in log
    assert "new stack NGC-7789-b_Luminance_1s_bin1 (made ahead)" in log

    # --- the registration undid the dithers: measured offsets move, the stack stays sharp -----
    offsets = np.array([(e["dx"], e["dy"]) for e in frames])
    assert np.ptp(np.hypot(*offsets.T)) > 2.0, offsets  # the field really moved on the sensor
    stack_path = tmp_path / "state" / "output" / "NGC-7789_Luminance_1s_bin1.fits"
    header = fits.getheader(stack_path)
    assert header["NCOMBINE"] == 8
    # The plan ran to its end: the final re-stack was written by itself, and announced.
    final = tmp_path / "state" / "output" / "NGC-7789_Luminance_1s_bin1_final.fits"
    assert lights["final"] == str(final) and fits.getheader(final)["NCOMBINE"] == 8
    assert {"event": "final", "stack": "NGC-7789_Luminance_1s_bin1", "path": str(final)} in sub.json("acquisition")
    single_fwhm, single_ell, _ = shape_of_stars(fits.getdata(files[0]))
    stack_fwhm, stack_ell, n = shape_of_stars(fits.getdata(stack_path))
    assert n >= 30
    # A misregistration of a few px would smear stars along the dither (FWHM and ellipticity up).
    assert stack_fwhm == pytest.approx(single_fwhm, rel=0.15), (stack_fwhm, single_fwhm)
    assert stack_ell < max(0.15, single_ell + 0.05), (stack_ell, single_ell)

    # --- the dark plan by command: frames in calibration/dark, a master, used next ------------
    darks = out["darks"]
    assert darks["state"] == "done" and darks["frames"] == 3
    assert all(Path(p).parent == tmp_path / "capture" / "calibration" / "dark" for p in darks["paths"])
    assert not any(e["path"] in darks["paths"] for e in sub.json("frame"))  # never stacked as lights
    master = Path(darks["master"])
    mh = fits.getheader(master)
    assert master.parent == tmp_path / "state" / "masters" and mh["NCOMBINE"] == 3
    assert mh["EXPTIME"] == pytest.approx(1.0)
    assert [e for e in sub.json("acquisition") if e.get("event") == "master"][0]["path"] == str(master)
    second_path = tmp_path / "state" / "output" / "NGC-7789-b_Luminance_1s_bin1.fits"
    assert fits.getheader(second_path)["DARKFRM"] == str(master)  # provenance names the dark used
    # The flat plan's master: the simulator's vignetting, normalised, and used by the new stack.
    flats = out["flats"]
    assert flats["state"] == "done" and flats["frames"] == 3 and Path(flats["master"]).parent == master.parent
    mflat = fits.getdata(flats["master"])
    h, w = mflat.shape
    assert np.median(mflat) == pytest.approx(1.0, abs=0.05)
    assert np.median(mflat[:h // 8, :w // 8]) < 0.85 * np.median(mflat[3 * h // 8:5 * h // 8, 3 * w // 8:5 * w // 8])
    assert fits.getheader(second_path)["FLATFRM"] == flats["master"]
    assert "DARKFRM" not in header  # the first stack was taken before the master existed
    # ... and the dark was really subtracted: the sky of the same field drops by the dark level.
    dark_level = float(np.median(fits.getdata(master)))
    sky1 = float(np.median(fits.getdata(stack_path)))
    sky2 = float(np.median(fits.getdata(second_path)))
    print(f"dark {dark_level:.1f} ADU, sky {sky1:.1f} -> {sky2:.1f}")
    assert dark_level > 2.0  # the simulator's offset: ~4.7 ADU at gain 90
    assert sky1 - sky2 == pytest.approx(dark_level, abs=1.0)


async def until(condition, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError("timed out waiting for a condition")
        await asyncio.sleep(0.1)
