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
file of their own, `stack-<id>.npz`, rewritten at most every `snapshot_every_s`; the
checkpoints in between name the snapshot and how many frames it holds, and the frames
stacked since are replayed from the spool on resume (`daemon.spool.replay_stack`: the same
stack to float16 rounding of the spooled frames). A snapshot is used only for the stack it
was made of (its frames' paths must be the first ones of the checkpoint's provenance).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

FILENAME = "checkpoint.npz"
_JSON_MEMBER = "__json__"
#: Seconds between two snapshots of a stack's statistics (see the module docstring).
SNAPSHOT_EVERY_S = 1800.0
#: Key of a pipeline state whose "stack.*" arrays are in a snapshot: {"file", "frames"}; and,
#: after `load`, the paths of the frames stacked since, to replay.
SNAPSHOT_KEY = "stack_snapshot"
REPLAY_KEY = "stack_replay"


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


def save(state_dir: Path, state: dict, *, snapshot_every_s: float = SNAPSHOT_EVERY_S) -> Path:
    """Write `state` atomically to <state_dir>/checkpoint.npz and return its path. Each stack's
    statistics go to its snapshot file when that is older than `snapshot_every_s` (0: every
    time), missing, or of another stack; else the checkpoint refers to the snapshot there."""
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    state = _with_snapshots(state_dir, state, snapshot_every_s)
    _write(state_dir / FILENAME, state)
    return state_dir / FILENAME


def _with_snapshots(state_dir: Path, state: dict, every_s: float) -> dict:
    """`state` with each pipeline's "stack.*" arrays replaced by a snapshot reference
    (writing the snapshot first where it is due). A shallow copy: `state` is not changed."""
    state = _copy_dicts(state)
    keep: set[str] = set()
    for path, pipe in _pipelines(state):
        if "stack.n_frames" not in pipe:
            continue
        name = "stack-" + hashlib.sha256("/".join(path).encode()).hexdigest()[:16] + ".npz"
        keep.add(name)
        file = state_dir / name
        n = int(pipe["stack.n_frames"])
        provenance = pipe.get("provenance") or []
        info = _snapshot_info(file)
        fresh = file.exists() and time.time() - file.stat().st_mtime < every_s
        usable = (info is not None and fresh and info["frames"] <= n <= len(provenance)
                  and info["digest"] == _paths_digest(provenance, info["frames"]))
        stack = {k: pipe.pop(k) for k in [k for k in pipe if k.startswith("stack.")]}
        if not usable:
            frames = n if n <= len(provenance) else 0
            _write(file, {"snapshot": {"frames": frames, "digest": _paths_digest(provenance, frames)}, **stack})
            info = {"frames": frames}
        pipe[SNAPSHOT_KEY] = {"file": name, "frames": int(info["frames"])}
    for stale in state_dir.glob("stack-*.npz"):
        if stale.name not in keep:
            stale.unlink(missing_ok=True)
    return state


def _copy_dicts(obj: Any) -> Any:
    """Copies of the nested dicts and lists (arrays and scalars shared)."""
    if isinstance(obj, dict):
        return {k: _copy_dicts(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_copy_dicts(v) for v in obj]
    return obj


def _write(target: Path, state: dict) -> None:
    """Write `state` atomically to `target` (temp file, fsync, rename, fsync of the folder)."""
    state_dir = target.parent
    arrays: dict[str, np.ndarray] = {}
    doc = json.dumps(_split(state, arrays)).encode()
    fd, tmp = tempfile.mkstemp(prefix=".checkpoint-", suffix=".tmp", dir=state_dir)
    try:
        with os.fdopen(fd, "wb") as fh:
            with zipfile.ZipFile(fh, "w", zipfile.ZIP_STORED) as zf:
                zf.writestr(_JSON_MEMBER, doc)
                for name, arr in arrays.items():
                    buf = io.BytesIO()
                    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
                    zf.writestr(f"{name}.npy", buf.getvalue())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
        fsync_dir(state_dir)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
        snap = _read(Path(state_dir) / ref["file"])
        if snap is None:
            raise ValueError(f"{Path(state_dir) / ref['file']}: the stack snapshot the checkpoint names is missing")
        snap.pop("snapshot", None)
        pipe.update(snap)
        pipe[REPLAY_KEY] = [p.get("path") for p in (pipe.get("provenance") or [])[int(ref["frames"]):]]
    return state


def _read(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        with zipfile.ZipFile(path) as zf:
            doc = json.loads(zf.read(_JSON_MEMBER))
            arrays = {
                n[:-4]: np.load(io.BytesIO(zf.read(n)), allow_pickle=False)
                for n in zf.namelist() if n.endswith(".npy")
            }
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
