"""Files waiting for the worker: in arrival order, each once, held while stacking is paused.

Loop only. The watcher may hand a file on twice (closed twice, or closed then moved); the
second is dropped while the first still waits. The one file in hand (between `get` and
`done`) still counts as pending, so `idle()` means: nothing queued and nothing in hand.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path


class FrameQueue:
    def __init__(self) -> None:
        self._queue: asyncio.Queue[Path] = asyncio.Queue()
        self._queued: set[str] = set()
        self.in_hand: Path | None = None
        self._open = asyncio.Event()  # running: files are handed out
        self._changed = asyncio.Event()  # a file arrived or the state changed
        self._idle = asyncio.Event()
        self._idle.set()
        #: Set while files wait: the one thing other threads may read (the worker puts a
        #: due stack snapshot off while frames wait: daemon.checkpoint).
        self.waiting = threading.Event()

    def __len__(self) -> int:
        """Files waiting (not counting the one in hand)."""
        return self._queue.qsize()

    def pending(self) -> list[Path]:
        """Files waiting and the one in hand."""
        paths = [Path(p) for p in self._queued]
        return paths if self.in_hand is None else [*paths, self.in_hand]

    def put(self, path: Path) -> bool:
        """Queue `path`; False when it is already waiting."""
        if str(path) in self._queued:
            return False
        self._queued.add(str(path))
        self._queue.put_nowait(path)
        self.waiting.set()
        self._idle.clear()
        self._changed.set()
        return True

    def hold(self, held: bool) -> None:
        """Hold the files (paused, stopped) or hand them out again (running)."""
        (self._open.clear if held else self._open.set)()
        self._changed.set()

    async def get(self, stop: asyncio.Event) -> Path | None:
        """The next file once not held, now in hand; None when `stop` is set first. Files
        left waiting at shutdown are not in the ledger: the next start's backlog finds them."""
        while not stop.is_set():
            self._changed.clear()
            if self._open.is_set() and not self._queue.empty():
                path = self.in_hand = self._queue.get_nowait()
                self._queued.discard(str(path))
                if self._queue.empty():
                    self.waiting.clear()
                return path
            changed = asyncio.ensure_future(self._changed.wait())
            stopped = asyncio.ensure_future(stop.wait())
            await asyncio.wait({changed, stopped}, return_when=asyncio.FIRST_COMPLETED)
            changed.cancel()
            stopped.cancel()
        return None

    def done(self) -> None:
        """The file in hand is dealt with."""
        self.in_hand = None
        if self._queue.empty():
            self._idle.set()

    async def idle(self) -> None:
        """Return once nothing is queued or in hand (at once when so already)."""
        await self._idle.wait()
