"""INDI camera: cooling, gain/offset, binning, frame type, exposure with local upload, abort.

Why a hidden upload name: INDI drivers write the upload file in place (fopen/fwrite/fclose of the
final name, checked on indi 1.9.9), so a watcher could see a half-written FITS. We let the driver
write `<capture>/.lightbucket-upload_NNN.fits` (hidden: the watcher ignores it) and, once
CCD_EXPOSURE reports Ok (the driver has closed the file by then: its "Image saved" message
precedes the state change), we rename it atomically, in the same folder, to our own name. The
watcher only ever sees complete files, and sees them at once: a rename within a watched folder
is a move event, where a file moved in from another folder would need the size-stable wait.
"""

from __future__ import annotations

import asyncio
import logging
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from daemon.names import safe_filename
from drivers.indi_client import IndiAlert, IndiClient, IndiError, IndiTimeout

if TYPE_CHECKING:  # the settings are the config's; this module only reads them
    from daemon.settings import CameraSettings

log = logging.getLogger(__name__)
#: `Camera._set_number(confirm=True)`: how often a number is asked for again when the driver
#: answers with other values, and how long each answer is waited for first (s).
_RESENDS = 3
_RESEND_S = 1.0

FRAME_TYPES = {"light": "FRAME_LIGHT", "dark": "FRAME_DARK", "bias": "FRAME_BIAS",
               "flat": "FRAME_FLAT", "darkflat": "FRAME_DARK"}
UPLOAD_PREFIX = ".lightbucket-upload_"


class ExposureTimeout(IndiTimeout):
    """An exposure did not complete in time (it has been aborted)."""


class Camera:
    #: How long to wait for an optional property (binning, gain) the driver may define late (s).
    define_wait_s = 3.0

    def __init__(self, client: IndiClient, device: str):
        self.client, self.device = client, device
        self.capture_dir: Path | None = None
        self.settings: CameraSettings | None = None
        self._seq = 0

    async def connect(self, timeout: float = 10.0) -> None:
        await self.client.connect_device(self.device, timeout)
        for name in ("CCD_EXPOSURE", "CCD_FRAME_TYPE", "UPLOAD_MODE", "UPLOAD_SETTINGS"):
            await self.client.wait_for(self.device, name, timeout=timeout,
                                       what=f"camera property {name} defined")

    async def _set_number(self, name: str, values: dict, timeout: float = 5.0,
                          confirm: bool = False) -> None:
        """Set a number property and wait for the driver's answer. confirm: wait until the
        driver reports exactly these values (not just any idle update: a device that has just
        reconnected re-defines its properties with their defaults, which would pass for one),
        asking again (at most `_RESENDS` times, `_RESEND_S` apart) when it answers with others:
        a driver that has just connected loads its saved configuration, which can overwrite a
        request sent meanwhile. IndiTimeout after `timeout` s, IndiAlert when refused."""
        def matches(p) -> bool:
            return all(p.values.get(k) == v for k, v in values.items())

        def done(p) -> bool:
            return p.state == "Alert" or (p.state != "Busy" and (not confirm or matches(p)))

        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        resends = 0
        gen = self.client.send_number(self.device, name, values)
        while True:
            remaining = deadline - loop.time()
            step = min(_RESEND_S, remaining) if confirm and resends < _RESENDS else remaining
            try:
                await self.client.wait_for(self.device, name, done, max(0.0, step), gen, f"{name} = {values}")
                break
            except IndiTimeout:
                snap = self.client.prop(self.device, name)
                if loop.time() >= deadline or snap is None:
                    raise IndiTimeout(f"{self.device}.{name}: {name} = {values} not reached in {timeout:g} s "
                                      f"(last state {snap.state if snap else 'never seen'}"
                                      f"{f', values {snap.values}' if snap else ''})") from None
                if snap.state == "Busy" or resends >= _RESENDS:
                    continue  # still working on it, or asked often enough: wait on
                resends += 1
                log.info("%s answered %s = %s, not %s: asking again", self.device, name, snap.values, values)
                gen = self.client.send_number(self.device, name, values)
        if self.client.prop(self.device, name).state == "Alert":
            raise IndiAlert(f"{self.device} refused {name} = {values}")

    async def _ensure_binning(self) -> None:
        """Binning as configured, checked before every exposure: a camera that was switched off
        and on again (or a restarted driver) comes back at 1x1, and its frames would go to
        another stack at another scale."""
        b = int(getattr(self.settings, "binning", 1) or 1)
        snap = self.client.prop(self.device, "CCD_BINNING")
        if snap is None or (snap.values.get("HOR_BIN"), snap.values.get("VER_BIN")) == (b, b):
            return
        log.warning("%s is binned %gx%g, not %dx%d: setting it again", self.device,
                    snap.values.get("HOR_BIN"), snap.values.get("VER_BIN"), b, b)
        await self._set_number("CCD_BINNING", {"HOR_BIN": b, "VER_BIN": b}, confirm=True)

    async def _set_switch(self, name: str, on: str, timeout: float = 5.0) -> None:
        snap = self.client.prop(self.device, name)
        if snap is not None and snap.values.get(on) is True and snap.state != "Alert":
            return
        gen = self.client.send_switch(self.device, name, [on])
        await self.client.wait_state(self.device, name, gen, timeout, f"{name} {on}")

    async def configure(self, settings: CameraSettings, capture_dir: str | Path,
                        target: str = "") -> None:
        """Binning, gain, offset, local upload under a hidden name in capture_dir, FITS object name."""
        c, d = self.client, self.device
        self.capture_dir = Path(capture_dir)
        self.capture_dir.mkdir(parents=True, exist_ok=True)
        self.settings = settings
        b = int(settings.binning)
        if await c.wait_defined(d, ["CCD_BINNING"], 0 if b == 1 else self.define_wait_s):
            await self._set_number("CCD_BINNING", {"HOR_BIN": b, "VER_BIN": b}, confirm=True)
        elif b != 1:
            raise IndiError(f"{d} has no CCD_BINNING ([camera] binning = {b})")
        for key, value in (("GAIN", settings.gain), ("OFFSET", settings.offset)):
            if value is None:
                continue
            found = await c.wait_defined(d, [f"CCD_{key}", "CCD_CONTROLS"], self.define_wait_s)
            if found == f"CCD_{key}":
                await self._set_number(f"CCD_{key}", {key: value})
            elif found and key.title() in c.prop(d, found).values:
                await self._set_number("CCD_CONTROLS", {key.title(): value})
            else:
                raise IndiError(f"{d} has neither CCD_{key} nor CCD_CONTROLS.{key.title()} "
                                f"([camera] {key.lower()} = {value})")
        gen = c.send_text(d, "UPLOAD_SETTINGS", {"UPLOAD_DIR": str(self.capture_dir),
                                                 "UPLOAD_PREFIX": UPLOAD_PREFIX + "XXX"})
        await c.wait_state(d, "UPLOAD_SETTINGS", gen, 5.0, "upload folder")
        await self._set_switch("UPLOAD_MODE", "UPLOAD_LOCAL")
        if target and c.prop(d, "FITS_HEADER"):
            try:
                c.send_text(d, "FITS_HEADER", {"FITS_OBJECT": target})
            except IndiError as exc:  # not essential: file names carry the target too
                log.info("FITS_HEADER not set: %s", exc)

    async def cool(self, set_c: float, tolerance_c: float = 0.5, timeout: float = 600.0) -> float:
        """Cooler on (when the camera has one), set-point, wait until within tolerance; returns
        the sensor temperature in deg C."""
        c, d = self.client, self.device
        cooler = c.prop(d, "CCD_COOLER")
        if cooler and not (cooler.values.get("COOLER_ON") and cooler.state != "Alert"):
            # Busy is a valid answer here: many drivers keep the cooler Busy while cooling.
            gen = c.send_switch(d, "CCD_COOLER", ["COOLER_ON"])
            snap = await c.wait_for(d, "CCD_COOLER", lambda p: p.values.get("COOLER_ON")
                                    or p.state == "Alert", 10.0, gen, "cooler on")
            if snap.state == "Alert":
                raise IndiAlert(f"{d} refused to switch the cooler on")
        if not c.prop(d, "CCD_TEMPERATURE"):
            raise IndiError(f"{d} has no CCD_TEMPERATURE: cannot cool to {set_c} C")
        gen = c.send_number(d, "CCD_TEMPERATURE", {"CCD_TEMPERATURE_VALUE": set_c})
        snap = await c.wait_for(
            d, "CCD_TEMPERATURE",
            lambda p: p.state == "Alert"
            or abs(p.values["CCD_TEMPERATURE_VALUE"] - set_c) <= tolerance_c,
            timeout, gen, f"sensor at {set_c} C")
        if snap.state == "Alert":
            raise IndiAlert(f"{d} cooler reports Alert at {snap.values}")
        return snap.values["CCD_TEMPERATURE_VALUE"]

    def min_exposure_s(self) -> float:
        """Shortest exposure the camera accepts (s): what bias frames use."""
        snap = self.client.prop(self.device, "CCD_EXPOSURE")
        low = snap.limits.get("CCD_EXPOSURE_VALUE", (0.0, 0.0))[0] if snap else 0.0
        return max(low, 0.0)

    def frame_geometry(self) -> tuple[tuple[int, int], str | None] | None:
        """(height, width) in binned px of the frames the next exposure gives, and their CFA
        pattern (None: mono), from CCD_FRAME, CCD_BINNING and CCD_CFA; None when the camera
        does not say (no CCD_FRAME)."""
        frame = self.client.prop(self.device, "CCD_FRAME")
        w, h = (frame.values.get("WIDTH"), frame.values.get("HEIGHT")) if frame else (None, None)
        if not w or not h:
            return None
        binning = self.client.prop(self.device, "CCD_BINNING")
        bx = int(binning.values.get("HOR_BIN") or 1) if binning else 1
        by = int(binning.values.get("VER_BIN") or 1) if binning else 1
        cfa = self.client.prop(self.device, "CCD_CFA")
        pattern = str(cfa.values.get("CFA_TYPE") or "").strip().upper() if cfa else ""
        return (int(h) // max(by, 1), int(w) // max(bx, 1)), pattern or None

    def temperature(self) -> float | None:
        snap = self.client.prop(self.device, "CCD_TEMPERATURE")
        return snap.values.get("CCD_TEMPERATURE_VALUE") if snap else None

    async def set_frame_type(self, frame_type: str) -> None:
        try:
            element = FRAME_TYPES[frame_type]
        except KeyError:
            raise ValueError(f"frame type {frame_type!r}: expected one of {sorted(FRAME_TYPES)}") from None
        await self._set_switch("CCD_FRAME_TYPE", element)

    async def expose(self, seconds: float, name: str, timeout: float | None = None) -> Path:
        """One exposure; returns the complete FITS in the capture folder named
        `name`_<time>_<seq>.fits (hidden when `name` starts with a dot).

        Raises ExposureTimeout (after aborting) when the camera does not finish within
        `timeout` (default: exposure + 30 s for download), IndiAlert when it reports failure.
        """
        if self.capture_dir is None:
            raise IndiError("camera not configured (call configure first)")
        for old in self._uploads():  # leftovers of an interrupted exposure
            old.unlink(missing_ok=True)
        await self._ensure_binning()
        limit = timeout if timeout is not None else seconds + 30.0
        gen = self.client.send_number(self.device, "CCD_EXPOSURE", {"CCD_EXPOSURE_VALUE": seconds})
        try:
            await self.client.wait_state(self.device, "CCD_EXPOSURE", gen, limit,
                                         f"{seconds:g} s exposure")
        except IndiTimeout as exc:
            await self.abort()
            raise ExposureTimeout(str(exc)) from None
        files = sorted(self._uploads(), key=lambda p: p.stat().st_mtime)
        if not files:
            raise IndiError(f"{self.device}: exposure done but no {UPLOAD_PREFIX}* file in {self.capture_dir} "
                            "(is UPLOAD_MODE local and the folder writable by the driver?)")
        self._seq += 1
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
        # A name with a leading dot stays hidden (the centring and focus frames): the folder
        # watcher ignores hidden files, so they never reach a stack.
        stem = ("." if name.startswith(".") else "") + safe_filename(name.lstrip("."))
        dest = self.capture_dir / f"{stem}_{stamp}_{self._seq:04d}{files[-1].suffix}"
        os.replace(files[-1], dest)
        return dest

    def _uploads(self) -> list[Path]:
        return list(self.capture_dir.glob(UPLOAD_PREFIX + "*"))

    async def abort(self) -> None:
        try:
            self.client.send_switch(self.device, "CCD_ABORT_EXPOSURE", ["ABORT"])
        except IndiError as exc:
            log.warning("could not abort exposure on %s: %s", self.device, exc)

    async def set_simulator_sensor(self, width_px: int, height_px: int, timeout: float = 10.0) -> None:
        """INDI's CCD simulator only: make its sensor width x height (unbinned px). Why: drawing
        the real sky (Tycho-2, complete to about V 11.5), its default 1280 x 1024 field (25' x
        20' at 900 mm) holds too few catalogue stars to plate-solve; 2560 x 2048 (51' x 41')
        does. Raises IndiError when the device has no SIMULATOR_SETTINGS (not the simulator)."""
        await self.client.wait_for(self.device, "SIMULATOR_SETTINGS", timeout=timeout,
                                   what="CCD simulator settings")
        await self._set_number("SIMULATOR_SETTINGS", {"SIM_XRES": int(width_px), "SIM_YRES": int(height_px)},
                               timeout=timeout, confirm=True)
