"""The disk tier: reuse across restarts, clean-up of leftovers, LRU within a budget."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from gitcache import keys
from gitcache.repo import RepoRef
from tests.helpers import HOST, snapshot_url
from tests.upstream import Upstream


async def test_restart_reuses_entries_and_removes_leftovers(
    make_client: Any, upstream: Upstream, rich: str, state_dir: Path
) -> None:
    first = await make_client()
    body = await (await first.get(snapshot_url(rich))).read()
    await first.close()

    repo_dir = state_dir / "cache" / HOST / "group%2Frich"
    (state_dir / "spool" / "x.partial").write_bytes(b"half")
    (state_dir / "tmp" / "clone-dead").mkdir()
    (repo_dir / "deadbeef-0000.tar.zst").write_bytes(b"not in the manifest")
    (repo_dir / ".manifest.json.tmp").write_bytes(b"{")

    upstream.fail = True  # a hit must not need the upstream
    second = await make_client()
    hit = await second.get(snapshot_url(rich))
    assert hit.headers["X-Gitcache-Source"] == "hit"
    assert await hit.read() == body
    assert not any((state_dir / "spool").iterdir())
    assert not any((state_dir / "tmp").iterdir())
    entry = await second.app[keys.CACHE].newest(RepoRef(HOST, "group/rich"), "HEAD")
    assert sorted(p.name for p in repo_dir.iterdir()) == sorted(
        ["manifest.json", f"{entry.key}.tar.zst"]
    )


async def test_entry_without_its_file_is_dropped(
    make_client: Any, rich: str, state_dir: Path
) -> None:
    first = await make_client()
    await (await first.get(snapshot_url(rich))).read()
    await first.close()
    for path in (state_dir / "cache" / HOST / "group%2Frich").glob("*.tar.zst"):
        path.write_bytes(b"truncated")  # size no longer matches the manifest
    second = await make_client()
    response = await second.get(snapshot_url(rich))
    assert response.headers["X-Gitcache-Source"] == "miss"
    await response.read()


async def test_lru_eviction_within_budget(make_client: Any, rich: str) -> None:
    probe = await make_client()
    size = len(await (await probe.get(snapshot_url(rich, "feature"))).read())
    await probe.close()

    client = await make_client(cache={"disk": {"max_size": int(size * 2.5)}})
    cache = client.app[keys.CACHE]

    async def get(ref: str) -> str:
        response = await client.get(snapshot_url(rich, ref))
        await response.read()
        return str(response.headers["X-Gitcache-Source"])

    assert await get("feature") == "hit"  # reused from the probe's run
    assert await get("main") == "miss"
    assert await get("feature") == "hit"  # a use: main is now the least recent
    assert await get("v1.0") == "miss"  # over budget: main goes
    await asyncio.sleep(0)
    metrics = await (await client.get("/metrics")).text()
    assert 'gitcache_cache_evictions_total{tier="disk"} 1.0' in metrics
    assert cache.size <= int(size * 2.5)
    assert await get("feature") == "hit"
    assert await get("v1.0") == "hit"
    assert await get("main") == "miss"
