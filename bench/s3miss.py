"""What the S3 upload adds to a miss, measured in the same invocation: the time until a
client has its whole snapshot, and until the snapshot is cached (in the bucket, for S3),
with ``backend = "disk"`` (the baseline), with
``backend = "s3"`` and parts uploaded while the snapshot is generated (16 and 5 MiB parts),
and with ``backend = "s3"`` and one part larger than the snapshot, which leaves the whole
upload for the end (what uploading the verified file afterwards costs).

    python -m bench.s3miss [--files 3000 --commits 200 | --repo /path/to/bare.git]

With an S3 backend a client sees the end of its stream once the snapshot is verified; the
upload may finish later. moto shares this machine's two cores: an upload running during a
generation takes CPU from it here, which a remote S3 would not.
"""

from __future__ import annotations

import statistics
import time
import urllib.request

from bench.harness import BUCKET, benchmark, local_bucket, served_upstream
from bench.run import HOST, curl, gitcache_server
from tests.upstream import git


def idle(base: str) -> None:
    """Until no generation runs (an upload may outlive its clients' streams): each miss
    is measured on a machine with nothing else to do."""
    while True:
        with urllib.request.urlopen(f"{base}/metrics") as page:
            if "gitcache_generations_in_flight 0.0" in page.read().decode():
                return
        time.sleep(0.02)


def misses(base: str, name: str, refs: list[str]) -> tuple[float, float]:
    """Medians, one distinct snapshot per ref: seconds until the client had the whole
    snapshot, and until the generation ended (for S3: the snapshot is in the bucket)."""
    client, cached = [], []
    for ref in ["warm", *refs]:  # the first clones the mirror
        started = time.perf_counter()
        client.append(curl(f"{base}/git/{HOST}/{name}/snapshot.tar.zst?ref={ref}")[1])
        idle(base)
        cached.append(time.perf_counter() - started)
    return statistics.median(client[1:]), statistics.median(cached[1:])


def main() -> None:
    results: dict[str, tuple[float, float]] = {}
    with (
        benchmark(__doc__, runs=5) as (args, bare, tmp),
        local_bucket() as endpoint,
        served_upstream(bare) as (url, _),
    ):
        head = git("--git-dir", str(bare), "rev-parse", "HEAD").strip()
        refs = [f"bench-{i}" for i in range(args.runs)]
        for branch in ["warm", *refs]:  # the same commit, distinct snapshots
            git("--git-dir", str(bare), "branch", "-f", branch, head)
        s3 = f'[cache.s3]\nbucket = "{BUCKET}"\nendpoint_url = "{endpoint}"\n'
        setups = {
            "disk": "",
            "s3, 16 MiB parts (default)": f'[cache]\nbackend = "s3"\n{s3}part_size = "16MiB"\n',
            "s3, 5 MiB parts": f'[cache]\nbackend = "s3"\n{s3}part_size = "5MiB"\n',
            "s3, one part, at the end": f'[cache]\nbackend = "s3"\n{s3}part_size = "4GiB"\n',
        }
        for i, (label, extra) in enumerate(setups.items()):
            state = tmp / f"state-{i}"
            state.mkdir()
            prefix = f'prefix = "run-{i}/"\n' if extra else ""
            with gitcache_server(state, url, extra + prefix) as (base, _):
                results[label] = misses(base, bare.name.removesuffix(".git"), refs)
    disk = results["disk"][0]
    print(f"miss, medians of {args.runs} runs: until the client had it | until it was cached")
    for label, (client, cached) in results.items():
        print(
            f"  {label:28s} {client * 1e3:7.0f} ms ({client / disk:4.2f}x disk)"
            f"  | {cached * 1e3:7.0f} ms"
        )


if __name__ == "__main__":
    main()
