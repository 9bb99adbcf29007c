"""Atomic checkpoint of everything the daemon must not lose: the stacks and the ledger.

One file, `<state.dir>/checkpoint.npz`, written to a temp file in the same folder, fsynced,
renamed over the old one and the folder fsynced: after a power cut or `kill -9` either the old
or the new checkpoint is on disk, never a torn one. Since the ledger lives in the same file as
the stacks they can never disagree (see daemon.ledger).

Nested dicts/lists of JSON values and numpy arrays (LivePipeline.state()) are stored as one
JSON document in which each array is replaced by {"__ndarray__": "a<N>"}, plus the arrays as
uncompressed .npy members (fast to write on a Pi; float32 stacks compress poorly anyway).
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

FILENAME = "checkpoint.npz"
_JSON_MEMBER = "__json__"


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


def save(state_dir: Path, state: dict) -> Path:
    """Write `state` atomically to <state_dir>/checkpoint.npz and return its path."""
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {}
    doc = json.dumps(_split(state, arrays)).encode()
    target = state_dir / FILENAME
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
    return target


def load(state_dir: Path) -> dict | None:
    """The last checkpoint, or None when there is none. A damaged one raises ValueError."""
    path = Path(state_dir) / FILENAME
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
