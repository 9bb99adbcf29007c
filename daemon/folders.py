"""Folders the daemon writes to: created on demand and proven writable before they are needed."""

from __future__ import annotations

import tempfile
from pathlib import Path


def ensure_writable(path: Path) -> None:
    """Create folder `path` (and its parents) if needed and create and drop a nameless file
    in it. Raises OSError where this process cannot write there: permissions, a read-only
    mount, or anything outside ReadWritePaths= under systemd's ProtectSystem=strict. A real
    write is the only faithful test (`os.access` says yes to root, also where a security
    module or a full disk would still say no)."""
    path.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=path):
        pass
