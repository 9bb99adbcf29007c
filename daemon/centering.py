"""Centring on the target after a slew: expose, plate-solve, sync the mount, slew again.

Why sync-and-slew rather than an offset goto: after a sync the mount's own model is right
near the target, so the dithers and the re-slews after a fault or a meridian flip land
where they should too. The loop ends when a solve puts the frame's centre within the
tolerance of the target, or after `max_tries` frames (then the plan goes on where it is,
having said so: a night of slightly off-centre frames beats no night).

The frames are hidden files (".lightbucket-center_*") in the capture folder, so the watcher
ignores them, and are deleted once solved; the solve runs in a worker thread (`solve-field`
is a subprocess), never on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
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
