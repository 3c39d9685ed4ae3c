"""git through gitcache's smart HTTP against git straight from the upstream, in one run:

    python -m bench.git                  # the generated tree-heavy repository
    python -m bench.git --shape pack     # the pack-heavy one
    python -m bench.git --repo /path/to/bare

- ``git clone`` and ``git clone --depth 1``: through gitcache with a warm mirror and the
  pack response cached (one clone through gitcache before the measured ones), against the
  same clone from the upstream over HTTP;
- ``git fetch`` of 10 new upstream commits by ``--runs`` clones that each had the old
  state: through gitcache (``mirrors.fetch_interval = 0``: every fetch checks the
  upstream) against each fetching from the upstream.

For each, the median time and what the upstream was asked per command: ref listings (an
``info/refs`` and an ``ls-refs``, cheap) and packs (a ``fetch``, which costs it a
pack-objects: the CPU that matters).
"""

from __future__ import annotations

import os
import shutil
import statistics
from collections.abc import Callable
from pathlib import Path

from bench.harness import run_in_work_dir, serve_in_thread
from bench.run import HOST, gitcache_server, sh
from tests.servers import free_port
from tests.upstream import Upstream, git


def _asked(upstream: Upstream, name: str) -> tuple[int, int]:
    adverts = sum(1 for p, _ in upstream.requests if p == f"/{name}.git/info/refs")
    packs = sum(1 for p, _ in upstream.requests if p == f"/{name}.git/git-upload-pack")
    return adverts, packs


def _measure(upstream: Upstream, name: str, runs: int, step: Callable[[int], str]) -> str:
    """Run ``step(i)`` (a shell command) ``runs`` times: the median time and the upstream
    requests per run."""
    before = _asked(upstream, name)
    times = [sh(step(i)) for i in range(runs)]
    after = _asked(upstream, name)
    adverts, posts = ((a - b) / runs for a, b in zip(after, before, strict=True))
    # Protocol v2: each session lists refs once (info/refs, then an ls-refs POST); the
    # other upload-pack POSTs are fetches, which cost the upstream a pack-objects.
    median = statistics.median(times) * 1e3
    return (
        f"{median:8.0f} ms  upstream/run: {adverts:4.1f} ref listings {posts - adverts:4.1f} packs"
    )


def _commits(bare: Path, work: Path, count: int) -> None:
    """``count`` new commits on the upstream's default branch."""
    checkout = work / "pusher"
    if not checkout.exists():
        git("clone", "-q", str(bare), str(checkout))
    for n in range(count):
        (checkout / "bench-new.txt").write_text(f"change {n}\n" * 100)
        git("add", "-A", cwd=checkout)
        git(
            "-c",
            "user.name=b",
            "-c",
            "user.email=b@x",
            "commit",
            "-q",
            "-m",
            f"new {n}",
            cwd=checkout,
        )
    git("push", "-q", str(bare), "HEAD", cwd=checkout)


def run(bare: Path, runs: int, work: Path) -> None:
    name = bare.name.removesuffix(".git")
    git("--git-dir", str(bare), "config", "uploadpack.allowFilter", "true")
    state = work / "state"
    state.mkdir()
    port = free_port()
    upstream = Upstream(bare.parent, port=port)
    direct = f"http://127.0.0.1:{port}/{name}.git"
    os.environ["GITCACHE_MIRRORS_FETCH_INTERVAL"] = "0s"  # fetches see new commits at once
    print(f"repository {name}; medians of {runs} runs")
    with (
        serve_in_thread(upstream.app(), port),
        gitcache_server(state, f"http://127.0.0.1:{port}/{{repo}}.git") as (base, _),
    ):
        ours = f"{base}/git/{HOST}/{name}"
        for option in ("", "--depth 1"):
            sh(f"git clone -q {option} {ours} {work}/warm")  # the mirror, the pack cached
            shutil.rmtree(work / "warm")
            label = f"git clone {option}".strip()
            print(f"\n{label}")
            print(
                "  gitcache  "
                + _measure(
                    upstream, name, runs, lambda i, o=option: f"git clone -q {o} {ours} {work}/g{i}"
                )
            )
            print(
                "  upstream  "
                + _measure(
                    upstream,
                    name,
                    runs,
                    lambda i, o=option: f"git clone -q {o} {direct} {work}/d{i}",
                )
            )
            for i in range(runs):
                shutil.rmtree(work / f"g{i}")
                shutil.rmtree(work / f"d{i}")

        for i in range(runs):  # clones at the old state, one per runner
            sh(f"git clone -q {ours} {work}/g{i} && git clone -q {direct} {work}/d{i}")
        _commits(bare, work, 10)
        print(f"\ngit fetch of 10 new commits by {runs} clones")
        print(
            "  gitcache  "
            + _measure(upstream, name, runs, lambda i: f"git -C {work}/g{i} fetch -q")
        )
        print(
            "  upstream  "
            + _measure(upstream, name, runs, lambda i: f"git -C {work}/d{i} fetch -q")
        )
    print(
        "\nupstream/run: what the upstream answered per measured command. Through gitcache a"
        "\nclone or fetch costs it one ref listing (fetch_interval 0: every listing checks;"
        "\nwithin a longer interval, none) and no pack, but the mirror's own fetch of a change."
    )


if __name__ == "__main__":
    run_in_work_dir(__doc__ or "", run, runs=5)
