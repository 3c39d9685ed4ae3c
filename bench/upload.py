"""S3 upload throughput and peak memory against part size, with boto3's own managed
``upload_file`` (its transfer manager) as the baseline, run in the same invocation against
the same S3-compatible server (moto, on loopback).

    python -m bench.upload [--size-mb 256]

Each measurement runs in a child process of its own, so its peak RSS is its own.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import boto3

from bench.harness import BUCKET, local_bucket
from gitcache.bucket.client import Bucket
from gitcache.cache.base import Entry
from gitcache.cache.s3 import S3Cache
from gitcache.config import S3CacheConfig
from gitcache.metrics import Metrics
from gitcache.repo import RepoRef

MiB = 1024 * 1024


class PeakRSS:
    """Samples this process's resident memory while an upload runs."""

    def __init__(self) -> None:
        self.base = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @staticmethod
    def _rss() -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.005)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def growth_mib(self) -> float:
        return (self.peak - self.base) / 1024


def _child(endpoint: str, bucket: str, path: Path, part_size: int, concurrency: int) -> None:
    """One upload; prints seconds and the peak RSS growth in MiB as JSON."""
    if part_size:
        digest = hashlib.sha256()
        with path.open("rb") as f:
            while chunk := f.read(MiB):
                digest.update(chunk)
        data_sha = digest.hexdigest()
        size = path.stat().st_size
        entry = Entry("bench", "HEAD", "c" * 40, "d", size, data_sha, 0.0, 0.0)

        async def upload() -> float:
            config = S3CacheConfig(
                bucket=bucket,
                endpoint_url=endpoint,
                part_size=part_size,
                upload_concurrency=concurrency,
            )
            s3 = Bucket(config, Metrics())
            await s3.open()
            started = time.perf_counter()
            await S3Cache(s3).commit(RepoRef("bench.test", "repo"), path, entry)
            elapsed = time.perf_counter() - started
            await s3.close()
            return elapsed

        with PeakRSS() as rss:
            seconds = asyncio.run(upload())
    else:
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        with PeakRSS() as rss:
            started = time.perf_counter()
            s3.upload_file(str(path), bucket, "baseline.tar.zst")
            seconds = time.perf_counter() - started
    print(json.dumps({"seconds": seconds, "rss_mib": rss.growth_mib}))


def _measure(
    endpoint: str, bucket: str, path: Path, part_size: int, concurrency: int = 0
) -> dict[str, float]:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.upload",
            "--child",
            endpoint,
            bucket,
            str(path),
            str(part_size),
            str(concurrency),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-mb", type=int, default=256)
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:  # credentials: in the environment local_bucket() gave the parent
        endpoint, bucket, path, part_size, concurrency = args.child
        _child(endpoint, bucket, Path(path), int(part_size), int(concurrency))
        return
    with local_bucket() as endpoint, tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "snapshot.tar.zst"
        path.write_bytes(os.urandom(args.size_mb * MiB))
        baseline = _measure(endpoint, BUCKET, path, 0)
        mb = args.size_mb * MiB / 1e6
        print(
            f"S3 upload of {args.size_mb} MiB to moto on loopback; "
            f"baseline boto3 upload_file: {mb / baseline['seconds']:.0f} MB/s, "
            f"+{baseline['rss_mib']:.0f} MiB RSS"
        )
        # 8 MiB x 10 is what upload_file itself uses: the like-for-like comparison.
        for part, concurrency in ((5, 4), (16, 4), (64, 4), (8, 10)):
            r = _measure(endpoint, BUCKET, path, part * MiB, concurrency)
            print(
                f"  part_size {part:3d} MiB x {concurrency:2d} in flight: "
                f"{mb / r['seconds']:6.0f} MB/s"
                f" ({baseline['seconds'] / r['seconds']:.2f}x baseline), "
                f"+{r['rss_mib']:.0f} MiB RSS"
            )


if __name__ == "__main__":
    main()
