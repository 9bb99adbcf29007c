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


def ensure_dir(path: Path, setting: str, *, writable: bool = True) -> None:
    """Create folder `path` if needed and, with `writable`, prove that a file can be made in it.

    Why at start: a folder the service cannot write (another user's, a read-only mount, or
    under systemd anything outside ReadWritePaths=, since ProtectSystem=strict) would otherwise
    let it run and look healthy while every checkpoint, spool write and product fails. Raises
    OSError naming the config setting.
    """
    try:
        if writable:
            ensure_writable(path)
        else:
            path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OSError(f"{setting} = {str(path)!r}: cannot {'write to' if writable else 'create'} it "
                      f"({exc.strerror or exc}); give the service's user write access, or under "
                      f"systemd add it to ReadWritePaths= (docs/systemd.md)") from exc
