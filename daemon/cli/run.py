"""`lightbucket run --config FILE [--set section.key=value ...]`: the daemon (daemon.service)."""

from __future__ import annotations

import asyncio
import logging
import sys

log = logging.getLogger("lightbucket")


def add_parser(sub) -> None:
    p = sub.add_parser("run", help="run the live-stacking daemon (watch folder, stack, MQTT)")
    p.add_argument("--config", required=True, help="TOML config file (see config/watch.toml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config key (value parsed as TOML, else string); repeatable")
    p.set_defaults(func=run)


def run(args) -> int:
    from daemon.config import ConfigError, load_config

    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"lightbucket run: {exc}", file=sys.stderr)
        return 2
    from daemon.service import Service

    try:
        service = Service(config)
    except (ValueError, OSError) as exc:  # settings or calibration masters refused
        print(f"lightbucket run: {exc}", file=sys.stderr)
        return 2
    # One line per event on stdout (under systemd, the journal: see `log_format`).
    root = logging.getLogger()
    for handler in root.handlers:
        handler.setStream(sys.stdout)
    return asyncio.run(service.run())
