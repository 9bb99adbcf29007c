"""The night's stacks and everything that must agree with them, owned by one worker thread.

`Session` holds the stacks (one live pipeline per `daemon.routing.StackKey`), the ledger of
files dealt with, the masters in use and the spools. Every method runs on the service's one
worker thread, one job at a time, so a checkpoint always sees stacks and a ledger that agree,
and no other thread ever reads them. After each job the worker hands the event loop an
immutable `SessionSnapshot`; the loop builds `status` from that alone.

Crash safety: the ledger and the stacks go into one atomic checkpoint (daemon.checkpoint); a
file is either stacked and recorded, or neither. The file being processed is marked on disk
(`daemon.ledger.InHand`): one the process died with (a decoder crash, out of memory,
kill -9) is read once more at the next start, and quarantined if the process dies with it again.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol

from daemon import checkpoint
from daemon.config import Config, ConfigError, coerce, parse_override
from daemon.io.load import FrameLoader
from daemon.ledger import InHand, Ledger, quarantine_left_over
from daemon.masters import build_master, load_masters
from daemon.names import safe_filename
from daemon.pipeline.frame import FrameType
from daemon.pipeline.live import LivePipeline
from daemon.pipeline.live_settings import LiveSettings
from daemon.pipeline.quality import QualitySettings
from daemon.pipeline.restack import restack
from daemon.products import preview_jpeg, write_stack
from daemon.routing import StackKey
from daemon.spool import SpoolWriter, replay_stack

log = logging.getLogger("lightbucket")

class SessionError(ValueError):
    """A request the session cannot carry out (no such stack, nothing spooled); says why."""


def live_settings(config: Config) -> LiveSettings:
    """The live pipeline's settings from the config's [stack] and [quality]."""
    return live_settings_from(config.stack, config.quality, config.source)


def live_overrides(items: Iterable[str]) -> dict[str, dict]:
    """`--set` items for the live pipeline, parsed as the daemon's `--set` is
    (`daemon.config.parse_override`: `stack.kappa=2.5`, the value as TOML); a bare key
    (`kappa=2.5`) is looked up in [quality], else [stack]. Returns {"stack": {...},
    "quality": {...}}; ConfigError naming the item for any other section or a malformed item."""
    quality_keys = {f.name for f in dataclasses.fields(QualitySettings)}
    tables: dict[str, dict] = {"stack": {}, "quality": {}}
    for item in items:
        section, key, value = parse_override(item if "." in item.partition("=")[0] else f"_.{item}")
        if section == "_":
            section = "quality" if key in quality_keys else "stack"
        if section not in tables:
            raise ConfigError(f"--set {item!r}: only [stack] and [quality] settings apply here")
        tables[section][key] = value
    return tables


def live_settings_from(stack: dict, quality: dict, source: str) -> LiveSettings:
    """LiveSettings from [stack] and [quality] tables, each value checked against its type as
    every other config value is. Raises ValueError naming `source` and the key (`stack.kapa`),
    so a typo stops the daemon at start."""
    hints = typing.get_type_hints(LiveSettings)
    tables = {name: {k: coerce(v, hints[k], f"{source}: [{name}] {k}") if k in hints else v
                     for k, v in table.items()} for name, table in (("stack", stack), ("quality", quality))}
    try:
        return LiveSettings.from_config(tables["stack"], tables["quality"])
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{source}: {exc}") from exc


class PipelineFactory(Protocol):
    """Makes the per-stack pipelines, calibrated with the given master files ({kind: path})."""

    def new(self, masters: dict[str, str]) -> Any: ...

    def restore(self, state: dict, masters: dict[str, str]) -> Any: ...


class LivePipelineFactory:
    """LivePipeline with the given settings; masters loaded once per set of files.

    Raises FrameError/MasterError (ValueError) at construction when the config's masters are
    unreadable or do not fit together, so the daemon refuses to start rather than stack raw.
    """

    def __init__(self, settings: LiveSettings, masters: dict[str, str], memory_bytes: int | None = None):
        """`memory_bytes`: what the process may use, for debayer "auto" (`LivePipeline.memory_note`)."""
        self.settings = settings
        self.memory_bytes = memory_bytes
        self._loaded: dict[tuple, Any] = {}
        self.masters_for(masters)

    def masters_for(self, paths: dict[str, str]):
        """The loaded Masters of these files (None for none)."""
        key = tuple(sorted(paths.items()))
        if not key:
            return None
        if key not in self._loaded:
            self._loaded[key] = load_masters(**paths)
        return self._loaded[key]

    def new(self, masters: dict[str, str]) -> LivePipeline:
        return LivePipeline(self.settings, self.masters_for(masters), memory_bytes=self.memory_bytes)

    def restore(self, state: dict, masters: dict[str, str]) -> LivePipeline:
        return LivePipeline.from_state(state, self.settings, self.masters_for(masters), memory_bytes=self.memory_bytes)


@dataclass
class Stack:
    key: StackKey
    pipeline: Any
    #: Master files ({kind: path}) this stack is calibrated with: those in use when it began.
    masters: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Outcome:
    """What happened to one file, made on the worker for the loop to publish.

    outcome: "stacked", "rejected", "error" or "skipped" (already done, or vanished)."""

    path: Path
    outcome: str
    stack: str | None = None
    result: Any = None  # the pipeline's FrameResult (its `registered` already handed to the spool)
    reason: str | None = None
    n_stacked: int = 0
    #: Header values the loader could not use (`EXPTIME='abc' ...`), each naming the key.
    warnings: tuple[str, ...] = ()
    #: The stack's grid frame while its WCS is not plate-solved (for daemon.reference_solve).
    grid: Any = None


@dataclass(frozen=True)
class StackSummary:
    """One stack as the loop may see it."""

    key: StackKey
    frames: int
    total_exposure_s: float
    reference: str | None
    #: Why the stack is at superpixel resolution though full resolution was asked for where it
    #: fits (`LivePipeline.resolution_note`); None otherwise.
    resolution_note: str | None = None


@dataclass(frozen=True)
class SessionSnapshot:
    """The session's state after a job, for the loop (status, page, commands' checks).

    counts: files by outcome ("stacked", "rejected", "errors"): one per file, however often
    it was tried. files: the ledger's keys (paths relative to the capture folder)."""

    session: str
    current: str | None
    stacks: Mapping[str, StackSummary]
    counts: Mapping[str, int]
    files: frozenset[str]
    masters: Mapping[str, str]
    #: A stack changed since its FITS and preview were last written.
    products_due: bool
    #: Files dealt with since the last checkpoint, and when that was (time.monotonic()).
    unsaved: bool
    last_checkpoint: float


class Session:
    """The stacks, ledger, masters and spools of one night. Worker thread only (see module)."""

    def __init__(self, state_dir: Path, capture_dir: Path, output_dir: Path, factory: PipelineFactory,
                 loader: Any, masters: dict[str, str], frames_waiting: Callable[[], bool] | None = None):
        self.state_dir, self.capture_dir, self.output_dir = Path(state_dir), Path(capture_dir), Path(output_dir)
        self.factory = factory
        self.loader = loader if loader is not None else FrameLoader()
        self.ledger = Ledger(self.capture_dir)
        self.stacks: dict[str, Stack] = {}
        self.masters = dict(masters)
        self.current: str | None = None
        self.session = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        self.spools = SpoolWriter(self.state_dir / "spool")
        self.in_hand = InHand(self.state_dir)
        self.last_checkpoint = time.monotonic()
        self.unsaved = False  # files dealt with since the last checkpoint
        self.products_due = False  # a stack changed since the last products
        self._transfers: dict[tuple[str, int], Any] = {}  # (stack, n_stacked) -> tile stretch
        #: Whether frames wait (thread-safe): a due stack snapshot is put off while they do.
        self.frames_waiting = frames_waiting
        #: ((masters, frame shape, CFA pattern) it was made for, a pipeline whose stack was
        #: made ahead: `prepare`): the next frame's new stack takes it, else it is freed.
        self._spare: tuple[tuple[dict[str, str], tuple[int, ...], str | None], Any] | None = None

    # ----------------------------------------------------------------- snapshot
    def snapshot(self) -> SessionSnapshot:
        stacks = {n: StackSummary(s.key, s.pipeline.n_stacked, s.pipeline.total_exposure_s,
                                  getattr(s.pipeline, "reference_path", None),
                                  getattr(s.pipeline, "resolution_note", None)) for n, s in self.stacks.items()}
        counts = {"stacked": 0, "rejected": 0, "errors": 0}
        for entry in self.ledger.entries.values():
            counts["errors" if entry.outcome == "error" else entry.outcome] += 1
        return SessionSnapshot(self.session, self.current, MappingProxyType(stacks), MappingProxyType(counts),
                               frozenset(self.ledger.entries), MappingProxyType(dict(self.masters)),
                               self.products_due, self.unsaved, self.last_checkpoint)

    # ----------------------------------------------------------------- start and checkpoint
    def restore(self) -> Path | None:
        """Resume from the checkpoint, if any; read the file a previous process died with once
        more, or quarantine it after a second death (`quarantine_left_over`). Returns a
        quarantined file (for the loop to report), None when there was none."""
        for stale in checkpoint.remove_stale_temp(self.state_dir):
            log.info("removed %s, left by a checkpoint write that was cut short", stale.name)
        state = checkpoint.load(self.state_dir)
        if state is not None:
            self._restore(state)
        quarantined = quarantine_left_over(self.ledger, self.in_hand)
        if quarantined is None:
            return None
        self.try_checkpoint()
        return Path(quarantined)

    def _restore(self, state: dict) -> None:
        self.ledger = Ledger.from_json(state["ledger"], self.capture_dir)
        self.session = state.get("session", self.session)
        self.current = state.get("current")
        self.masters = dict(state.get("masters", self.masters))
        for name, st in state.get("stacks", {}).items():
            masters = st.get("masters", self.masters)
            pipeline = self.factory.restore(st["pipeline"], masters)
            self.stacks[name] = Stack(StackKey(**st["key"]), pipeline, dict(masters))
            replay = st["pipeline"].get(checkpoint.REPLAY_KEY)
            if replay:  # the stack's snapshot is older than the checkpoint: the frames since again
                done, missing = replay_stack(pipeline, replay, self.spools.folder(name))
                log.info("stack %s: %d frames replayed from the spool since its snapshot", name, done)
                if missing:
                    log.error("stack %s: %d stacked frames are not in the spool and are missing from the live "
                              "stack (first: %s)", name, len(missing), missing[0])
        log.info("resumed session %s from checkpoint: %s", self.session,
                 ", ".join(f"{n}: {s.pipeline.n_stacked} frames" for n, s in self.stacks.items()) or "no stacks")

    def checkpoint(self) -> None:
        """Save stacks, ledger and masters atomically. Raises OSError when the disk fails."""
        self.spools.drain()  # every frame the ledger calls stacked is in its spool (or failed)
        state = {
            "version": 1,
            "session": self.session,
            "current": self.current,
            "masters": dict(self.masters),
            "ledger": self.ledger.to_json(),
            "stacks": {n: {"key": s.key.__dict__, "masters": s.masters, "pipeline": s.pipeline.state()}
                       for n, s in self.stacks.items()},
        }
        checkpoint.save(self.state_dir, state, frames_waiting=self.frames_waiting)
        self.last_checkpoint = time.monotonic()
        self.unsaved = False

    def try_checkpoint(self) -> None:
        """Checkpoint from the frame path: a full or failing disk is logged and retried with
        the next frame; stacking goes on (the stack in memory is intact)."""
        try:
            self.checkpoint()
        except OSError as exc:
            self.unsaved = True
            log.error("checkpoint to %s failed: %s (stacking goes on; retried)", self.state_dir, exc)
        except Exception:  # noqa: BLE001 - a checkpoint bug must not stop the night's stacking
            self.unsaved = True
            log.exception("checkpoint to %s failed (stacking goes on; retried)", self.state_dir)

    def checkpoint_if_unsaved(self) -> None:
        if self.unsaved:
            self.try_checkpoint()

    def close(self) -> None:
        """Finish the spool writes (at shutdown, after the last checkpoint)."""
        self.spools.shutdown()

    # ----------------------------------------------------------------- frames
    def prepare(self, frame_shape: tuple[int, int] | None, bayer: str | None,
                key: StackKey | None = None) -> Any:
        """Make the stack the next frames will start while they are being exposed (the
        service, at a plan's first exposure, or when the watcher sees a file being written:
        `prepare_for`; `LivePipeline.prepare`), so that the first frame does not pay for its
        memory. Nothing when `key`'s stack exists (its frames go there) or a spare was made for
        the same shape, pattern and masters; `frame_shape` None frees a spare made before.
        Held until the next frame: the new stack that frame starts takes it, else it is freed
        then. The frame loader gets the frame's array ready too (`FrameLoader.reserve`).
        Returns the running stack made (`RunningStack`), None when none was made."""
        if key is not None and key.name in self.stacks:
            return None
        if self._spare is not None and frame_shape is not None and self._spare[0] == (
                dict(self.masters), tuple(frame_shape), bayer):
            return None
        self._spare = None  # the previous one freed first: never two
        reserve = getattr(self.loader, "reserve", None)  # (a test's loader may have none)
        if frame_shape is None:
            if reserve is not None:
                reserve(None)
            return None
        pipeline = self.factory.new(self.masters)
        made = pipeline.prepare(frame_shape, bayer) if hasattr(pipeline, "prepare") else None
        if made is not None:
            self._spare = ((dict(self.masters), tuple(frame_shape), bayer), pipeline)
            if reserve is not None:
                reserve(frame_shape)
            log.info("stack of %dx%d%s made ahead of its first frame", made.shape[1], made.shape[0],
                     " colour" if len(made.shape) == 3 else "")
        return made

    def prepare_for(self, path: Path) -> Any:
        """`prepare` for a light frame file seen being written, from its header
        (`FrameLoader.peek`); nothing for a file dealt with before or a header that does not
        tell (yet). Returns what `prepare` returns."""
        peek = getattr(self.loader, "peek", None)  # (a test's loader may have none)
        found = peek(path) if peek is not None and not self.ledger.done(path) else None
        if found is None or found[1].frame_type.is_calibration:
            return None
        return self.prepare(found[0], found[1].bayer, StackKey.of(found[1]))

    def _stack_for(self, key: StackKey) -> Stack:
        spare, self._spare = self._spare, None  # taken by a new stack, else freed
        stack = self.stacks.get(key.name)
        if stack is None:
            made = spare is not None and spare[0][0] == self.masters
            pipeline = spare[1] if made else self.factory.new(self.masters)
            stack = self.stacks[key.name] = Stack(key, pipeline, dict(self.masters))
            log.info("new stack %s%s", key.name, " (made ahead)" if made else "")
        return stack

    def process(self, path: Path, checkpoint_now: bool) -> Outcome:
        """Load, stack, record in the ledger and (if `checkpoint_now`) checkpoint one file.
        Never raises for a bad file: it is an "error" outcome with the reason."""
        if self.ledger.done(path):
            return Outcome(path, "skipped")
        if not path.exists():
            return Outcome(path, "skipped", reason="file vanished")
        self.in_hand.begin(path)
        try:
            out = self._process(path)
        finally:
            self.in_hand.end()
        self.unsaved = True
        if checkpoint_now:
            self.try_checkpoint()
        return out

    def _process(self, path: Path) -> Outcome:
        try:
            frame = self.loader(path)
        except (ValueError, OSError, MemoryError) as exc:
            reason = getattr(exc, "reason", None) or str(exc) or type(exc).__name__
            if isinstance(exc, MemoryError):
                reason = f"{path.name}: out of memory while decoding ({reason})"
            self.ledger.record(path, "error", reason=reason)
            return Outcome(path, "error", reason=reason)
        key = StackKey.of(frame.meta)
        new = key.name not in self.stacks
        stack = self._stack_for(key)
        note = getattr(stack.pipeline, "memory_note", None)
        if new and note is not None and frame.meta.bayer and (why := note(frame.data.shape)):
            log.warning("stack %s: %s", key.name, why)
        try:
            result = stack.pipeline.process(frame, consume=True)
        except Exception as exc:  # noqa: BLE001 - one bad frame must not stop the night
            log.exception("pipeline failed on %s", path)
            reason = f"pipeline error: {type(exc).__name__}: {exc}"
            self.ledger.record(path, "error", stack=key.name, reason=reason)
            return Outcome(path, "error", stack=key.name, reason=reason, warnings=tuple(frame.meta.warnings))
        outcome = "stacked" if result.accepted else "rejected"
        if hasattr(self.loader, "keep_large"):  # a frame's array kept for the next one where it is held anyway
            self.loader.keep_large = getattr(stack.pipeline, "holds_frames", self.loader.keep_large)
        if result.accepted and getattr(result, "registered", None) is not None:
            # float16 here, on the stacking thread (parallel kernels); the float32 frame is
            # dropped before the next one, the writer thread only writes.
            image = self.spools.encode(result.registered)
            result.registered = None
            self.spools.submit(key.name, str(path), image, weight=result.weight,
                               date_obs=frame.meta.date_obs.isoformat() if frame.meta.date_obs else None,
                               exposure_s=frame.meta.exposure_s)
        self.ledger.record(path, outcome, stack=key.name, reason=result.reason)
        self.current = key.name
        self.products_due = True
        grid = None if getattr(stack.pipeline, "wcs_solved", True) else stack.pipeline.grid_frame()
        return Outcome(path, outcome, key.name, result, result.reason, stack.pipeline.n_stacked,
                       tuple(frame.meta.warnings), grid)

    # ----------------------------------------------------------------- commands
    def named(self, name: str | None) -> Stack:
        """Stack `name` (the current one for None). Raises SessionError naming the stacks."""
        name = name or self.current
        if name not in self.stacks:
            raise SessionError(f"no stack named {name!r} (stacks: {', '.join(self.stacks) or 'none'})")
        return self.stacks[name]

    def reset(self, name: str | None) -> dict:
        """Empty a stack and its spool; returns what was removed (for the reply)."""
        stack = self.named(name)
        frames = stack.pipeline.n_stacked
        spooled = self.spools.clear(stack.key.name)
        stack.pipeline.reset()
        self.checkpoint()
        return {"stack": stack.key.name,
                "removed": {"frames": frames, "spooled_frames": spooled,
                            "spool": str(self.spools.folder(stack.key.name))}}

    def set_reference(self, path: Path) -> tuple[dict, list[Path]]:
        """New reference for the frame's stack. The pipeline empties that stack (coordinates
        change), so its frames are taken out of the ledger and returned for processing again
        against the new reference; the spool (old coordinates) is cleared."""
        try:
            frame = self.loader(path)
        except (ValueError, OSError) as exc:
            raise SessionError(f"set_reference: cannot load {path.name}: "
                               f"{getattr(exc, 'reason', None) or exc}") from None
        stack = self._stack_for(StackKey.of(frame.meta))
        frames = stack.pipeline.n_stacked
        stack.pipeline.set_reference(frame)
        spooled = self.spools.clear(stack.key.name)
        again = []
        for key, entry in list(self.ledger.entries.items()):
            if entry.stack == stack.key.name and entry.outcome in ("stacked", "rejected"):
                del self.ledger.entries[key]
                again.append(self.capture_dir / key)
        self.checkpoint()
        return ({"stack": stack.key.name, "requeued": len(again),
                 "removed": {"frames": frames, "spooled_frames": spooled,
                             "spool": str(self.spools.folder(stack.key.name))}}, again)

    def restack(self, name: str | None) -> dict:
        """Final winsorized sigma-clipped combine of a stack's spooled frames into
        <stack>_final.fits. Frames the live stack holds that are not in the spool (a failed
        write, a full disk) are spooled again from their files when they still exist
        (`LivePipeline.respool`); those that cannot be are named in the reply and the log: the
        final stack lacks them."""
        stack = self.named(name)
        # Only frames the ledger has as stacked here (a frame spooled just before a crash and
        # rejected when processed again after it is left out).
        stacked = {(self.capture_dir / k).resolve(): self.capture_dir / k for k, e in self.ledger.entries.items()
                   if e.outcome == "stacked" and e.stack == stack.key.name}
        spool = self.spools.open(stack.key.name)
        spooled = {Path(e["path"]).resolve() for e in (spool.entries if spool else []) if e.get("path")}
        respooled = self._respool(stack, [p for r, p in stacked.items() if r not in spooled])
        spool = self.spools.open(stack.key.name) if respooled else spool
        entries = [e for e in (spool.entries if spool else [])
                   if e.get("path") and Path(e["path"]).resolve() in stacked]
        if not entries:
            raise SessionError(f"restack: no spooled frames for stack {stack.key.name}")
        missing = sorted(p.name for p in set(stacked) - {Path(e["path"]).resolve() for e in entries})
        result = restack([spool.open(e) for e in entries], [e["weight"] for e in entries],
                         [e["scale"] for e in entries])
        out = self.output_dir / f"{stack.key.name}_final.fits"
        self.output_dir.mkdir(parents=True, exist_ok=True)
        provenance = [{k: e.get(k) for k in ("path", "weight", "date_obs", "exposure_s")} for e in entries]
        write_stack(out, result.image, provenance, method="final", masters=stack.masters, pipeline=stack.pipeline,
                    reference=getattr(stack.pipeline, "reference_path", None),
                    rejected={"low": result.rejected_low, "high": result.rejected_high})
        log.info("restack of %s: %d frames -> %s", stack.key.name, result.n_frames, out)
        reply = {"stack": stack.key.name, "path": str(out), "frames": result.n_frames,
                 "live_frames": stack.pipeline.n_stacked}
        if respooled:
            reply["respooled"] = respooled
        if missing:
            log.warning("restack of %s: %d of the live stack's %d frames are not in the spool (a failed "
                        "write?) and are not in %s: %s", stack.key.name, len(missing), len(stacked), out.name,
                        ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else ""))
            reply["missing"] = {"frames": len(missing), "first": missing[:10]}
        return reply

    def _respool(self, stack: Stack, paths: list[Path]) -> int:
        """Spool again the frames of `paths` the stack holds, from their files; returns how
        many were written (a file gone or changed, or a disk still full, is logged)."""
        done = 0
        for path in paths:
            try:
                frame = self.loader(path)
                item, weight = stack.pipeline.respool(frame)
            except (KeyError, ValueError, OSError) as exc:
                log.warning("restack of %s: %s not spooled again: %s", stack.key.name, path.name, exc)
                continue
            date_obs = frame.meta.date_obs.isoformat() if frame.meta.date_obs else None
            self.spools.submit(stack.key.name, str(path), self.spools.encode(item), weight=weight, date_obs=date_obs,
                               exposure_s=frame.meta.exposure_s)
            self.spools.drain()
            if str(path) not in self.spools.failed.get(stack.key.name, set()):
                done += 1
                log.info("restack of %s: %s spooled again from its file", stack.key.name, path.name)
        return done

    def restack_of_file(self, path: str | Path) -> dict:
        """`restack` of the stack that file `path` went to (a plan's last frame)."""
        entry = self.ledger.entries.get(self.ledger.key(path))
        if entry is None or entry.stack is None:
            raise SessionError(f"restack: {Path(path).name} is in no stack")
        return self.restack(entry.stack)

    def set_reference_wcs(self, name: str, path: str, cards: dict) -> bool:
        """A plate solve of stack `name`'s grid frame `path`: its WCS from now on (the next
        products carry it). False, nothing changed, when the stack or its grid frame changed
        meanwhile (a reset, set_reference)."""
        stack = self.stacks.get(name)
        if stack is None or not stack.pipeline.set_reference_wcs(path, cards):
            return False
        self.products_due = True
        return True

    # ----------------------------------------------------------------- masters
    def build_master(self, kind: FrameType, paths: list[str], *, exposure_s: float, filter_name: str | None) -> Path:
        """Combine calibration frames into a master under <state>/masters and adopt it. Dark
        and flat masters have the bias (flats: the dark-flat) in use subtracted, so darks
        scale with exposure. Raises ValueError/OSError when the frames do not combine."""
        kind = FrameType(kind)
        exposure = f"_{exposure_s:g}s" if kind in (FrameType.DARK, FrameType.DARKFLAT) else ""
        filt = f"_{filter_name}" if kind in (FrameType.FLAT, FrameType.DARKFLAT) and filter_name else ""
        out = self.state_dir / "masters" / f"{safe_filename(f'{kind}{filt}{exposure}_{self.session}')}.fits"
        out.parent.mkdir(parents=True, exist_ok=True)
        sub = {}
        if kind in (FrameType.DARK, FrameType.FLAT) and "bias" in self.masters:
            sub["bias"] = self.masters["bias"]
        if kind is FrameType.FLAT and "darkflat" in self.masters:
            sub = {"darkflat": self.masters["darkflat"]}
        build_master(kind, paths, out, **sub)
        self.adopt_master(kind, out)
        log.info("master %s from %d frames: %s (used for new stacks)", kind, len(paths), out)
        return out

    def adopt_master(self, kind: FrameType, path: Path) -> None:
        """Calibrate new stacks (and stacks still empty) with master `path` from now on.
        Raises (changing nothing) when the masters do not load or fit together."""
        masters = {**self.masters, str(kind): str(path)}
        fresh = {n: self.factory.new(masters) for n, s in self.stacks.items() if s.pipeline.n_stacked == 0}
        if not fresh:
            self.factory.new(masters)  # raises if they do not fit
        self.masters = masters
        for name, pipeline in fresh.items():
            self.stacks[name].pipeline, self.stacks[name].masters = pipeline, dict(masters)
        self.checkpoint()

    # ----------------------------------------------------------------- products
    def products(self, max_edge: int) -> tuple[bytes, dict] | None:
        """Write the current stack's FITS and preview.jpg; return the preview for MQTT (also
        when the files could not be written)."""
        self.products_due = False
        stack = self.stacks.get(self.current or "")
        if stack is None or stack.pipeline.n_stacked == 0:
            return None
        image = stack.pipeline.stack_image()
        if image is None:
            return None
        jpeg = preview_jpeg(image, max_edge=max_edge)
        try:  # a full or failing disk stops the files, never the live preview
            self.output_dir.mkdir(parents=True, exist_ok=True)
            write_stack(self.output_dir / f"{stack.key.name}.fits", stack.pipeline, masters=stack.masters)
            tmp = self.output_dir / ".preview.jpg.tmp"
            tmp.write_bytes(jpeg)
            tmp.replace(self.output_dir / "preview.jpg")
        except OSError as exc:
            log.error("stack %s not written to %s: %s (the live preview goes on)", stack.key.name,
                      self.output_dir, exc)
        meta = {
            "stack": stack.key.name, "target": stack.key.target, "filter": stack.key.filter,
            "exposure_s": stack.key.exposure_s, "frames": stack.pipeline.n_stacked,
            "total_exposure_s": stack.pipeline.total_exposure_s, "width": int(image.shape[1]),
            "height": int(image.shape[0]), "bytes": len(jpeg), "format": "jpeg",
            "time": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        return jpeg, meta

    def stack_preview(self, name: str, max_edge: int) -> tuple[bytes, int, int]:
        """Preview JPEG of any stack and its full width and height (px). KeyError when the
        stack is unknown or empty."""
        stack = self.stacks.get(name)
        image = stack.pipeline.stack_image() if stack is not None and stack.pipeline.n_stacked else None
        if image is None:
            raise KeyError(f"no stacked image for {name!r}")
        return preview_jpeg(image, max_edge=max_edge), int(image.shape[1]), int(image.shape[0])

    def crop(self, name: str, x: int, y: int, size: int, max_edge: int):
        """A full-resolution crop of stack `name` around (x, y) for a tile (daemon.web.tiles),
        with the preview's stretch. KeyError when the stack is unknown or empty."""
        from daemon.web.tiles import crop_for_tile  # the page's code: only with [web]

        stack = self.stacks.get(name)
        image = stack.pipeline.stack_image() if stack is not None else None
        if image is None:
            raise KeyError(f"no stacked image for {name!r}")
        key = (name, stack.pipeline.n_stacked)
        out = crop_for_tile(image, x, y, size, self._transfers.get(key), max_edge=max_edge)
        self._transfers = {key: out.transfer}
        return out
