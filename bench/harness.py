"""What every benchmark needs: its arguments, the repository it runs on (generated or a
copy of yours), the upstream serving it over HTTP, and a local S3 bucket."""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import boto3
from aiohttp import web

from bench.make_repo import SHAPES, make_repo
from tests.servers import free_port, start_s3_server
from tests.upstream import Upstream

BUCKET = "gitcache-bench"


@contextmanager
def benchmark(description: str, runs: int) -> Iterator[tuple[argparse.Namespace, Path, Path]]:
    """Parse the arguments every benchmark takes; yield them, the bare repository they
    name, and a temporary directory that is removed afterwards."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repo", type=Path, help="a local bare repository (default: generate)")
    parser.add_argument(
        "--shape",
        choices=SHAPES,
        default="tree",
        help="a generated repository's shape: mostly working tree, or mostly pack",
    )
    parser.add_argument("--files", type=int, default=3000, help="files in a generated repository")
    parser.add_argument(
        "--commits", type=int, help="its number of commits (default: 200, or 50,000 for a pack)"
    )
    parser.add_argument("--runs", type=int, default=runs, help="runs per measurement (median)")
    args = parser.parse_args()
    os.environ.setdefault("GIT_CONFIG_NOSYSTEM", "1")
    with tempfile.TemporaryDirectory(prefix="gitcache-bench-") as name:
        tmp = Path(name)
        bare = tmp / "repos" / "bench.git"
        bare.parent.mkdir()
        if args.repo is None:
            commits = args.commits or (50_000 if args.shape == "pack" else 200)
            make_repo(bare, files=args.files, commits=commits, shape=args.shape)
        else:  # a copy: benchmarks add branches to it
            subprocess.run(
                ["git", "clone", "-q", "--bare", str(args.repo.resolve()), str(bare)], check=True
            )
        yield args, bare, tmp


def run_in_work_dir(
    description: str, run: Callable[[Path, int, Path], None], runs: int = 5
) -> None:
    """A benchmark's main: its arguments and repository, then ``run(bare, runs, work)``
    with an empty work directory."""
    with benchmark(description, runs=runs) as (args, bare, tmp):
        work = tmp / "work"
        work.mkdir()
        run(bare, args.runs, work)


@contextmanager
def serve_in_thread(app: web.Application, port: int) -> Iterator[None]:
    """Run an aiohttp app on its own loop in a thread (the upstream, FileResponse)."""
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app, access_log=None)
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.run_until_complete(runner.cleanup())
        loop.close()


@contextmanager
def served_upstream(bare: Path) -> Iterator[tuple[str, int]]:
    """``git http-backend`` serving ``bare``'s directory on loopback: the URL template an
    upstream is configured with, and its port."""
    port = free_port()
    with serve_in_thread(Upstream(bare.parent, port=port).app(), port):
        yield f"http://127.0.0.1:{port}/{{repo}}.git", port


@contextmanager
def local_bucket() -> Iterator[str]:
    """moto's S3 server on loopback with :data:`BUCKET` created; yields its endpoint.
    It accepts any credentials; they are found the standard way."""
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    port = free_port()
    server = start_s3_server(port)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(
            Bucket=BUCKET
        )
        yield endpoint
    finally:
        server.terminate()
        server.wait()
