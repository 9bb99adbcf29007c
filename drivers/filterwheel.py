"""INDI filter wheel: select a filter by name (FILTER_NAME labels -> FILTER_SLOT number)."""

from __future__ import annotations

from drivers.indi_client import IndiClient, IndiError


class FilterWheel:
    def __init__(self, client: IndiClient, device: str):
        self.client, self.device = client, device

    async def connect(self, timeout: float = 10.0) -> None:
        await self.client.connect_device(self.device, timeout)
        await self.client.wait_for(self.device, "FILTER_SLOT", timeout=timeout, what="filter slot")

    def names(self) -> list[str]:
        snap = self.client.prop(self.device, "FILTER_NAME")
        return list(snap.values.values()) if snap else []

    async def select(self, name: str, timeout: float = 60.0) -> int:
        """Move to the filter labelled `name` (case-insensitive); returns its slot (1-based)."""
        names = self.names()
        matches = [i for i, n in enumerate(names, 1) if n.strip().lower() == name.strip().lower()]
        if not matches:
            raise IndiError(f"[plan] filter {name!r} not in {self.device}'s filters {names}")
        slot = matches[0]
        gen = self.client.send_number(self.device, "FILTER_SLOT", {"FILTER_SLOT_VALUE": slot})
        await self.client.wait_state(self.device, "FILTER_SLOT", gen, timeout, f"filter {name}")
        return slot
