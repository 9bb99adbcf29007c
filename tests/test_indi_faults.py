"""Fault paths of the INDI drivers and the plan runner, with a fake indiserver client (fast).

The fake keeps the real waiting machinery of IndiClient (futures, generations, timeouts); only the
socket is missing, so these tests show the timeouts fire and never hang.
"""

from __future__ import annotations

import asyncio
import types

import pytest

from daemon.acquisition import AcquisitionError, run_acquisition
from daemon.settings import CameraSettings, IndiSettings, PlanSettings, SettingsError, parse_dec, parse_ra
from drivers.camera import Camera, ExposureTimeout
from drivers.indi_client import IndiClient, IndiDisconnected, IndiTimeout, PropSnapshot
from drivers.indiserver import free_port
from drivers.mount import Mount, SlewTimeout


class FakeClient(IndiClient):
    """IndiClient without a socket: properties are set by the test, sends are recorded and
    answered by `responder(device, name, values) -> list[PropSnapshot]` (or nothing)."""

    def __init__(self, responder=None):
        super().__init__("fake", 0)
        self.connected = True
        self.sent: list[tuple[str, str, dict]] = []
        self.responder = responder or (lambda *a: [])

    def put(self, device, name, kind, state, values):
        self._on_property(PropSnapshot(device, name, kind, state, dict(values)))

    def _send(self, device, name, values):
        if (device, name) not in self._props:
            raise IndiDisconnected(f"fake has no {device}.{name}")
        self.sent.append((device, name, dict(values)))
        gen = self._generation
        loop = asyncio.get_running_loop()
        for snap in self.responder(device, name, values):
            loop.call_soon(self._on_property, snap)
        return gen

    def send_number(self, device, name, values):
        return self._send(device, name, values)

    def send_switch(self, device, name, on, off=()):
        return self._send(device, name, {k: True for k in on})

    def send_text(self, device, name, values):
        return self._send(device, name, values)


def test_exposure_that_never_completes_times_out_and_aborts(tmp_path):
    def busy_forever(device, name, values):
        if name == "CCD_EXPOSURE":
            return [PropSnapshot(device, name, "number", "Busy", dict(values))]
        return []

    async def main():
        c = FakeClient(busy_forever)
        c.put("Cam", "CCD_EXPOSURE", "number", "Idle", {"CCD_EXPOSURE_VALUE": 0})
        c.put("Cam", "CCD_ABORT_EXPOSURE", "switch", "Idle", {"ABORT": False})
        cam = Camera(c, "Cam")
        cam.capture_dir = tmp_path
        with pytest.raises(ExposureTimeout, match="CCD_EXPOSURE"):
            await asyncio.wait_for(cam.expose(0.2, "light", timeout=0.3), 5)
        return c.sent

    sent = asyncio.run(main())
    assert ("Cam", "CCD_ABORT_EXPOSURE", {"ABORT": True}) in sent


def test_slew_that_never_arrives_times_out_and_aborts():
    def slow(device, name, values):
        if name == "EQUATORIAL_EOD_COORD":
            return [PropSnapshot(device, name, "number", "Busy", {"RA": 1.0, "DEC": 50.0})]
        return []

    async def main():
        c = FakeClient(slow)
        c.put("Mnt", "EQUATORIAL_EOD_COORD", "number", "Ok", {"RA": 0.0, "DEC": 90.0})
        c.put("Mnt", "TELESCOPE_ABORT_MOTION", "switch", "Idle", {"ABORT": False})
        with pytest.raises(SlewTimeout, match="track to RA"):
            await asyncio.wait_for(Mount(c, "Mnt").slew(10.0, 60.0, timeout=0.3), 5)
        return c.sent

    sent = asyncio.run(main())
    assert ("Mnt", "TELESCOPE_ABORT_MOTION", {"ABORT": True}) in sent


def test_mount_refusing_the_slew_is_an_error_not_a_hang():
    def refuse(device, name, values):
        if name == "EQUATORIAL_EOD_COORD":
            return [PropSnapshot(device, name, "number", "Alert", {"RA": 0.0, "DEC": 90.0})]
        return []

    async def main():
        c = FakeClient(refuse)
        c.put("Mnt", "EQUATORIAL_EOD_COORD", "number", "Ok", {"RA": 0.0, "DEC": 90.0})
        with pytest.raises(Exception, match="refused"):
            await asyncio.wait_for(Mount(c, "Mnt").slew(10.0, 60.0, timeout=5), 5)

    asyncio.run(main())


class Recorder:
    def __init__(self):
        self.events: list[tuple[str, dict]] = []

    async def publish(self, kind, payload):
        self.events.append((kind, payload))


def _config(tmp_path, port, **plan):
    return types.SimpleNamespace(
        indi=IndiSettings(port=port), camera=CameraSettings(),
        plan=PlanSettings(**{"target": "T", "ra": 10.0, "dec": 60.0, "count": 2, **plan}),
        capture=types.SimpleNamespace(dir=str(tmp_path)))


def test_no_indiserver_retries_with_backoff_then_gives_up(tmp_path):
    events, stop = Recorder(), asyncio.Event()
    cfg = _config(tmp_path, free_port())  # nothing listens there

    async def main():
        await asyncio.wait_for(run_acquisition(cfg, events, stop, max_failures=3,
                                               backoff_s=(0.05, 0.2), connect_timeout_s=1), 30)

    with pytest.raises(AcquisitionError, match="3 faults"):
        asyncio.run(main())
    states = [p["state"] for k, p in events.events if k == "plan"]
    assert states == ["starting", "retrying", "retrying", "failed"]
    retry = [p for k, p in events.events if p["state"] == "retrying"]
    assert retry[1]["retry_in_s"] == 2 * retry[0]["retry_in_s"]  # exponential backoff
    assert "indiserver" in retry[0]["error"]


def test_stop_during_backoff_ends_the_plan_promptly(tmp_path):
    events, stop = Recorder(), asyncio.Event()
    cfg = _config(tmp_path, free_port())

    async def main():
        task = asyncio.ensure_future(run_acquisition(cfg, events, stop, backoff_s=(30, 30),
                                                     connect_timeout_s=1))
        while not any(p["state"] == "retrying" for _, p in events.events):
            await asyncio.sleep(0.01)
        stop.set()
        return await asyncio.wait_for(task, 5)

    summary = asyncio.run(main())
    assert summary["state"] == "stopped" and summary["frames"] == 0


@pytest.mark.parametrize("bad, message", [
    ({"frame_type": "science"}, r"\[plan\] frame_type = 'science'"),
    ({"dec": "+95d"}, r"\[plan\] dec = '\+95d': outside"),
    ({"until": "tonight"}, r"\[plan\] until = 'tonight': not an ISO time"),
    ({"count": -1}, r"\[plan\] count = -1: must be >= 0"),
    ({"exposure_s": -5.0}, r"\[plan\] exposure_s = -5.0: must be >= 0"),
    ({"exposure_s": 1e9}, r"\[plan\] exposure_s = 1000000000.0: must be >= 0 and <= 3600"),
    ({"dither_every": -3}, r"\[plan\] dither_every = -3: must be >= 0"),
])
def test_bad_plans_are_refused_naming_the_key(tmp_path, bad, message):
    """A plan value that cannot be run is refused when the plan is made, before any device moves."""
    with pytest.raises(SettingsError, match=message):
        _config(tmp_path, 1, **bad)


def test_coordinate_strings():
    assert parse_ra("19h59m36s") == pytest.approx(299.9)
    assert parse_ra("19:59:36") == pytest.approx(299.9)
    assert parse_ra(299.9) == pytest.approx(299.9)
    assert parse_dec("+22d43m16s") == pytest.approx(22.72111, abs=1e-5)
    assert parse_dec("-05:30:00") == pytest.approx(-5.5)


def test_property_deleted_while_waiting_raises_disconnected():
    """A driver that disconnects deletes its properties: a waiter must fail at once, not time out."""
    async def main():
        c = FakeClient()
        c.put("Cam", "CCD_EXPOSURE", "number", "Busy", {"CCD_EXPOSURE_VALUE": 1})
        waiter = asyncio.ensure_future(c.wait_state("Cam", "CCD_EXPOSURE", c.generation, 60, "x"))
        await asyncio.sleep(0)
        c._on_remove("Cam", "CCD_EXPOSURE")  # noqa: SLF001 - as the C++ thread calls it when a driver goes
        with pytest.raises(IndiDisconnected, match="went away"):
            await asyncio.wait_for(waiter, 5)

    asyncio.run(main())


def test_plan_until_a_past_time_ends_at_once_without_devices(tmp_path):
    events = Recorder()
    cfg = _config(tmp_path, free_port(), count=0, until="2020-01-01T00:00:00+00:00")
    summary = asyncio.run(asyncio.wait_for(run_acquisition(cfg, events, asyncio.Event()), 10))
    assert summary["state"] == "done" and summary["frames"] == 0
    assert [p["state"] for _, p in events.events] == ["starting", "done"]
    assert events.events[0][1]["eta_s"] == 0


def test_slew_ignored_once_is_sent_again_not_a_fault():
    """INDI's telescope simulator once left the first goto after connecting Idle: the slew is
    sent once more (after unparking if needed) instead of failing the plan."""
    from drivers.mount import j2000_to_jnow

    ra_h, dec = j2000_to_jnow(10.0, 60.0)
    gotos = []

    def ignore_first(device, name, values):
        if name == "EQUATORIAL_EOD_COORD":
            gotos.append(values)
            if len(gotos) == 1:
                return [PropSnapshot(device, name, "number", "Idle", {"RA": 0.0, "DEC": 90.0})]
            return [PropSnapshot(device, name, "number", "Busy", {"RA": 0.0, "DEC": 90.0}),
                    PropSnapshot(device, name, "number", "Ok", {"RA": ra_h, "DEC": dec})]
        return []

    async def main():
        c = FakeClient(ignore_first)
        c.put("Mnt", "EQUATORIAL_EOD_COORD", "number", "Idle", {"RA": 0.0, "DEC": 90.0})
        c.put("Mnt", "TELESCOPE_ABORT_MOTION", "switch", "Idle", {"ABORT": False})
        await asyncio.wait_for(Mount(c, "Mnt").slew(10.0, 60.0, timeout=0.3), 5)

    asyncio.run(main())
    assert len(gotos) == 2


def test_binning_overwritten_by_the_drivers_saved_configuration_is_asked_for_again():
    """A driver that has just connected loads its saved configuration, which can overwrite a
    request sent meanwhile (seen with INDI's CCD simulator under load: Ok, at 1x1): the camera
    asks again instead of timing out into a plan fault."""
    answers = {"n": 0}

    def config_loaded_after(device, name, values):
        answers["n"] += 1
        if name != "CCD_BINNING":
            return []
        new = PropSnapshot(device, name, "number", "Ok", dict(values))
        saved = PropSnapshot(device, name, "number", "Ok", {"HOR_BIN": 1, "VER_BIN": 1})
        return [new, saved] if answers["n"] == 1 else [new]

    async def main():
        c = FakeClient(config_loaded_after)
        c.put("Cam", "CCD_BINNING", "number", "Ok", {"HOR_BIN": 1, "VER_BIN": 1})
        cam = Camera(c, "Cam")
        await asyncio.wait_for(cam._set_number("CCD_BINNING", {"HOR_BIN": 2, "VER_BIN": 2}, confirm=True),  # noqa: SLF001
                               10)
        return c

    c = asyncio.run(main())
    assert [s for s in c.sent if s[1] == "CCD_BINNING"] == [("Cam", "CCD_BINNING", {"HOR_BIN": 2, "VER_BIN": 2})] * 2
    assert c.prop("Cam", "CCD_BINNING").values == {"HOR_BIN": 2, "VER_BIN": 2}


def test_a_driver_that_keeps_other_values_times_out_after_a_few_requests():
    def clamps(device, name, values):
        return [PropSnapshot(device, name, "number", "Ok", {"HOR_BIN": 1, "VER_BIN": 1})]

    async def main():
        c = FakeClient(clamps)
        c.put("Cam", "CCD_BINNING", "number", "Ok", {"HOR_BIN": 1, "VER_BIN": 1})
        cam = Camera(c, "Cam")
        t = asyncio.get_running_loop().time()
        with pytest.raises(IndiTimeout, match=r"CCD_BINNING .* not reached in 2 s \(last state Ok, values"):
            await cam._set_number("CCD_BINNING", {"HOR_BIN": 2, "VER_BIN": 2}, 2.0, confirm=True)  # noqa: SLF001
        return c, asyncio.get_running_loop().time() - t

    c, waited = asyncio.run(main())
    assert 1.9 < waited < 3.0 and 2 <= len(c.sent) <= 4  # asked again, a bounded number of times
