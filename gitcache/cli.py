"""``gitcache serve`` and ``gitcache check-config``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from aiohttp import web

from gitcache.app import create_app
from gitcache.auth import Tokens
from gitcache.config import ConfigError, dump_config, load_config
from gitcache.log import setup_logging


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gitcache", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("serve", "serve snapshots over HTTP"),
        ("check-config", "validate and print the effective config"),
    ):
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument(
            "--config",
            type=Path,
            default=None,
            help="TOML config file (default: $GITCACHE_CONFIG, else the embedded default)",
        )
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
        if config.auth.tokens_file:  # validated here too, so check-config catches it
            Tokens.load(Path(config.auth.tokens_file))
    except ConfigError as exc:
        print(f"gitcache: invalid configuration: {exc}", file=sys.stderr)
        return 2
    if args.command == "check-config":
        print(dump_config(config))
        return 0
    setup_logging(config.log.level)
    web.run_app(
        create_app(config),
        host=config.server.host,
        port=config.server.port,
        shutdown_timeout=config.server.shutdown_timeout,
        print=None,
        access_log=None,  # one line per request comes from the observe middleware
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
