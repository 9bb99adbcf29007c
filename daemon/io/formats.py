"""The one list of file names the loader reads, by format: everything else asks this module.

The watcher's default patterns (`DEFAULT_PATTERNS`, the config's default), `lightbucket
stack`'s folder expansion and the loader's dispatch all come from `SUFFIXES`, so a format is
either read everywhere or nowhere. With the default patterns the watcher hands on every file
but temporary ones and a frame's companions (`COMPANION_SUFFIXES`), so that the loader answers
each (read, or refused naming its kind); config may narrow the patterns (`narrowed`), never
widen what loads. This module imports nothing heavy: the settings (a leaf) import it.
"""

from __future__ import annotations

import fnmatch
import os

FITS_SUFFIXES = (".fits", ".fit", ".fts", ".fits.fz", ".fz", ".fits.gz", ".fit.gz", ".fts.gz")
XISF_SUFFIXES = (".xisf",)
TIFF_SUFFIXES = (".tif", ".tiff")
#: The file types of the cameras LibRaw reads (digiKam's LibRaw list, dcraw's, and the later
#: GoPro, RED, Rawzor, Phase One and Kodak containers). Left out: `.hdr` (Leaf, but mostly
#: Radiance HDR images) and `.cin` (old Phantom, but mostly Cineon images): these names are
#: answered as unsupported rather than handed to LibRaw.
RAW_SUFFIXES = (
    ".3fr", ".ari", ".arw", ".bay", ".bmq", ".cap", ".cine", ".cr2", ".cr3", ".crw", ".cs1", ".dc2",
    ".dcr", ".dcs", ".dng", ".drf", ".eip", ".erf", ".fff", ".gpr", ".ia", ".iiq", ".k25", ".kc2",
    ".kdc", ".mdc", ".mef", ".mos", ".mrw", ".nef", ".nrw", ".obm", ".orf", ".ori", ".pef", ".ptx",
    ".pxn", ".qtk", ".r3d", ".raf", ".raw", ".rdc", ".rw2", ".rwl", ".rwz", ".sr2", ".srf", ".srw",
    ".sti", ".x3f",
)
#: Every suffix a frame file may have, by format name.
SUFFIXES: dict[str, tuple[str, ...]] = {
    "fits": FITS_SUFFIXES, "xisf": XISF_SUFFIXES, "tiff": TIFF_SUFFIXES, "raw": RAW_SUFFIXES,
}
ALL_SUFFIXES: tuple[str, ...] = tuple(s for group in SUFFIXES.values() for s in group)
#: Watcher patterns (fnmatch, case-insensitive) for every readable file.
DEFAULT_PATTERNS: tuple[str, ...] = tuple(f"*{s}" for s in ALL_SUFFIXES)
#: Files capture programs write beside their frames that describe a frame and are no frame
#: themselves: JSON sidecars (a TIFF's `<name>.json`, Jocular's `info.json`: read by the
#: loader with the frame) and SharpCap's `<name>.CameraSettings.txt`. Never answered alone.
COMPANION_SUFFIXES = (".json", ".camerasettings.txt")


def format_of(path: str | os.PathLike) -> str | None:
    """'fits', 'xisf', 'tiff', 'raw' by the file's suffix (case-insensitive), None if unknown."""
    name = os.fspath(path).lower()
    for fmt, suffixes in SUFFIXES.items():
        if name.endswith(suffixes):
            return fmt
    return None


def is_companion(path: str | os.PathLike) -> bool:
    """The name is a frame's companion file (`COMPANION_SUFFIXES`), not a frame."""
    return os.fspath(path).lower().endswith(COMPANION_SUFFIXES)


def narrowed(patterns: tuple[str, ...] | None) -> tuple[str, ...] | None:
    """`patterns` when they narrow what is read, None when they are the default (every
    name the loader reads: then every other file is handed on too, to be answered)."""
    return None if patterns is None or tuple(patterns) == DEFAULT_PATTERNS else tuple(patterns)


def describe_suffix(path: str | os.PathLike) -> str:
    """The file's suffix as a user would name its kind ('.jpg', 'no suffix')."""
    name = os.path.basename(os.fspath(path))
    stem, dot, ext = name.rpartition(".")
    return f".{ext.lower()}" if dot and stem else "no suffix"


def matches(path: str | os.PathLike, patterns: tuple[str, ...]) -> bool:
    """The file name matches one of `patterns` (fnmatch, case-insensitive)."""
    low = os.path.basename(os.fspath(path)).lower()
    return any(fnmatch.fnmatch(low, p.lower()) for p in patterns)
