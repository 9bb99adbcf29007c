"""Atomic checkpoint of everything the daemon must not lose: the stacks and the ledger.

One file, `<state.dir>/checkpoint.npz`, written to a temp file in the same folder, fsynced,
renamed over the old one and the folder fsynced: after a power cut or `kill -9` either the old
or the new checkpoint is on disk, never a torn one. Since the ledger lives in the same file as
the stacks they can never disagree (see daemon.ledger).

Nested dicts/lists of JSON values and numpy arrays (LivePipeline.state()) are stored as one
JSON document in which each array is replaced by {"__ndarray__": "a<N>"}, plus the arrays as
uncompressed .npy members (fast to write on a Pi; float32 stacks compress poorly anyway).

The running stacks' statistics are most of the bytes (a 26 Mpx colour stack at full
resolution: ~0.8 GB, more during its warm-up), far too much to write every 30 s to an SD
card. So each stack's arrays (the "stack.*" entries of a pipeline's state) go to a snapshot
file of their own, `stack-<id>-<serial>.npz`, a new one at most every `snapshot_every_s`
and every `snapshot_every_frames` (so that, with long exposures too, what a frame costs in
snapshot bytes stays a fraction of the frame); the checkpoints in between name the snapshot
and how many frames it holds, and the frames stacked since are replayed from the spool on
resume (`daemon.spool.replay_stack`: the same stack to float16 rounding of the spooled
frames). A snapshot is used only for the stack it
was made of (its frames' paths must be the first ones of the checkpoint's provenance).
A snapshot is never rewritten in place: a new one gets a new name and the old one is
deleted only once a checkpoint naming the new one is on disk, so the checkpoint on disk
always names a snapshot that is there and holds exactly the frames it says (a crash between
the two writes must not leave an old checkpoint beside a newer snapshot: its frames since
would be stacked twice).

Off the stacking path, as far as a consistent snapshot allows: arrays are streamed into the
file in slices (no second copy of the statistics in memory), and with `frames_waiting` a
due snapshot is put off, or one being written abandoned between slices, while frames wait to
be stacked, as long as an older snapshot of the stack is at most `DEFER_FACTOR` intervals
old (the checkpoint then names that one; resuming replays more frames). Frames arrive
an exposure apart and take a fraction of it to stack, so the snapshot is written in the gaps.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

FILENAME = "checkpoint.npz"
_JSON_MEMBER = "__json__"
#: Seconds between two snapshots of a stack's statistics (see the module docstring).
SNAPSHOT_EVERY_S = 1800.0
#: ... and frames stacked between two snapshots (a stack's statistics are ~15 times a raw
#: colour frame: per frame, at most a quarter of one).
SNAPSHOT_EVERY_FRAMES = 60
#: Key of a pipeline state whose "stack.*" arrays are in a snapshot: {"file", "frames"}; and,
#: after `load`, the paths of the frames stacked since, to replay.
SNAPSHOT_KEY = "stack_snapshot"
REPLAY_KEY = "stack_replay"
#: A due snapshot is put off for waiting frames until the newest one is this many intervals
#: old (in seconds and in frames); then it is written whatever waits.
DEFER_FACTOR = 2.0
#: Bytes written between two looks at `frames_waiting`.
_SLICE_BYTES = 8 << 20


class Deferred(Exception):
    """A snapshot write given up between slices because frames are waiting."""


def _split(obj: Any, arrays: dict[str, np.ndarray]) -> Any:
    if isinstance(obj, np.ndarray):
        name = f"a{len(arrays)}"
        arrays[name] = obj
        return {"__ndarray__": name}
    if isinstance(obj, dict):
        return {str(k): _split(v, arrays) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_split(v, arrays) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _join(obj: Any, arrays: Any) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__ndarray__"}:
            return arrays[obj["__ndarray__"]]
        return {k: _join(v, arrays) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join(v, arrays) for v in obj]
    return obj


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (the directory entry, not only the file)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pipelines(obj: Any, path: tuple = ()):
    """(path, dict) of every pipeline state inside `obj`: dicts holding "stack.n_frames"."""
    if isinstance(obj, dict):
        if "stack.n_frames" in obj or SNAPSHOT_KEY in obj:
            yield path, obj
            return
        for k, v in obj.items():
            yield from _pipelines(v, path + (str(k),))


def _paths_digest(provenance: list, n: int) -> str:
    return hashlib.sha256(json.dumps([p.get("path") for p in provenance[:n]]).encode()).hexdigest()[:32]


def _snapshot_info(path: Path) -> dict | None:
    """The JSON of a snapshot file (frames, paths digest), None when absent or unreadable."""
    try:
        with zipfile.ZipFile(path) as zf:
            return json.loads(zf.read(_JSON_MEMBER))["snapshot"]
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None


def save(state_dir: Path, state: dict, *, snapshot_every_s: float = SNAPSHOT_EVERY_S,
         snapshot_every_frames: int = SNAPSHOT_EVERY_FRAMES,
         frames_waiting: Callable[[], bool] | None = None) -> Path:
    """Write `state` atomically to <state_dir>/checkpoint.npz and return its path.

    state_dir: the state folder (created if missing); state: nested dicts/lists of JSON
    values and numpy arrays, pipeline states among them (dicts with "stack.n_frames");
    snapshot_every_s, snapshot_every_frames: a stack's statistics go to a new snapshot file
    when the newest one is older than `snapshot_every_s` and `snapshot_every_frames` frames
    behind the stack (both 0: every time), missing, or of another stack; else the checkpoint
    refers to the snapshot there; frames_waiting: called between slices of a due snapshot: True puts
    the snapshot off (see the module docstring). Snapshots no longer named are deleted after
    the checkpoint is written. OSError (e.g. a full disk): the snapshots this call wrote are
    deleted again, the previous checkpoint and its snapshots stay as they were."""
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    try:
        every = (snapshot_every_s, snapshot_every_frames)
        state, keep = _with_snapshots(state_dir, state, every, written, frames_waiting)
        _write(state_dir / FILENAME, state)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    for stale in state_dir.glob("stack-*.npz"):
        if stale.name not in keep:
            stale.unlink(missing_ok=True)
    return state_dir / FILENAME


def _with_snapshots(state_dir: Path, state: dict, every: tuple[float, int], written: list[Path],
                    frames_waiting: Callable[[], bool] | None = None) -> tuple[dict, set[str]]:
    """`state` with each pipeline's "stack.*" arrays replaced by a snapshot reference
    (writing a new snapshot first where one is due; its path appended to `written`), and the
    names of the snapshots it refers to. A shallow copy: `state` is not changed."""
    state = _copy_dicts(state)
    keep: set[str] = set()
    for path, pipe in _pipelines(state):
        if "stack.n_frames" not in pipe:
            continue
        stem = "stack-" + hashlib.sha256("/".join(path).encode()).hexdigest()[:16]
        n = int(pipe["stack.n_frames"])
        provenance = pipe.get("provenance") or []
        name, frames = _usable_snapshot(state_dir, stem, n, provenance, every)
        stack = {k: pipe.pop(k) for k in [k for k in pipe if k.startswith("stack.")]}
        if name is None:
            older, older_frames = (None, 0) if frames_waiting is None else _usable_snapshot(
                state_dir, stem, n, provenance, (DEFER_FACTOR * every[0], int(DEFER_FACTOR * every[1])))
            stop = frames_waiting if older is not None else None
            new = f"{stem}-{time.time_ns():x}.npz"
            frames = n if n <= len(provenance) else 0
            try:
                if stop is not None and stop():
                    raise Deferred
                _write(state_dir / new, {"snapshot": {"frames": frames, "digest": _paths_digest(provenance, frames)},
                                         **stack}, stop)
                written.append(state_dir / new)
                name = new
            except Deferred:
                name, frames = older, older_frames
        keep.add(name)
        pipe[SNAPSHOT_KEY] = {"file": name, "frames": int(frames)}
    return state, keep


def _usable_snapshot(state_dir: Path, stem: str, n: int, provenance: list, every: tuple[float, int]
                     ) -> tuple[str | None, int]:
    """(name, frames) of the newest snapshot `stem-*.npz` that holds the first frames of this
    stack (at most its `n`) and is not yet due: younger than every[0] seconds or fewer than
    every[1] frames behind. (None, 0) when a new one is due."""
    now = time.time()
    best: tuple[str | None, int] = (None, 0)
    newest = -1.0
    for file in state_dir.glob(f"{stem}*.npz"):
        try:
            mtime = file.stat().st_mtime
        except OSError:
            continue
        if mtime <= newest:
            continue
        info = _snapshot_info(file)
        if (info is None or not info["frames"] <= n <= len(provenance)
                or info["digest"] != _paths_digest(provenance, info["frames"])):
            continue
        if now - mtime < every[0] or n - int(info["frames"]) < every[1]:
            best, newest = (file.name, int(info["frames"])), mtime
    return best


def _copy_dicts(obj: Any) -> Any:
    """Copies of the nested dicts and lists (arrays and scalars shared)."""
    if isinstance(obj, dict):
        return {k: _copy_dicts(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_copy_dicts(v) for v in obj]
    return obj


def _write(target: Path, state: dict, stop: Callable[[], bool] | None = None) -> None:
    """Write `state` atomically to `target` (temp file, fsync, rename, fsync of the folder).
    Arrays are streamed in slices of `_SLICE_BYTES`; `stop` (if given) is asked between
    slices and True raises `Deferred` (nothing left on disk)."""
    state_dir = target.parent
    arrays: dict[str, np.ndarray] = {}
    doc = json.dumps(_split(state, arrays)).encode()
    fd, tmp = tempfile.mkstemp(prefix=".checkpoint-", suffix=".tmp", dir=state_dir)
    try:
        with os.fdopen(fd, "wb") as fh:
            with zipfile.ZipFile(fh, "w", zipfile.ZIP_STORED) as zf:
                zf.writestr(_JSON_MEMBER, doc)
                for name, arr in arrays.items():
                    _write_array(zf, f"{name}.npy", np.ascontiguousarray(arr), stop)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
        fsync_dir(state_dir)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_array(zf: zipfile.ZipFile, name: str, arr: np.ndarray, stop: Callable[[], bool] | None) -> None:
    """One array as a .npy member, written from its own memory in slices (no copy)."""
    if arr.dtype.hasobject:
        raise ValueError(f"checkpoint member {name}: object arrays are not stored")
    with zf.open(name, "w", force_zip64=arr.nbytes > (1 << 31) - (1 << 20)) as member:
        np.lib.format.write_array_header_1_0(member, np.lib.format.header_data_from_array_1_0(arr))
        raw = arr.reshape(-1).view(np.uint8)
        for i in range(0, raw.size, _SLICE_BYTES):
            if stop is not None and i and stop():
                raise Deferred
            member.write(memoryview(raw[i: i + _SLICE_BYTES]))


def load(state_dir: Path) -> dict | None:
    """The last checkpoint, or None when there is none. A damaged one raises ValueError.
    Each pipeline state gets its stack's arrays back from its snapshot, and under
    REPLAY_KEY the paths of the frames stacked after the snapshot, in stacking order (for
    `daemon.spool.replay_stack`)."""
    state = _read(Path(state_dir) / FILENAME)
    if state is None:
        return None
    for _, pipe in _pipelines(state):
        ref = pipe.pop(SNAPSHOT_KEY, None)
        if ref is None:
            continue
        file = Path(state_dir) / ref["file"]
        snap = _read(file)
        if snap is None:
            raise ValueError(f"{file}: the stack snapshot the checkpoint names is missing")
        info = snap.pop("snapshot", None) or {}
        provenance = pipe.get("provenance") or []
        frames = int(ref["frames"])
        if info.get("frames") != frames or info.get("digest") != _paths_digest(provenance, frames):
            raise ValueError(f"{file}: the stack snapshot does not hold the {frames} frames the checkpoint names "
                             f"(it holds {info.get('frames')})")
        pipe.update(snap)
        pipe[REPLAY_KEY] = [p.get("path") for p in provenance[frames:]]
    return state


def _read(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        with zipfile.ZipFile(path) as zf:
            doc = json.loads(zf.read(_JSON_MEMBER))
            arrays = {}
            for n in zf.namelist():
                if n.endswith(".npy"):
                    with zf.open(n) as member:  # read in slices into the array: no second copy
                        arrays[n[:-4]] = np.lib.format.read_array(member, allow_pickle=False)
    except (zipfile.BadZipFile, KeyError, ValueError, OSError) as exc:
        raise ValueError(f"{path}: damaged checkpoint: {exc}") from exc
    return _join(doc, arrays)


def remove_stale_temp(state_dir: Path) -> list[Path]:
    """Delete the temp files a process killed while writing a checkpoint or a snapshot left
    in `state_dir` (`.checkpoint-*.tmp`; never read: the rename is what commits a write).
    Call it at start, before anything writes. Returns the files removed."""
    removed = []
    for stale in Path(state_dir).glob(".checkpoint-*.tmp"):
        try:
            stale.unlink()
            removed.append(stale)
        except OSError:
            continue
    return removed
