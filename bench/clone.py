"""The restore client against its baselines, every figure a ratio in one run:

    python -m bench.clone                       # the generated repository
    python -m bench.clone --repo /path/to/bare  # any local bare repository

- ``gitcache clone`` of a cached snapshot, against ``curl | zstd -d | tar -x`` of the same
  snapshot, that pipeline with the sha256 check the client makes (``tee`` into a hash on
  the other core), and ``git clone`` over HTTP from the upstream;
- the first ``git status`` in the result against the second (the client writes the index's
  stat data, so the first need not reread the tree), and the same for the plain pipeline.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.harness import run_in_work_dir, served_upstream
from bench.run import HOST, curl, gitcache_server, sh

CLIENT = Path(__file__).resolve().parent.parent / "gitcache" / "client.py"
# sha256 of stdin, by OpenSSL through hashlib (coreutils' sha256sum is several times slower)
HASH_STDIN = (
    f"{sys.executable} -c 'import hashlib, sys; h = hashlib.sha256(); "
    '[h.update(b) for b in iter(lambda: sys.stdin.buffer.read(1 << 20), b"")]\' > /dev/null'
)


def status_times(checkout: Path) -> tuple[float, float]:
    first = sh(f"git -C {checkout} status --porcelain > /dev/null")
    second = sh(f"git -C {checkout} status --porcelain > /dev/null")
    return first, second


def run(bare: Path, runs: int, work: Path) -> None:
    size = sum(f.stat().st_size for f in bare.rglob("*") if f.is_file())
    print(f"repository {bare.name}: {size / 1e6:.1f} MB on disk; medians of {runs} runs")
    state = work / "state"
    state.mkdir()
    name = bare.name.removesuffix(".git")
    with (
        served_upstream(bare) as (upstream_url, upstream_port),
        gitcache_server(state, upstream_url) as (base, _),
    ):
        url = f"{base}/git/{HOST}/{name}/snapshot.tar.zst"
        megabytes = curl(url)[2] / 1e6  # a miss: cached from now on
        ours, pipeline, checked, clone = [], [], [], []
        ours_status, pipe_status = [], []

        def client(i: int) -> None:
            started = time.perf_counter()
            subprocess.run(
                [
                    sys.executable,
                    str(CLIENT),
                    "clone",
                    "--quiet",
                    "--server",
                    base,
                    f"{HOST}/{name}",
                    str(work / f"g-{i}"),
                ],
                check=True,
            )
            ours.append(time.perf_counter() - started)

        def bare_pipeline(i: int) -> None:
            pipeline.append(
                sh(f"mkdir {work}/p-{i} && curl -sf '{url}' | zstd -d -q | tar -x -C {work}/p-{i}")
            )

        def checked_pipeline(i: int) -> None:
            checked.append(
                sh(
                    f"mkdir {work}/h-{i} && curl -sf '{url}' | tee >({HASH_STDIN}) "
                    f"| zstd -d -q | tar -x -C {work}/h-{i}"
                )
            )

        for i in range(runs):
            # Each restore starts with nothing left to write back from the one before
            # (sync, untimed), and the two take turns going first: on a file system whose
            # latency depends on what was just written or deleted, order is not neutral.
            turns = (client, bare_pipeline, checked_pipeline)
            for restore in turns if i % 2 == 0 else turns[::-1]:
                sh("sync")
                restore(i)
            ours_status.append(status_times(work / f"g-{i}"))
            pipe_status.append(status_times(work / f"p-{i}"))
            sh("sync")
            clone.append(
                sh(f"git clone -q http://127.0.0.1:{upstream_port}/{name}.git {work}/c-{i}")
            )
            for prefix in ("g", "p", "h", "c"):
                shutil.rmtree(work / f"{prefix}-{i}")
    med = statistics.median
    print(f"\nrestore of a {megabytes:.1f} MB cached snapshot")
    print(f"  gitcache clone       {med(ours) * 1e3:8.1f} ms")
    print(
        f"  curl | zstd | tar    {med(pipeline) * 1e3:8.1f} ms   client / pipeline "
        f"{med(ours) / med(pipeline):.2f}x"
    )
    print(
        f"  the same + sha256    {med(checked) * 1e3:8.1f} ms   (the check the client makes, by"
        f" OpenSSL on the other core: {med(checked) / med(pipeline):.2f}x the bare pipeline)"
    )
    print(
        f"  git clone over HTTP  {med(clone) * 1e3:8.1f} ms   client {med(clone) / med(ours):.2f}x "
        "faster"
    )
    for label, times in (("gitcache clone", ours_status), ("curl | zstd | tar", pipe_status)):
        first, second = med(t[0] for t in times), med(t[1] for t in times)
        print(
            f"\nfirst git status after {label}: {first * 1e3:.1f} ms, second "
            f"{second * 1e3:.1f} ms  (first / second {first / second:.2f}x)"
        )


if __name__ == "__main__":
    run_in_work_dir(__doc__ or "", run)
