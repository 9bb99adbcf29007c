"""Centring on the target after a slew: expose, plate-solve, sync the mount, slew again.

Why sync-and-slew rather than an offset goto: after a sync the mount's own model is right
near the target, so the dithers and the re-slews after a fault or a meridian flip land
where they should too. The loop ends when a solve puts the frame's centre within the
tolerance of the target, or after `max_tries` frames (then the plan goes on where it is,
having said so: a night of slightly off-centre frames beats no night).

The frames are hidden files (".lightbucket-center_*") in the capture folder, so the watcher
ignores them, and are deleted once solved; the solve runs in a worker thread (`solve-field`
is a subprocess), never on the event loop.

During the night `PointingCheck` says when to solve one of the plan's own frames and what
its answer means: a frame far from the target (the mount slipped, a cable snagged) is
reported, and re-centred when the plan asks for it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from daemon.io.load import load_frame
from daemon.solve import Solution, hints_from_meta, solve_frame
from daemon.wcs import separation_arcsec

log = logging.getLogger(__name__)

#: Name of the centring frames: hidden, so the watcher never stacks them.
FRAME_NAME = ".lightbucket-center"


@dataclass(frozen=True)
class CenterSettings:
    """tolerance_arcsec: good enough; max_tries: frames solved at most; exposure_s: each
    frame's exposure; time_limit_s: each solve's limit; radius_deg: how far from the target
    the solver searches."""

    tolerance_arcsec: float = 30.0
    max_tries: int = 5
    exposure_s: float = 2.0
    time_limit_s: float = 15.0
    radius_deg: float = 3.0


@dataclass(frozen=True)
class CenterResult:
    """ok: within tolerance; error_arcsec: the last solved distance from the target (None if
    nothing solved); tries: frames taken; reason: why not, when not ok."""

    ok: bool
    error_arcsec: float | None
    tries: int
    reason: str = ""
    solution: Solution | None = None


def solve_path(path: Path, ra_deg: float, dec_deg: float, settings: CenterSettings) -> Solution:
    """Solve one frame file hinted by the target position and its header's scale (blocking)."""
    frame = load_frame(path)
    hints = replace(hints_from_meta(frame.meta, radius_deg=settings.radius_deg), ra_deg=ra_deg, dec_deg=dec_deg)
    return solve_frame(frame, hints, time_limit_s=settings.time_limit_s)


Publish = Callable[..., Awaitable[None]]


async def center_on(mount, camera, ra_deg: float, dec_deg: float, settings: CenterSettings,
                    publish: Publish, slew_timeout_s: float = 180.0) -> CenterResult:
    """Bring the target within tolerance of the frame centre.

    Parameters
    ----------
    mount : `drivers.mount.Mount` (slewed to the target already).
    camera : `drivers.camera.Camera`, configured for lights.
    ra_deg, dec_deg : the target, J2000 degrees.
    settings : `CenterSettings`.
    publish : ``await publish(state, **fields)``: the plan's event ("centering" with
        error_arcsec and try, then "centered").
    slew_timeout_s : for each re-slew.

    Returns a `CenterResult`; solver failures are results, INDI faults raise as from the mount.
    """
    error = None
    reason = ""
    solution = None
    for attempt in range(1, settings.max_tries + 1):
        path = await camera.expose(settings.exposure_s, FRAME_NAME)
        try:
            sol = await asyncio.to_thread(solve_path, path, ra_deg, dec_deg, settings)
        finally:
            path.unlink(missing_ok=True)
        if not sol.ok:
            reason = f"frame {attempt} not solved: {sol.reason}"
            await publish("centering", error_arcsec=None, attempt=attempt, reason=sol.reason)
            continue
        solution = sol
        error = separation_arcsec(sol.ra_deg, sol.dec_deg, ra_deg, dec_deg)
        await publish("centering", error_arcsec=round(error, 1), attempt=attempt,
                      solved_ra_deg=round(sol.ra_deg, 5), solved_dec_deg=round(sol.dec_deg, 5))
        if error <= settings.tolerance_arcsec:
            await publish("centered", error_arcsec=round(error, 1), attempt=attempt)
            return CenterResult(True, error, attempt, solution=sol)
        log.info("centring: %.0f\" from the target; syncing to the solve and slewing again", error)
        await mount.sync(sol.ra_deg, sol.dec_deg)
        await mount.slew(ra_deg, dec_deg, timeout=slew_timeout_s)
        reason = f"{error:.0f}\" from the target after {attempt} tries"
    return CenterResult(False, error, settings.max_tries, reason=reason or "no frame solved",
                        solution=solution)


@dataclass
class PointingCheck:
    """When to plate-solve one of the night's frames, and what its solve means (pure).

    every_s: seconds between checks (the first frame after a centring is checked at once);
    far_arcsec: a centre farther than this from the target is a drift, reported; recenter:
    a drift also asks for a re-centring (`PlanRunner.recenter`) before the next frame.
    """

    every_s: float = 600.0
    far_arcsec: float = 120.0
    recenter: bool = False
    _last_s: float | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.every_s > 0 or not self.far_arcsec > 0:
            raise ValueError(f"plan.pointing_check_s and plan.pointing_far_arcsec must be > 0, got "
                             f"{self.every_s!r} and {self.far_arcsec!r}")

    def due(self, now_s: float) -> bool:
        """True when a frame taken at `now_s` (time.monotonic seconds) should be solved; the
        check is then counted as done."""
        if self._last_s is not None and now_s - self._last_s < self.every_s:
            return False
        self._last_s = now_s
        return True

    def centered(self) -> None:
        """The mount was just centred: check the next frame."""
        self._last_s = None

    def verdict(self, path: str, solution: Solution, ra_deg: float, dec_deg: float) -> dict:
        """The `pointing` event of a solved frame: {"event": "pointing", "path", "ok",
        "ra_deg", "dec_deg", "error_arcsec", "far", "recenter", "reason"}. A frame that did not
        solve is reported (ok False, its reason) and never re-centred on."""
        if not solution.ok:
            return {"event": "pointing", "path": path, "ok": False, "ra_deg": None, "dec_deg": None,
                    "error_arcsec": None, "far": False, "recenter": False, "reason": solution.reason}
        error = separation_arcsec(solution.ra_deg, solution.dec_deg, ra_deg, dec_deg)
        far = error > self.far_arcsec
        return {"event": "pointing", "path": path, "ok": True, "ra_deg": round(solution.ra_deg, 5),
                "dec_deg": round(solution.dec_deg, 5), "error_arcsec": round(error, 1), "far": far,
                "recenter": far and self.recenter,
                "reason": f"{error:.0f}\" from the target (limit {self.far_arcsec:g}\")" if far else None}
