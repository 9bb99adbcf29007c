"""An asyncio bridge over pyindi-client.

pyindi-client calls us back on its own listener thread. Each callback copies the property into an
immutable `PropSnapshot` right there (the C++ object may change under us later) and hands it to the
event loop with `loop.call_soon_threadsafe`; all state lives on the loop, so waiting for a property
is an `asyncio.Future` with a timeout, never a sleep-and-poll.

Why snapshots carry a generation number: after sending a new value we must wait for an update that
came *after* the send, not be fooled by the state the property had before.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import PyIndi

log = logging.getLogger(__name__)

IDLE, OK, BUSY, ALERT = "Idle", "Ok", "Busy", "Alert"
_STATES = {PyIndi.IPS_IDLE: IDLE, PyIndi.IPS_OK: OK, PyIndi.IPS_BUSY: BUSY, PyIndi.IPS_ALERT: ALERT}


class IndiError(RuntimeError):
    """Something INDI-side went wrong; the message says which device/property."""


class IndiTimeout(IndiError, TimeoutError):
    """A property did not reach the awaited state in time."""


class IndiDisconnected(IndiError):
    """The connection to indiserver was lost (or never made)."""


class IndiAlert(IndiError):
    """A device answered a request with state Alert."""


@dataclass(frozen=True)
class PropSnapshot:
    """One property as last seen: values by element name (float for numbers, bool for switches,
    str for texts/lights)."""

    device: str
    name: str
    kind: str  # "number" | "switch" | "text" | "light" | "blob"
    state: str  # Idle | Ok | Busy | Alert
    values: dict = field(default_factory=dict)
    generation: int = 0
    #: (min, max) per number element, as the driver declares them.
    limits: dict = field(default_factory=dict)

    def on(self) -> list[str]:
        """Names of switch elements that are On."""
        return [k for k, v in self.values.items() if v is True]


def _snapshot(prop) -> PropSnapshot | None:
    """Copy a PyIndi property (runs on the pyindi thread)."""
    t = prop.getType()
    if t == PyIndi.INDI_NUMBER:
        kind, p = "number", PyIndi.PropertyNumber(prop)
        values = {w.getName(): float(w.getValue()) for w in p}
        limits = {w.getName(): (float(w.getMin()), float(w.getMax())) for w in p}
    elif t == PyIndi.INDI_SWITCH:
        kind, p = "switch", PyIndi.PropertySwitch(prop)
        values = {w.getName(): w.getState() == PyIndi.ISS_ON for w in p}
    elif t == PyIndi.INDI_TEXT:
        kind, p = "text", PyIndi.PropertyText(prop)
        values = {w.getName(): str(w.getText()) for w in p}
    elif t == PyIndi.INDI_LIGHT:
        kind, p = "light", PyIndi.PropertyLight(prop)
        values = {w.getName(): _STATES.get(w.getState(), IDLE) for w in p}
    elif t == PyIndi.INDI_BLOB:
        kind, values = "blob", {}
    else:
        return None
    return PropSnapshot(prop.getDeviceName(), prop.getName(), kind,
                        _STATES.get(prop.getState(), IDLE), values,
                        limits=limits if kind == "number" else {})


#: Listeners that have been disconnected, kept alive for the life of the process. Why: when
#: the last Python reference to a pyindi-client BaseClient goes, its C++ object is destroyed
#: at once, while libindiclient's listener thread may still be delivering a last callback
#: (serverDisconnected, a property) into it; that thread then aborts the whole process
#: (seen here about one run in four of the indiserver-killed test). A few KB per reconnect.
_RETIRED: list[_Listener] = []


@dataclass(frozen=True)
class _Callbacks:
    """Where the C++ thread's callbacks go: each is called on `loop`."""

    loop: asyncio.AbstractEventLoop
    on_property: Callable
    on_remove: Callable
    on_message: Callable
    on_server: Callable


class _Listener(PyIndi.BaseClient):
    """The pyindi-client subclass: every callback is snapshotted here, on the C++ thread, and
    goes straight to the loop."""

    def __init__(self, callbacks: _Callbacks):
        super().__init__()
        self.callbacks = callbacks

    def _post(self, fn, *args) -> None:
        try:
            self.callbacks.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # loop closed during shutdown
            pass

    def newProperty(self, prop):
        snap = _snapshot(prop)
        if snap:
            self._post(self.callbacks.on_property, snap)

    def updateProperty(self, prop):
        self.newProperty(prop)

    def removeProperty(self, prop):
        self._post(self.callbacks.on_remove, prop.getDeviceName(), prop.getName())

    def newMessage(self, device, message_id):
        try:
            text = device.messageQueue(message_id)
        except Exception:  # noqa: BLE001 - a message we cannot read is not worth failing over
            return
        self._post(self.callbacks.on_message, device.getDeviceName(), str(text))

    def serverConnected(self):
        self._post(self.callbacks.on_server, True)

    def serverDisconnected(self, code):
        self._post(self.callbacks.on_server, False)


class IndiClient:
    """Connection to one indiserver. All methods are called from the event loop thread."""

    def __init__(self, host: str = "127.0.0.1", port: int = 7624):
        self.host, self.port = host, port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listener: _Listener | None = None
        self._props: dict[tuple[str, str], PropSnapshot] = {}
        self._waiters: list[tuple[Callable[[], bool], asyncio.Future]] = []
        self._generation = 0
        self.connected = False
        self.messages: list[tuple[str, str]] = []

    # -- connection -------------------------------------------------------------------------
    async def connect(self, timeout: float = 5.0) -> None:
        """Connect to indiserver; raises IndiDisconnected when nothing answers."""
        await self.close()
        self._loop = asyncio.get_running_loop()
        self._props.clear()
        listener = _Listener(_Callbacks(self._loop, self._on_property, self._on_remove, self._on_message,
                                        self._on_server))
        listener.setServer(self.host, int(self.port))
        listener.setConnectionTimeout(int(timeout), 0)
        ok = await asyncio.to_thread(listener.connectServer)
        if not ok:
            _RETIRED.append(listener)
            raise IndiDisconnected(f"no indiserver answering at {self.host}:{self.port}")
        self._listener = listener
        self.connected = True
        self._wake()

    async def close(self) -> None:
        listener, self._listener = self._listener, None
        self.connected = False
        if listener is not None:
            _RETIRED.append(listener)  # never destroyed: see _RETIRED
            await asyncio.to_thread(listener.disconnectServer)
        self._wake()

    # -- callbacks, on the loop ------------------------------------------------------------
    def _on_property(self, snap: PropSnapshot) -> None:
        self._generation += 1
        self._props[(snap.device, snap.name)] = PropSnapshot(
            snap.device, snap.name, snap.kind, snap.state, snap.values, self._generation,
            snap.limits)
        self._wake()

    def _on_remove(self, device: str, name: str) -> None:
        self._props.pop((device, name), None)
        self._wake(everyone=True)  # waiters on it must notice that it went away

    def _on_message(self, device: str, text: str) -> None:
        self.messages = (self.messages + [(device, text)])[-50:]
        log.debug("INDI %s: %s", device, text)

    def _on_server(self, up: bool) -> None:
        if not up and self.connected:
            log.warning("lost connection to indiserver %s:%s", self.host, self.port)
        self.connected = up and self._listener is not None
        self._wake()

    def _wake(self, everyone: bool = False) -> None:
        """Resolve the futures of waiters whose condition holds (all of them: they re-check)."""
        for cond, fut in list(self._waiters):
            if not fut.done() and (everyone or not self.connected or cond()):
                fut.set_result(None)

    # -- reading ---------------------------------------------------------------------------
    def prop(self, device: str, name: str) -> PropSnapshot | None:
        return self._props.get((device, name))

    @property
    def generation(self) -> int:
        return self._generation

    async def wait_for(self, device: str, name: str,
                       predicate: Callable[[PropSnapshot], bool] = lambda p: True,
                       timeout: float = 5.0, after: int = 0, what: str = "") -> PropSnapshot:
        """The first snapshot of device.name newer than generation `after` satisfying predicate.

        Raises IndiTimeout after `timeout` s, IndiDisconnected when the server goes away.
        """
        def ready() -> bool:
            p = self._props.get((device, name))
            return p is not None and p.generation > after and predicate(p)

        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        seen = (device, name) in self._props
        while True:
            if not self.connected:
                raise IndiDisconnected(f"indiserver {self.host}:{self.port} not connected "
                                       f"while waiting for {device}.{name}")
            if ready():
                return self._props[(device, name)]
            if seen and (device, name) not in self._props:  # the driver deleted it: disconnected
                raise IndiDisconnected(f"{device}.{name} went away while waiting for "
                                       f"{what or 'it'} (device disconnected?)")
            fut = loop.create_future()
            entry = (ready, fut)
            self._waiters.append(entry)
            try:
                await asyncio.wait_for(fut, max(0.0, deadline - loop.time()))
            except TimeoutError:
                last = self._props.get((device, name))
                raise IndiTimeout(
                    f"{device}.{name}: {what or 'expected state'} not reached in {timeout:g} s "
                    f"(last state {last.state if last else 'never seen'})") from None
            finally:
                self._waiters.remove(entry)

    async def wait_defined(self, device: str, names: Iterable[str], timeout: float) -> str | None:
        """The first of `names` that device defines within `timeout` s (None if none does).

        Drivers define their properties in batches after CONNECT, so "not there yet" and "not
        supported" look the same for a moment; this waits out the moment.
        """
        names = list(names)

        def ready() -> bool:
            return any((device, n) in self._props for n in names)

        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not ready():
            if not self.connected:
                raise IndiDisconnected(f"indiserver {self.host}:{self.port} not connected")
            fut = loop.create_future()
            entry = (ready, fut)
            self._waiters.append(entry)
            try:
                await asyncio.wait_for(fut, max(0.0, deadline - loop.time()))
            except TimeoutError:
                return None
            finally:
                self._waiters.remove(entry)
        return next(n for n in names if (device, n) in self._props)

    async def wait_state(self, device: str, name: str, after: int, timeout: float,
                         what: str = "") -> PropSnapshot:
        """Wait until the property leaves Busy after a request; Alert raises IndiAlert."""
        snap = await self.wait_for(device, name, lambda p: p.state in (OK, ALERT, IDLE),
                                   timeout, after, what)
        if snap.state == ALERT:
            last = self.messages[-1][1] if self.messages else ""
            raise IndiAlert(f"{device}.{name} answered Alert ({what}) {last}".strip())
        return snap

    # -- writing ---------------------------------------------------------------------------
    def _live(self, device: str, name: str, getter: str):
        if self._listener is None or not self.connected:
            raise IndiDisconnected(f"cannot set {device}.{name}: not connected")
        dev = self._listener.getDevice(device)
        if not dev or not dev.isValid():
            raise IndiError(f"INDI device {device!r} not found on {self.host}:{self.port}")
        prop = getattr(dev, getter)(name)
        if not prop or not prop.isValid():
            raise IndiError(f"{device} has no property {name}")
        return prop

    def _check(self, device, name, prop, values: Iterable[str]) -> None:
        known = {w.getName() for w in prop}
        missing = [v for v in values if v not in known]
        if missing:
            raise IndiError(f"{device}.{name} has no element(s) {missing}; has {sorted(known)}")

    def _send_values(self, device: str, name: str, values: dict, kind: str, setter) -> int:
        prop = self._live(device, name, f"get{kind}")
        self._check(device, name, prop, values)
        for w in prop:
            if w.getName() in values:
                setter(w, values[w.getName()])
        gen = self._generation
        getattr(self._listener, f"sendNew{kind}")(prop)
        return gen

    def send_number(self, device: str, name: str, values: dict[str, float]) -> int:
        """Send new numbers; returns the generation to pass to wait_state as `after`."""
        return self._send_values(device, name, values, "Number", lambda w, v: w.setValue(float(v)))

    def send_switch(self, device: str, name: str, on: Iterable[str], off: Iterable[str] = ()) -> int:
        """Turn switches `on` On; for one-of-many rules the others go Off."""
        on, off = set(on), set(off)
        prop = self._live(device, name, "getSwitch")
        self._check(device, name, prop, on | off)
        exclusive = prop.getRule() in (PyIndi.ISR_1OFMANY, PyIndi.ISR_ATMOST1)
        for w in prop:
            if w.getName() in on:
                w.setState(PyIndi.ISS_ON)
            elif exclusive or w.getName() in off:
                w.setState(PyIndi.ISS_OFF)
        gen = self._generation
        self._listener.sendNewSwitch(prop)
        return gen

    def send_text(self, device: str, name: str, values: dict[str, str]) -> int:
        return self._send_values(device, name, values, "Text", lambda w, v: w.setText(str(v)))

    async def connect_device(self, device: str, timeout: float = 10.0) -> None:
        """Switch CONNECTION on and wait until the driver reports it connected."""
        snap = await self.wait_for(device, "CONNECTION", timeout=timeout,
                                   what=f"device {device!r} to appear")
        if snap.values.get("CONNECT") and snap.state == OK:
            return
        gen = self.send_switch(device, "CONNECTION", ["CONNECT"])
        await self.wait_for(device, "CONNECTION",
                            lambda p: p.values.get("CONNECT") is True and p.state == OK
                            or p.state == ALERT, timeout, gen, "connected")
        if self.prop(device, "CONNECTION").state == ALERT:
            raise IndiAlert(f"{device} refused to connect")
