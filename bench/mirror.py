"""A new replica's first mirror: restored from the bucket's archive (then checked and
brought up to date from the upstream) against ``git clone --bare`` from the upstream over
HTTP, measured in the same invocation.

    python -m bench.mirror [--files 3000 --commits 200 | --repo /path/to/bare.git]

The repository is served through ``git http-backend`` on loopback, the bucket by moto's
server on loopback; both share this machine's cores with the measured work.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import boto3

from bench.make_repo import add_repo_arguments, bench_repo
from bench.run import free_port, serve_in_thread
from gitcache.cache.s3 import S3Cache
from gitcache.config import Config, config_from_dict
from gitcache.metrics import Metrics
from gitcache.mirror.archive import MirrorArchives
from gitcache.mirror.store import MirrorStore
from gitcache.repo import RepoRef
from gitcache.tasks import TaskSet
from tests.conftest import start_s3_server
from tests.upstream import Upstream

HOST = "bench.test"
BUCKET = "gitcache-bench"


def make_config(state: Path, upstream_url: str, s3_endpoint: str) -> Config:
    return config_from_dict(
        {
            "server": {"state_dir": str(state)},
            "cache": {"backend": "s3", "s3": {"bucket": BUCKET, "endpoint_url": s3_endpoint}},
            "upstreams": {HOST: {"url": upstream_url, "allow_private": True}},
        }
    )


async def measure(upstream_url: str, s3_endpoint: str, work: Path, runs: int) -> None:
    repo = RepoRef(HOST, "bench")
    bucket = S3Cache(make_config(work, upstream_url, s3_endpoint).cache.s3, Metrics())

    def store(state: Path) -> MirrorStore:
        config = make_config(state, upstream_url, s3_endpoint)
        archives = MirrorArchives(bucket, state / "tmp")
        return MirrorStore(config, TaskSet(), Metrics(), archives=archives)

    await bucket.start()
    try:
        first = store(work / "first")
        await first.ensure(repo)  # no archive yet: a clone
        started = time.perf_counter()
        assert await first.archive(repo)
        made = time.perf_counter() - started
        archive = await MirrorArchives(bucket, work).newest(repo)
        assert archive is not None

        restores, clones = [], []
        url = upstream_url.replace("{repo}", "bench")
        for i in range(runs):
            started = time.perf_counter()
            await store(work / f"replica-{i}").ensure(repo)
            restores.append(time.perf_counter() - started)
            started = time.perf_counter()
            subprocess.run(["git", "clone", "-q", "--bare", url, str(work / f"c-{i}")], check=True)
            clones.append(time.perf_counter() - started)
            shutil.rmtree(work / f"replica-{i}")
            shutil.rmtree(work / f"c-{i}")
    finally:
        await bucket.close()
    ours, theirs = statistics.median(restores), statistics.median(clones)
    print(f"mirror archive: {archive.size / 1e6:.1f} MB, made and uploaded in {made:.2f}s")
    print(f"a new replica's mirror, medians of {runs} runs:")
    print(
        f"  restore + fsck + ls-remote {ours * 1e3:8.0f} ms  "
        f"git clone --bare {theirs * 1e3:8.0f} ms  {theirs / ours:.2f}x faster"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_repo_arguments(parser)
    parser.add_argument("--runs", type=int, default=3, help="runs per measurement (median)")
    args = parser.parse_args()
    os.environ.setdefault("GIT_CONFIG_NOSYSTEM", "1")
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    with tempfile.TemporaryDirectory(prefix="gitcache-bench-") as tmp:
        bare = bench_repo(Path(tmp), args)
        work = Path(tmp, "work")
        work.mkdir()
        s3_port, upstream_port = free_port(), free_port()
        server = start_s3_server(s3_port)
        s3_endpoint = f"http://127.0.0.1:{s3_port}"
        try:
            boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(
                Bucket=BUCKET
            )
            upstream = Upstream(bare.parent, port=upstream_port)
            with serve_in_thread(upstream.app(), upstream_port):
                upstream_url = f"http://127.0.0.1:{upstream_port}/{{repo}}.git"
                asyncio.run(measure(upstream_url, s3_endpoint, work, args.runs))
        finally:
            server.terminate()
            server.wait()


if __name__ == "__main__":
    main()
