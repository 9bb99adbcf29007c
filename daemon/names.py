"""Names that are safe where they go: file names for the file system, text for FITS headers.

FITS header values hold printable ASCII only (astropy refuses anything else), and a capture
program may name a frame `Light é 01.fits` or `M42 星.fits`. Text is escaped, never dropped,
so a header still tells which file it was (`\\xe9`, `\\u661f`, as Python writes them).
"""

from __future__ import annotations

import re

_UNSAFE_FILENAME = re.compile(r"[^A-Za-z0-9_.+-]+")
_ESCAPE = re.compile(r"\\x[0-9a-fA-F]{2}|\\u[0-9a-fA-F]{4}|\\U[0-9a-fA-F]{8}")


def safe_filename(name: str) -> str:
    """A file name of ASCII letters, digits and `_.+-` only: every other run becomes '-'.

    Parameters
    ----------
    name : str
        Any text (a stack key, a target name).

    Returns
    -------
    str
        The name, never empty ('-' for an empty name), never starting with a dot.
    """
    out = _UNSAFE_FILENAME.sub("-", name)
    if out.startswith("."):
        out = "-" + out[1:]
    return out or "-"


def ascii_safe(text: str) -> str:
    """`text` as printable ASCII for a FITS card: other characters (non-ASCII, control)
    written as backslash escapes (`é` -> `\\xe9`, `星` -> `\\u661f`, tab -> `\\x09`).

    Parameters
    ----------
    text : str
        Any text (a path, a name from a capture program's header).

    Returns
    -------
    str
        The same text when it is printable ASCII already; `ascii_unescape` reverses it.
    """
    if text.isascii() and text.isprintable():
        return text
    return "".join(c if c.isascii() and c.isprintable() else c.encode("ascii", "backslashreplace").decode()
                   if ord(c) > 0x7F else f"\\x{ord(c):02x}" for c in text)


def ascii_unescape(text: str) -> str:
    """Undo `ascii_safe`: `\\xNN`, `\\uNNNN`, `\\UNNNNNNNN` escapes back to their characters."""
    return _ESCAPE.sub(lambda m: chr(int(m.group(0)[2:], 16)), text)
