"""`lightbucket` command line: one module per subcommand in this package.

Each subcommand module defines ``add_parser(subparsers)`` (which registers its parser and
sets ``func``) and is imported only when the command line is built, so a broken optional
dependency of one command cannot stop the others.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from daemon import __version__

COMMANDS = ("master", "calibrate", "register", "stack", "run", "demo")


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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
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
