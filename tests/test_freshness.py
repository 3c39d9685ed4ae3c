"""Mirrors are fetched once older than the freshness window; unchanged refs mean a hit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.helpers import Clock, snapshot_url
from tests.upstream import Upstream, agit, commit_all, git


async def test_fetch_after_the_window(
    make_client: Any, upstream: Upstream, rich: str, scratch: Path
) -> None:
    clock = Clock()
    client = await make_client(clock=clock, mirrors={"fetch_interval": "60s"})

    async def get() -> tuple[str, str]:
        response = await client.get(snapshot_url(rich))
        await response.read()
        return response.headers["X-Gitcache-Source"], response.headers["X-Gitcache-Commit"]

    source, old = await get()
    assert source == "miss"

    work = scratch / "work"
    await agit("clone", "-q", upstream.url(rich), str(work))
    (work / "new.txt").write_text("new\n")
    new = commit_all(work, "third")
    git("push", "-q", str(upstream.root / f"{rich}.git"), "main", cwd=work)

    clock.now += 30
    assert await get() == ("hit", old)  # inside the window: not even a fetch
    assert upstream.clones(rich) == 2  # the clone, and ours above

    clock.now += 31  # refs changed: ls-remote, then fetch
    assert await get() == ("miss", new)
    assert upstream.clones(rich) == 4

    clock.now += 61  # refs unchanged: ls-remote only, and the same snapshot
    assert await get() == ("hit", new)
    assert upstream.clones(rich) == 5


async def test_default_branch_change_is_followed(
    make_client: Any, upstream: Upstream, rich: str
) -> None:
    clock = Clock()
    client = await make_client(clock=clock)
    first = await client.get(snapshot_url(rich))
    await first.read()
    git("symbolic-ref", "HEAD", "refs/heads/feature", cwd=upstream.root / f"{rich}.git")
    clock.now += 3600
    second = await client.get(snapshot_url(rich))
    await second.read()
    assert second.headers["X-Gitcache-Commit"] != first.headers["X-Gitcache-Commit"]
