"""Snapshot variants against the full snapshot and against the matching ``git clone``:

    python -m bench.variants                 # the generated tree-heavy repository
    python -m bench.variants --shape pack    # the pack-heavy one
    python -m bench.variants --repo /path/to/bare

For the full snapshot, ``?depth=1``, ``?filter=blob:none`` and ``source.tar.zst``: the size,
the miss with a warm mirror, and the restore of a hit (``curl | zstd -d | tar -x``); each
against the full snapshot's figures and against ``git clone`` with the matching option
over HTTP from the upstream (``--depth 1``, ``--filter=blob:none``; for the source, the
shallow clone a build job would otherwise make).
"""

from __future__ import annotations

import shutil
import statistics
from pathlib import Path

from bench.harness import run_in_work_dir, served_upstream
from bench.run import HOST, curl, gitcache_server, sh
from tests.upstream import git

VARIANTS = {
    "full": ("snapshot.tar.zst", "", ""),
    "depth=1": ("snapshot.tar.zst", "depth=1", "--depth 1"),
    "filter=blob:none": ("snapshot.tar.zst", "filter=blob:none", "--filter=blob:none"),
    "source": ("source.tar.zst", "", "--depth 1"),
}


def run(bare: Path, runs: int, work: Path) -> None:
    git("--git-dir", str(bare), "config", "uploadpack.allowFilter", "true")
    head = git("--git-dir", str(bare), "rev-parse", "HEAD").strip()
    for i in range(runs):  # a branch per measured miss: the same commit, a warm mirror
        git("--git-dir", str(bare), "branch", "-f", f"variant-{i}", head)
    name = bare.name.removesuffix(".git")
    state = work / "state"
    state.mkdir()
    print(f"repository {name}; medians of {runs} runs")
    print(
        f"{'variant':<18}{'size':>10}{'miss':>10}{'restore':>10}"
        f"{'git clone':>11}{'vs clone':>10}{'vs full':>9}"
    )
    with (
        served_upstream(bare) as (upstream_url, upstream_port),
        gitcache_server(state, upstream_url) as (base, _),
    ):
        curl(f"{base}/git/{HOST}/{name}/snapshot.tar.zst?ref=variant-0")  # the mirror
        full_restore = 0.0
        for label, (path, query, option) in VARIANTS.items():
            url = f"{base}/git/{HOST}/{name}/{path}?{query}"
            # The working tree's entry is the commit's alone: one miss, then hits.
            count = 1 if path == "source.tar.zst" else runs
            misses = [curl(f"{url}&ref=variant-{i}")[1] for i in range(count)]
            size = curl(f"{url}&ref=variant-0")[2]
            restores, clones = [], []
            for i in range(runs):
                out = work / f"r-{i}"
                restores.append(
                    sh(f"mkdir {out} && curl -sf '{url}&ref=variant-0' | zstd -dq | tar -xC {out}")
                )
                clone = work / f"c-{i}"
                clones.append(
                    sh(f"git clone -q {option} http://127.0.0.1:{upstream_port}/{name}.git {clone}")
                )
                shutil.rmtree(out)
                shutil.rmtree(clone)
            restore, clone_s = statistics.median(restores), statistics.median(clones)
            full_restore = full_restore or restore
            print(
                f"{label:<18}{size / 1e6:>8.1f}MB{statistics.median(misses) * 1e3:>8.0f}ms"
                f"{restore * 1e3:>8.0f}ms{clone_s * 1e3:>9.0f}ms"
                f"{clone_s / restore:>9.1f}x{full_restore / restore:>8.1f}x"
            )
    print(
        "\nmiss: a warm mirror, the variant not cached, the commit's working tree stored (the"
        "\nfirst miss stored it); restore: curl | zstd -d | tar -x of a hit; git clone: the"
        "\nmatching option over HTTP; vs clone / vs full: how many times faster the restore"
        "\nis than that clone, and than restoring the full snapshot."
    )


if __name__ == "__main__":
    run_in_work_dir(__doc__ or "", run, runs=3)
