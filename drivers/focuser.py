"""INDI focuser: absolute moves (ABS_FOCUS_POSITION, steps) and relative moves, abort, and its
temperature probe (FOCUS_TEMPERATURE, deg C), the one to refocus by: a cooled camera's sensor
temperature says nothing about the tube's."""

from __future__ import annotations

from drivers.indi_client import IndiClient, IndiError, IndiTimeout


class Focuser:
    def __init__(self, client: IndiClient, device: str):
        self.client, self.device = client, device

    async def connect(self, timeout: float = 10.0) -> None:
        await self.client.connect_device(self.device, timeout)
        await self.client.wait_for(self.device, "ABS_FOCUS_POSITION", timeout=timeout,
                                   what="absolute focus position")

    def position(self) -> int | None:
        snap = self.client.prop(self.device, "ABS_FOCUS_POSITION")
        return int(round(snap.values["FOCUS_ABSOLUTE_POSITION"])) if snap else None

    def temperature(self) -> float | None:
        """The focuser's temperature probe (deg C), None when it has none."""
        snap = self.client.prop(self.device, "FOCUS_TEMPERATURE")
        if snap is None:
            return None
        value = snap.values.get("TEMPERATURE")
        return None if value is None else float(value)

    async def move_to(self, steps: int, timeout: float = 120.0) -> int:
        """Move to an absolute position (steps); returns where the focuser says it is."""
        snap = self.client.prop(self.device, "ABS_FOCUS_POSITION")
        if snap is None:
            raise IndiError(f"{self.device} has no ABS_FOCUS_POSITION")
        low, high = snap.limits.get("FOCUS_ABSOLUTE_POSITION", (0.0, float("inf")))
        if not low <= steps <= high:
            raise IndiError(f"{self.device}: position {steps} outside {low:g}..{high:g}")
        gen = self.client.send_number(self.device, "ABS_FOCUS_POSITION",
                                      {"FOCUS_ABSOLUTE_POSITION": steps})
        try:
            await self.client.wait_for(
                self.device, "ABS_FOCUS_POSITION",
                lambda p: p.state == "Alert" or (p.state != "Busy" and
                                                 abs(p.values["FOCUS_ABSOLUTE_POSITION"] - steps) < 1),
                timeout, gen, f"focuser at {steps}")
        except IndiTimeout:
            await self.abort()
            raise
        if self.client.prop(self.device, "ABS_FOCUS_POSITION").state == "Alert":
            raise IndiError(f"{self.device} refused to move to {steps}")
        return self.position()

    async def move_by(self, steps: int, timeout: float = 120.0) -> int:
        return await self.move_to(self.position() + int(steps), timeout)

    async def abort(self) -> None:
        try:
            self.client.send_switch(self.device, "FOCUS_ABORT_MOTION", ["ABORT"])
        except IndiError:
            pass
