"""On-disk spool of registered frames, for the final re-stack and for resuming a session.

Each accepted frame is kept as a float16 `.npy` (half the size of float32; ~0.05 %
precision, far below shot noise) that the re-stack reads back as a memmap in row bands:
a mono or superpixel frame already warped into the reference and background-normalised; a
full-resolution colour frame as its calibrated mosaic (`daemon.pipeline.fused.RegisteredMosaic`:
a third of the registered RGB image's bytes, the raw frame's size), with its transform and
sky offset in the index, re-made into the registered image band by band when read
(`RegisteredView`: by interpolation or Bayer drizzle). Values beyond float16's range
(> 65504 ADU after flat division) are scaled by a power of two recorded in the index.
`index.json` lists the frames in stacking order with their weights and provenance; it is
rewritten atomically after each frame file is fsynced, so a crash leaves either the old or
the new index, never one that names a half-written frame.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numba
import numpy as np

from daemon.checkpoint import fsync_dir
from daemon.pipeline.fused import RegisteredMosaic, RegisteredView
from daemon.pipeline.half import to_half

log = logging.getLogger("lightbucket")

_F16_MAX = 60000.0
INDEX = "index.json"
#: How many nice levels the spool writer thread runs below the process (Linux schedules
#: threads by their own nice value).
WRITER_NICE = 10


def writer_thread() -> ThreadPoolExecutor:
    """One background thread for `Spool.append`, at a lower CPU priority than the thread that
    stacks: the spool is only needed for the final re-stack, while the live stack and its
    preview are what the observer waits for. At equal priority a writer copying tens of MB
    into the page cache slows the next frame's parallel kernels on 2 cores (bench); niced, it
    runs in the gaps (sep holds one core, waits on the disk) and still finishes long before
    the next exposure."""

    def lower_priority() -> None:
        try:
            tid = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + WRITER_NICE))
        except (OSError, AttributeError):  # not Linux, or not permitted: equal priority
            pass

    return ThreadPoolExecutor(1, thread_name_prefix="spool", initializer=lower_priority)


@dataclass(frozen=True)
class Encoded:
    """A registered frame as the spool stores it: `data` (float16) times `scale` is ADU;
    `meta`: what the index keeps beside it (a mosaic's transform, offset, method)."""

    data: np.ndarray
    scale: float
    meta: dict = field(default_factory=dict)


def encode(image: np.ndarray | RegisteredMosaic, out: np.ndarray | None = None) -> Encoded:
    """The float16 copy of a registered frame the spool keeps (half the bytes of float32; ~0.05 %
    precision, far below shot noise). Frames with values beyond float16's range (> 65504 ADU
    after flat division) are scaled down by a power of two. The peak from numpy's reductions,
    the conversion in one parallel pass (`daemon.pipeline.half`), no float32 temporary. Call it
    on the thread that stacks (its kernels use numba's thread pool); the service does, then
    drops the float32 frame and hands the writer thread only this. A `RegisteredMosaic`
    gives its mosaic, with its description as `meta`.

    `out`: an earlier `Encoded.data` nothing else holds any more, to encode into when it has
    the frame's shape (`SpoolWriter.encode`: written memory, not new pages); else a new array."""
    if isinstance(image, RegisteredMosaic):
        enc = encode(image.data, out)
        return Encoded(enc.data, enc.scale, image.meta())
    shape = tuple(int(n) for n in image.shape)
    if not image.size:
        return Encoded(np.empty(shape, np.float16), 1.0)
    rows = np.ascontiguousarray(image, dtype=np.float32).reshape(shape[0], -1)
    # Largest |value|, NaN (no data) ignored; none at all (NaN) or inf: no scaling.
    peak = max(float(np.fmax.reduce(rows, axis=None)), -float(np.fmin.reduce(rows, axis=None)))
    if not np.isfinite(peak):
        peak = 0.0
    scale = 1.0
    while peak * scale > _F16_MAX:
        scale /= 2.0
    if out is not None and out.dtype == np.float16 and out.shape == shape and out.flags.c_contiguous:
        bits = out.view(np.uint16).reshape(rows.shape)
    else:
        bits = np.empty(rows.shape, np.uint16)
    _to_half_rows(rows, np.float32(scale), bits)
    return Encoded(bits.view(np.float16).reshape(shape), 1.0 / scale)


@numba.njit(parallel=True, cache=True, nogil=True)
def _to_half_rows(rows: np.ndarray, scale: np.float32, out: np.ndarray) -> None:  # pragma: no cover - numba
    """out = float16 bits of rows * scale (a power of two: exact), NaN stays NaN."""
    for i in numba.prange(rows.shape[0]):
        for j in range(rows.shape[1]):
            out[i, j] = to_half(rows[i, j] * scale)


def _drop_cached(fd: int) -> None:
    """Drop a written spool file from the page cache (it is on disk: fsync'ed). It is read
    again only by the final re-stack, hours later; cached, tens of MB a frame would push out
    what is worth caching (the frames just captured) on a Pi. The freed pages take the next
    frame's write, cheaper than new page-cache pages (bench/PERFORMANCE.md)."""
    if hasattr(os, "posix_fadvise"):
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError:  # advice only
            pass


class Spool:
    """A directory of spooled frames plus index.json. Not thread-safe (one writer)."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.entries: list[dict] = []
        index = self.dir / INDEX
        if index.exists():
            try:
                data = json.loads(index.read_text())
                self.entries = list(data["frames"])
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"spool index {index} is unreadable: {exc}") from exc
            # Frames whose file went missing cannot be re-stacked: drop them from the index.
            self.entries = [e for e in self.entries if (self.dir / e["file"]).exists()]
        for stray in self.dir.glob("*.tmp"):  # a write cut short (kill -9, power): never committed
            stray.unlink(missing_ok=True)

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, path: str) -> bool:
        return any(e.get("path") == path for e in self.entries)

    def append(self, image: np.ndarray | RegisteredMosaic | Encoded, *, weight: float, path: str | None = None,
               **meta) -> dict:
        """Spool one registered frame (H, W) or (H, W, C), float32 ADU or already `encode`d,
        with its weight and provenance (JSON-able keyword values: date_obs, exposure_s, ...).
        OSError (e.g. a full disk): nothing of the frame is left on disk (no partial file
        holding space), the spool and its index as before."""
        enc = image if isinstance(image, Encoded) else encode(image)
        del image
        seq = (max((e["seq"] for e in self.entries), default=0) + 1)
        name = f"frame_{seq:06d}.npy"
        tmp = self.dir / (name + ".tmp")
        try:
            with open(tmp, "wb") as fh:
                # A plain write of the float16 array (no memmap, whose written pages would count
                # against the process's memory).
                np.lib.format.write_array_header_1_0(
                    fh, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float16)), "fortran_order": False,
                         "shape": tuple(int(n) for n in enc.data.shape)})
                fh.write(enc.data.data)
                fh.flush()
                os.fsync(fh.fileno())
                _drop_cached(fh.fileno())
            os.replace(tmp, self.dir / name)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        entry = {"seq": seq, "file": name, "path": path, "weight": float(weight), "scale": enc.scale,
                 "shape": list(enc.data.shape), **enc.meta, **meta}
        self.entries.append(entry)
        try:
            self._write_index()
        except BaseException:
            self.entries.pop()
            (self.dir / name).unlink(missing_ok=True)
            raise
        return entry

    def frames(self) -> Iterator[np.ndarray]:
        for e in self.entries:
            yield self.open(e)

    def open(self, entry: dict) -> np.ndarray | RegisteredView:
        """The stored frame as a read-only float16 memmap (multiply by entry['scale']); a
        spooled mosaic as the `RegisteredView` that re-makes its registered RGB rows (in the
        same units)."""
        data = np.load(self.dir / entry["file"], mmap_mode="r")
        if entry.get("kind") == "mosaic":
            return RegisteredView(data, entry, float(entry["scale"]))
        return data

    def restack_inputs(self) -> tuple[list[np.ndarray], list[float], list[float]]:
        """(frames, weights, scales) for daemon.pipeline.restack.restack."""
        return ([self.open(e) for e in self.entries], [e["weight"] for e in self.entries],
                [e["scale"] for e in self.entries])

    def clear(self) -> None:
        """Delete every spooled frame (a new session or target)."""
        for e in self.entries:
            (self.dir / e["file"]).unlink(missing_ok=True)
        self.entries = []
        self._write_index()
        for stray in self.dir.glob("frame_*.npy*"):
            stray.unlink()

    def _write_index(self) -> None:
        tmp = self.dir / (INDEX + ".tmp")
        try:
            with open(tmp, "w") as fh:
                json.dump({"version": 1, "frames": self.entries}, fh, indent=1)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.dir / INDEX)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(self.dir)


def replay_stack(pipeline, paths: list[str], directory: str | os.PathLike) -> tuple[int, list[str]]:
    """Catch a stack restored from an older snapshot up (`daemon.checkpoint`): the spooled
    frames of `paths`, in that order, added again through `pipeline.replay` (a LivePipeline).
    Returns (frames replayed, paths not in the spool: stacked before the crash but lost with a
    failed spool write; the live stack then lacks them, the ledger still counts them)."""
    folder = Path(directory)
    spool = Spool(folder) if folder.exists() else None
    by_path = {e.get("path"): e for e in spool.entries} if spool is not None else {}
    missing = [p for p in paths if p not in by_path]

    def frames():
        for p in paths:
            e = by_path.get(p)
            if e is None:
                continue
            data = np.load(folder / e["file"], mmap_mode="r")
            scale = float(e.get("scale", 1.0))
            if e.get("kind") == "mosaic":
                mosaic = data if scale == 1.0 else np.asarray(data, np.float32) * np.float32(scale)
                yield RegisteredMosaic(mosaic, e["bayer"], np.asarray(e["matrix"], np.float64),
                                       tuple(e["offset"]), e.get("interpolation", "bicubic")), float(e["weight"])
            else:
                yield np.asarray(data, np.float32) * np.float32(scale), float(e["weight"])

    return pipeline.replay(frames()), missing


def folder_bytes(directory: str | os.PathLike) -> int:
    """Bytes of the files under `directory` (0 when it is missing; files vanishing meanwhile,
    as spool temp files do, are skipped): the state folder's disk use for `status`."""
    total = 0
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return 0
    for entry in entries:
        try:
            if entry.is_dir(follow_symlinks=False):
                total += folder_bytes(entry.path)
            elif entry.is_file(follow_symlinks=False):
                total += entry.stat(follow_symlinks=False).st_size
        except OSError:
            continue
    return total


class SpoolWriter:
    """The spools of a session's stacks, written by one low-priority thread (`writer_thread`)
    while the next frame is processed. Owned by the worker thread: every method is called
    there. At most one write is in flight (`submit` waits for the previous one); anything that
    reads or clears a spool, and the checkpoint, `drain`s first, so every frame a checkpoint
    records as stacked is in its spool or in `failed`.

    A write that fails (a full or failing disk) is logged and remembered in `failed` (stack
    name -> frame paths): the live stack has the frame, only the final re-stack would miss it,
    and it says so.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.failed: dict[str, set[str]] = {}
        self._spools: dict[str, Spool] = {}
        self._thread = writer_thread()
        self._pending: list = []
        self._written: Encoded | None = None  # the last frame handed to the writer

    def folder(self, name: str) -> Path:
        """The spool folder of stack `name`."""
        return self.root / name

    def submit(self, name: str, path: str, image: Encoded, **meta) -> None:
        """Queue `image` (already `encode`d, on the stacking thread) for stack `name`'s spool,
        keyed by the frame's `path` (a frame already spooled, e.g. before a crash, is skipped)."""
        self.drain()  # back-pressure: one write in flight at most
        self._written = image
        self._pending.append(self._thread.submit(self._write, name, path, image, meta))

    def encode(self, image: np.ndarray | RegisteredMosaic) -> Encoded:
        """`encode` for `submit`: the write in flight finishes first and its float16 array,
        written, takes this frame (one frame's copy alive at a time, and no new memory per
        frame: a 26 Mpx mosaic's copy is 52 MB)."""
        self.drain()
        last, self._written = self._written, None
        # Written (drained), and held by nobody else (refcounts: `last` or its field, and
        # getrefcount's argument): no caller or writer task still has it.
        reuse = last is not None and sys.getrefcount(last) <= 2 and sys.getrefcount(last.data) <= 2
        out = last.data if reuse else None
        del last
        return encode(image, out)

    def _write(self, name: str, path: str, image: Encoded, meta: dict) -> None:
        try:
            spool = self._spools.get(name)
            if spool is None:
                spool = self._spools[name] = Spool(self.folder(name))
            if path not in spool:
                spool.append(image, path=path, **meta)
            self.failed.get(name, set()).discard(path)
        except (OSError, ValueError) as exc:  # the live stack has the frame; only restack misses it
            self.failed.setdefault(name, set()).add(path)
            log.error("spooling %s for the final re-stack failed: %s", path, exc)

    def drain(self) -> None:
        """Wait for the write in flight, if any."""
        while self._pending:
            self._pending.pop(0).result()

    def open(self, name: str) -> Spool | None:
        """Stack `name`'s spool (after the writes in flight), None when it has none."""
        self.drain()
        folder = self.folder(name)
        return Spool(folder) if folder.exists() else None

    def clear(self, name: str) -> int:
        """Delete stack `name`'s spooled frames; returns how many there were."""
        self.drain()
        self._spools.pop(name, None)
        self.failed.pop(name, None)
        folder = self.folder(name)
        if not folder.exists():
            return 0
        spool = Spool(folder)
        n = len(spool)
        spool.clear()
        return n

    def shutdown(self) -> None:
        """Finish the writes in flight and stop the thread."""
        self.drain()
        self._thread.shutdown(wait=True)
