"""`lightbucket` command line: one module per subcommand in this package.

Each subcommand module defines ``add_parser(subparsers)`` (which registers its parser and
sets ``func``) and is imported only when the command line is built, so a broken optional
dependency of one command cannot stop the others.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import stat
import sys
import tempfile
from pathlib import Path

from daemon import __version__
from daemon.folders import ensure_writable

COMMANDS = ("master", "calibrate", "register", "stack", "solve", "run", "demo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightbucket",
        description="Observatory acquisition and live-stacking daemon.",
    )
    parser.add_argument("--version", action="version", version=f"lightbucket {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"daemon.cli.{name}").add_parser(sub)
    return parser


def _writable(folder: Path) -> bool:
    try:
        ensure_writable(folder)
        return True
    except OSError:
        return False


def _private_temp_dir(name: str) -> str:
    """Folder `name` in the temp directory, owned by us and closed to others (numba's cache
    holds code that gets run, so a folder another user made first is not taken), else a
    fresh one."""
    path = Path(tempfile.gettempdir()) / name
    try:
        path.mkdir(mode=0o700, exist_ok=True)
        st = path.lstat()
        if stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o077:
            return str(path)
    except OSError:
        pass
    return tempfile.mkdtemp(prefix=f"{name}-")


def ensure_numba_cache(code: Path | None = None, user_cache: Path | None = None) -> None:
    """Give numba a writable cache folder before any kernel is defined.

    numba keeps compiled kernels beside the code (in `code`, the pipeline's __pycache__),
    else in ~/.cache/numba (`user_cache`). A root-owned install run by a system user without
    a home (`lightbucket run` by hand, as docs/systemd.md suggests, without the unit's
    NUMBA_CACHE_DIR) has neither, and numba then refuses to define the kernels: importing the
    pipeline fails with "cannot cache function ...: no locator available". NUMBA_CACHE_DIR is
    then set to a private folder in the temp directory.
    """
    if os.environ.get("NUMBA_CACHE_DIR"):
        return
    code = code or Path(__file__).resolve().parents[1] / "pipeline" / "__pycache__"
    if user_cache is None:
        user_cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "numba"
    if _writable(code) or _writable(user_cache):
        return
    os.environ["NUMBA_CACHE_DIR"] = _private_temp_dir(f"lightbucket-numba-{os.getuid()}")


def log_format(environ=os.environ) -> str:
    """One line per event; under systemd (JOURNAL_STREAM set: our output goes to the
    journal, which time-stamps every line itself) without a second time stamp."""
    return "%(levelname)s %(name)s: %(message)s" if environ.get("JOURNAL_STREAM") else \
        "%(asctime)s %(levelname)s %(name)s: %(message)s"


def main(argv: list[str] | None = None) -> int:
    ensure_numba_cache()  # before the subcommands import the pipeline's kernels
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format=log_format(),
        stream=sys.stderr,
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
