"""Keeping a light plan on target and in focus: centring after each slew, autofocus at the
plan's start and whenever asked, the night's refocus trigger and pointing check.

Why apart from the plan runner (daemon.acquisition): the runner keeps the night's order
(window, devices, flip, dither, expose); this keeps what makes the frames good, and has
callers of its own. The service, seeing each stacked frame, asks for a refocus (the
`RefocusTrigger` fired on the frames' FWHM or the focuser's temperature) or a re-centring (a
frame solved far from the target: `PointingCheck`) at any time; the runner honours what was
asked at the top of its frame loop (`between_frames`), never during an exposure.

Frames taken before a focus run or a centring ended, but stacked after it, say nothing about
the new state: they are not counted (the `_mark` of each).

`focus_once` is the autofocus command outside a plan: its own short INDI session.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from daemon.autofocus import run_autofocus
from daemon.centering import CenterResult, CenterSettings, PointingCheck, center_on
from daemon.focus import RefocusTrigger
from daemon.pipeline.frame import FrameType
from daemon.settings import FocusSettings, IndiSettings
from drivers.camera import Camera
from drivers.focuser import Focuser
from drivers.indi_client import IndiClient
from drivers.indiserver import IndiServer

if TYPE_CHECKING:
    from daemon.acquisition import Events, PlanRunner

log = logging.getLogger(__name__)

#: The CCD simulator's sensor when it draws the real sky (unbinned px): the smallest field
#: that holds enough Tycho-2 stars to plate-solve (`Camera.set_simulator_sensor`).
REAL_SKY_SENSOR = (2560, 2048)


async def prepare_simulator(camera: Camera, indi: IndiSettings) -> None:
    """INDI's CCD simulator drawing the real sky: a sensor large enough for its frames to solve.
    Nothing for any other camera or sky."""
    if indi.sim_sky == "real" and indi.camera == "CCD Simulator":
        await camera.set_simulator_sensor(*REAL_SKY_SENSOR)


def server_for(indi: IndiSettings) -> IndiServer | None:
    """The indiserver the daemon starts itself ([indi] drivers), None when it uses a running one."""
    env = {"LIGHTBUCKET_GSC_SKY": indi.sim_sky} if indi.sim_sky != "synthetic" else None
    return IndiServer(list(indi.drivers), indi.port, env=env) if indi.drivers else None


class Upkeep:
    """Centring, autofocus and the night's requests of one plan run by `runner`."""

    def __init__(self, runner: PlanRunner, focus: FocusSettings | None = None):
        self.runner = runner
        self.settings = focus or FocusSettings()
        plan, indi = runner.plan, runner.indi
        self.focuser = Focuser(runner.client, indi.focuser) if indi.focuser and runner.light else None
        self.trigger = None
        if self.focuser is not None and self.settings.refocus:
            s = self.settings
            self.trigger = RefocusTrigger(s.refocus_fwhm_factor, s.refocus_temp_drop_c, s.refocus_min_frames)
        self.check = None
        if runner.light and plan.pointing_check_s > 0 and plan.ra is not None and plan.dec is not None:
            self.check = PointingCheck(plan.pointing_check_s, plan.pointing_far_arcsec, plan.pointing_recenter)
        self.centered: CenterResult | None = None
        #: The last autofocus result (its event payload), None before the first.
        self.focused: dict | None = None
        self._focus_request: tuple[str, int] | None = None  # (reason, start offset) asked for
        self._recenter_request = False
        self._start_focus_done = False
        self._busy = ""  # "focus" or "centre" while one runs: frames then say nothing new
        # Frames counted by the trigger and the check: those taken after the last focus run /
        # centring ended (an index into runner.progress.paths).
        self._focus_mark = self._center_mark = 0

    # -- requests (from the service, on the loop, at any time) --------------------------------
    def request_autofocus(self, reason: str, start_offset_steps: int = 0) -> None:
        """Focus before the next frame (the first request waiting wins; an offset is the
        command's defocused start)."""
        if self.focuser is None:
            raise ValueError("no [indi] focuser")
        if self._focus_request is None:
            log.info("autofocus asked for (%s): before the next frame", reason)
            self._focus_request = (reason, int(start_offset_steps))

    def request_recenter(self) -> None:
        """Centre on the target again before the next frame (needs a mount)."""
        if self.runner.mount is not None:
            self._recenter_request = True

    @property
    def pending(self) -> dict:
        """What is asked for and not yet done: {"autofocus": reason or None, "recenter": bool}."""
        return {"autofocus": self._focus_request[0] if self._focus_request else None,
                "recenter": self._recenter_request}

    # -- what the stacked frames say ---------------------------------------------------------
    def frame_measured(self, path: str | Path, accepted: bool, reason: str | None, fwhm_px: float | None) -> str | None:
        """One of the plan's frames judged by the pipeline: fed to the refocus trigger when it
        was accepted or rejected for its FWHM (a blurred frame is what the trigger looks for),
        taken after the last focus run and with no focus run asked for. Returns the trigger's
        reason when it fired (an autofocus is then asked for), else None."""
        if self.trigger is None or self._focus_request is not None or self._busy:
            return None
        index = self.runner.frame_index(path)
        if index is None or index < self._focus_mark:
            return None
        if not (accepted or (reason or "").startswith("FWHM")):  # daemon.pipeline.quality's FWHM verdict
            return None
        why = self.trigger.frame(fwhm_px, self.focuser.temperature())
        if why:
            self.request_autofocus(why)
        return why

    def check_due(self, path: str | Path) -> bool:
        """Whether this frame of the plan (stacked) is the one to plate-solve for the pointing
        check now (counted as checked when True)."""
        if self.check is None or self._recenter_request or self._busy:
            return False
        index = self.runner.frame_index(path)
        if index is None or index < self._center_mark:
            return False
        return self.check.due(time.monotonic())

    # -- what the runner calls ---------------------------------------------------------------
    async def connect(self, timeout_s: float) -> None:
        if self.focuser is not None:
            await self.focuser.connect(timeout_s)

    async def after_slew(self) -> None:
        """After a goto to the target (the plan's start, a fault, a meridian flip): centre when
        the plan centres; the pointing check starts over."""
        if self.runner.center:
            await self.recenter()
        elif self.check is not None:
            self._center_mark = self.runner.progress.done
            self.check.centered()

    async def at_start(self) -> None:
        """Once per plan, after the first centring: focus when the plan asks (`autofocus`)."""
        if self.runner.plan.autofocus and self.focuser is not None and not self._start_focus_done:
            self._start_focus_done = True
            await self.autofocus("plan start")
        elif self.runner.plan.autofocus and self.focuser is None and not self._start_focus_done:
            self._start_focus_done = True
            log.warning("[plan] autofocus: no [indi] focuser: not focused")

    async def between_frames(self) -> None:
        """What was asked for since the last frame: a re-centring, then an autofocus."""
        if self._recenter_request:
            await self.recenter()
        if self._focus_request is not None:
            reason, offset = self._focus_request
            await self.autofocus(reason, offset)

    async def recenter(self) -> CenterResult:
        """Plate-solve and sync until the target is within center_tolerance_arcsec; a failure
        is published and the plan goes on."""
        r, p = self.runner, self.runner.plan
        self._recenter_request, self._busy = False, "centre"
        settings = CenterSettings(tolerance_arcsec=p.center_tolerance_arcsec, max_tries=p.center_max_tries,
                                  exposure_s=p.center_exposure_s)
        try:
            self.centered = await center_on(r.mount, r.camera, r.ra, r.dec, settings, r.publish_state,
                                            r.slew_timeout_s)
        finally:
            self._busy = ""
            self._center_mark = r.progress.done
            if self.check is not None:
                self.check.centered()
        if not self.centered.ok:
            await r.publish_state("centering failed", error=self.centered.reason,
                                  error_arcsec=self.centered.error_arcsec)
        return self.centered

    async def autofocus(self, reason: str, start_offset_steps: int = 0) -> dict:
        """One autofocus run (its `focusing` and `autofocus` events); the trigger starts over
        at the focuser's temperature. An INDI fault raises (a plan fault: the runner retries
        the devices, the focus is not retried unless asked again)."""
        r = self.runner
        self._focus_request, self._busy = None, "focus"
        try:
            self.focused = await run_autofocus(self.focuser, r.camera, self.settings, r.events.publish,
                                               start_offset_steps=start_offset_steps, reason=reason)
        finally:
            self._busy = ""
            self._focus_mark = r.progress.done
            if self.trigger is not None:
                self.trigger.focused(self.focuser.temperature())
        return self.focused


async def focus_once(config: Any, events: Events, start_offset_steps: int = 0, *,
                     connect_timeout_s: float = 10.0) -> dict:
    """The autofocus command outside a plan: connect (starting the [indi] drivers' own
    indiserver when the config has some, stopped again after), bring the camera to light
    frames, focus, disconnect.

    Parameters
    ----------
    config : the daemon's Config (indi with a focuser, camera, capture, focus).
    events : where the `focusing` and `autofocus` events go (``await events.publish(kind, payload)``).
    start_offset_steps : move this far first (the command's defocused start).
    connect_timeout_s : for the server and each device.

    Returns the autofocus result payload; raises IndiError when a device cannot be reached.
    """
    indi = config.indi
    server = server_for(indi)
    client = IndiClient(indi.host, indi.port)
    try:
        if server is not None:
            await server.start()
        await client.connect(timeout=connect_timeout_s)
        camera, focuser = Camera(client, indi.camera), Focuser(client, indi.focuser)
        await camera.connect(connect_timeout_s)
        await prepare_simulator(camera, indi)
        await camera.configure(config.camera, config.capture.dir, "autofocus")
        await camera.set_frame_type(FrameType.LIGHT)
        await focuser.connect(connect_timeout_s)
        return await run_autofocus(focuser, camera, getattr(config, "focus", None) or FocusSettings(),
                                   events.publish, start_offset_steps=start_offset_steps, reason="command")
    finally:
        await client.close()
        if server is not None:
            await server.stop()
