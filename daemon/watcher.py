"""Capture folder -> a callback on the event loop for each complete frame file.

A frame is handed on only once its writer is done with it:
- on Linux (inotify) when the file is closed after writing (watchdog's FileClosedEvent) or
  renamed into place (FileMovedEvent: the usual temp-then-rename of capture programs);
- a file moved in from a folder that is not watched (another program's temp or staging
  folder) arrives as a bare "created" with no close to follow: it is handed on once its
  size has stayed unchanged for `settle_s`, unless it gets written to (then its close event
  decides, however long the writer pauses);
- elsewhere (polling/other observers, network shares) once its size and mtime have stayed
  unchanged for `settle_s` seconds.
A file first seen being written (created or modified, not complete yet) is reported once
to `on_sight`, if given: what it will be can be read from its header while the rest arrives.
Which files: with the default patterns (every name the loader reads, or None) every file is
handed on, so each gets an answer: the loader reads it or refuses it naming its kind. Never
handed on: temporary and partial names (*.tmp, *.part, *.crdownload, .hidden, ~backup) and a
frame's companion files (JSON sidecars, SharpCap's CameraSettings.txt: `daemon.io.formats`).
Patterns that narrow the default (capture.patterns) leave the other files out, each with one
log line naming the setting. Hidden sub-folders (staging folders such as `.incoming/`, where
frames are written before a rename) and `calibration/` (calibration plans' darks, bias and
flats, which become masters, not lights) are never watched, recursive or not. `backlog()`
lists files already present at start. Duplicates are possible (a file closed twice); the
ledger decides.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from pathlib import Path

from watchdog.events import FileClosedEvent, FileMovedEvent, FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from daemon.io.formats import is_companion, matches, narrowed

log = logging.getLogger(__name__)

TEMP_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload", ".download", ".swp", "~")
#: Sub-folders of the capture folder that never hold lights (see the module docstring).
SKIPPED_DIRS = ("calibration",)


def _skipped_dir(name: str) -> bool:
    return name.startswith(".") or name in SKIPPED_DIRS


def is_candidate(path: str | os.PathLike, patterns: tuple[str, ...] | None = None) -> bool:
    """True for a name worth an answer: no temp/partial/hidden name, no companion file, and
    matching one of `patterns` (fnmatch, case-insensitive) when they narrow the default."""
    return _is_file_of_interest(path) and _within(path, narrowed(patterns))


def _is_file_of_interest(path: str | os.PathLike) -> bool:
    name = Path(path).name
    return not (name.startswith((".", "~")) or name.lower().endswith(TEMP_SUFFIXES) or is_companion(name))


def _within(path: str | os.PathLike, patterns: tuple[str, ...] | None) -> bool:
    return patterns is None or matches(path, patterns)


def _log_outside(path: str | os.PathLike, patterns: tuple[str, ...]) -> None:
    log.info("%s: not read: outside capture.patterns (%s)", path, ", ".join(patterns))


def backlog(root: Path, patterns: tuple[str, ...] | None, recursive: bool) -> list[Path]:
    """Frames already in the folder, oldest first (mtime), hidden sub-folders skipped; a file
    outside narrowed `patterns` is logged (once per call) and left out."""
    root = Path(root)
    only = narrowed(patterns)
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not _skipped_dir(d)) if recursive else []
        for f in filenames:
            if not _is_file_of_interest(f):
                continue
            if _within(f, only):
                found.append(Path(dirpath) / f)
            else:
                _log_outside(Path(dirpath) / f, only)

    def mtime(p: Path) -> float:
        try:
            return p.stat().st_mtime
        except OSError:
            return 0.0

    return sorted(found, key=lambda p: (mtime(p), str(p)))


class _Handler(FileSystemEventHandler):
    def __init__(self, watcher: FolderWatcher):
        self.w = watcher

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.is_directory:
            return
        if isinstance(event, FileMovedEvent):
            self.w.from_observer(os.fsdecode(event.dest_path), "complete")
        elif isinstance(event, FileClosedEvent):
            self.w.from_observer(os.fsdecode(event.src_path), "complete")
        elif event.event_type in ("created", "modified"):
            self.w.from_observer(os.fsdecode(event.src_path), event.event_type)


class FolderWatcher:
    """Runs a watchdog observer thread and calls `on_file(path)` on the loop per complete file
    (and `on_sight(path)` once per file first seen being written)."""

    def __init__(self, root: Path, on_file: Callable[[Path], None], *, patterns: tuple[str, ...] | None = None,
                 recursive: bool = False, settle_s: float = 2.0, force_polling: bool = False,
                 on_sight: Callable[[Path], None] | None = None):
        self.root = Path(root)
        self.on_file = on_file
        self.on_sight = on_sight
        self._sighted: set[str] = set()  # files reported to on_sight and not complete yet
        #: None: every file is handed on (the default patterns); else the narrowing ones.
        self.patterns = narrowed(patterns)
        self._outside: set[str] = set()  # names outside the patterns, logged once each
        self.recursive = recursive
        self.settle_s = settle_s
        if force_polling:
            from watchdog.observers.polling import PollingObserver

            self._observer = PollingObserver(timeout=0.5)
        else:
            self._observer = Observer()
        #: inotify reports close-after-write; other observers need the size-stable fallback.
        self.close_events = type(self._observer).__name__.startswith("Inotify")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: dict[str, asyncio.Task] = {}

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.root.mkdir(parents=True, exist_ok=True)
        self._observer.schedule(_Handler(self), str(self.root), recursive=self.recursive)
        self._observer.start()
        log.info("watching %s (%s)", self.root,
                 "close-after-write events" if self.close_events else f"size stable {self.settle_s} s")

    def stop(self) -> None:
        for task in self._pending.values():
            task.cancel()
        self._observer.stop()
        self._observer.join(timeout=5)

    def _in_skipped_dir(self, path: str) -> bool:
        try:
            parts = Path(path).relative_to(self.root).parts[:-1]
        except ValueError:
            return True  # not under the watched folder at all
        return any(_skipped_dir(p) for p in parts)

    def from_observer(self, path: str, kind: str) -> None:
        """Called on the observer thread for each file event: hands it to the loop."""
        if not _is_file_of_interest(path) or self._loop is None or self._in_skipped_dir(path):
            return
        if self.patterns is not None and not matches(path, self.patterns):
            self._loop.call_soon_threadsafe(self._outside_once, path)
            return
        self._loop.call_soon_threadsafe(self._on_event, path, kind)

    def _outside_once(self, path: str) -> None:
        if path not in self._outside:
            self._outside.add(path)
            _log_outside(path, self.patterns or ())

    def _on_event(self, path: str, kind: str) -> None:
        """kind: "complete" (closed after writing, renamed into place), "created", "modified"."""
        if kind == "complete":
            self._sighted.discard(path)
            task = self._pending.pop(path, None)
            if task:
                task.cancel()
            self.on_file(Path(path))
            return
        if self.on_sight is not None and path not in self._sighted:
            self._sighted.add(path)
            self.on_sight(Path(path))
        if self.close_events and kind == "modified":
            task = self._pending.pop(path, None)  # being written: its close event will come
            if task:
                task.cancel()
        elif path not in self._pending and (kind == "created" or not self.close_events):
            self._pending[path] = asyncio.ensure_future(self._settle(path))

    async def _settle(self, path: str) -> None:
        """Fallback: hand the file on once size and mtime stop changing for settle_s."""
        last = None
        try:
            while True:
                try:
                    st = os.stat(path)
                except FileNotFoundError:
                    self._sighted.discard(path)
                    return
                now = (st.st_size, st.st_mtime_ns)
                if now == last and st.st_size > 0:
                    self._sighted.discard(path)
                    self.on_file(Path(path))
                    return
                last = now
                await asyncio.sleep(self.settle_s)
        finally:
            self._pending.pop(path, None)
