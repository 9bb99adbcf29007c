"""The daemon: watcher -> queue -> live pipeline (worker thread) -> checkpoint, products, MQTT.

Threads and ownership (why it cannot race): the event loop owns the queue, the MQTT link and
the status; ONE worker thread owns the pipelines and the ledger. Everything that touches a
pipeline (process, reset, set_reference, state for the checkpoint, the preview) runs in that
thread, one job at a time, so a checkpoint always sees a stack and a ledger that agree.

A stack per (target, filter, exposure, binning): a frame of another target or filter goes to
its own stack. The "current" stack is the one that received the last frame.

Commands arrive as JSON on <prefix>cmd; each gets a reply on <prefix>cmd/result with the same
id. A command that does not validate is refused before anything changes.

Acquisition (with [indi]): one plan at a time, the config's [plan] at start or one sent with the
`plan` command. Its frames reach the stacks only through the watcher, like any other program's.
A calibration plan (dark, bias, flat, darkflat) ends in a master built from its frames; from then
on that master calibrates every new stack (and any stack still empty), and the checkpoint keeps
it, so a restart calibrates the same way.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import json
import logging
import re
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from daemon import checkpoint
from daemon.settings import PlanSettings
from daemon.commands import MASTER_KINDS, CommandError, plan_from_command, validate_command
from daemon.config import Config
from daemon.folders import ensure_dir
from daemon.ledger import Ledger
from daemon.memory import retain_freed_memory
from daemon.sdnotify import Notifier, watchdog_interval_s
from daemon.warmup import ensure_warm
from daemon.watcher import FolderWatcher, backlog

log = logging.getLogger("lightbucket")


class PipelineFactory(Protocol):
    """Makes the per-stack pipelines, calibrated with the given master files ({kind: path})."""

    def new(self, masters: dict[str, str]) -> Any: ...

    def restore(self, state: dict, masters: dict[str, str]) -> Any: ...


class LivePipelineFactory:
    """LivePipeline with LiveSettings from [stack]/[quality]; masters loaded once per set of files."""

    def __init__(self, config: Config):
        from daemon.pipeline.live import LiveSettings

        try:
            self.settings = LiveSettings.from_config(config.stack, config.quality)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{config.source}: {exc}") from exc
        self._loaded: dict[tuple, Any] = {}
        cal = config.calibration
        self.masters_for({k: str(getattr(cal, k)) for k in MASTER_KINDS if getattr(cal, k)})  # fail at start

    def masters_for(self, paths: dict[str, str]):
        """The loaded Masters of these files (None for none). Raises FrameError/MasterError
        (ValueError) when a file is unreadable or they do not fit together."""
        key = tuple(sorted(paths.items()))
        if not key:
            return None
        if key not in self._loaded:
            from daemon.masters import load_masters

            self._loaded[key] = load_masters(**paths)
        return self._loaded[key]

    def new(self, masters: dict[str, str]):
        from daemon.pipeline.live import LivePipeline

        return LivePipeline(self.settings, self.masters_for(masters))

    def restore(self, state: dict, masters: dict[str, str]):
        from daemon.pipeline.live import LivePipeline

        return LivePipeline.from_state(state, self.settings, self.masters_for(masters))


@dataclass(frozen=True)
class StackKey:
    target: str
    filter: str
    exposure_s: float
    binning: int

    @property
    def name(self) -> str:
        """File-system safe: 'M27_L_300s_bin1'."""
        exp = f"{self.exposure_s:g}s"
        return _safe_name(f"{self.target}_{self.filter}_{exp}_bin{self.binning}")

    @classmethod
    def of(cls, meta) -> StackKey:
        binning = meta.binning[0] if isinstance(meta.binning, (tuple, list)) else int(meta.binning or 1)
        return cls(meta.target or "unknown", meta.filter or "none", float(meta.exposure_s or 0.0), int(binning))


@dataclass
class Stack:
    key: StackKey
    pipeline: Any
    #: Master files ({kind: path}) this stack is calibrated with: those in use when it began.
    masters: dict[str, str] = field(default_factory=dict)


@dataclass
class Outcome:
    """What happened to one file, built in the worker thread for the loop to publish."""

    path: Path
    outcome: str  # "stacked" | "rejected" | "error" | "skipped"
    stack: str | None = None
    key: StackKey | None = None
    result: Any = None
    reason: str | None = None
    n_stacked: int = 0
    total_exposure_s: float = 0.0


def _result_fields(result: Any) -> dict:
    keys = ("accepted", "reason", "stars", "fwhm_px", "eccentricity", "dx", "dy", "rotation_deg",
            "background", "weight", "processing_ms")
    return {k: getattr(result, k, None) for k in keys}


class Service:
    def __init__(self, config: Config, *, factory: PipelineFactory | None = None,
                 loader: Callable[[Path], Any] | None = None, notifier: Notifier | None = None,
                 force_polling: bool = False, acquire_at_start: bool = True):
        self.config = config
        self.factory = factory if factory is not None else LivePipelineFactory(config)
        if loader is None:
            from daemon.io.load import FrameLoader, LoadOptions

            loader = FrameLoader(LoadOptions(config.capture.max_frame_bytes, config.capture.tiff_bayer))
        self.loader = loader
        self.notifier = notifier or Notifier()
        self.force_polling = force_polling
        #: False: [plan] waits for a `start` command (or run_plan), e.g. to take darks first.
        self.acquire_at_start = acquire_at_start
        self.capture_dir = Path(config.capture.dir)
        self.state_dir = Path(config.state.dir)
        self.output_dir = config.output_dir
        for path, setting, write in ((self.state_dir, "state.dir", True),
                                     (self.output_dir, "state.output_dir", True),
                                     # its own camera's frames are written there
                                     (self.capture_dir, "capture.dir", config.indi is not None)):
            ensure_dir(path, setting, writable=write)
        self.ledger = Ledger(self.capture_dir)
        self.stacks: dict[str, Stack] = {}
        self._spools: dict[str, Any] = {}
        self.current: str | None = None
        self.session = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        self.state = "starting"
        #: Files dealt with since the session began (the ledger's view; restored with it).
        self.counts = {"stacked": 0, "rejected": 0, "errors": 0}
        self.last_frame: dict | None = None
        #: The last rejected frame: path, reason, time (status `last_reject`).
        self.last_reject: dict | None = None
        #: The running (or last) plan's latest progress event, also in `status` as "plan".
        self.plan_progress: dict | None = None
        self.mqtt = None
        #: Callbacks (kind, payload) for every event published (the web page's live channel).
        self._listeners: list[Callable[[str, dict], None]] = []
        self._preview: tuple[bytes, dict] | None = None  # the latest (JPEG, preview/meta)
        self._transfers: dict[tuple[str, int], Any] = {}  # (stack, n_stacked) -> ScreenTransfer
        self.web = None
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="pipeline")
        #: The spool writer: a frame's float16 copy is written while the next frame is processed
        #: (on a Pi's SD card ~1 s per 26 Mpx frame). At most one write waits; the checkpoint,
        #: and anything that reads or clears a spool, waits for it first (`_spool_drain`).
        from daemon.spool import writer_thread

        self._spooler = writer_thread()
        self._spool_pending: list[concurrent.futures.Future] = []
        self._queue: asyncio.Queue[Path] = asyncio.Queue()
        self._queued: set[str] = set()
        self._stop = asyncio.Event()
        self._running = asyncio.Event()
        self._in_hand = 0  # 1 while a frame is in the worker
        self._changed = asyncio.Event()  # queue or state changed: wakes the processing loop
        self._last_checkpoint = time.monotonic()
        self._unsaved = False  # frames dealt with since the last checkpoint
        self._last_products = 0.0
        self._products_dirty = False
        self._acq_task: asyncio.Task | None = None
        self._acq_stop: asyncio.Event | None = None
        #: Master files in use, by kind: the config's [calibration], then those built here.
        cal = config.calibration
        self.masters: dict[str, str] = {k: str(getattr(cal, k)) for k in MASTER_KINDS if getattr(cal, k)}

    # ----------------------------------------------------------------- worker-thread side
    async def _in_worker(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _restore(self) -> None:
        state = checkpoint.load(self.state_dir)
        if state is None:
            return
        self.ledger = Ledger.from_json(state["ledger"], self.capture_dir)
        self.session = state.get("session", self.session)
        self.counts.update(state.get("counts", {}))
        self.current = state.get("current")
        self.masters = dict(state.get("masters", self.masters))
        for name, st in state.get("stacks", {}).items():
            masters = st.get("masters", self.masters)
            self.stacks[name] = Stack(StackKey(**st["key"]), self.factory.restore(st["pipeline"], masters),
                                      dict(masters))
            replay = st["pipeline"].get(checkpoint.REPLAY_KEY)
            if replay:  # the stack's snapshot is older than the checkpoint: the frames since again
                from daemon.spool import replay_stack

                done, missing = replay_stack(self.stacks[name].pipeline, replay, self.state_dir / "spool" / name)
                log.info("stack %s: %d frames replayed from the spool since its snapshot", name, done)
                if missing:
                    log.error("stack %s: %d stacked frames are not in the spool and are missing from the live "
                              "stack (first: %s)", name, len(missing), missing[0])
        log.info("resumed session %s from checkpoint: %s", self.session,
                 ", ".join(f"{n}: {s.pipeline.n_stacked} frames" for n, s in self.stacks.items()) or "no stacks")

    def _checkpoint(self) -> None:
        self._spool_drain()  # every frame the ledger calls stacked is in its spool
        state = {
            "version": 1,
            "session": self.session,
            "counts": dict(self.counts),
            "current": self.current,
            "masters": dict(self.masters),
            "ledger": self.ledger.to_json(),
            "stacks": {n: {"key": s.key.__dict__, "masters": s.masters, "pipeline": s.pipeline.state()}
                       for n, s in self.stacks.items()},
        }
        checkpoint.save(self.state_dir, state)
        self._last_checkpoint = time.monotonic()
        self._unsaved = False

    def _checkpoint_if_unsaved(self) -> None:
        if self._unsaved:
            self._try_checkpoint()

    def _try_checkpoint(self) -> None:
        """Checkpoint from the frame path: a full or failing disk is logged and retried with
        the next frame; stacking goes on (the stack in memory is intact)."""
        try:
            self._checkpoint()
        except OSError as exc:
            self._unsaved = True
            log.error("checkpoint to %s failed: %s (stacking goes on; retried)", self.state_dir, exc)

    def _stack_for(self, key: StackKey) -> Stack:
        stack = self.stacks.get(key.name)
        if stack is None:
            stack = self.stacks[key.name] = Stack(key, self.factory.new(self.masters), dict(self.masters))
            log.info("new stack %s", key.name)
        return stack

    def _process(self, path: Path, checkpoint_now: bool) -> Outcome:
        """Load, stack, record in the ledger and (if due) checkpoint one file."""
        out = self._process_one(path, checkpoint_now)
        if out.outcome != "skipped" and not checkpoint_now:
            self._unsaved = True
        return out

    def _process_one(self, path: Path, checkpoint_now: bool) -> Outcome:
        if self.ledger.done(path):
            return Outcome(path, "skipped")
        if not path.exists():
            return Outcome(path, "skipped", reason="file vanished")
        try:
            frame = self.loader(path)
        except (ValueError, OSError) as exc:
            reason = getattr(exc, "reason", None) or str(exc)
            self.ledger.record(path, "error", reason=reason)
            self.counts["errors"] += 1
            if checkpoint_now:
                self._try_checkpoint()
            return Outcome(path, "error", reason=reason)
        key = StackKey.of(frame.meta)
        stack = self._stack_for(key)
        try:
            result = stack.pipeline.process(frame, consume=True)
        except Exception as exc:  # noqa: BLE001 - one bad frame must not stop the night
            log.exception("pipeline failed on %s", path)
            reason = f"pipeline error: {type(exc).__name__}: {exc}"
            self.ledger.record(path, "error", stack=key.name, reason=reason)
            self.counts["errors"] += 1
            if checkpoint_now:
                self._try_checkpoint()
            return Outcome(path, "error", stack=key.name, key=key, reason=reason)
        outcome = "stacked" if result.accepted else "rejected"
        if result.accepted and getattr(result, "registered", None) is not None:
            self._spool(key.name, path, result, frame)
        self.ledger.record(path, outcome, stack=key.name, reason=result.reason)
        self.counts[outcome] += 1
        self.current = key.name
        self._products_dirty = True
        if checkpoint_now:
            self._try_checkpoint()
        return Outcome(path, outcome, key.name, key, result, result.reason,
                       stack.pipeline.n_stacked, stack.pipeline.total_exposure_s)

    def _spool(self, name: str, path: Path, result: Any, frame: Any) -> None:
        """Keep the registered frame for the final re-stack, written by the spool thread. Every
        frame a checkpoint records as stacked is in the spool (the checkpoint drains first);
        after a crash a frame may already be spooled: the spool is keyed by path."""
        from daemon.spool import encode

        # float16 here (parallel, ~3 ms at 12 Mpx), the float32 frame freed before the next
        # one; the writer thread only writes (and waits for the disk).
        image = encode(result.registered)
        result.registered = None
        self._spool_drain()  # back-pressure: one write in flight at most
        date_obs = frame.meta.date_obs.isoformat() if frame.meta.date_obs else None
        self._spool_pending.append(self._spooler.submit(
            self._spool_write, name, str(path), image, result.weight, date_obs, frame.meta.exposure_s))

    def _spool_write(self, name: str, path: str, image: Any, weight: float, date_obs: str | None,
                     exposure_s: float | None) -> None:
        from daemon.spool import Spool

        try:
            if name not in self._spools:
                self._spools[name] = Spool(self.state_dir / "spool" / name)
            spool = self._spools[name]
            if path not in spool:
                spool.append(image, weight=weight, path=path, date_obs=date_obs, exposure_s=exposure_s)
        except (OSError, ValueError) as exc:  # the live stack has the frame; only restack misses it
            log.error("spooling %s for the final re-stack failed: %s", path, exc)

    def _spool_drain(self) -> None:
        """Wait for the spool writes in flight (worker thread)."""
        while self._spool_pending:
            self._spool_pending.pop(0).result()


    def _build_master(self, plan: PlanSettings, paths: list[str]) -> Path:
        """Combine a calibration plan's frames into a master under <state>/masters and use it
        for new stacks (and stacks still empty). Dark and flat masters have the bias (or, for
        flats, the dark-flat) in use subtracted, so darks scale with exposure."""
        from daemon.masters import build_master

        kind = plan.frame_type
        exposure = f"_{plan.exposure_s:g}s" if kind in ("dark", "darkflat") else ""
        filt = f"_{plan.filter}" if kind in ("flat", "darkflat") and plan.filter else ""
        name = _safe_name(f"{kind}{filt}{exposure}_{self.session}")
        out = self.state_dir / "masters" / f"{name}.fits"
        out.parent.mkdir(parents=True, exist_ok=True)
        sub = {}
        if kind in ("dark", "flat") and "bias" in self.masters:
            sub["bias"] = self.masters["bias"]
        if kind == "flat" and "darkflat" in self.masters:
            sub = {"darkflat": self.masters["darkflat"]}
        build_master(kind, paths, out, **sub)
        masters = {**self.masters, kind: str(out)}
        # new() raises (and nothing has changed yet) if the masters do not load or fit together.
        fresh = {n: self.factory.new(masters) for n, s in self.stacks.items() if s.pipeline.n_stacked == 0}
        if not fresh:
            self.factory.new(masters)
        self.masters = masters
        for name, pipeline in fresh.items():
            self.stacks[name].pipeline, self.stacks[name].masters = pipeline, dict(masters)
        self._checkpoint()
        log.info("master %s from %d frames: %s (used for new stacks)", kind, len(paths), out)
        return out

    def _products(self, max_edge: int) -> tuple[bytes, dict] | None:
        """Write the current stack FITS (+ preview.jpg) and return the preview for MQTT."""
        self._products_dirty = False
        stack = self.stacks.get(self.current or "")
        if stack is None or stack.pipeline.n_stacked == 0:
            return None
        try:
            from daemon.products import preview_jpeg, write_stack
        except ImportError as exc:
            log.warning("products not available: %s", exc)
            return None
        self.output_dir.mkdir(parents=True, exist_ok=True)
        write_stack(self.output_dir / f"{stack.key.name}.fits", stack.pipeline, masters=stack.masters)
        image = stack.pipeline.stack_image()
        if image is None:
            return None
        jpeg = preview_jpeg(image, max_edge=max_edge)
        tmp = self.output_dir / ".preview.jpg.tmp"
        tmp.write_bytes(jpeg)
        tmp.replace(self.output_dir / "preview.jpg")
        meta = {
            "stack": stack.key.name, "target": stack.key.target, "filter": stack.key.filter,
            "exposure_s": stack.key.exposure_s, "frames": stack.pipeline.n_stacked,
            "total_exposure_s": stack.pipeline.total_exposure_s, "width": int(image.shape[1]),
            "height": int(image.shape[0]), "bytes": len(jpeg), "format": "jpeg",
            "time": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        return jpeg, meta

    # ----------------------------------------------------------------- event-loop side
    def enqueue(self, path: Path) -> None:
        key = str(path)
        if key in self._queued:
            return
        self._queued.add(key)
        self._queue.put_nowait(path)
        self._changed.set()
        self.publish_status()

    def status(self) -> dict:
        stack = self.stacks.get(self.current or "")
        try:
            disk_free = shutil.disk_usage(self.output_dir if self.output_dir.exists() else self.state_dir).free
        except OSError:
            disk_free = None
        return {
            "state": self.state,
            "session": self.session,
            "stack": stack.key.name if stack else None,
            "target": stack.key.target if stack else None,
            "filter": stack.key.filter if stack else None,
            "exposure_s": stack.key.exposure_s if stack else None,
            "frames": {"received": sum(self.counts.values()) + self._queue.qsize() + self._in_hand, **self.counts},
            "stacked_current": stack.pipeline.n_stacked if stack else 0,
            "total_exposure_s": stack.pipeline.total_exposure_s if stack else 0.0,
            "stacks": {n: s.pipeline.n_stacked for n, s in self.stacks.items()},
            "queue": self._queue.qsize(),
            "last_frame": self.last_frame,
            "last_reject": self.last_reject,
            "plan": self.plan_progress,
            "disk_free_bytes": disk_free,
            "state_bytes": self._state_bytes(),
            "time": datetime.now(UTC).isoformat(timespec="seconds"),
        }

    def _state_bytes(self) -> int:
        """Disk use of the state folder (spool, checkpoint, snapshots, masters), bytes; counted
        at most every 30 s (status goes out on every frame)."""
        now = time.monotonic()
        cached = getattr(self, "_state_bytes_cache", None)
        if cached is None or now - cached[0] > 30:
            from daemon.spool import folder_bytes

            cached = self._state_bytes_cache = (now, folder_bytes(self.state_dir))
        return cached[1]

    def publish_status(self) -> None:
        if self.mqtt is not None or self._listeners:
            status = self.status()
            if self.mqtt is not None:
                self.mqtt.set_status(status)
            self._emit("status", status)

    # ----------------------------------------------------------------- public interface (web page)
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

    async def command(self, payload: dict) -> dict:
        """Run one command (the MQTT `cmd` JSON) and return its `cmd/result` JSON, as MQTT does."""
        reply = await self.handle_command(json.dumps(payload).encode())
        self._emit("cmd/result", reply)
        return reply

    def preview(self) -> tuple[bytes, dict] | None:
        """The latest preview (JPEG bytes, preview/meta), or None before the first."""
        return self._preview

    async def stack_preview(self, stack: str) -> tuple[bytes, int, int]:
        """The preview JPEG of any stack and its full width and height (px), made on the worker
        (which owns the stack). KeyError for an unknown or empty stack."""
        from daemon.products import preview_jpeg

        def make():
            st = self.stacks.get(stack)
            image = st.pipeline.stack_image() if st is not None and st.pipeline.n_stacked else None
            if image is None:
                raise KeyError(f"no stacked image for {stack!r}")
            max_edge = self.config.mqtt.preview_max_edge if self.config.mqtt else 1280
            return preview_jpeg(image, max_edge=max_edge), int(image.shape[1]), int(image.shape[0])

        return await self._in_worker(make)

    async def tile(self, stack: str, x: int, y: int, size: int) -> bytes:
        """A full-resolution JPEG crop of `stack` around (x, y), stretched like the preview: the
        crop is copied on the worker (which owns the stack), stretched in a thread. KeyError
        for an unknown or empty stack."""
        from daemon.web.tiles import crop_for_tile, tile_jpeg  # only with [web]

        def crop():
            st = self.stacks.get(stack)
            image = st.pipeline.stack_image() if st is not None else None
            if image is None:
                raise KeyError(f"no stacked image for {stack!r}")
            key = (stack, st.pipeline.n_stacked)
            max_edge = self.config.mqtt.preview_max_edge if self.config.mqtt else 1280
            out = crop_for_tile(image, x, y, size, self._transfers.get(key), max_edge=max_edge)
            self._transfers = {key: out.transfer}
            return out

        return await asyncio.to_thread(tile_jpeg, await self._in_worker(crop))

    def _set_state(self, state: str) -> None:
        self.state = state
        (self._running.set if state == "running" else self._running.clear)()
        self._changed.set()
        self.notifier.status(f"{state}; {self.counts['stacked']} stacked, queue {self._queue.qsize()}")
        self.publish_status()

    async def _next_path(self) -> Path | None:
        """The next queued file once running, or None when shutting down. Files left in the
        queue at shutdown are not in the ledger, so the backlog scan finds them again."""
        while not self._stop.is_set():
            self._changed.clear()
            if self._running.is_set() and not self._queue.empty():
                path = self._queue.get_nowait()
                self._queued.discard(str(path))
                return path
            changed = asyncio.ensure_future(self._changed.wait())
            stop = asyncio.ensure_future(self._stop.wait())
            await asyncio.wait({changed, stop}, return_when=asyncio.FIRST_COMPLETED)
            changed.cancel()
            stop.cancel()
        return None

    async def _process_loop(self) -> None:
        every = self.config.state.checkpoint_every_s
        while True:
            path = await self._next_path()
            if path is None:
                return
            due = every <= 0 or time.monotonic() - self._last_checkpoint >= every
            self._in_hand = 1
            try:
                out = await self._in_worker(self._process, path, due)
            finally:
                self._in_hand = 0
            self._report(out)
            await self._maybe_products()

    def _report(self, out: Outcome) -> None:
        if out.outcome == "skipped":
            return
        name = str(out.path)
        if out.outcome == "error":
            log.warning("frame %s: not stacked: %s", name, out.reason)
            event = {"path": name, "accepted": False, "error": True, "reason": out.reason, "stack": out.stack}
        else:
            r = out.result
            event = {"path": name, **_result_fields(r), "stack": out.stack}
            metrics = f"stars={r.stars} fwhm={_fmt(r.fwhm_px)}px dx={_fmt(r.dx)} dy={_fmt(r.dy)} {r.processing_ms:.0f}ms"
            if r.accepted:
                log.info("frame %s: stacked #%d in %s (%s)", name, out.n_stacked, out.stack, metrics)
            else:
                log.info("frame %s: rejected: %s (%s)", name, r.reason, metrics)
        event["time"] = datetime.now(UTC).isoformat(timespec="seconds")
        self.last_frame = event
        if not event.get("accepted"):
            self.last_reject = {k: event.get(k) for k in ("path", "reason", "stack", "time")}
        self.publish_event("frame", event)
        self.notifier.status(f"{self.state}; {self.counts['stacked']} stacked, queue {self._queue.qsize()}")
        self.publish_status()

    async def _maybe_products(self, force: bool = False) -> None:
        interval = self.config.mqtt.preview_interval_s if self.config.mqtt else 5.0
        if not self._products_dirty:
            return
        if not force and not self._queue.empty() and time.monotonic() - self._last_products < interval:
            return  # coalesced: frames are waiting, the preview can wait too
        self._last_products = time.monotonic()
        max_edge = self.config.mqtt.preview_max_edge if self.config.mqtt else 1280
        try:
            preview = await self._in_worker(self._products, max_edge)
        except Exception:  # noqa: BLE001 - a failed preview/FITS must not stop stacking
            log.exception("writing products failed")
            return
        if preview:
            self._preview = preview
            if self.mqtt is not None:
                self.mqtt.set_preview(*preview)
            self._emit("preview", preview[1])

    # ----------------------------------------------------------------- commands
    async def _command_loop(self) -> None:
        while True:
            raw = await self.mqtt.commands.get()
            reply = await self.handle_command(raw)
            self.publish_event("cmd/result", reply)

    async def handle_command(self, raw: bytes) -> dict:
        cmd_id = None
        try:
            try:
                loose = json.loads(raw)
                if isinstance(loose, dict) and isinstance(loose.get("id"), (str, int)):
                    cmd_id = loose["id"]
            except (ValueError, UnicodeDecodeError):
                pass
            cmd = validate_command(raw)
            detail = await self._execute(cmd)
            log.info("command %s (id %s): ok", cmd["action"], cmd_id)
            return {"id": cmd_id, "ok": True, "action": cmd["action"], **(detail or {})}
        except CommandError as exc:
            log.warning("command refused (id %s): %s", cmd_id, exc)
            return {"id": cmd_id, "ok": False, "error": str(exc)}
        except Exception as exc:  # noqa: BLE001 - a failing command must not end the command loop
            log.exception("command failed (id %s)", cmd_id)
            return {"id": cmd_id, "ok": False, "error": f"{type(exc).__name__}: {exc}"}

    def _named_stack(self, name: str | None) -> Stack:
        name = name or self.current
        if name not in self.stacks:
            raise CommandError(f"no stack named {name!r} (stacks: {', '.join(self.stacks) or 'none'})")
        return self.stacks[name]

    async def _execute(self, cmd: dict) -> dict | None:
        action = cmd["action"]
        if action in ("pause", "resume"):
            if action == "resume" and self.state == "stopped":
                raise CommandError("resume: stacking is stopped; use start")
            self._set_state("paused" if action == "pause" else "running")
        elif action == "start":
            self._set_state("running")
            self._start_acquisition()
        elif action == "plan":
            if self.config.indi is None:
                raise CommandError("plan: no [indi] section in the config: nothing to acquire with")
            if self._acq_task is not None and not self._acq_task.done():
                raise CommandError("plan: a plan is running; send stop first")
            plan = plan_from_command(cmd, self.config.plan)
            if self.state != "running":
                self._set_state("running")
            self._start_acquisition(plan)
            return {"plan": dataclasses.asdict(plan)}
        elif action == "stop":
            await self._stop_acquisition()
            self._set_state("stopped")
            await self._maybe_products(force=True)
        elif action == "reset":
            stack = self._named_stack(cmd.get("stack"))
            removed = await self._in_worker(self._reset, stack)
            self.publish_status()
            return {"stack": stack.key.name, "removed": removed}
        elif action == "set_reference":
            path = Path(cmd["path"])
            path = (path if path.is_absolute() else self.capture_dir / path).resolve()
            if not path.is_relative_to(self.capture_dir.resolve()):
                raise CommandError(f"set_reference: {cmd['path']} is not under the capture folder {self.capture_dir}")
            name, again, removed = await self._in_worker(self._set_reference, path)
            for p in sorted(again, key=lambda p: (p.stat().st_mtime if p.exists() else 0, str(p))):
                self.enqueue(p)
            self.publish_status()
            return {"stack": name, "requeued": len(again), "removed": removed}
        elif action == "restack":
            stack = self._named_stack(cmd.get("stack"))
            out = await self._in_worker(self._restack, stack)
            return {"stack": stack.key.name, "path": str(out)}
        return None

    def _reset(self, stack: Stack) -> dict:
        """Empty the stack and its spool; returns what was removed (for the reply)."""
        frames = stack.pipeline.n_stacked
        spooled = self._clear_spool(stack.key.name)
        stack.pipeline.reset()
        self._checkpoint()
        return {"frames": frames, "spooled_frames": spooled, "spool": str(self.state_dir / "spool" / stack.key.name)}

    def _set_reference(self, path: Path) -> tuple[str, list[Path], dict]:
        """New reference for the frame's stack. The pipeline empties that stack (coordinates
        change), so its frames are taken out of the ledger and returned for re-processing
        against the new reference; the spool (old coordinates) is cleared."""
        try:
            frame = self.loader(path)
        except (ValueError, OSError) as exc:
            raise CommandError(f"set_reference: cannot load {path}: {getattr(exc, 'reason', None) or exc}") from None
        stack = self._stack_for(StackKey.of(frame.meta))
        frames = stack.pipeline.n_stacked
        stack.pipeline.set_reference(frame)
        spooled = self._clear_spool(stack.key.name)
        again = []
        for key, entry in list(self.ledger.entries.items()):
            if entry.stack == stack.key.name and entry.outcome in ("stacked", "rejected"):
                del self.ledger.entries[key]
                self.counts[entry.outcome] -= 1
                again.append(self.capture_dir / key)
        self._checkpoint()
        return stack.key.name, again, {"frames": frames, "spooled_frames": spooled,
                                       "spool": str(self.state_dir / "spool" / stack.key.name)}

    def _clear_spool(self, name: str) -> int:
        """Delete the stack's spooled frames; returns how many there were."""
        self._spool_drain()
        spool_dir = self.state_dir / "spool" / name
        self._spools.pop(name, None)
        if not spool_dir.exists():
            return 0
        from daemon.spool import Spool

        spool = Spool(spool_dir)
        n = len(spool)
        spool.clear()
        return n

    def _restack(self, stack: Stack) -> Path:
        """Final winsorized sigma-clipped combine of the spooled frames -> <stack>_final.fits."""
        from daemon.pipeline.restack import restack
        from daemon.products import write_stack
        from daemon.spool import Spool

        self._spool_drain()
        spool_dir = self.state_dir / "spool" / stack.key.name
        spool = Spool(spool_dir) if spool_dir.exists() else None
        if spool is None or len(spool) == 0:
            raise CommandError(f"restack: no spooled frames for stack {stack.key.name}")
        # Only frames the ledger has as stacked here (a frame spooled just before a crash and
        # rejected when processed again after it is left out).
        stacked = {str((self.capture_dir / k).resolve()) for k, e in self.ledger.entries.items()
                   if e.outcome == "stacked" and e.stack == stack.key.name}
        entries = [e for e in spool.entries if e.get("path") and str(Path(e["path"]).resolve()) in stacked]
        if not entries:
            raise CommandError(f"restack: no spooled frames for stack {stack.key.name}")
        result = restack([spool.open(e) for e in entries], [e["weight"] for e in entries],
                         [e["scale"] for e in entries])
        out = self.output_dir / f"{stack.key.name}_final.fits"
        self.output_dir.mkdir(parents=True, exist_ok=True)
        provenance = [{k: e.get(k) for k in ("path", "weight", "date_obs", "exposure_s")} for e in entries]
        write_stack(out, result.image, provenance, method="final", masters=stack.masters, pipeline=stack.pipeline,
                    reference=getattr(stack.pipeline, "reference_path", None),
                    rejected={"low": result.rejected_low, "high": result.rejected_high})
        log.info("restack of %s: %d frames -> %s", stack.key.name, result.n_frames, out)
        return out

    # ----------------------------------------------------------------- acquisition
    def _start_acquisition(self, plan: PlanSettings | None = None) -> asyncio.Task | None:
        """Run `plan` (default: the config's [plan]) as a task, unless one is running."""
        if self.config.indi is None or (self._acq_task and not self._acq_task.done()):
            return None
        plan = plan or self.config.plan
        if plan is None:
            log.warning("%s: [indi] without [plan]: nothing to acquire, watching only", self.config.source)
            return None
        from daemon.acquisition import run_acquisition

        self._acq_stop = asyncio.Event()
        service = self
        config = dataclasses.replace(self.config, plan=plan)

        class Events:
            async def publish(self, kind: str, payload: dict) -> None:
                if kind == "plan":
                    service.plan_progress = {k: v for k, v in payload.items() if k != "paths"}
                    service.publish_status()
                service.publish_event("acquisition", {"event": kind, **payload})

        async def run() -> dict:
            try:
                summary = await run_acquisition(config, Events(), self._acq_stop)
            except Exception as exc:  # noqa: BLE001 - stacking of what arrives goes on
                log.exception("acquisition failed")
                error = f"{type(exc).__name__}: {exc}"
                self.publish_event("acquisition", {"event": "error", "error": error})
                return {"state": "failed", "frames": 0, "paths": [], "error": error}
            log.info("acquisition %s: %s frames", summary.get("state"), summary.get("frames"))
            self.publish_event("acquisition", {"event": "finished", **summary})
            paths = summary.get("paths") or []
            if plan.frame_type == "light" and summary.get("state") == "done" and paths:
                summary["final"] = await self._final_restack(paths)
            if plan.frame_type != "light" and (summary.get("state") == "done" or len(paths) >= 3) and paths:
                try:
                    out = await self._in_worker(self._build_master, plan, paths)
                    summary["master"] = str(out)
                    self.publish_event("acquisition", {"event": "master", "kind": plan.frame_type,
                                                       "path": str(out), "frames": len(paths)})
                except (ValueError, OSError) as exc:
                    log.error("master %s from %d frames not built: %s", plan.frame_type, len(paths), exc)
                    summary["error"] = f"master not built: {exc}"
                    self.publish_event("acquisition", {"event": "error", "error": summary["error"]})
            return summary

        self._acq_task = asyncio.create_task(run())
        return self._acq_task

    async def _final_restack(self, paths: list[str], timeout_s: float = 600.0) -> str | None:
        """The session-end product of a light plan that ran to its end: once its frames are all
        processed, the final re-stack of their stack (what `restack` does on demand)."""
        if not await self.wait_processed(paths, timeout_s):
            log.warning("final re-stack skipped: frames of the plan still unprocessed after %g s", timeout_s)
            return None
        entry = self.ledger.entries.get(self.ledger.key(paths[-1]))
        stack = self.stacks.get(entry.stack if entry else "")
        if stack is None:
            return None
        try:
            out = await self._in_worker(self._restack, stack)
        except (CommandError, ValueError, OSError) as exc:
            log.error("final re-stack of %s not written: %s", stack.key.name, exc)
            return None
        self.publish_event("acquisition", {"event": "final", "stack": stack.key.name, "path": str(out)})
        return str(out)

    async def run_plan(self, plan: PlanSettings) -> dict:
        """Run one plan to its end and return its summary (state, frames, paths, master)."""
        if self._acq_task is not None and not self._acq_task.done():
            raise RuntimeError("a plan is already running")
        task = self._start_acquisition(plan)
        if task is None:
            raise RuntimeError("no [indi] section: nothing to acquire with")
        return await task

    async def wait_processed(self, paths: list[str | Path], timeout: float) -> bool:
        """Wait until every one of `paths` is in the ledger (stacked, rejected or error)."""
        deadline = time.monotonic() + timeout
        while not all(self.ledger.done(Path(p)) for p in paths):
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.1)
        return True

    async def _stop_acquisition(self) -> None:
        if self._acq_task and not self._acq_task.done():
            self._acq_stop.set()
            try:
                await asyncio.wait_for(asyncio.shield(self._acq_task), 30)
            except TimeoutError:
                self._acq_task.cancel()

    # ----------------------------------------------------------------- lifecycle
    async def _heartbeat(self) -> None:
        """Watchdog pings from the event loop itself (a blocked loop stops them, and systemd
        restarts us), and a status refresh every 30 s (disk_free_bytes, time)."""
        interval = watchdog_interval_s()
        period = min(interval or 30.0, 30.0)
        last_status = time.monotonic()
        while True:
            if interval:
                self.notifier.watchdog()
            await asyncio.sleep(period)
            if time.monotonic() - last_status >= 30.0:
                last_status = time.monotonic()
                self.publish_status()

    async def _periodic_checkpoint(self, every: float) -> None:
        """With checkpoint_every_s > 0: save frames stacked since the last checkpoint once
        `every` seconds have passed, also when no further frame arrives to trigger it. A task
        of its own: waiting for the busy worker must never delay the watchdog pings."""
        while True:
            await asyncio.sleep(max(every / 4, 0.5))
            if self._unsaved and time.monotonic() - self._last_checkpoint >= every:
                await self._in_worker(self._checkpoint_if_unsaved)

    async def _start_web(self) -> None:
        """The page and HTTP API ([web]); a port in use or unreadable TLS files are logged and
        the daemon stacks on without the page (it runs unattended: stacking comes first)."""
        from daemon.web.server import WebServer  # aiohttp: only with [web]

        web = WebServer(self, self.config.web)
        try:
            await web.start()
        except (OSError, ValueError) as exc:
            log.error("%s: [web] %s:%d: the page is not served: %s", self.config.source,
                      self.config.web.host, self.config.web.port, exc)
            return
        self.web = web

    def request_stop(self) -> None:
        log.info("stop requested: finishing the frame in hand")
        self._stop.set()

    async def run(self) -> int:
        retain_freed_memory()  # before the pipeline thread starts: see daemon.memory
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        await self._in_worker(self._restore)
        # numba's kernels compiled (a cold cache) or loaded before READY, so the first frame
        # is as fast as the tenth (daemon.warmup).
        warmed = await self._in_worker(ensure_warm)
        if warmed is not None:
            log.info("numba kernels compiled and cached in %.1f s", warmed)
        tasks: list[asyncio.Task] = []
        if self.config.mqtt is not None:
            from daemon.mqtt import MqttLink
            from daemon.web import page_url

            web = self.config.web
            self.mqtt = MqttLink(self.config.mqtt, page_url=page_url(web.host, web.port, web.cert_file is not None)
                                 if web is not None else None)
            tasks.append(asyncio.create_task(self.mqtt.run(), name="mqtt"))
            tasks.append(asyncio.create_task(self._command_loop(), name="commands"))
        if self.config.web is not None:
            await self._start_web()
        watcher = FolderWatcher(self.capture_dir, self.enqueue, patterns=self.config.capture.patterns,
                                recursive=self.config.capture.recursive, settle_s=self.config.capture.settle_s,
                                force_polling=self.force_polling or self.config.capture.poll)
        watcher.start()
        self.watcher = watcher
        for path in backlog(self.capture_dir, self.config.capture.patterns, self.config.capture.recursive):
            if not self.ledger.done(path):
                self.enqueue(path)
        log.info("backlog: %d frames to process", self._queue.qsize())
        self._set_state("running")
        tasks.append(asyncio.create_task(self._heartbeat(), name="heartbeat"))
        if self.config.state.checkpoint_every_s > 0:
            tasks.append(asyncio.create_task(self._periodic_checkpoint(self.config.state.checkpoint_every_s)))
        if self.acquire_at_start:
            self._start_acquisition()
        self.notifier.ready(f"running; {self.counts['stacked']} stacked, queue {self._queue.qsize()}")
        try:
            await self._process_loop()  # returns on SIGTERM after the frame in hand
        finally:
            self.notifier.stopping()
            self.state = "stopped"
            watcher.stop()
            await self._stop_acquisition()
            await self._in_worker(self._checkpoint)
            await self._maybe_products(force=True)
            self.publish_status()
            if self.mqtt is not None and self.mqtt.connected.is_set():
                # Give queued events a moment to go out; a down broker does not hold us up.
                deadline = time.monotonic() + 2.0
                while (self.mqtt.backlog or self.mqtt._dirty) and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                await self.mqtt.close()
            if self.web is not None:
                await self.web.stop()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._executor.shutdown(wait=True)
            self._spooler.shutdown(wait=True)
            log.info("stopped: %d stacked, %d rejected, %d errors", self.counts["stacked"],
                     self.counts["rejected"], self.counts["errors"])
        return 0


def _safe_name(text: str) -> str:
    """File-system safe: runs of anything but letters, digits and _.+- become '-'."""
    return re.sub(r"[^A-Za-z0-9_.+-]+", "-", text)


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"
