"""Miss, follower and hit: one generation per key, identical bytes, HTTP semantics."""

from __future__ import annotations

import asyncio
import logging
import shutil
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gitcache import keys
from gitcache.errors import GitError
from tests.helpers import extract, settled, snapshot_url, status, wrap_build_tar
from tests.upstream import Upstream, git
from tests.waiting import until


async def test_miss_then_hit_serves_identical_bytes(
    client: Any, upstream: Upstream, rich: str
) -> None:
    miss = await client.get(snapshot_url(rich))
    miss_body = await miss.read()
    assert miss.headers["X-Gitcache-Source"] == "miss"
    assert "Content-Length" not in miss.headers

    hit = await client.get(snapshot_url(rich))
    assert hit.status == 200
    assert hit.headers["X-Gitcache-Source"] == "hit"
    assert await hit.read() == miss_body
    assert hit.headers["Content-Length"] == str(len(miss_body))
    assert hit.headers["ETag"].startswith('"') and len(hit.headers["ETag"]) == 66
    assert hit.headers["Accept-Ranges"] == "bytes"
    assert hit.headers["Last-Modified"].endswith("GMT")
    assert hit.headers["X-Gitcache-Commit"] == miss.headers["X-Gitcache-Commit"]
    assert upstream.clones(rich) == 1  # within the freshness window: no fetch


async def test_concurrent_cold_requests_share_one_clone_and_one_generation(
    client: Any, upstream: Upstream, rich: str
) -> None:
    responses = await asyncio.gather(*(client.get(snapshot_url(rich)) for _ in range(20)))
    bodies = [await r.read() for r in responses]
    assert all(r.status == 200 for r in responses)
    assert len(set(bodies)) == 1
    assert upstream.clones(rich) == 1
    sources = sorted(r.headers["X-Gitcache-Source"] for r in responses)
    assert sources.count("miss") == 1
    assert set(sources) <= {"miss", "follower", "hit"}
    assert client.app[keys.SNAPSHOTS].generations_started == 1


async def _generations_done(client: Any) -> None:
    await until(lambda: not client.app[keys.SNAPSHOTS].running, "the generation's end", 20)
    await settled(client)  # its clean-up too (the work directory goes after `running`)


async def test_client_disconnect_does_not_stop_the_cache_fill(
    client: Any, upstream: Upstream, big_work: Path, scratch: Path
) -> None:
    upstream.create("big", big_work)
    async with aiohttp.ClientSession() as session:
        response = await session.get(client.make_url(snapshot_url("big")))
        assert response.headers["X-Gitcache-Source"] == "miss"
        await response.content.read(1024)
        response.close()  # the client goes away mid-stream
    await _generations_done(client)
    hit = await client.get(snapshot_url("big"))
    assert hit.headers["X-Gitcache-Source"] == "hit"
    snap = extract(await hit.read(), scratch / "snap")
    git("fsck", cwd=snap)
    assert status(snap) == ""


async def test_failed_generation_aborts_streams_and_caches_nothing(
    client: Any,
    upstream: Upstream,
    big_work: Path,
    monkeypatch: pytest.MonkeyPatch,
    state_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    upstream.create("big", big_work)

    async def fail_after_4mib(sent: int) -> None:
        if sent > 4 * 1024 * 1024:
            raise GitError("git archive failed: simulated corruption")

    wrap_build_tar(monkeypatch, fail_after_4mib)
    first, second = await asyncio.gather(
        client.get(snapshot_url("big")), client.get(snapshot_url("big"))
    )
    for response in (first, second):
        assert response.status == 200  # headers were out before the failure
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()
    await _generations_done(client)
    errors = [r.name for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == ["gitcache.snapshot.producer"]  # logged once, where it happened
    assert not any((state_dir / "spool").iterdir())
    assert not any((state_dir / "tmp").iterdir())
    assert not (state_dir / "cache").joinpath("example.test").exists()

    monkeypatch.undo()
    retry = await client.get(snapshot_url("big"))
    assert retry.headers["X-Gitcache-Source"] == "miss"
    assert len(await retry.read()) > 20 * 1024 * 1024


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
async def test_curl_fails_on_an_aborted_stream(
    client: Any,
    upstream: Upstream,
    big_work: Path,
    monkeypatch: pytest.MonkeyPatch,
    scratch: Path,
) -> None:
    upstream.create("big", big_work)

    async def fail_at_once(sent: int) -> None:
        raise GitError("simulated")

    wrap_build_tar(monkeypatch, fail_at_once)
    url = str(client.make_url(snapshot_url("big")))
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sf", "-o", str(scratch / "out"), url, stdout=subprocess.DEVNULL
    )
    assert await proc.wait() != 0


async def test_head_never_starts_a_generation(client: Any, rich: str) -> None:
    cold = await client.head(snapshot_url(rich))
    assert cold.status == 200
    assert cold.headers["X-Gitcache-Source"] == "miss"
    assert "X-Gitcache-Commit" in cold.headers
    assert client.app[keys.SNAPSHOTS].generations_started == 0

    body = await (await client.get(snapshot_url(rich))).read()
    warm = await client.head(snapshot_url(rich))
    assert warm.headers["X-Gitcache-Source"] == "hit"
    assert warm.headers["Content-Length"] == str(len(body))
    assert await warm.read() == b""


async def test_refs_branch_tag_and_sha(
    client: Any, rich: str, rich_work: Any, scratch: Path
) -> None:
    shas = rich_work[1]
    cases = {
        "feature": (shas["first"], "feature"),
        "refs/heads/feature": (shas["first"], "feature"),
        "v1.0": (shas["first"], "HEAD"),
        "light": (shas["second"], "HEAD"),
        shas["first"]: (shas["first"], "HEAD"),
    }
    for i, (ref, (commit, head)) in enumerate(cases.items()):
        response = await client.get(snapshot_url(rich, ref))
        assert response.status == 200, await response.text()
        assert response.headers["X-Gitcache-Commit"] == commit
        snap = extract(await response.read(), scratch / str(i))
        assert git("rev-parse", "HEAD", cwd=snap).strip() == commit
        assert git("rev-parse", "--abbrev-ref", "HEAD", cwd=snap).strip() == head
        git("fsck", cwd=snap)
        assert status(snap) == ""
