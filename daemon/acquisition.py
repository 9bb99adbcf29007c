"""Session and calibration plans run on INDI devices: the night's imaging loop.

`run_acquisition(config, events, stop)` is what the service awaits when the config has [indi].
It connects (or starts its own indiserver when [indi] drivers is non-empty), prepares the devices
(camera settings, cooling, filter, slew-and-track for lights), then takes frames into the capture
folder, dithering every N frames, publishing `plan` events (frame k of N, ETA) as it goes.

Faults: a lost indiserver or device, an exposure that never completes, a slew that times out are
reported as `plan` events with state "retrying"; the loop reconnects with exponential backoff,
prepares the devices again (a restarted simulator has forgotten everything) and retries the frame.
It gives up, with state "failed" and an AcquisitionError, after `max_failures` faults in a row.
Captured frames reach the pipeline only through the folder watcher: one path for every frame.

The night (with a site: [site], or the mount's own): before anything moves, the plan's window
(daemon.schedule) says whether it waits (state "waiting", with the time it starts and the
target's rise time), is refused (state "refused", the reason naming the altitude), and when it
ends (until, dawn, daylight, the target setting). A German equatorial mount flips once the
target is [mount] flip_after_min past the meridian: the exposure in hand finishes if it ends
within flip_max_wait_min, else is aborted; state "flipping", a goto that must change the pier
side, settle, re-centre, and frames go on into the same stack (the next "running" event has
the new pier_side). Safe ends: the mount parks at dawn, after a failed flip, after giving up on
faults ([mount] park_on_fault) and, with [plan] park, at every end; when parking fails,
tracking is switched off and both are said in the "park failed" event.

Light plans are kept on target and in focus by `daemon.upkeep` (centring after each slew,
autofocus at the start with [plan] autofocus, and what the service asks for between frames:
`request_autofocus`, `request_recenter`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import random
import shutil
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from daemon import schedule, sky
from daemon.pipeline.frame import FrameType
from daemon.routing import StackKey
from daemon.settings import CameraSettings, FocusSettings, IndiSettings, MountSettings, PlanSettings, SiteSettings
from daemon.upkeep import Upkeep, prepare_simulator, server_for
from drivers.camera import Camera, ExposureTimeout
from drivers.filterwheel import FilterWheel
from drivers.indi_client import IndiClient, IndiError
from drivers.indiserver import IndiServer
from drivers.mount import FlipFailed, Mount, PointingErrorMount, SlewTimeout

log = logging.getLogger(__name__)

#: What `_until_stopped` returns when its deadline passed first.
_LATE = object()

class Events(Protocol):
    async def publish(self, kind: str, payload: dict) -> None: ...


class AcquisitionError(RuntimeError):
    """The plan cannot go on (a plan the devices cannot run, too many faults in a row, a failed
    meridian flip)."""


@dataclass
class _Progress:
    done: int = 0
    paths: list[str] = field(default_factory=list)
    cycle_s: list[float] = field(default_factory=list)
    faults: int = 0


class PlanRunner:
    """Runs one plan on one indiserver; `run()` returns a summary dict."""

    def __init__(self, indi: IndiSettings, camera: CameraSettings, plan: PlanSettings,
                 capture_dir: str | Path, events: Events, stop: asyncio.Event,
                 server: IndiServer | None = None, *, client: IndiClient | None = None,
                 site: SiteSettings | None = None, mount_settings: MountSettings | None = None,
                 focus: FocusSettings | None = None, done_paths: Sequence[str] = (),
                 max_failures: int | None = None, backoff_s: tuple[float, float] = (0.5, 30.0),
                 connect_timeout_s: float = 10.0, slew_timeout_s: float = 180.0,
                 exposure_margin_s: float = 30.0,
                 expect_frames: Callable[[tuple[int, int], str | None, StackKey], None] | None = None):
        """site: [site] (None: the mount's own, if it has one). mount_settings: [mount]. focus:
        [focus] (autofocus with [indi] focuser). done_paths: frames of this plan taken before a
        restart: they count, and are not taken again. max_failures: faults in a row before
        giving up (default [plan] max_faults). expect_frames: told, as a light plan's first
        exposure starts, the frames' (height, width), CFA pattern and stack (the service
        makes that stack meanwhile: `Session.prepare`)."""
        # The settings checked their own values (daemon.settings); what is left depends on the rig.
        self.until = plan.until_time
        self.light = plan.frame_type is FrameType.LIGHT
        self.ra = self.dec = None
        if self.light and indi.mount:
            if plan.ra is None or plan.dec is None:
                raise AcquisitionError("[plan] ra and dec are required for lights with a mount")
            self.ra, self.dec = plan.ra_deg, plan.dec_deg
        self.indi, self.cam_settings, self.plan = indi, camera, plan
        self.capture_dir = Path(capture_dir)
        if not self.light:  # calibration frames in their own folder, by type
            self.capture_dir = self.capture_dir / "calibration" / plan.frame_type
        self.events, self.stop, self.server = events, stop, server
        self.client = client or IndiClient(indi.host, indi.port)
        self.max_failures = plan.max_faults if max_failures is None else max_failures
        self.backoff_s = backoff_s
        self.site, self.site_source = site, "config" if site else None
        self.mount_settings = mount_settings or MountSettings()
        self.window: schedule.Window | None = None
        self.ended = ""  # why the plan ended: "count", "until", "dawn", "target sets", ...
        self.flip_at: datetime | None = None  # when the pending meridian flip is due
        self.flips = 0
        self.connect_timeout_s, self.slew_timeout_s = connect_timeout_s, slew_timeout_s
        self.exposure_margin_s = exposure_margin_s
        self.exposure_s = float(plan.exposure_s)  # bias: the camera's minimum, set in prepare()
        self.camera = Camera(self.client, indi.camera)
        self.mount = None
        if indi.mount and self.light:
            err = tuple(indi.sim_pointing_error_arcsec)
            self.mount = (PointingErrorMount(self.client, indi.mount, err) if any(err)
                          else Mount(self.client, indi.mount))
        # Auto: when the solver is installed, unless the sky is the simulator's synthetic one
        # (its stars are nowhere in a catalogue: no frame of it can solve).
        solvable = shutil.which("solve-field") is not None and not (
            indi.camera == "CCD Simulator" and indi.sim_sky == "synthetic")
        self.center = (solvable if plan.center is None else plan.center) and self.mount is not None
        self.wheel = FilterWheel(self.client, indi.filter_wheel) if indi.filter_wheel else None
        # Seeded by the target, so a re-run of the same plan dithers the same way.
        self.rng = random.Random(zlib.crc32(f"{plan.target}|{plan.filter or ''}".encode()))
        self.progress = _Progress(done=len(done_paths), paths=list(done_paths))
        self._index = {_key(p): i for i, p in enumerate(done_paths)}
        self.upkeep = Upkeep(self, focus)
        self.ready = False
        self.moved = False  # the mount was sent somewhere by this plan (so a safe end parks it)
        self.plate_scale_arcsec = 1.0
        self.started = time.monotonic()
        self.expect_frames = expect_frames
        self._expected = False  # expect_frames told (once per plan)

    # -- plan bookkeeping ------------------------------------------------------------------
    def _finished(self) -> bool:
        if self.plan.count > 0 and self.progress.done >= self.plan.count:
            self.ended = self.ended or "count"
            return True
        if self.until is not None and datetime.now(UTC) >= self.until:
            self.ended = self.ended or (self.window.end_reason if self.window else "until")
            return True
        return False

    def _eta_s(self) -> float | None:
        if self.until is not None and self.plan.count <= 0:
            return max(0.0, (self.until - datetime.now(UTC)).total_seconds())
        if self.plan.count <= 0:
            return None  # open-ended: runs until stopped
        left = self.plan.count - self.progress.done
        recent = self.progress.cycle_s[-5:]
        per = sum(recent) / len(recent) if recent else self.exposure_s + 2.0
        return round(left * per, 1)

    def _name(self) -> str:
        p = self.plan
        prefix = self.cam_settings.upload_prefix if self.light else p.frame_type
        parts = [prefix, p.target if self.light else "", p.filter, f"{self.exposure_s:g}s"]
        return "_".join(x for x in parts if x)

    def frame_index(self, path: str | Path) -> int | None:
        """The place (0-based) of a frame among those this plan took, None when it is not one."""
        return self._index.get(_key(path))

    def request_autofocus(self, reason: str, start_offset_steps: int = 0) -> None:
        """Focus before the next frame (ValueError without a focuser); see daemon.upkeep."""
        self.upkeep.request_autofocus(reason, start_offset_steps)

    def request_recenter(self) -> None:
        """Centre on the target again before the next frame (with a mount)."""
        self.upkeep.request_recenter()

    async def publish_state(self, state: str, **extra: Any) -> None:
        """A `plan` event with the plan's progress (the centring's, too)."""
        await self._publish(state, **extra)

    async def _publish(self, state: str, **extra: Any) -> None:
        payload = {"state": state, "target": self.plan.target, "filter": self.plan.filter,
                   "frame_type": self.plan.frame_type, "exposure_s": self.exposure_s,
                   "frame": self.progress.done, "count": self.plan.count,
                   "eta_s": self._eta_s(), "faults": self.progress.faults, "until": sky.iso(self.until),
                   **extra}
        try:
            await self.events.publish("plan", payload)
        except Exception as exc:  # noqa: BLE001 - progress reporting must never stop the plan
            log.warning("plan event not published: %s", exc)

    async def _sleep(self, seconds: float) -> bool:
        """Wait `seconds` unless stop is set first; True when stopped."""
        try:
            await asyncio.wait_for(self.stop.wait(), seconds)
            return True
        except TimeoutError:
            return False

    async def _until_stopped(self, coro, deadline_s: float | None = None):
        """Run coro; if stop is set first, cancel it and raise asyncio.CancelledError. With
        deadline_s: cancel it after that many seconds and return _LATE."""
        task = asyncio.ensure_future(coro)
        stopper = asyncio.ensure_future(self.stop.wait())
        try:
            await asyncio.wait({task, stopper}, timeout=None if deadline_s is None else max(0.0, deadline_s),
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            if self.stop.is_set() or deadline_s is None:
                raise asyncio.CancelledError("plan stopped")
            return _LATE
        return task.result()

    # -- devices ---------------------------------------------------------------------------
    async def _connect(self) -> None:
        if self.server is not None and not self.server.running:
            log.warning("own indiserver is not running: restarting it")
            await self.server.start()
        if not self.client.connected:
            await self.client.connect(timeout=self.connect_timeout_s)

    async def _begin_night(self) -> bool:
        """Find the site, the plan's window, and wait for its start. True when refused."""
        p = self.plan
        if self.mount is not None:
            await self._connect()
            await self.mount.connect(self.connect_timeout_s)
            if self.site is not None:
                if await self.mount.write_site(self.site, self.connect_timeout_s):
                    log.info("%s told the site %s", self.indi.mount, self.site.describe())
            else:
                self.site = await self.mount.read_site(self.connect_timeout_s)
                self.site_source = "mount" if self.site else None
        if self.site is None:
            if self.light or p.start_sun_alt_deg is not None or p.until_sun_alt_deg is not None:
                log.warning("plan %s: no site ([site], or the mount's): no altitude, twilight or daylight "
                            "limits and no meridian flip", p.target or p.frame_type)
        else:
            log.info("site %s (from the %s)", self.site.describe(), self.site_source)
            note = sky.tables_warning()
            if note:
                log.warning("%s", note)
        now = datetime.now(UTC)
        if self.site is None and (p.start_sun_alt_deg is not None or p.until_sun_alt_deg is not None):
            self.window = schedule.Window(now, refused=f"start/until at a twilight ({p.start or p.until}) needs "
                                                       "a site: [site] latitude/longitude, or a mount that has one")
        else:
            self.window = await asyncio.to_thread(schedule.plan_window, p, self.site, now)
        w = self.window
        if w.refused:
            log.error("plan %s refused: %s", p.target or p.frame_type, w.refused)
            await self._publish("refused", reason=w.refused)
            return True
        self.until = w.end
        wait_s = (w.start - datetime.now(UTC)).total_seconds()
        if wait_s > 0:
            log.info("plan %s waits %.0f min for %s (%s)", p.target or p.frame_type, wait_s / 60,
                     w.start_reason, sky.iso(w.start))
            await self._publish("waiting", start=sky.iso(w.start), reason=w.start_reason, rise=sky.iso(w.rise),
                                limit=w.limit)
            await asyncio.sleep(wait_s)  # cancelled by stop (see _until_stopped)
        return False

    async def prepare(self) -> None:
        """(Re)connect and bring every device to the plan's state. Idempotent."""
        await self._connect()
        await self.camera.connect(self.connect_timeout_s)
        await prepare_simulator(self.camera, self.indi)
        await self.upkeep.connect(self.connect_timeout_s)
        if self.progress.faults:
            # After a fault an exposure may still run in the driver (the INDI CCD simulator keeps
            # the one it was taking when it was switched off and on, and ends the next one with
            # its short image): abort it before taking frames again.
            await self.camera.abort()
        await self._configure_camera()
        if self.wheel is not None and self.plan.filter:
            await self.wheel.connect(self.connect_timeout_s)
            await self.wheel.select(self.plan.filter)
        if self.cam_settings.cooler_c is not None:
            temp = await self.camera.cool(self.cam_settings.cooler_c)
            log.info("%s at %.1f C", self.indi.camera, temp)
        if self.mount is not None:
            await self.mount.connect(self.connect_timeout_s)
            if self.site_source == "config" and self.progress.faults:
                await self.mount.write_site(self.site, self.connect_timeout_s)  # a restarted driver forgot it
            await self._publish("slewing", ra_deg=self.ra, dec_deg=self.dec)
            self.moved = True
            await self.mount.slew(self.ra, self.dec, timeout=self.slew_timeout_s)
            self._schedule_flip()
            self.plate_scale_arcsec = self._plate_scale()
            await self.upkeep.after_slew()
        await self.upkeep.at_start()
        self.ready = True

    async def _configure_camera(self) -> None:
        await self.camera.configure(self.cam_settings, self.capture_dir, self.plan.target)
        if self.plan.frame_type is FrameType.BIAS:
            self.exposure_s = self.camera.min_exposure_s()
        await self.camera.set_frame_type(
            FrameType.DARK if self.plan.frame_type is FrameType.DARKFLAT else self.plan.frame_type)

    def _plate_scale(self) -> float:
        """arcsec per (binned) pixel from the camera's pixel size and the scope's focal length."""
        info = self.client.prop(self.indi.camera, "CCD_INFO")
        pixel_um = info.values.get("CCD_PIXEL_SIZE") if info else None
        focal = self.mount.focal_length_mm() if self.mount else None
        if not focal:
            scope = self.client.prop(self.indi.camera, "SCOPE_INFO")
            focal = scope.values.get("FOCAL_LENGTH") if scope else None
        if not pixel_um or not focal:
            log.warning("plate scale unknown (pixel %s um, focal %s mm): dithering assumes 1\"/px",
                        pixel_um, focal)
            return 1.0
        return 206.264806 * pixel_um * int(self.cam_settings.binning) / focal

    async def dither(self) -> dict:
        """Move the mount to a random point within dither_px pixels of the target, then settle."""
        r = self.plan.dither_px * math.sqrt(self.rng.random())
        angle = self.rng.uniform(0.0, 2.0 * math.pi)
        dx_px, dy_px = r * math.cos(angle), r * math.sin(angle)
        scale_deg = self.plate_scale_arcsec / 3600.0
        ddec = dy_px * scale_deg
        dra = dx_px * scale_deg / max(math.cos(math.radians(self.dec)), 1e-3)
        await self.mount.slew(self.ra + dra, self.dec + ddec, timeout=self.slew_timeout_s)
        err = self.mount.error_arcsec(self.ra + dra, self.dec + ddec)
        await self._sleep(self.plan.settle_s)
        return {"dx_px": round(dx_px, 2), "dy_px": round(dy_px, 2),
                "pointing_error_arcsec": None if err is None else round(err, 2)}

    # -- meridian flip --------------------------------------------------------------------
    def _hour_angle_deg(self) -> float:
        return sky.hour_angle_deg(self.ra, self.dec, self.site, datetime.now(UTC))

    def _schedule_flip(self) -> None:
        """After a goto to the target: a flip is pending when flips are on, the site is known,
        the mount is a German equatorial one (it reports a pier side) and the goto was made
        east of the meridian (past it, the mount chose the after-flip side itself)."""
        self.flip_at = None
        if not (self.mount_settings.meridian_flip and self.site and self.mount.pier_side()):
            return
        now = datetime.now(UTC)
        ha = sky.hour_angle_deg(self.ra, self.dec, self.site, now)
        if ha < 0.0:
            self.flip_at = schedule.flip_time(ha, now, self.mount_settings.flip_after_min)
            log.info("meridian flip due at %s (target %.1f min east of the meridian, pier side %s)",
                     sky.iso(self.flip_at), -ha * 4.0, self.mount.pier_side())

    def _flip_due(self) -> bool:
        return self.flip_at is not None and datetime.now(UTC) >= self.flip_at

    def _past_meridian(self) -> bool:
        """A flip is pending and the target has crossed the meridian: a goto now (a dither)
        would make the mount flip by itself, so none is sent until the flip."""
        return self.flip_at is not None and self._hour_angle_deg() >= 0.0

    async def _flip(self) -> None:
        """Goto the target again past the meridian so the pier side changes, settle, re-centre.
        Raises FlipFailed when the side does not change or the slew fails."""
        ha_min = self._hour_angle_deg() * 4.0
        await self._publish("flipping", pier_side=self.mount.pier_side(), hour_angle_min=round(ha_min, 2))
        before, after = await self.mount.flip(self.ra, self.dec, timeout=self.slew_timeout_s)
        self.flip_at = None
        self.flips += 1
        log.info("meridian flip at %.1f min past the meridian: pier side %s -> %s", ha_min, before, after)
        await self._sleep(self.mount_settings.settle_s)
        await self.upkeep.after_slew()

    async def _expose(self) -> Path | None:
        """One frame; None when it was aborted because a meridian flip could wait no longer
        (flip_max_wait_min past the flip time). Stop cancels it (asyncio.CancelledError)."""
        coro = self.camera.expose(self.exposure_s, self._name(), timeout=self.exposure_s + self.exposure_margin_s)
        if self.flip_at is None:
            return await self._until_stopped(coro)
        limit = self.flip_at.timestamp() + 60.0 * self.mount_settings.flip_max_wait_min
        path = await self._until_stopped(coro, deadline_s=limit - time.time())
        if path is _LATE:
            log.warning("exposure aborted: the meridian flip cannot wait longer")
            await self.camera.abort()
            return None
        return path

    def _expect(self) -> None:
        """Tell `expect_frames` what the plan's frames will be (once, before its first exposure)."""
        self._expected = True
        geometry = self.camera.frame_geometry() if self.expect_frames is not None else None
        if geometry is None:
            return
        key = StackKey(self.plan.target or "unknown", self.plan.filter or "none", float(self.exposure_s),
                       int(self.cam_settings.binning))
        self.expect_frames(*geometry, key)

    # -- the loop --------------------------------------------------------------------------
    async def run(self) -> dict:
        """Run the plan to its end; returns the summary (see run_acquisition)."""
        await self._publish("starting")
        error = ""
        try:
            state = await self._loop()
        except _GiveUp as exc:
            state, error = "failed", str(exc)
        parked = await self._safe_end(state)
        final = {"paths": self.progress.paths if not self.light else None, "folder": str(self.capture_dir),
                 "parked": parked, "ended": self.ended or None, "site": self._site_dict()}
        if error:
            final["error"] = error
        await self._publish(state, **final)
        if state == "failed":
            raise AcquisitionError(error)
        return {"state": state, "frames": self.progress.done, "paths": list(self.progress.paths),
                "faults": self.progress.faults, "folder": str(self.capture_dir), "parked": parked,
                "ended": self.ended or None, "until": sky.iso(self.until),
                "reason": self.window.refused if self.window and self.window.refused else None}

    def _site_dict(self) -> dict | None:
        s = self.site
        return None if s is None else {"latitude": s.latitude, "longitude": s.longitude,
                                       "elevation_m": s.elevation_m, "source": self.site_source}

    async def _loop(self) -> str:
        """The frames, until done, stopped or refused (the state returned); raises _GiveUp."""
        failures = 0
        dithered_at = 0
        flipped = False
        while not self.stop.is_set() and not self._finished():
            try:
                if self.window is None:
                    if await self._until_stopped(self._begin_night()):
                        return "refused"
                    continue  # the window may have ended the plan already
                if not self.ready:
                    await self._until_stopped(self.prepare())
                if self.mount is not None and self._flip_due():
                    try:
                        await self._until_stopped(self._flip())
                    except FlipFailed as exc:
                        self.ended = "flip failed"
                        log.error("meridian flip failed: %s", exc)
                        raise _GiveUp(f"meridian flip failed: {exc}") from exc
                    flipped = True
                    continue
                await self._until_stopped(self.upkeep.between_frames())
                extra = {}
                due = (self.mount is not None and self.plan.dither_every > 0
                       and self.progress.done > 0 and self.progress.done % self.plan.dither_every == 0
                       and dithered_at != self.progress.done and not self._past_meridian())
                if due:
                    extra["dither"] = await self._until_stopped(self.dither())
                    dithered_at = self.progress.done
                if self.light and not self._expected:
                    self._expect()
                t0 = time.monotonic()
                path = await self._expose()
                if path is None:
                    continue  # aborted for the flip, which is due now
                self._index[_key(path)] = self.progress.done
                self.progress.done += 1
                self.progress.paths.append(str(path))
                self.progress.cycle_s.append(time.monotonic() - t0 + (self.plan.settle_s if due else 0))
                failures = 0
                log.info("plan %s: frame %d/%s %s", self.plan.target or self.plan.frame_type,
                         self.progress.done, self.plan.count or "-", path.name)
                if flipped:
                    extra["flipped"] = True
                    flipped = False
                await self._publish("running", path=str(path), temperature_c=self.camera.temperature(),
                                    pier_side=self.mount.pier_side() if self.mount else None, **extra)
            except asyncio.CancelledError:
                if self.stop.is_set():
                    if self.client.connected:
                        await self.camera.abort()
                    break
                raise
            except (IndiError, OSError, ExposureTimeout, SlewTimeout) as exc:
                failures += 1
                self.progress.faults += 1
                self.ready = False
                delay = min(self.backoff_s[1], self.backoff_s[0] * 2 ** (failures - 1))
                log.warning("plan fault %d/%d: %s; retrying in %.1f s", failures,
                            self.max_failures, exc, delay)
                if failures >= self.max_failures:
                    self.ended = "faults"
                    raise _GiveUp(f"giving up after {failures} faults in a row: {exc}") from exc
                await self._publish("retrying", error=str(exc), kind=type(exc).__name__,
                                    retry_in_s=delay)
                await self.client.close()
                if await self._sleep(delay):
                    break
        return "done" if self._finished() else "stopped"

    async def _safe_end(self, state: str) -> bool | None:
        """Park when the plan asks (park), at dawn or daylight, after a failed flip and after
        giving up on faults (park_on_fault), once the plan has moved the mount. None: not parked
        because none of these applies."""
        if self.mount is None or not self.moved:
            return None
        why = None
        if state == "failed" and (self.ended == "flip failed" or self.mount_settings.park_on_fault):
            why = self.ended
        elif state == "done" and self.ended in ("dawn", "daylight"):
            why = self.ended
        elif self.plan.park and state in ("done", "stopped"):
            why = "end of plan"
        return await self._park(why) if why else None

    async def _park(self, why: str) -> bool:
        """Park; when that fails, switch tracking off. Failures are reported, never raised."""
        try:
            if not self.client.connected:
                await self.client.connect(timeout=self.connect_timeout_s)
                await self.mount.connect(self.connect_timeout_s)
            await self._publish("parking", reason=why)
            await self.mount.park(timeout=self.slew_timeout_s)
            log.info("%s parked (%s)", self.indi.mount, why)
            return True
        except (IndiError, OSError, SlewTimeout) as exc:
            log.error("%s not parked: %s", self.indi.mount, exc)
            park_error = str(exc)
        try:
            await self.mount.set_tracking(False)
            tracking, note = False, "tracking switched off"
        except (IndiError, OSError) as exc:
            tracking, note = None, f"tracking could not be switched off either: {exc}"
        log.error("%s: %s", self.indi.mount, note)
        await self._publish("park failed", error=park_error, tracking=tracking, note=note, reason=why)
        return False


class _GiveUp(Exception):
    """The plan cannot go on (faults in a row, a failed flip): the message says why."""


def _key(path: str | Path) -> str:
    """One spelling of a frame's path (the camera's and the watcher's may differ)."""
    return os.path.realpath(path)


async def run_acquisition(config: Any, events: Events, stop: asyncio.Event,
                          on_runner: Callable[[PlanRunner | None], None] | None = None, **runner_options) -> dict:
    """Run config.plan on config.indi/config.camera into config.capture.dir until done or stop.

    Starts (and finally stops) its own indiserver when config.indi.drivers is non-empty. Uses
    config.site ([site]), config.mount ([mount]) and config.focus ([focus]) when the config has
    them. on_runner: called with the PlanRunner once it exists, and with None when it has ended
    (so the service can ask it for a refocus or a re-centring).
    Returns a summary: state ("done" | "stopped" | "refused"), frames, paths, faults, folder,
    parked, ended (why: "count", "until", "dawn", "daylight", "target sets"), until (ISO),
    reason (why refused). Raises AcquisitionError when the plan fails.
    """
    server = server_for(config.indi)
    runner_options.setdefault("site", getattr(config, "site", None))
    runner_options.setdefault("mount_settings", getattr(config, "mount", None))
    runner_options.setdefault("focus", getattr(config, "focus", None))
    runner = PlanRunner(config.indi, config.camera, config.plan, config.capture.dir, events, stop,
                        server, **runner_options)
    if on_runner is not None:
        on_runner(runner)
    try:
        if server is not None:
            await server.start()
        return await runner.run()
    finally:
        if on_runner is not None:
            on_runner(None)
        await runner.client.close()
        if server is not None:
            await server.stop()
