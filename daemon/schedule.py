"""When a plan may run: its window in the night, from its settings, the site and the clock.

Pure (no devices): `plan_window(plan, site, now)` answers once, when the plan starts, with the
time to wait for (dusk, a start time, the target rising above its limit, darkness for lights),
the time the plan ends (until, dawn, the target setting below its limit, daylight for lights)
and why, or a refusal naming the altitude when the target never rises above its limit from the
site. `flip_time` says when a meridian flip is due. All times aware UTC.

Without a site only clock times (`start`/`until` as ISO times) count: no altitude, twilight or
daylight limit can be computed, and the plan runs as before (the caller reports that).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from daemon import sky
from daemon.pipeline.frame import FrameType
from daemon.settings import PlanSettings, SiteSettings

#: Light frames wait while the sun is above this (deg) unless the plan names a twilight: the
#: sky in civil twilight is too bright for any light frame worth stacking.
DAYLIGHT_SUN_ALT_DEG = -6.0
#: Rounds of "wait for dark, then for the target to rise" before giving up (each moves later).
_MAX_ROUNDS = 4


@dataclass(frozen=True)
class Window:
    """start: when the plan may begin (== now when it may begin at once); start_reason: what it
    waits for ("", "start time", "dusk", "dark", "target rises"); rise: when the target comes
    above its limit, when it is below now. end: when the plan must end (None: count or stop
    decides); end_reason: "until", "dawn", "daylight", "target sets". refused: why the plan
    cannot run at all (None when it can)."""

    start: datetime
    start_reason: str = ""
    rise: datetime | None = None
    end: datetime | None = None
    end_reason: str = ""
    refused: str | None = None
    limit: str = ""


def _dark_alt(plan: PlanSettings) -> float:
    """The sun altitude below which lights are taken: the plan's own twilight when it names one."""
    for alt in (plan.start_sun_alt_deg, plan.until_sun_alt_deg):
        if alt is not None:
            return alt
    return DAYLIGHT_SUN_ALT_DEG


def plan_window(plan: PlanSettings, site: SiteSettings | None, now: datetime) -> Window:
    """The window of `plan` from `now` (see the module docstring).

    Parameters
    ----------
    plan : PlanSettings; ra/dec are needed for the altitude limit (lights only).
    site : SiteSettings or None (unknown: clock times only).
    now : aware datetime.
    """
    start, start_reason = now, ""
    if plan.start_time is not None and plan.start_time > now:
        start, start_reason = plan.start_time, "start time"
    if site is None:
        end = plan.until_time
        return Window(start, start_reason, end=end, end_reason="until" if end else "")

    light = plan.frame_type is FrameType.LIGHT
    if plan.start_sun_alt_deg is not None and float(sky.sun_alt_deg(site, start)) > plan.start_sun_alt_deg:
        dusk = sky.sun_crossing(site, start, plan.start_sun_alt_deg, rising=False)
        if dusk is None:
            return Window(start, refused=f"no {plan.start} at {site.describe()} in the next "
                                         f"{sky.LOOKAHEAD_H:g} h (sun never below {plan.start_sun_alt_deg:g} deg)")
        start, start_reason = dusk, "dusk"
    horizon = sky.Horizon(plan.min_altitude_deg, plan.horizon)
    has_target = light and plan.ra is not None and plan.dec is not None
    rise = None
    dark = _dark_alt(plan)
    for _ in range(_MAX_ROUNDS):
        if light and float(sky.sun_alt_deg(site, start)) > dark:
            t = sky.sun_crossing(site, start, dark, rising=False)
            if t is None:
                return Window(start, refused=f"no dark sky (sun below {dark:g} deg) at {site.describe()} "
                                             f"in the next {sky.LOOKAHEAD_H:g} h")
            start, start_reason = t, "dark"
        if not has_target:
            break
        vis = sky.visibility(plan.ra_deg, plan.dec_deg, site, start, horizon)
        if vis.never:
            return Window(start, refused=f"{plan.target or 'target'} {vis.reason}")
        if vis.up:
            break
        if vis.rise is None:
            return Window(start, refused=f"{plan.target or 'target'} does not rise above "
                                         f"{horizon.describe()} in the next {sky.LOOKAHEAD_H:g} h")
        start, start_reason, rise = vis.rise, "target rises", vis.rise
        if not (light and float(sky.sun_alt_deg(site, start)) > dark):
            break  # risen in a dark sky: go
    else:
        return Window(start, refused=f"{plan.target or 'target'} is not above {horizon.describe()} in a dark "
                                     f"sky at {site.describe()} in the next {sky.LOOKAHEAD_H:g} h")

    ends: list[tuple[datetime, str]] = []
    if plan.until_time is not None:
        ends.append((plan.until_time, "until"))
    if plan.until_sun_alt_deg is not None:
        dawn = sky.sun_crossing(site, start, plan.until_sun_alt_deg, rising=True)
        if dawn is not None:
            ends.append((dawn, "dawn"))
    if light:
        day = sky.sun_crossing(site, start, dark, rising=True)
        if day is not None:
            ends.append((day, "daylight"))
    if has_target:  # from a moment after the start: at a rise the target is on the limit
        vis = sky.visibility(plan.ra_deg, plan.dec_deg, site, start + timedelta(seconds=30), horizon)
        if vis.set is not None:
            ends.append((vis.set, "target sets"))
    end, end_reason = min(ends, key=lambda e: e[0]) if ends else (None, "")
    if end_reason == "daylight" and plan.until_sun_alt_deg == dark:
        end_reason = "dawn"  # the same moment: say what the plan asked for
    return Window(start, start_reason, rise, end, end_reason, limit=horizon.describe())


def flip_time(ha_deg: float, now: datetime, flip_after_min: float) -> datetime:
    """When a target now at hour angle `ha_deg` is `flip_after_min` minutes of time past the
    meridian (now or in the past when it already is)."""
    flip_deg = flip_after_min / 4.0  # 4 minutes of time per degree
    return now + timedelta(seconds=(flip_deg - ha_deg) / sky.SIDEREAL_DEG_PER_S)
