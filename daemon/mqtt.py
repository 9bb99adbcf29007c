"""MQTT link (aiomqtt): publishes status, frame events and previews; receives commands.

Why it looks like this: the broker may be down, restarting or unreachable for hours, and that
must never stall stacking. So the service never awaits the network: it drops messages into
this object (`event`, `set_status`, `set_preview`) and returns at once. A single connection
task drains them whenever a broker is reachable and reconnects with back-off otherwise.
- Status and preview are *latest-value* slots (retained on the broker): only the newest is
  sent, and both are re-sent on every (re)connection, so the broker catches up.
- Frame events and command results go through a bounded FIFO (oldest dropped beyond
  `mqtt.buffer`, counted in `dropped`); a message is removed only after the broker acked it.
- `availability` is `online` on connect (retained); `offline` is the last will and is also
  published on a clean shutdown.
- A broker that refuses us (wrong or missing user name/password, an ACL) or cannot be reached
  is never silent: `state` says so for the status and the page, and an error line naming the
  broker and the user is logged at once and again with back-off while it lasts.
Topics are documented in docs/mqtt.md.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiomqtt
from aiomqtt.exceptions import MqttConnectError

from daemon import ha
from daemon.config import MqttConfig

log = logging.getLogger(__name__)

PUBLISH_TIMEOUT_S = 10.0
#: A failure that lasts is logged again at failed attempts 1, 2, 4, ... up to this, then every
#: this many attempts (with the 5 s reconnect delay: every ~10 minutes).
LOG_EVERY_MAX = 128

#: A connection dropped this soon (s) after it was made is most likely taken over by another
#: client with the same id; the warning says so.
QUICK_DROP_S = 5.0
#: CONNACK refusals (MQTT 3.1.1 codes and their MQTT 5 equivalents) in words for the observer.
_REFUSALS = {1: "protocol version not accepted", 2: "client id not accepted", 3: "broker unavailable",
             4: "bad user name or password", 5: "not authorised", 132: "protocol version not accepted",
             133: "client id not accepted", 134: "bad user name or password", 135: "not authorised",
             136: "broker unavailable", 137: "broker busy", 138: "banned"}


def topic_prefix(rig: str) -> str:
    return f"lightbucket/{rig}/"


@dataclass
class _Message:
    topic: str
    payload: bytes
    retain: bool = False


def _json(payload: dict) -> bytes:
    return json.dumps(payload, separators=(",", ":"), default=str).encode()


def describe_failure(exc: BaseException) -> str:
    """A failed connection attempt in words, as `MqttLink.state` shows it: "refused: not
    authorised" (the broker answered no: credentials, ACL), "tls error: ...", or
    "unreachable: connection refused" (no broker there, a wrong host or port, no network)."""
    if isinstance(exc, MqttConnectError):
        code = getattr(exc.rc, "value", exc.rc)
        return "refused: " + _REFUSALS.get(code, str(exc.rc).lower())
    text = re.sub(r"^\[Errno -?\d+\] ", "", str(exc)).strip() or type(exc).__name__
    if "ssl" in text.lower() or "certificate" in text.lower():
        return f"tls error: {text}"
    return f"unreachable: {text[:1].lower()}{text[1:]}"


def _log_now(attempt: int) -> bool:
    """Whether failed attempt number `attempt` (1-based) of the same failure is logged."""
    return attempt % LOG_EVERY_MAX == 0 or (attempt < LOG_EVERY_MAX and attempt & (attempt - 1) == 0)


class MqttLink:
    """The daemon's one connection to the broker (see the module docstring).

    Parameters
    ----------
    cfg : MqttConfig
        [mqtt]: broker, credentials, rig, discovery, buffer.
    reconnect_max_s : float
        Longest wait between connection attempts (s); the wait starts at 0.5 s and doubles.
    page_url : str, optional
        The web page's address, Home Assistant's `configuration_url` for the device.
    on_state : callable(state), optional
        Called on the loop whenever `state` changes (the service republishes its status).
    """

    def __init__(self, cfg: MqttConfig, *, reconnect_max_s: float = 5.0, page_url: str | None = None,
                 on_state: Callable[[str], None] | None = None):
        self.cfg = cfg
        self.page_url = page_url
        self.on_state = on_state
        #: "connecting", "connected", "refused: <why>", "unreachable: <why>", "tls error: <why>"
        #: or "lost: <why>" (the connection dropped; reconnecting).
        self.state = "connecting"
        #: Failed connection attempts since the last success (0 while connected).
        self.failures = 0
        self._same = 0  # of them, how many in a row with the same `state`
        self.prefix = topic_prefix(cfg.rig)
        self.commands: asyncio.Queue[bytes] = asyncio.Queue()
        self.connected = asyncio.Event()
        self.dropped = 0
        self._fifo: collections.deque[_Message] = collections.deque()
        self._status: bytes | None = None
        self._preview: tuple[bytes, bytes] | None = None
        self._dirty: set[str] = set()
        self._wake = asyncio.Event()
        self._reconnect_max_s = reconnect_max_s
        self._client: aiomqtt.Client | None = None

    # ------------------------------------------------------------ called by the service
    def event(self, subtopic: str, payload: dict) -> None:
        """Queue a JSON event on <prefix><subtopic> (not retained); never blocks."""
        if len(self._fifo) >= self.cfg.buffer:
            self._fifo.popleft()
            self.dropped += 1
        self._fifo.append(_Message(self.prefix + subtopic, _json(payload)))
        self._wake.set()

    def set_status(self, status: dict) -> None:
        self._status = _json(status)
        self._dirty.add("status")
        self._wake.set()

    def set_preview(self, jpeg: bytes, meta: dict) -> None:
        self._preview = (jpeg, _json(meta))
        self._dirty.add("preview")
        self._wake.set()

    @property
    def backlog(self) -> int:
        """Frame events and command results waiting for the broker."""
        return len(self._fifo)

    @property
    def unsent(self) -> int:
        """Everything waiting: the backlog, and a status or preview not yet published (what a
        clean shutdown waits for)."""
        return len(self._fifo) + len(self._dirty)

    async def flush(self, timeout_s: float) -> None:
        """Wait (at most `timeout_s`) until everything queued has gone out, while connected:
        at shutdown, the last events and status reach the broker; a down broker does not
        hold the daemon up."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while self.unsent and self.connected.is_set() and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)

    def queued(self) -> list[tuple[str, bytes]]:
        """(topic, payload) of the backlog, oldest first (a copy)."""
        return [(m.topic, m.payload) for m in self._fifo]

    @property
    def client_id(self) -> str:
        """The MQTT client id; the broker drops the older of two connections with the same id."""
        return f"lightbucket-{self.cfg.rig}"

    @property
    def broker(self) -> str:
        """`host:port (user <name>)` as the log lines name the broker and who we log in as."""
        who = f"user {self.cfg.username}" if self.cfg.username else "anonymous: no mqtt.username"
        return f"{self.cfg.host}:{self.cfg.port} ({who})"

    def _set_state(self, state: str) -> None:
        if state == self.state:
            return
        self.state = state
        if self.on_state is not None:
            try:
                self.on_state(state)
            except Exception:  # noqa: BLE001 - a listener's bug must not end the link
                log.exception("MQTT state listener failed")

    def _failed(self, exc: BaseException) -> None:
        """One failed connection attempt: the state, and an error line with back-off."""
        reason = describe_failure(exc)
        self.failures += 1
        self._same = 1 if reason != self.state else self._same + 1
        self._set_state(reason)
        if _log_now(self._same):
            log.error("MQTT broker %s: %s; retrying at most %g s apart (attempt %d)", self.broker, reason,
                      self._reconnect_max_s, self.failures)

    # ------------------------------------------------------------ connection task
    def _make_client(self) -> aiomqtt.Client:
        tls = None
        if self.cfg.tls:
            tls = aiomqtt.TLSParameters(ca_certs=str(self.cfg.ca_file) if self.cfg.ca_file else None)
        return aiomqtt.Client(
            self.cfg.host, self.cfg.port,
            username=self.cfg.username, password=self.cfg.password,
            identifier=self.client_id,
            will=aiomqtt.Will(self.prefix + "availability", b"offline", qos=1, retain=True),
            keepalive=self.cfg.keepalive_s, tls_params=tls, timeout=PUBLISH_TIMEOUT_S,
        )

    async def run(self) -> None:
        """Connect, publish, receive commands; reconnect forever (until cancelled)."""
        delay = 0.5
        connected_at = 0.0
        while True:
            try:
                async with self._make_client() as client:
                    self._client = client
                    await client.publish(self.prefix + "availability", b"online", qos=1, retain=True)
                    await client.subscribe(self.prefix + "cmd", qos=1)
                    await self._discovery(client)
                    self._dirty.update(k for k, v in (("status", self._status), ("preview", self._preview)) if v)
                    self._wake.set()
                    self.connected.set()
                    log.info("MQTT connected to %s%s", self.broker,
                             f" after {self.failures} failed attempts" if self.failures else "")
                    self.failures = 0
                    self._set_state("connected")
                    connected_at = time.monotonic()
                    delay = 0.5
                    await self._serve(client)
            except* (aiomqtt.MqttError, OSError) as group:
                exc = group.exceptions[0]
                if self.connected.is_set():
                    after_s = time.monotonic() - connected_at
                    hint = (f"; {after_s:.1f} s after connecting: does another client use the id "
                            f"{self.client_id} (a second daemon with mqtt.rig = {self.cfg.rig!r})?"
                            if after_s < QUICK_DROP_S else "")
                    log.warning("MQTT broker %s: connection lost (%s); queued: %d%s", self.broker, exc,
                                len(self._fifo), hint)
                    self._set_state(f"lost: {exc}")
                else:
                    self._failed(exc)
            except* Exception as group:  # noqa: BLE001 - never let the link die: log and retry
                log.error("MQTT link error: %r; reconnecting", group.exceptions[0])
            finally:
                self._client = None
                self.connected.clear()
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._reconnect_max_s)

    async def _serve(self, client: aiomqtt.Client) -> None:
        """Send and receive until one of them fails (the connection dropped): raises its error.

        Not an asyncio.TaskGroup: in Python 3.11 a TaskGroup whose child fails in the instant
        its task is cancelled raises the child's error and forgets the cancel, and the link
        would reconnect forever while the daemon's shutdown waits for it."""
        children = {asyncio.create_task(self._sender(client)), asyncio.create_task(self._receiver(client))}
        try:
            done, _ = await asyncio.wait(children, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            for child in children:
                child.cancel()
            await asyncio.wait(children)
        for child in done:
            child.result()

    async def _sender(self, client: aiomqtt.Client) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            # FIFO first so that the status that follows already counts these frames.
            while self._fifo:
                msg = self._fifo[0]
                await client.publish(msg.topic, msg.payload, qos=1, retain=msg.retain)
                if self._fifo and self._fifo[0] is msg:
                    self._fifo.popleft()
            if "preview" in self._dirty and self._preview:
                self._dirty.discard("preview")
                jpeg, meta = self._preview
                try:
                    await client.publish(self.prefix + "preview", jpeg, qos=1, retain=True)
                    await client.publish(self.prefix + "preview/meta", meta, qos=1, retain=True)
                except aiomqtt.MqttError:
                    self._dirty.add("preview")
                    raise
            if "status" in self._dirty and self._status:
                self._dirty.discard("status")
                try:
                    await client.publish(self.prefix + "status", self._status, qos=1, retain=True)
                except aiomqtt.MqttError:
                    self._dirty.add("status")
                    raise

    async def _receiver(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            payload = message.payload
            if isinstance(payload, str):
                payload = payload.encode()
            self.commands.put_nowait(bytes(payload or b""))

    async def close(self) -> None:
        """Publish `offline` (a clean disconnect does not fire the will); best effort."""
        client = self._client
        if client is not None:
            try:
                await client.publish(self.prefix + "availability", b"offline", qos=1, retain=True, timeout=2)
            except aiomqtt.MqttError:
                pass

    async def _discovery(self, client: aiomqtt.Client) -> None:
        """Home Assistant discovery (daemon.ha): the configs with `mqtt.discovery`, otherwise
        empty retained payloads on the same topics, which removes the entities."""
        if self.cfg.discovery:
            # the `image` entity replaces the `camera` of earlier versions
            await client.publish(ha.OLD_CAMERA.format(rig=self.cfg.rig), b"", qos=1, retain=True)
            for topic, conf in ha.discovery_configs(self.cfg.rig, self.prefix, self.page_url).items():
                await client.publish(topic, _json(conf), qos=1, retain=True)
        else:
            for topic in ha.removed_topics(self.cfg.rig):
                await client.publish(topic, b"", qos=1, retain=True)
