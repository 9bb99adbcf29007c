"""The plumbing of focus and pointing during a plan, with fakes: which frames feed the refocus
trigger and the pointing check, requests honoured between frames (once), the autofocus
command's three ways (refused, queued on the running plan, run at once), the pointing check's
answer asking the plan for a re-centring. (The real thing: tests/test_focus_pointing_daemon.py.)
"""

from __future__ import annotations

import asyncio
import types
from pathlib import Path

import pytest

import daemon.upkeep as upkeep_module
from daemon.acquisition import _Progress
from daemon.centering import CenterResult, PointingCheck
from daemon.config import config_from_dict
from daemon.pointing import Pointing
from daemon.service import Service
from daemon.session import Outcome
from daemon.settings import FocusSettings, IndiSettings, PlanSettings
from daemon.solve import Solution
from daemon.supervisor import PlanSupervisor
from daemon.upkeep import Upkeep

RA, DEC = 10.0, 70.0


class Prop:
    def __init__(self, **values):
        self.values = values


class FakeClient:
    def __init__(self):
        self.temperature = 10.0

    def prop(self, device, name):
        return Prop(TEMPERATURE=self.temperature) if name == "FOCUS_TEMPERATURE" else None


class FakeRunner:
    """What Upkeep reads of a PlanRunner."""

    def __init__(self, tmp_path: Path, focuser: str = "Focuser Simulator", **plan):
        self.plan = PlanSettings(**{"target": "T", "ra": RA, "dec": DEC, **plan})
        self.indi = IndiSettings(focuser=focuser)
        self.light, self.client, self.center = True, FakeClient(), True
        self.mount, self.camera = object(), object()
        self.ra, self.dec, self.slew_timeout_s = RA, DEC, 1.0
        self.progress = _Progress()
        self.folder = tmp_path
        self.states: list[str] = []
        self.events = types.SimpleNamespace(publish=None)
        self.recenters = 0

    def take(self, n: int = 1) -> list[str]:
        paths = []
        for _ in range(n):
            paths.append(str(self.folder / f"light_{self.progress.done:03d}.fits"))
            self.progress.paths.append(paths[-1])
            self.progress.done += 1
        return paths

    def frame_index(self, path):
        return self.progress.paths.index(str(path)) if str(path) in self.progress.paths else None

    async def publish_state(self, state, **extra):
        self.states.append(state)

    def request_recenter(self):
        self.recenters += 1


@pytest.fixture
def fakes(monkeypatch):
    calls: list[tuple] = []

    async def run_autofocus(focuser, camera, settings, publish, *, start_offset_steps=0, reason=""):
        calls.append(("focus", reason, start_offset_steps))
        hook = calls_hook.get("during")
        if hook:
            calls.append(("during", hook()))
        return {"event": "autofocus", "ok": True, "trigger": reason}

    async def center_on(mount, camera, ra, dec, settings, publish, timeout):
        calls.append(("centre", ra, dec))
        return CenterResult(True, 4.0, 1)

    calls_hook: dict = {}
    monkeypatch.setattr(upkeep_module, "run_autofocus", run_autofocus)
    monkeypatch.setattr(upkeep_module, "center_on", center_on)
    return calls, calls_hook


def test_the_refocus_trigger_sees_the_plans_sharp_and_blurred_frames_only(tmp_path, fakes):
    calls, hook = fakes
    runner = FakeRunner(tmp_path)
    up = Upkeep(runner, FocusSettings(refocus_min_frames=2, refocus_fwhm_factor=1.3))
    a, b, c, d, e = runner.take(5)
    assert up.frame_measured(a, True, None, 2.0) is None and up.frame_measured(b, True, None, 2.0) is None
    assert up.frame_measured(tmp_path / "other.fits", True, None, 9.0) is None  # not the plan's
    assert up.frame_measured(c, False, "clouds: 3 of 140 reference stars", 9.0) is None  # not a focus matter
    assert up.pending["autofocus"] is None
    why = up.frame_measured(d, False, "FWHM 3.40 px > 1.3x session median 2.00 px", 3.4)  # median(2.0, 3.4)
    assert why and why.startswith("FWHM") and up.pending["autofocus"] == why
    assert up.frame_measured(e, True, None, 3.2) is None  # asked once
    # Honoured between frames, once; frames judged during the run and frames taken before it
    # say nothing about the new focus.
    hook["during"] = lambda: up.frame_measured(e, False, "FWHM 5.0 px > limit", 5.0)
    asyncio.run(up.between_frames())
    assert calls == [("focus", why, 0), ("during", None)] and up.pending["autofocus"] is None
    asyncio.run(up.between_frames())
    assert len(calls) == 2
    assert up.frame_measured(e, False, "FWHM 5.0 px > limit", 5.0) is None
    f, g = runner.take(2)
    assert up.frame_measured(f, True, None, 2.0) is None and up.frame_measured(g, True, None, 2.1) is None
    # The tube cools: the focuser's probe 2.5 C below the last focus's.
    runner.client.temperature = 7.5
    (h,) = runner.take(1)
    assert "2.5 C below the last focus" in up.frame_measured(h, True, None, 2.0)


def test_start_focus_once_centring_after_slews_and_the_pointing_check(tmp_path, fakes):
    calls, _ = fakes
    runner = FakeRunner(tmp_path, autofocus=True, pointing_check_s=600, pointing_recenter=True)
    up = Upkeep(runner)
    asyncio.run(up.after_slew())
    asyncio.run(up.at_start())
    asyncio.run(up.at_start())  # prepare() again after a fault: not a second start focus
    assert calls == [("centre", RA, DEC), ("focus", "plan start", 0)]
    a, b = runner.take(2)
    assert up.check_due(a) and not up.check_due(b)  # the first frame after a centring, then every 600 s
    up.request_recenter()
    assert up.pending["recenter"] and not up.check_due(b)
    asyncio.run(up.between_frames())
    assert calls[-1] == ("centre", RA, DEC) and not up.pending["recenter"]
    assert not up.check_due(b)  # taken before the re-centring
    (c,) = runner.take(1)
    assert up.check_due(c)  # the first after it
    # Without centring (center = false) a slew still starts the check over.
    runner.center = False
    up.check.due(0.0)
    (d,) = runner.take(1)
    asyncio.run(up.after_slew())
    (e,) = runner.take(1)
    assert not up.check_due(d) and up.check_due(e) and calls[-1] == ("centre", RA, DEC)


def test_without_a_focuser_no_trigger_and_no_request(tmp_path, fakes):
    calls, _ = fakes
    runner = FakeRunner(tmp_path, focuser="", autofocus=True)
    up = Upkeep(runner)
    assert up.focuser is None and up.trigger is None
    (a,) = runner.take(1)
    assert up.frame_measured(a, True, None, 50.0) is None
    with pytest.raises(ValueError, match="focuser"):
        up.request_autofocus("command")
    asyncio.run(up.at_start())
    assert calls == []


# -- the service side: the command, the supervisor's and the pointing's frame hooks -----------

def _service(tmp_path, focuser: str = "Focuser Simulator") -> Service:
    (tmp_path / "capture").mkdir(parents=True, exist_ok=True)
    raw = {"capture": {"dir": str(tmp_path / "capture")}, "state": {"dir": str(tmp_path / "state")},
           "indi": {"focuser": focuser}, "solve": {"enabled": False}}
    return Service(config_from_dict(raw, "test.toml"))


class PlanStub:
    """A running plan as the supervisor sees it."""

    def __init__(self, frame_type="light"):
        self.plan = PlanSettings(target="T", ra=RA, dec=DEC, frame_type=frame_type, pointing_check_s=60,
                                 pointing_far_arcsec=60, pointing_recenter=True)
        self.light = frame_type == "light"
        self.ra, self.dec = RA, DEC
        self.asked: list = []
        self.recentered = 0
        self.upkeep = types.SimpleNamespace(
            frame_measured=lambda *a: self.asked.append(a) or "FWHM risen",
            check_due=lambda path: True,
            check=PointingCheck(60, 60, True))

    def request_autofocus(self, reason, offset):
        self.asked.append((reason, offset))

    def request_recenter(self):
        self.recentered += 1


def test_the_autofocus_command_refused_queued_or_run(tmp_path, monkeypatch):
    async def main():
        no_focuser = _service(tmp_path / "a", focuser="")
        refused = await no_focuser.command({"id": 1, "action": "autofocus"})
        service = _service(tmp_path / "b")
        bad = await service.command({"id": 2, "action": "autofocus", "start_offset_steps": 200_000})
        wrong_type = await service.command({"id": 3, "action": "autofocus", "start_offset_steps": "far"})
        # A plan running: queued on it.
        plan = PlanStub()
        service.plans.runner = plan
        monkeypatch.setattr(PlanSupervisor, "running", property(lambda self: True))
        queued = await service.command({"id": 4, "action": "autofocus", "start_offset_steps": -3000})
        service.plans.runner = PlanStub("dark")
        dark = await service.command({"id": 5, "action": "autofocus"})
        # No plan: run at once in a session of its own.
        monkeypatch.setattr(PlanSupervisor, "running", property(lambda self: False))
        ran = []

        async def focus_once(config, events, offset):
            ran.append(offset)
            result = {"event": "autofocus", "ok": True, "position": 100, "trigger": "command"}
            await events.publish("autofocus", result)
            return result

        monkeypatch.setattr(upkeep_module, "focus_once", focus_once)
        now = await service.command({"id": 6, "action": "autofocus", "start_offset_steps": 500})
        return refused, bad, wrong_type, queued, plan, dark, now, ran, service.status()

    refused, bad, wrong_type, queued, plan, dark, now, ran, status = asyncio.run(main())
    assert not refused["ok"] and "[indi] focuser" in refused["error"]
    assert not bad["ok"] and "start_offset_steps" in bad["error"] and "200000" in bad["error"]
    assert not wrong_type["ok"] and "start_offset_steps" in wrong_type["error"]
    assert queued["ok"] and queued["queued"] is True and queued["target"] == "T" and plan.asked == [("command", -3000)]
    assert not dark["ok"] and "dark frames: focus after it" in dark["error"]
    assert now["ok"] and now["queued"] is False and now["focused"] and now["position"] == 100 and ran == [500]
    assert status["focus"]["position"] == 100  # the last autofocus event


def test_frames_of_the_running_plan_reach_its_trigger_and_its_pointing_check(tmp_path):
    service = _service(tmp_path)
    plan = PlanStub()
    service.plans.runner = plan
    result = types.SimpleNamespace(accepted=False, reason="FWHM 4.0 px > limit", fwhm_px=4.0)
    out = Outcome(Path("light_1.fits"), "rejected", "T_L", result)
    service.plans.frame_done(out)
    assert plan.asked == [(Path("light_1.fits"), False, "FWHM 4.0 px > limit", 4.0)]
    service.plans.frame_done(Outcome(Path("x.fits"), "error", reason="unreadable"))  # no result: nothing
    assert len(plan.asked) == 1

    published = []
    service.publish_event = lambda kind, payload: published.append((kind, payload))

    async def main():
        pointing = Pointing(service)

        async def solve_file(path, target):
            return Solution(ok=True, ra_deg=target[0], dec_deg=target[1] + 300 / 3600)  # 300" north

        pointing.solver = types.SimpleNamespace(solve_file=solve_file, request=lambda *a: None)
        stacked = Outcome(Path("light_2.fits"), "stacked", "T_L", types.SimpleNamespace(accepted=True))
        pointing.frame_done(Outcome(Path("light_1.fits"), "rejected", "T_L", result), plan)  # not stacked
        await pointing.drain()
        assert published == []
        pointing.frame_done(stacked, plan)
        await pointing.drain()
        return pointing

    pointing = asyncio.run(main())
    (kind, event), = published
    assert kind == "acquisition" and event["event"] == "pointing" and event["far"] and event["recenter"]
    assert event["error_arcsec"] == pytest.approx(300.0, abs=0.5) and plan.recentered == 1
    assert pointing.last == event and pointing.status(None)["pointing"] == event
