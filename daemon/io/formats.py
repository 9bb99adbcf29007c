"""The one list of file names the loader reads, by format: everything else asks this module.

The watcher's default patterns (`daemon.config.DEFAULT_PATTERNS`), `lightbucket stack`'s
folder expansion and the loader's dispatch all come from `SUFFIXES`, so a format is either
read everywhere or nowhere. Config may narrow the watched patterns, never widen what loads.
This module imports nothing heavy: the settings (a leaf) import it.
"""

from __future__ import annotations

import fnmatch
import os

FITS_SUFFIXES = (".fits", ".fit", ".fts", ".fits.fz", ".fz", ".fits.gz", ".fit.gz", ".fts.gz")
XISF_SUFFIXES = (".xisf",)
TIFF_SUFFIXES = (".tif", ".tiff")
#: LibRaw's camera raw containers (its documented list of supported cameras' file types).
RAW_SUFFIXES = (
    ".3fr", ".ari", ".arw", ".bay", ".cap", ".cr2", ".cr3", ".crw", ".dcr", ".dcs", ".dng", ".drf",
    ".eip", ".erf", ".fff", ".gpr", ".iiq", ".k25", ".kdc", ".mdc", ".mef", ".mos", ".mrw", ".nef",
    ".nrw", ".obm", ".orf", ".ori", ".pef", ".ptx", ".pxn", ".qtk", ".r3d", ".raf", ".raw", ".rdc",
    ".rw2", ".rwl", ".rwz", ".sr2", ".srf", ".srw", ".sti", ".x3f",
)
#: Every suffix a frame file may have, by format name.
SUFFIXES: dict[str, tuple[str, ...]] = {
    "fits": FITS_SUFFIXES, "xisf": XISF_SUFFIXES, "tiff": TIFF_SUFFIXES, "raw": RAW_SUFFIXES,
}
ALL_SUFFIXES: tuple[str, ...] = tuple(s for group in SUFFIXES.values() for s in group)
#: Files capture programs write beside their frames that are not frames: settings and log
#: text (SharpCap's `.CameraSettings.txt`), sidecars (`<frame>.json`, XMP), thumbnails and
#: previews (Seestar's and ASIAIR's JPEGs). The watcher names them in the log and moves on;
#: any other file gets an answer from the loader.
COMPANION_SUFFIXES = (".txt", ".json", ".xml", ".xmp", ".log", ".csv", ".ini", ".cfg", ".md",
                      ".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".db")
#: Watcher patterns (fnmatch, case-insensitive) for every readable file.
DEFAULT_PATTERNS: tuple[str, ...] = tuple(f"*{s}" for s in ALL_SUFFIXES)


def format_of(path: str | os.PathLike) -> str | None:
    """'fits', 'xisf', 'tiff', 'raw' by the file's suffix (case-insensitive), None if unknown."""
    name = os.fspath(path).lower()
    for fmt, suffixes in SUFFIXES.items():
        if name.endswith(suffixes):
            return fmt
    return None


def is_companion(path: str | os.PathLike) -> bool:
    """A file that accompanies frames and is not one (COMPANION_SUFFIXES, case-insensitive)."""
    return os.fspath(path).lower().endswith(COMPANION_SUFFIXES)


def describe_suffix(path: str | os.PathLike) -> str:
    """The file's suffix as a user would name its kind ('.jpg', 'no suffix')."""
    name = os.path.basename(os.fspath(path))
    stem, dot, ext = name.rpartition(".")
    return f".{ext.lower()}" if dot and stem else "no suffix"


def matches(path: str | os.PathLike, patterns: tuple[str, ...]) -> bool:
    """The file name matches one of `patterns` (fnmatch, case-insensitive)."""
    low = os.path.basename(os.fspath(path)).lower()
    return any(fnmatch.fnmatch(low, p.lower()) for p in patterns)
