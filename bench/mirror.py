"""A new replica's first mirror: restored from the bucket's archive (then checked and
brought up to date from the upstream) against ``git clone --bare`` from the upstream over
HTTP, measured in the same invocation.

    python -m bench.mirror [--files 3000 --commits 200 | --repo /path/to/bare.git]

The repository is served through ``git http-backend`` on loopback, the bucket by moto's
server on loopback; both share this machine's cores with the measured work.
"""

from __future__ import annotations

import asyncio
import shutil
import statistics
import subprocess
import time
from pathlib import Path

from bench.harness import BUCKET, benchmark, local_bucket, served_upstream
from gitcache.bucket.client import Bucket
from gitcache.config import Config
from gitcache.metrics import Metrics
from gitcache.mirror.archive import MirrorArchives
from gitcache.mirror.store import MirrorStore
from gitcache.repo import RepoRef
from gitcache.settings import config_from_dict
from gitcache.tasks import TaskSet

HOST = "bench.test"


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
    bucket = Bucket(make_config(work, upstream_url, s3_endpoint).cache.s3, Metrics())

    def store(state: Path) -> MirrorStore:
        config = make_config(state, upstream_url, s3_endpoint)
        archives = MirrorArchives(bucket, state / "tmp")
        return MirrorStore(config, TaskSet(), Metrics(), archives=archives)

    await bucket.open()
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
    with (
        benchmark(__doc__, runs=3) as (args, bare, tmp),
        local_bucket() as s3_endpoint,
        served_upstream(bare) as (upstream_url, _),
    ):
        work = tmp / "work"
        work.mkdir()
        asyncio.run(measure(upstream_url, s3_endpoint, work, args.runs))


if __name__ == "__main__":
    main()
