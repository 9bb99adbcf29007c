"""Autofocus against a fake focuser with real backlash and a fake camera drawing stars whose
size follows the focuser's *mechanical* position; the command's option; the events."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from daemon.autofocus import autofocus_command, run_autofocus
from daemon.settings import FocusSettings, SettingsError
from daemon.simulate import StarField, random_star_field, render_stars
from drivers.indi_client import IndiError

BEST = 41_000  # mechanical position of the best focus (steps)
BACKLASH = 1_500  # steps lost when the motor reverses


class Snap:
    def __init__(self, low, high):
        self.limits = {"FOCUS_ABSOLUTE_POSITION": (low, high)}


class FakeClient:
    def prop(self, device, name):
        return Snap(0, 100_000) if name == "ABS_FOCUS_POSITION" else None


class BacklashFocuser:
    """Reports the commanded position (as real focusers do); the optics sit at `mechanical`,
    which lags by BACKLASH after the motor reverses from outward to inward."""

    def __init__(self, position: int, fail_after: int | None = None):
        self.client, self.device = FakeClient(), "fake"
        self.commanded = self.mechanical = position
        self.moves: list[int] = []
        self.fail_after = fail_after

    def position(self) -> int:
        return self.commanded

    def temperature(self) -> float:
        return 4.5

    async def move_to(self, steps: int) -> int:
        if self.fail_after is not None and len(self.moves) >= self.fail_after:
            raise IndiError("fake focuser: connection lost")
        steps = int(steps)
        d = steps - self.commanded
        self.moves.append(steps)
        if d > 0:  # outward: the gear takes up any slack first (mechanical = commanded - 0)
            self.mechanical = steps
        elif d < 0:  # inward: the slack opens, the optics stop BACKLASH short
            self.mechanical = steps + BACKLASH
        self.commanded = steps
        return steps


class StarCamera:
    """Writes a frame of 60 stars whose FWHM follows the focuser's mechanical position
    (a hyperbola: 3 px at focus, +1 px per 1000 steps far out)."""

    def __init__(self, focuser: BacklashFocuser, folder: Path):
        self.focuser, self.folder, self.n = focuser, folder, 0
        self.field: StarField = random_star_field((300, 400), 60, seed=5, flux_range=(3e4, 2e5), margin=-0.05)

    def fwhm(self, mechanical: int) -> float:
        return 3.0 * float(np.sqrt(1 + ((mechanical - BEST) / 3000.0) ** 2))

    async def expose(self, exposure_s: float, name: str) -> Path:
        self.n += 1
        img = render_stars((300, 400), self.field, fwhm_px=self.fwhm(self.focuser.mechanical))
        img += np.random.default_rng(self.n).normal(500, 5, img.shape)
        path = self.folder / f"{name}_{self.n:03d}.fits"
        fits.writeto(path, img.astype(np.float32))
        return path


def _run(focuser, camera, settings, **kw):
    events: list[tuple[str, dict]] = []

    async def publish(kind, payload):
        events.append((kind, payload))

    async def main():
        return await run_autofocus(focuser, camera, settings, publish, **kw)

    return asyncio.run(main()), events


def test_autofocus_with_backlash_lands_on_the_mechanical_best(tmp_path):
    focuser = BacklashFocuser(50_000)
    camera = StarCamera(focuser, tmp_path)
    settings = FocusSettings(step=2500, points=7, backlash_steps=2500, exposure_s=1.0)
    result, events = _run(focuser, camera, settings, start_offset_steps=8000, reason="plan start")
    assert result["ok"], result
    best_fwhm = camera.fwhm(BEST)
    assert abs(focuser.mechanical - BEST) < 300 and camera.fwhm(focuser.mechanical) < 1.01 * best_fwhm
    assert result["hfr_px_start"] > 2.5 * result["hfr_px"]  # 17000 steps out at the start
    # every sample and the final position were reached moving outward: mechanical == commanded
    assert focuser.mechanical == focuser.commanded == result["position"]
    assert set(result) >= {"event", "ok", "position", "hfr_px", "hfr_px_start", "curve", "trigger"}
    assert result["event"] == "autofocus" and result["trigger"] == "plan start" and result["temperature_c"] == 4.5
    samples = [p for k, p in events if k == "focusing"]
    assert [p["sample"] for p in samples] == list(range(1, len(samples) + 1)) == list(
        range(1, len(result["curve"]) + 1))
    assert events[-1] == ("autofocus", result)
    assert not list(tmp_path.glob(".lightbucket-focus*"))  # frames deleted once measured


def test_control_without_backlash_compensation_the_final_inward_move_falls_short(tmp_path):
    focuser = BacklashFocuser(50_000)
    camera = StarCamera(focuser, tmp_path)
    result, _ = _run(focuser, camera, FocusSettings(step=2500, points=7, backlash_steps=0),
                     start_offset_steps=8000)
    assert focuser.mechanical - focuser.commanded == BACKLASH  # the last move was inward
    assert abs(focuser.mechanical - BEST) > 600  # and the lagging samples skewed the fit too


def test_no_minimum_within_reach_goes_back_and_says_why(tmp_path):
    focuser = BacklashFocuser(65_000)  # 24000 steps out: two sweeps of 4000 cannot reach it
    camera = StarCamera(focuser, tmp_path)
    result, _ = _run(focuser, camera, FocusSettings(step=1000, points=5, max_sweeps=2))
    assert not result["ok"] and "the minimum lies below the sweep" in result["reason"]
    assert result["position"] == 65_000 and focuser.mechanical == 65_000


def test_an_indi_fault_is_published_as_a_failed_result_then_raised(tmp_path):
    focuser = BacklashFocuser(50_000, fail_after=3)
    camera = StarCamera(focuser, tmp_path)
    events: list = []

    async def publish(kind, payload):
        events.append((kind, payload))

    with pytest.raises(IndiError):
        asyncio.run(run_autofocus(focuser, camera, FocusSettings(), publish))
    kind, payload = events[-1]
    assert kind == "autofocus" and payload["ok"] is False and "connection lost" in payload["reason"]


def test_the_command_option_and_settings_are_checked():
    assert autofocus_command({"action": "autofocus"}) == 0
    assert autofocus_command({"action": "autofocus", "start_offset_steps": -12000}) == -12000
    assert autofocus_command({"action": "autofocus", "start_offset_steps": 5000.0}) == 5000
    for bad in ("far", 1.5, True, 10**7, None):
        with pytest.raises(ValueError, match="start_offset_steps"):
            autofocus_command({"action": "autofocus", "start_offset_steps": bad})
    for key, value in (("points", 3), ("step", 0), ("exposure_s", 0.0), ("backlash_steps", -1), ("step", 2.5),
                       ("refocus_fwhm_factor", 1.0), ("refocus_temp_drop_c", 0.0), ("refocus_min_frames", 0)):
        with pytest.raises(SettingsError, match=rf"\[focus\] {key} = {value!r}"):
            FocusSettings(**{key: value})
