"""Autofocus with an INDI focuser: sweep, measure HFR, fit the V-curve, go to its minimum.

The imperative shell around `daemon.focus`: it moves the focuser, exposes hidden frames
(".lightbucket-focus_*", ignored by the watcher, deleted once measured), measures their stars
in a worker thread and fits. Every move ends moving outward (`focus.approach`), so backlash
is the same at every sample and at the final position. A sweep whose minimum lies at an edge
is followed by one further on (up to `max_sweeps`); when no minimum is found the focuser goes
back where it started and the result says why.

The result is the event payload {"event": "autofocus", "ok", "position", "hfr_px",
"hfr_px_start", "curve": [{"position", "hfr_px", "n_stars"}, ...], "reason", "model"}.
`run_autofocus` is what the service and a plan call: one run with its events (a `focusing`
event per sample, then the result); `autofocus_command` reads the `{"action": "autofocus"}`
command. When to run it during a night is `daemon.focus.RefocusTrigger`'s to say.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

from daemon.focus import approach, fit_curve, next_sweep, sweep
from daemon.io.load import load_frame
from daemon.pipeline.stars import measure
from daemon.settings import FocusSettings
from drivers.indi_client import IndiError

log = logging.getLogger(__name__)

FRAME_NAME = ".lightbucket-focus"


def hfr_of(path: Path, min_stars: int = 5) -> tuple[float | None, int]:
    """(median HFR px, star count) of one frame file; HFR None with fewer than min_stars (blocking)."""
    frame = load_frame(path)
    stars, metrics = measure(frame.data, bayer=frame.meta.bayer, bin_factor=1)
    hfr = metrics.hfr_px if metrics.n_stars >= min_stars else None
    return (None if hfr is None or not math.isfinite(hfr) else float(hfr)), int(metrics.n_stars)


class Autofocus:
    """One autofocus run on `focuser` (`drivers.focuser.Focuser`) and `camera`
    (`drivers.camera.Camera`, configured for lights)."""

    def __init__(self, focuser, camera, settings: FocusSettings | None = None,
                 on_sample: Callable[[dict], Awaitable[None]] | None = None):
        self.focuser, self.camera = focuser, camera
        self.settings = settings or FocusSettings()
        self.curve: list[dict] = []
        self._on_sample = on_sample

    def _limits(self) -> tuple[float, float]:
        snap = self.focuser.client.prop(self.focuser.device, "ABS_FOCUS_POSITION")
        if snap is None:
            return 0.0, math.inf
        return snap.limits.get("FOCUS_ABSOLUTE_POSITION", (0.0, math.inf))

    async def _move(self, target: int) -> int:
        low, high = self._limits()
        pos = self.focuser.position()
        for p in approach(pos, int(target), self.settings.backlash_steps):
            pos = await self.focuser.move_to(int(min(max(p, low), high)))
        return pos

    async def _sample(self, position: int | None = None) -> tuple[int, float | None, int]:
        pos = self.focuser.position() if position is None else await self._move(position)
        path = await self.camera.expose(self.settings.exposure_s, FRAME_NAME)
        try:
            hfr, n = await asyncio.to_thread(hfr_of, path, self.settings.min_stars)
        finally:
            path.unlink(missing_ok=True)
        log.info("autofocus: position %d HFR %s px (%d stars)", pos, "-" if hfr is None else f"{hfr:.2f}", n)
        return pos, hfr, n

    async def run(self, start_offset_steps: int = 0) -> dict:
        """Focus; returns the autofocus event payload (see the module docstring).

        start_offset_steps: first move this far from the current position (a defocused start,
        for tests and for a focuser known to be far off)."""
        s = self.settings
        low, high = self._limits()
        if start_offset_steps:
            await self._move(int(min(max(self.focuser.position() + start_offset_steps, low), high)))
        start, hfr_start, _ = await self._sample()
        positions = sweep(start, s.step, s.points, low, high)
        fit = None
        for _ in range(s.max_sweeps):
            for p in positions:
                pos, hfr, n = await self._sample(p)
                point = {"position": pos, "hfr_px": None if hfr is None else round(hfr, 3), "n_stars": n}
                self.curve.append(point)
                if self._on_sample is not None:
                    await self._on_sample({**point, "sample": len(self.curve)})
            pts = sorted(self.curve, key=lambda c: c["position"])
            xs, ys = [c["position"] for c in pts], [c["hfr_px"] for c in pts]
            fit = fit_curve(xs, ys)
            if fit.ok:
                break
            nxt = next_sweep(xs, ys, s.step, s.points, low, high)
            done = {c["position"] for c in self.curve}
            positions = [p for p in (nxt or []) if p not in done]
            if not positions:
                break
        if fit is None or not fit.ok:
            await self._move(start)
            return self._result(False, start, hfr_start, hfr_start,
                                fit.reason if fit else "no samples", None)
        pos, hfr, _ = await self._sample(fit.best_position)
        if hfr is None or (hfr_start is not None and hfr > hfr_start):
            await self._move(start)
            return self._result(False, start, hfr_start, hfr_start,
                                f"HFR at the fitted best {fit.best_position} was {hfr} px, not better "
                                f"than {hfr_start} px at the start", fit.model)
        return self._result(True, pos, hfr, hfr_start, "", fit.model)

    def failed(self, reason: str) -> dict:
        """The result payload of a run that could not go on (where the focuser is now)."""
        return self._result(False, self.focuser.position() or 0, None, None, reason, None)

    def _result(self, ok: bool, position: int, hfr, hfr_start, reason: str, model) -> dict:
        return {"event": "autofocus", "ok": ok, "position": int(position),
                "hfr_px": None if hfr is None else round(hfr, 3),
                "hfr_px_start": None if hfr_start is None else round(hfr_start, 3),
                "curve": sorted(self.curve, key=lambda c: c["position"]), "reason": reason or None,
                "model": model}


#: The largest start offset a command may ask for (steps): a typo must not drive a focuser
#: into its end stop for minutes.
MAX_START_OFFSET_STEPS = 100_000


def autofocus_command(payload: Mapping) -> int:
    """The start offset (steps, 0 when absent) of an `{"action": "autofocus",
    "start_offset_steps": N}` command; ValueError naming the key when it is no integer or
    beyond +-MAX_START_OFFSET_STEPS."""
    value = payload.get("start_offset_steps", 0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) \
            or abs(value) > MAX_START_OFFSET_STEPS:
        raise ValueError(f"autofocus: start_offset_steps must be an integer within +-{MAX_START_OFFSET_STEPS}, "
                         f"got {value!r}")
    return int(value)


Publish = Callable[[str, dict], Awaitable[None]]


async def run_autofocus(focuser, camera, settings: FocusSettings, publish: Publish, *,
                        start_offset_steps: int = 0, reason: str = "command") -> dict:
    """One autofocus run with its events.

    Parameters
    ----------
    focuser : `drivers.focuser.Focuser`, connected.
    camera : `drivers.camera.Camera`, connected and configured for lights (its frames go to
        the capture folder as hidden files, deleted once measured).
    settings : `FocusSettings`.
    publish : ``await publish(kind, payload)`` (the plan's `Events.publish`): kind "focusing"
        for each sample ({"position", "hfr_px", "n_stars", "sample", "reason"}), then
        "autofocus" with the result (module docstring) and "reason" / "trigger".
    start_offset_steps : move this far first (a defocused start; the command's option).
    reason : why this run ("command", "plan start", or `RefocusTrigger`'s reason): in the events.

    Returns the result payload. An INDI fault is published as a failed result, then raised.
    """
    async def sample(point: dict) -> None:
        await publish("focusing", {**point, "trigger": reason})

    af = Autofocus(focuser, camera, settings, on_sample=sample)
    temperature = getattr(focuser, "temperature", lambda: None)()
    try:
        result = await af.run(start_offset_steps=start_offset_steps)
    except IndiError as exc:
        result = af.failed(f"INDI: {exc}")
        await publish("autofocus", {**result, "trigger": reason, "temperature_c": temperature})
        raise
    result = {**result, "trigger": reason, "temperature_c": temperature}
    await publish("autofocus", result)
    return result
