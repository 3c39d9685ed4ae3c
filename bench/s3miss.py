"""What the S3 upload adds to a miss, measured in the same invocation: the time until a
client has its whole snapshot with ``backend = "disk"`` (the baseline), with
``backend = "s3"`` and parts uploaded while the snapshot is generated (16 and 5 MiB parts),
and with ``backend = "s3"`` and one part larger than the snapshot, which leaves the whole
upload for the end (what uploading the verified file afterwards costs).

    python -m bench.s3miss [--files 3000 --commits 200 | --repo /path/to/bare.git]

With an S3 backend a client sees the end of its stream once the snapshot is in the bucket
(so whoever has it finds it cached). moto shares this machine's two cores.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

import boto3

from bench.make_repo import add_repo_arguments, bench_repo
from bench.run import HOST, curl, free_port, gitcache_server, serve_in_thread
from tests.conftest import start_s3_server
from tests.upstream import Upstream, git

BUCKET = "gitcache-bench"


def misses(base: str, name: str, refs: list[str]) -> float:
    """Median seconds until the whole snapshot arrived, one distinct snapshot per ref."""
    curl(f"{base}/git/{HOST}/{name}/snapshot.tar.zst?ref=warm")  # clones the mirror
    return statistics.median(
        curl(f"{base}/git/{HOST}/{name}/snapshot.tar.zst?ref={ref}")[1] for ref in refs
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_repo_arguments(parser)
    parser.add_argument("--runs", type=int, default=5, help="runs per measurement (median)")
    args = parser.parse_args()
    os.environ.setdefault("GIT_CONFIG_NOSYSTEM", "1")
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    with tempfile.TemporaryDirectory(prefix="gitcache-bench-") as tmp:
        bare = bench_repo(Path(tmp), args)
        head = git("--git-dir", str(bare), "rev-parse", "HEAD").strip()
        refs = [f"bench-{i}" for i in range(args.runs)]
        for branch in ["warm", *refs]:  # the same commit, distinct snapshots
            git("--git-dir", str(bare), "branch", "-f", branch, head)
        s3_port, upstream_port = free_port(), free_port()
        server = start_s3_server(s3_port)
        endpoint = f"http://127.0.0.1:{s3_port}"
        s3 = f'[cache.s3]\nbucket = "{BUCKET}"\nendpoint_url = "{endpoint}"\n'
        setups = {
            "disk": "",
            "s3, 16 MiB parts (default)": f'[cache]\nbackend = "s3"\n{s3}part_size = "16MiB"\n',
            "s3, 5 MiB parts": f'[cache]\nbackend = "s3"\n{s3}part_size = "5MiB"\n',
            "s3, one part, at the end": f'[cache]\nbackend = "s3"\n{s3}part_size = "4GiB"\n',
        }
        results: dict[str, float] = {}
        try:
            boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(
                Bucket=BUCKET
            )
            upstream = Upstream(bare.parent, port=upstream_port)
            with serve_in_thread(upstream.app(), upstream_port):
                url = f"http://127.0.0.1:{upstream_port}/{{repo}}.git"
                for i, (label, extra) in enumerate(setups.items()):
                    state = Path(tmp, f"state-{i}")
                    state.mkdir()
                    prefix = f'prefix = "run-{i}/"\n' if extra else ""
                    with gitcache_server(state, url, extra + prefix) as (base, _):
                        results[label] = misses(base, bare.name.removesuffix(".git"), refs)
        finally:
            server.terminate()
            server.wait()
    disk = results["disk"]
    print(f"miss until the whole snapshot arrived, medians of {args.runs} runs")
    for label, seconds in results.items():
        print(f"  {label:28s} {seconds * 1e3:8.0f} ms  {seconds / disk:5.2f}x the disk backend")


if __name__ == "__main__":
    main()
