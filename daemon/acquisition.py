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
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import shutil
import time
import zlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from daemon.pipeline.frame import FrameType
from daemon.settings import CameraSettings, IndiSettings, PlanSettings
from drivers.camera import Camera, ExposureTimeout
from drivers.filterwheel import FilterWheel
from drivers.indi_client import IndiClient, IndiError
from drivers.indiserver import IndiServer
from drivers.mount import Mount, PointingErrorMount, SlewTimeout

if TYPE_CHECKING:
    from daemon.centering import CenterResult

log = logging.getLogger(__name__)

class Events(Protocol):
    async def publish(self, kind: str, payload: dict) -> None: ...


class AcquisitionError(RuntimeError):
    """The plan cannot go on (a plan the devices cannot run, or too many faults in a row)."""


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
                 max_failures: int = 8, backoff_s: tuple[float, float] = (0.5, 30.0),
                 connect_timeout_s: float = 10.0, slew_timeout_s: float = 180.0,
                 exposure_margin_s: float = 30.0):
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
        self.max_failures, self.backoff_s = max_failures, backoff_s
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
        self.centered: CenterResult | None = None
        self.wheel = FilterWheel(self.client, indi.filter_wheel) if indi.filter_wheel else None
        # Seeded by the target, so a re-run of the same plan dithers the same way.
        self.rng = random.Random(zlib.crc32(f"{plan.target}|{plan.filter or ''}".encode()))
        self.progress = _Progress()
        self.ready = False
        self.plate_scale_arcsec = 1.0
        self.started = time.monotonic()

    # -- plan bookkeeping ------------------------------------------------------------------
    def _finished(self) -> bool:
        if self.plan.count > 0 and self.progress.done >= self.plan.count:
            return True
        return self.until is not None and datetime.now(UTC) >= self.until

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

    async def _publish(self, state: str, **extra: Any) -> None:
        payload = {"state": state, "target": self.plan.target, "filter": self.plan.filter,
                   "frame_type": self.plan.frame_type, "exposure_s": self.exposure_s,
                   "frame": self.progress.done, "count": self.plan.count,
                   "eta_s": self._eta_s(), "faults": self.progress.faults, **extra}
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

    async def _until_stopped(self, coro):
        """Run coro; if stop is set first, cancel it and raise asyncio.CancelledError."""
        task = asyncio.ensure_future(coro)
        stopper = asyncio.ensure_future(self.stop.wait())
        try:
            await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise asyncio.CancelledError("plan stopped")
        return task.result()

    # -- devices ---------------------------------------------------------------------------
    async def prepare(self) -> None:
        """(Re)connect and bring every device to the plan's state. Idempotent."""
        if self.server is not None and not self.server.running:
            log.warning("own indiserver is not running: restarting it")
            await self.server.start()
        if not self.client.connected:
            await self.client.connect(timeout=self.connect_timeout_s)
        await self.camera.connect(self.connect_timeout_s)
        if self.progress.faults:
            # After a fault an exposure may still run in the driver (the INDI CCD simulator keeps
            # the one it was taking when it was switched off and on, and ends the next one with
            # its short image): abort it before taking frames again.
            await self.camera.abort()
        await self.camera.configure(self.cam_settings, self.capture_dir, self.plan.target)
        if self.plan.frame_type is FrameType.BIAS:
            self.exposure_s = self.camera.min_exposure_s()
        await self.camera.set_frame_type(
            FrameType.DARK if self.plan.frame_type is FrameType.DARKFLAT else self.plan.frame_type)
        if self.wheel is not None and self.plan.filter:
            await self.wheel.connect(self.connect_timeout_s)
            await self.wheel.select(self.plan.filter)
        if self.cam_settings.cooler_c is not None:
            temp = await self.camera.cool(self.cam_settings.cooler_c)
            log.info("%s at %.1f C", self.indi.camera, temp)
        if self.mount is not None:
            await self.mount.connect(self.connect_timeout_s)
            await self._publish("slewing", ra_deg=self.ra, dec_deg=self.dec)
            await self.mount.slew(self.ra, self.dec, timeout=self.slew_timeout_s)
            self.plate_scale_arcsec = self._plate_scale()
            if self.center:
                await self.recenter()
        self.ready = True

    async def recenter(self) -> CenterResult:
        """Plate-solve and sync until the target is within center_tolerance_arcsec (after a
        slew, a fault, a meridian flip); a failure is published and the plan goes on."""
        # The solver and the pipeline's star detection load only when a plan centres.
        from daemon.centering import CenterSettings, center_on

        p = self.plan
        settings = CenterSettings(tolerance_arcsec=p.center_tolerance_arcsec, max_tries=p.center_max_tries,
                                  exposure_s=p.center_exposure_s)
        self.centered = await center_on(self.mount, self.camera, self.ra, self.dec, settings, self._publish,
                                        self.slew_timeout_s)
        if not self.centered.ok:
            await self._publish("centering failed", error=self.centered.reason,
                                error_arcsec=self.centered.error_arcsec)
        return self.centered

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

    # -- the loop --------------------------------------------------------------------------
    async def run(self) -> dict:
        failures = 0
        dithered_at = 0
        await self._publish("starting")
        while not self.stop.is_set() and not self._finished():
            try:
                if not self.ready:
                    await self._until_stopped(self.prepare())
                extra = {}
                due = (self.mount is not None and self.plan.dither_every > 0
                       and self.progress.done > 0 and self.progress.done % self.plan.dither_every == 0
                       and dithered_at != self.progress.done)
                if due:
                    extra["dither"] = await self._until_stopped(self.dither())
                    dithered_at = self.progress.done
                t0 = time.monotonic()
                path = await self._until_stopped(self.camera.expose(
                    self.exposure_s, self._name(), timeout=self.exposure_s + self.exposure_margin_s))
                self.progress.done += 1
                self.progress.paths.append(str(path))
                self.progress.cycle_s.append(time.monotonic() - t0 + (self.plan.settle_s if due else 0))
                failures = 0
                log.info("plan %s: frame %d/%s %s", self.plan.target or self.plan.frame_type,
                         self.progress.done, self.plan.count or "-", path.name)
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
                    await self._publish("failed", error=str(exc))
                    raise AcquisitionError(f"giving up after {failures} faults in a row: {exc}") from exc
                await self._publish("retrying", error=str(exc), kind=type(exc).__name__,
                                    retry_in_s=delay)
                await self.client.close()
                if await self._sleep(delay):
                    break
        state = "done" if self._finished() else "stopped"
        parked = await self._park() if self.plan.park and self.mount is not None else None
        await self._publish(state, paths=self.progress.paths if not self.light else None,
                            folder=str(self.capture_dir), parked=parked)
        return {"state": state, "frames": self.progress.done, "paths": list(self.progress.paths),
                "faults": self.progress.faults, "folder": str(self.capture_dir), "parked": parked}

    async def _park(self) -> bool:
        """Park at the plan's end; a failure is reported, never raised (the frames are safe)."""
        try:
            if not self.client.connected:
                await self.client.connect(timeout=self.connect_timeout_s)
                await self.mount.connect(self.connect_timeout_s)
            await self._publish("parking")
            await self.mount.park(timeout=self.slew_timeout_s)
            log.info("%s parked", self.indi.mount)
            return True
        except (IndiError, OSError, SlewTimeout) as exc:
            log.error("%s not parked: %s", self.indi.mount, exc)
            await self._publish("park failed", error=str(exc))
            return False


async def run_acquisition(config: Any, events: Events, stop: asyncio.Event, **runner_options) -> dict:
    """Run config.plan on config.indi/config.camera into config.capture.dir until done or stop.

    Starts (and finally stops) its own indiserver when config.indi.drivers is non-empty.
    Returns a summary: state ("done" | "stopped"), frames, paths, faults, folder.
    """
    indi = config.indi
    env = {"LIGHTBUCKET_GSC_SKY": indi.sim_sky} if indi.sim_sky != "synthetic" else None
    server = IndiServer(list(indi.drivers), indi.port, env=env) if indi.drivers else None
    runner = PlanRunner(indi, config.camera, config.plan, config.capture.dir, events, stop,
                        server, **runner_options)
    try:
        if server is not None:
            await server.start()
        return await runner.run()
    finally:
        await runner.client.close()
        if server is not None:
            await server.stop()
