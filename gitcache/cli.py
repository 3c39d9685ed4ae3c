"""``gitcache serve``, ``gitcache check-config`` and ``gitcache clone`` (the client)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from aiohttp import web

from gitcache import client, keys
from gitcache.app import create_app
from gitcache.auth import Tokens
from gitcache.config import Config, ConfigError
from gitcache.log import setup_logging
from gitcache.settings import dump_config, load_config
from gitcache.web.server import Gate, GatedRunner, shut_down

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["clone"]:  # the client: the very module served at /client.py
        return client.main(argv)
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
    setup_logging(config.log.level, config.log.format)
    asyncio.run(serve(config))
    return 0


async def serve(config: Config) -> None:
    """Serve until SIGTERM or SIGINT, then shut down in order: readiness answers 503 at
    once, new connections are accepted for ``server.drain_delay`` more (so a load balancer
    sees the 503 and stops sending), then refused; running responses get
    ``server.shutdown_timeout`` to finish; then generations are aborted cleanly and every
    git child is killed (the app's cleanup contexts)."""
    app = create_app(config)
    metrics = app[keys.METRICS]
    runner = GatedRunner(
        app,
        gate=Gate(
            max_connections=config.server.max_connections,
            on_refused=metrics.overloaded.labels("max_connections").inc,
        ),
        header_timeout=config.server.header_timeout,
        access_log=None,  # the observe middleware logs one line per request
        # Requests were given server.shutdown_timeout and then cut (see stop): what is
        # left for aiohttp to wait for is connections closing.
        shutdown_timeout=1.0,
    )
    await runner.setup()
    await web.TCPSite(runner, config.server.host, config.server.port).start()
    log.info("gitcache listening on %s", config.server.listen)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
        log.info("shutting down: readiness is 503 now")
        app[keys.HEALTH].ready = False
        await asyncio.sleep(config.server.drain_delay)
    finally:
        await shut_down(runner, config.server.shutdown_timeout)
        log.info("gitcache stopped")


if __name__ == "__main__":
    sys.exit(main())
