"""The daemon: watcher -> queue -> session (worker thread) -> checkpoint, products, MQTT, page.

Threads and ownership (why it cannot race): ONE worker thread owns the session (the stacks,
the ledger, the masters, the spools: daemon.session); every job that touches them runs there,
one at a time, and hands back an immutable `SessionSnapshot`. The event loop owns the queue,
the state, the MQTT link, the web server and everything published, and builds `status` from
the latest snapshot only. Commands are a table (daemon.commands checks, daemon.control acts);
plans are run by daemon.supervisor. CPU-heavy work never runs on the loop, so the watchdog
pings, MQTT and the page stay live while a frame is stacked.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from daemon.config import Config
from daemon.control import Controller
from daemon.events import frame_event, status_document
from daemon.folders import ensure_dir
from daemon.frame_queue import FrameQueue
from daemon.io.limits import process_memory_bytes
from daemon.io.load import FrameLoader, LoadOptions
from daemon.ledger import QUARANTINED, file_key
from daemon.memory import freeze_startup_objects, retain_freed_memory
from daemon.pointing import Pointing
from daemon.sdnotify import Notifier, watchdog_interval_s
from daemon.session import LivePipelineFactory, Outcome, PipelineFactory, Session, SessionSnapshot, live_settings
from daemon.spool import folder_bytes
from daemon.supervisor import PlanSupervisor
from daemon.warmup import ensure_warm
from daemon.watcher import FolderWatcher, backlog

log = logging.getLogger("lightbucket")
T = TypeVar("T")

#: Seconds between status refreshes with no frame (disk free, time) and disk-use recounts.
STATUS_EVERY_S = 30.0


class Service:
    """The daemon's event-loop side. `run()` until `request_stop()` (SIGTERM, SIGINT).

    Public, for the page, the CLI and tests: `status()`, `snapshot`, `command()`,
    `subscribe()`, `preview()`, `stack_preview()`, `tile()`, `idle()`, `wait_processed()`,
    `plans` (run, wait for, stop plans); all on the event loop.
    """

    def __init__(self, config: Config, *, factory: PipelineFactory | None = None,
                 loader: Callable[[Path], Any] | None = None, notifier: Notifier | None = None,
                 force_polling: bool = False, acquire_at_start: bool = True):
        self.config = config
        self.capture_dir = Path(config.capture.dir)
        self.state_dir = Path(config.state.dir)
        self.output_dir = config.output_dir
        for path, setting, write in ((self.state_dir, "state.dir", True),
                                     (self.output_dir, "state.output_dir", True),
                                     # its own camera's frames are written there
                                     (self.capture_dir, "capture.dir", config.indi is not None)):
            ensure_dir(path, setting, writable=write)
        masters = config.calibration.files()
        settings = live_settings(config)
        if factory is None:
            factory = LivePipelineFactory(settings, masters, process_memory_bytes())
        if loader is None:
            loader = FrameLoader(LoadOptions(config.capture.max_frame_bytes, config.capture.tiff_bayer),
                                 keep_large=settings.holds_frames)
        self._queue = FrameQueue()
        self.session = Session(self.state_dir, self.capture_dir, self.output_dir, factory, loader, masters,
                               self._queue.waiting.is_set)
        self.snapshot: SessionSnapshot = self.session.snapshot()
        self.notifier = notifier or Notifier()
        self.force_polling = force_polling
        #: False: [plan] waits for a `start` command (or run_plan), e.g. to take darks first.
        self.acquire_at_start = acquire_at_start
        self.state = "starting"
        self.last_frame: dict | None = None
        #: The last rejected frame: path, reason, time (status `last_reject`).
        self.last_reject: dict | None = None
        #: The running (or last) plan's latest progress event, also in `status` as "plan".
        self.plan_progress: dict | None = None
        self.mqtt = None
        self.web = None
        self.watcher: FolderWatcher | None = None
        self.plans = PlanSupervisor(config, self.publish_event, self._plan_progress, self.job, self.wait_processed)
        self.controller = Controller(self)
        #: The plate solves: each stack's reference, the night's pointing check (daemon.pointing).
        self.pointing = Pointing(self)
        self._listeners: list[Callable[[str, dict], None]] = []
        self._preview: tuple[bytes, dict] | None = None  # the latest (JPEG, preview/meta)
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="pipeline")
        self._stop = asyncio.Event()
        self._last_products = 0.0
        self._state_bytes: tuple[float, int] | None = None  # (when counted, bytes)
        self._sightings: set[asyncio.Future] = set()  # stacks being made for files seen being written

    # ----------------------------------------------------------------- the worker
    async def job(self, fn: Callable[[Session], T]) -> T:
        """Run fn(session) on the worker thread; the snapshot is renewed after it (also when
        it raises)."""
        loop = asyncio.get_running_loop()

        def run():
            try:
                return fn(self.session)
            finally:
                # Scheduled before the job's result reaches the loop: the awaiting caller
                # already sees the snapshot of what it did.
                loop.call_soon_threadsafe(setattr, self, "snapshot", self.session.snapshot())

        return await loop.run_in_executor(self._executor, run)

    # ----------------------------------------------------------------- queue
    def enqueue(self, path: Path) -> None:
        """Queue a file for the worker (the watcher's callback); duplicates are dropped."""
        if self._queue.put(path):
            self.publish_status()

    def _on_sight(self, path: Path) -> None:
        """The watcher's first sight of a file being written: the stack it will start is made
        meanwhile (`Session.prepare_for`), so that its first frame does not pay for it."""
        task = asyncio.ensure_future(self._prepare_for(path))
        self._sightings.add(task)  # (the loop keeps only a weak reference to a task)
        task.add_done_callback(self._sightings.discard)

    async def _prepare_for(self, path: Path) -> None:
        try:
            await self.job(lambda session: session.prepare_for(path))
        except Exception as exc:  # noqa: BLE001 - only a head start: the frame makes its stack itself
            log.warning("%s: its stack was not made ahead: %s", path, exc)

    async def idle(self) -> None:
        """Return once the queue is empty and no file is in hand (at once when so already)."""
        await self._queue.idle()

    async def wait_processed(self, paths: list[str | Path], timeout: float) -> bool:
        """Wait until every one of `paths` is in the ledger (stacked, rejected or error);
        False when `timeout` (s) passes first."""
        keys = {file_key(self.capture_dir, p) for p in paths}
        deadline = time.monotonic() + timeout
        while not keys <= self.snapshot.files:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.1)
        return True

    async def _process_loop(self) -> None:
        every = self.config.state.checkpoint_every_s
        while (path := await self._queue.get(self._stop)) is not None:
            due = every <= 0 or time.monotonic() - self.snapshot.last_checkpoint >= every
            try:
                out = await self.job(lambda session, path=path, due=due: session.process(path, due))
            except Exception:  # noqa: BLE001 - a bug on one file must not end the night
                log.exception("processing %s failed; the daemon goes on with the next file", path)
                continue
            finally:
                self._queue.done()
            self._report(out)
            await self.write_products()

    # ----------------------------------------------------------------- publishing
    def status(self) -> dict:
        """The status JSON (MQTT `status`, `GET /api/status`), from the latest snapshot."""
        pending = {file_key(self.capture_dir, p) for p in self._queue.pending()}
        try:
            disk_free = shutil.disk_usage(self.output_dir if self.output_dir.exists() else self.state_dir).free
        except OSError:
            disk_free = None
        return status_document(
            self.snapshot, state=self.state, queue=len(self._queue), pending=pending,
            last_frame=self.last_frame, last_reject=self.last_reject, plan=self.plan_progress,
            plan_queue=self.plans.queue_status(),
            mqtt=self.mqtt.state if self.mqtt is not None else None, **self.pointing.status(self.snapshot.current),
            focus=self.plans.focus, disk_free_bytes=disk_free, state_bytes=self._disk_use())

    def _disk_use(self) -> int:
        """Bytes under the state folder (spool, checkpoint, snapshots, masters), counted at
        most every STATUS_EVERY_S (status goes out on every frame)."""
        now = time.monotonic()
        if self._state_bytes is None or now - self._state_bytes[0] > STATUS_EVERY_S:
            self._state_bytes = (now, folder_bytes(self.state_dir))
        return self._state_bytes[1]

    def publish_status(self) -> None:
        if self.mqtt is not None or self._listeners:
            status = self.status()
            if self.mqtt is not None:
                self.mqtt.set_status(status)
            self._emit("status", status)

    def subscribe(self, callback: Callable[[str, dict], None]) -> Callable[[], None]:
        """Call `callback(kind, payload)` on the loop for every event published (kind:
        "status", "frame", "preview" (its meta), "cmd/result", "acquisition"); it must not
        block. Returns the function that unsubscribes."""
        self._listeners.append(callback)
        return lambda: self._listeners.remove(callback) if callback in self._listeners else None

    def _emit(self, kind: str, payload: dict) -> None:
        for callback in list(self._listeners):
            try:
                callback(kind, payload)
            except Exception:  # noqa: BLE001 - a listener's bug must not stop stacking
                log.exception("event listener failed on %s", kind)

    def publish_event(self, kind: str, payload: dict) -> None:
        """An event to MQTT (if configured) and to the listeners."""
        if self.mqtt is not None:
            self.mqtt.event(kind, payload)
        self._emit(kind, payload)

    def _plan_progress(self, payload: dict) -> None:
        self.plan_progress = payload
        self.publish_status()

    def _report(self, out: Outcome) -> None:
        if out.outcome == "skipped":
            return
        self.pointing.frame_done(out, self.plans.runner)
        self.plans.frame_done(out)
        event = self.last_frame = frame_event(out)
        if not event["accepted"]:
            self.last_reject = {k: event.get(k) for k in ("path", "reason", "stack", "time")}
        self.publish_event("frame", event)
        self.notifier.status(f"{self.state}; {self.snapshot.counts['stacked']} stacked, queue {len(self._queue)}")
        self.publish_status()

    async def write_products(self, force: bool = False) -> None:
        """The current stack's FITS and preview (worker), published; coalesced while frames
        wait, at most every preview_interval_s."""
        interval = self.config.mqtt.preview_interval_s if self.config.mqtt else 5.0
        if not self.snapshot.products_due:
            return
        if not force and len(self._queue) and time.monotonic() - self._last_products < interval:
            return  # coalesced: frames are waiting, the preview can wait too
        self._last_products = time.monotonic()
        try:
            preview = await self.job(lambda session: session.products(self._preview_edge))
        except Exception:  # noqa: BLE001 - a failed preview/FITS must not stop stacking
            log.exception("writing products failed")
            return
        if preview:
            self._preview = preview
            if self.mqtt is not None:
                self.mqtt.set_preview(*preview)
            self._emit("preview", preview[1])

    @property
    def _preview_edge(self) -> int:
        return self.config.mqtt.preview_max_edge if self.config.mqtt else 1280

    # ----------------------------------------------------------------- the page's interface
    async def command(self, payload: dict) -> dict:
        """Run one command (the MQTT `cmd` JSON) and return its `cmd/result` JSON, as MQTT does."""
        reply = await self.handle_command(json.dumps(payload).encode())
        self._emit("cmd/result", reply)
        return reply

    async def handle_command(self, raw: bytes) -> dict:
        """Check and run one command (raw JSON); its reply (never raises)."""
        return await self.controller.handle(raw)

    def preview(self) -> tuple[bytes, dict] | None:
        """The latest preview (JPEG bytes, preview/meta), or None before the first."""
        return self._preview

    async def stack_preview(self, stack: str) -> tuple[bytes, int, int]:
        """The preview JPEG of any stack and its full width and height (px), made on the
        worker (which owns the stack). KeyError for an unknown or empty stack."""
        return await self.job(lambda session: session.stack_preview(stack, self._preview_edge))

    async def tile(self, stack: str, x: int, y: int, size: int) -> bytes:
        """A full-resolution JPEG crop of `stack` around (x, y), stretched like the preview:
        copied on the worker, encoded in a thread. KeyError for an unknown or empty stack."""
        from daemon.web.tiles import tile_jpeg  # the page's code: only with [web]

        crop = await self.job(lambda session: session.crop(stack, x, y, size, self._preview_edge))
        return await asyncio.to_thread(tile_jpeg, crop)

    def set_state(self, state: str) -> None:
        """running | paused | stopped (commands), starting at start."""
        self.state = state
        self._queue.hold(state != "running")
        self.notifier.status(f"{state}; {self.snapshot.counts['stacked']} stacked, queue {len(self._queue)}")
        self.publish_status()

    # ----------------------------------------------------------------- lifecycle
    async def _heartbeat(self) -> None:
        """Watchdog pings from the event loop itself (a blocked loop stops them, and systemd
        restarts us), and a status refresh every STATUS_EVERY_S (disk free, time)."""
        interval = watchdog_interval_s()
        period = min(interval or STATUS_EVERY_S, STATUS_EVERY_S)
        last_status = time.monotonic()
        while True:
            if interval:
                self.notifier.watchdog()
            await asyncio.sleep(period)
            if time.monotonic() - last_status >= STATUS_EVERY_S:
                last_status = time.monotonic()
                self.publish_status()

    async def _periodic_checkpoint(self, every: float) -> None:
        """With checkpoint_every_s > 0: save frames dealt with since the last checkpoint once
        `every` seconds have passed, also when no further frame arrives to trigger it."""
        while True:
            await asyncio.sleep(max(every / 4, 0.5))
            if self.snapshot.unsaved and time.monotonic() - self.snapshot.last_checkpoint >= every:
                await self.job(lambda session: session.checkpoint_if_unsaved())

    async def _start_links(self, tasks: list[asyncio.Task]) -> None:
        """MQTT ([mqtt]) and the page ([web]). A port in use or unreadable TLS files are
        logged and the daemon stacks on without the page: stacking comes first."""
        web = self.config.web
        if self.config.mqtt is not None:
            from daemon.mqtt import MqttLink  # aiomqtt: only with [mqtt]
            from daemon.web import page_url

            url = page_url(web.host, web.port, web.cert_file is not None) if web is not None else None
            self.mqtt = MqttLink(self.config.mqtt, page_url=url, on_state=lambda _state: self.publish_status())
            tasks.append(asyncio.create_task(self.mqtt.run(), name="mqtt"))
            tasks.append(asyncio.create_task(self._command_loop(), name="commands"))
        if web is not None:
            from daemon.web.server import WebServer  # aiohttp: only with [web]

            server = WebServer(self, web)
            try:
                await server.start()
            except (OSError, ValueError) as exc:
                log.error("%s: [web] %s:%d: the page is not served: %s", self.config.source, web.host, web.port, exc)
            else:
                self.web = server

    async def _command_loop(self) -> None:
        while True:
            raw = await self.mqtt.commands.get()
            reply = await self.handle_command(raw)
            self.publish_event("cmd/result", reply)

    def request_stop(self) -> None:
        log.info("stop requested: finishing the frame in hand")
        self._stop.set()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        retain_freed_memory()  # before the pipeline thread starts: see daemon.memory
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        quarantined = await self.job(lambda session: session.restore())
        self.pointing.start()
        tasks: list[asyncio.Task] = [asyncio.create_task(self._heartbeat(), name="heartbeat")]
        await self._start_links(tasks)  # the page and MQTT say "starting" while kernels compile
        try:
            # numba's kernels compiled (a cold cache) or loaded before READY, so the first
            # frame is as fast as the tenth (daemon.warmup).
            warmed = await loop.run_in_executor(self._executor, ensure_warm)
            if warmed is not None:
                log.info("numba kernels compiled and cached in %.1f s", warmed)
            if self._stop.is_set():  # SIGTERM during the warm-up
                return 0
            log.info("start-up objects kept out of the garbage collector's passes: %d", freeze_startup_objects())
            if quarantined is not None:
                self._report(Outcome(quarantined, "error", reason=QUARANTINED))
            await self._start_watching()
            self.set_state("running")
            if self.config.state.checkpoint_every_s > 0:
                tasks.append(asyncio.create_task(self._periodic_checkpoint(self.config.state.checkpoint_every_s)))
            if self.acquire_at_start:
                self.plans.start()
            self.notifier.ready(f"running; {self.snapshot.counts['stacked']} stacked, queue {len(self._queue)}")
            await self._process_loop()  # returns on SIGTERM after the frame in hand
        finally:
            await self._shut_down(tasks)
        return 0

    async def _start_watching(self) -> None:
        """The watcher, then the files already there and not yet dealt with (oldest first)."""
        cap = self.config.capture
        self.watcher = FolderWatcher(self.capture_dir, self.enqueue, patterns=cap.patterns, recursive=cap.recursive,
                                     settle_s=cap.settle_s, force_polling=self.force_polling or cap.poll,
                                     on_sight=self._on_sight)
        self.watcher.start()
        found = backlog(self.capture_dir, cap.patterns, cap.recursive)
        for path in await self.job(lambda session: [p for p in found if not session.ledger.done(p)]):
            self.enqueue(path)
        log.info("backlog: %d frames to process", len(self._queue))

    async def _shut_down(self, tasks: list[asyncio.Task]) -> None:
        self.notifier.stopping()
        self.state = "stopped"
        if self.watcher is not None:
            self.watcher.stop()
        await self.plans.stop()
        await self.job(lambda session: session.try_checkpoint())
        await self.write_products(force=True)
        self.publish_status()
        if self.mqtt is not None:
            await self.mqtt.flush(timeout_s=2.0)  # queued events go out; a down broker does not hold us
            await self.mqtt.close()
        if self.web is not None:
            await self.web.stop()
        await self.pointing.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.job(lambda session: session.close())
        self._executor.shutdown(wait=True)
        counts = self.snapshot.counts
        log.info("stopped: %d stacked, %d rejected, %d errors", counts["stacked"], counts["rejected"],
                 counts["errors"])

