"""Replicas that share one bucket: hits across replicas, one lease winner per refresh,
mirrors restored from the bucket's archives instead of cloned (with the fall back to a
clone), and the same with two real gitcache processes."""

from __future__ import annotations

import asyncio
import io
import tarfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import boto3
import pytest
import zstandard

from gitcache import keys
from gitcache.mirror.archive import ArchiveRecord, write_archive
from tests.helpers import Clock, extract, sample, settled, snapshot_url
from tests.processes import start_gitcache
from tests.upstream import Upstream, agit, commit_all, git
from tests.waiting import until


def s3_cache(endpoint: str, bucket: str) -> dict[str, Any]:
    return {"backend": "s3", "s3": {"bucket": bucket, "endpoint_url": endpoint}}


@pytest.fixture
def replica(
    make_client: Any, s3_endpoint: str, s3_bucket: str, tmp_path: Path, clock: Clock
) -> Callable[[str], Awaitable[Any]]:
    """Start a replica on the shared bucket, with a state directory of its own; time
    is ``clock``'s and refresh jobs run when the test says."""

    async def start(name: str) -> Any:
        cache = s3_cache(s3_endpoint, s3_bucket)
        return await make_client(clock=clock, background=False, state=tmp_path / name, cache=cache)

    return start


async def push_change(upstream: Upstream, repo: str, work: Path, name: str) -> str:
    """Commit a new file upstream; its commit id."""
    if not work.exists():
        await agit("clone", "-q", upstream.url(repo), str(work))
    await agit("-C", str(work), "pull", "-q")
    (work / f"{name}.txt").write_text(f"{name}\n")
    commit = commit_all(work, name)
    git("push", "-q", str(upstream.root / f"{repo}.git"), "HEAD:main", cwd=work)
    return commit


async def test_replicas_share_a_bucket(
    make_client: Any, rich: str, s3_endpoint: str, s3_bucket: str, tmp_path: Path
) -> None:
    cache = {"backend": "s3", "s3": {"bucket": s3_bucket, "endpoint_url": s3_endpoint}}
    first = await make_client(cache=cache)
    miss = await first.get(snapshot_url(rich))
    body = await miss.read()
    assert miss.headers["X-Gitcache-Source"] == "miss"
    await settled(first)
    hit = await first.get(snapshot_url(rich))
    assert hit.headers["X-Gitcache-Source"] == "hit"
    assert await hit.read() == body
    ranged = await first.get(snapshot_url(rich), headers={"Range": "bytes=10-19"})
    assert ranged.status == 206 and await ranged.read() == body[10:20]

    replica = await make_client(state=tmp_path / "replica-b", cache=cache)
    response = await replica.get(snapshot_url(rich))
    assert response.headers["X-Gitcache-Source"] == "hit"  # made by the other replica
    assert await response.read() == body


async def test_one_replica_wins_the_refresh_lease(
    replica: Any, upstream: Upstream, rich: str, tmp_path: Path, clock: Clock
) -> None:
    replicas = [await replica("a"), await replica("b")]
    for client in replicas:
        await (await client.get(snapshot_url(rich))).read()
        await settled(client)
    new = await push_change(upstream, rich, tmp_path / "work", "new")

    before = sum(r.app[keys.SNAPSHOTS].generations_started for r in replicas)
    clock.now += 3600
    await asyncio.gather(*(r.app[keys.REFRESHER].run_due() for r in replicas))
    await settled(*replicas)
    after = sum(r.app[keys.SNAPSHOTS].generations_started for r in replicas)
    assert after - before == 1  # one replica regenerated and uploaded; the other did not
    for client in replicas:
        response = await client.get(snapshot_url(rich))
        assert response.headers["X-Gitcache-Source"] == "hit"
        assert response.headers["X-Gitcache-Commit"] == new
        await response.read()


def mirror_operations(client: Any, operation: str, result: str = "ok") -> float:
    return client.app[keys.METRICS].value(
        "gitcache_mirror_operations_total", operation=operation, result=result
    )


async def test_a_new_replica_restores_the_mirror_from_the_archive(
    replica: Any, upstream: Upstream, rich: str, tmp_path: Path
) -> None:
    first = await replica("a")
    await (await first.get(snapshot_url(rich))).read()
    await first.app[keys.REFRESHER].run_due()  # a new mirror is archived at the next tick
    assert mirror_operations(first, "archive") == 1
    await first.app[keys.REFRESHER].run_due()
    assert mirror_operations(first, "archive") == 1  # not again within the interval

    new = await push_change(upstream, rich, tmp_path / "work", "after-archive")
    second = await replica("b")
    response = await second.get(snapshot_url(rich), headers={"Cache-Control": "max-age=0"})
    assert response.status == 200
    assert response.headers["X-Gitcache-Commit"] == new  # restored, then fetched
    body = await response.read()
    assert mirror_operations(second, "restore") == 1
    assert mirror_operations(second, "clone") == 0
    metrics = [c.app[keys.METRICS] for c in (first, second)]
    fetched = [m.value("gitcache_upstream_fetched_bytes_total") for m in metrics]
    assert 0 < fetched[1] < fetched[0] / 2  # only the new commit came from the upstream

    checkout = extract(body, tmp_path / "checkout")
    git("fsck", "--no-progress", cwd=checkout)
    assert (checkout / "after-archive.txt").read_text() == "after-archive\n"
    mirror = second.app[keys.MIRRORS].mirror(first.app[keys.MIRRORS].known()[0].repo)
    git("--git-dir", str(mirror.path), "fsck", "--connectivity-only", "--no-progress")
    config = git("--git-dir", str(mirror.path), "config", "remote.origin.url")
    assert config.strip() == upstream.url(rich)


async def test_a_broken_archive_is_discarded_and_the_mirror_cloned(
    replica: Any, upstream: Upstream, rich: str, s3_endpoint: str, s3_bucket: str, tmp_path: Path
) -> None:
    """An archive whose bytes match its entry but whose pack is damaged: the restored
    mirror fails its check, is thrown away, and the mirror is cloned."""
    first = await replica("a")
    await (await first.get(snapshot_url(rich))).read()
    await settled(first)
    await first.app[keys.REFRESHER].run_due()
    archives = first.app[keys.MIRRORS].archives
    assert archives is not None
    repo = first.app[keys.MIRRORS].known()[0].repo
    bucket = first.app[keys.BUCKET]
    assert bucket is not None
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    raw = s3.get_object(Bucket=s3_bucket, Key=bucket.key(archives.name(repo)))["Body"].read()
    unpacked = tmp_path / "unpacked"
    with (
        zstandard.ZstdDecompressor().stream_reader(
            io.BytesIO(raw), read_across_frames=True
        ) as zstd,
        tarfile.open(fileobj=zstd, mode="r|") as tar,
    ):
        tar.extractall(unpacked, filter="data")
    for pack in (unpacked / "objects" / "pack").glob("*.pack"):
        pack.write_bytes(pack.read_bytes()[:100])  # a truncated pack
    size, sha256 = write_archive(unpacked, tmp_path / "broken.tar.zst")
    broken = ArchiveRecord("d" * 64, size, sha256, 0.0)
    await archives.upload(repo, tmp_path / "broken.tar.zst", broken)

    new = await push_change(upstream, rich, tmp_path / "work", "after-break")
    second = await replica("b")
    response = await second.get(snapshot_url(rich), headers={"Cache-Control": "max-age=0"})
    assert response.headers["X-Gitcache-Commit"] == new
    body = await response.read()
    assert mirror_operations(second, "restore", "failed") == 1
    assert mirror_operations(second, "clone") == 1
    checkout = extract(body, tmp_path / "checkout")
    git("fsck", "--no-progress", cwd=checkout)
    await settled(second)
    assert not any((tmp_path / "b" / "tmp").iterdir())  # the restore left nothing


async def test_two_gitcache_processes_share_one_bucket(
    upstream: Upstream, rich: str, s3_endpoint: str, s3_bucket: str, tmp_path: Path
) -> None:
    """Two real processes, one bucket: a snapshot one made is a hit on the other; after a
    push, exactly one of them regenerates it (the lease), and both serve it as a hit."""
    sections: dict[str, Any] = {
        "cache": {"backend": "s3"},
        "cache_s3": {"bucket": s3_bucket, "endpoint_url": s3_endpoint},
        "refresh": {"interval": "2s"},
        "mirrors": {"fetch_interval": "1s"},
    }
    replicas = [await start_gitcache(tmp_path, name, upstream, **sections) for name in "ab"]
    try:
        async with aiohttp.ClientSession() as session:
            url = snapshot_url(rich)
            async with session.get(replicas[0].base + url) as miss:
                assert miss.headers["X-Gitcache-Source"] == "miss"
                body = await miss.read()
            async with session.get(replicas[1].base + url) as hit:
                assert hit.headers["X-Gitcache-Source"] == "hit"  # made by the other process
                assert await hit.read() == body

            new = await push_change(upstream, rich, tmp_path / "work", "pushed")

            async def both_serve_it() -> bool:  # the refresh jobs pick the push up
                commits = []
                for replica in replicas:
                    async with session.get(replica.base + url) as response:
                        await response.read()
                        headers = response.headers
                        commits.append((headers["X-Gitcache-Commit"], headers["X-Gitcache-Source"]))
                return all(c == (new, "hit") for c in commits)

            await until(both_serve_it, f"both replicas to serve {new} as a hit", 30)
            pages = []
            for replica in replicas:
                async with session.get(replica.base + "/metrics") as page:
                    pages.append(await page.text())
        started = [sample(p, "gitcache_generations_started_total") for p in pages]
        assert started[0] + started[1] == 2  # the first miss, then one regeneration
    finally:
        for replica in replicas:
            assert await replica.stop() == 0


async def test_a_process_killed_mid_upload_leaves_nothing_visible(
    upstream: Upstream, big_work: Path, s3_endpoint: str, s3_bucket: str, tmp_path: Path
) -> None:
    """SIGKILL while parts are being uploaded: no object, no entry, no manifest appear;
    the pending multipart upload is aborted when gitcache starts again."""
    upstream.create("big", big_work)
    sections: dict[str, Any] = {
        "cache": {"backend": "s3"},
        "cache_s3": {"bucket": s3_bucket, "endpoint_url": s3_endpoint, "part_size": "5MiB"},
        "mirrors": {"archive_interval": 0},
        "snapshot": {"zstd_level": 19},  # slow on purpose: still generating when killed
    }
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    process = await start_gitcache(tmp_path, "a", upstream, **sections)
    try:
        async with aiohttp.ClientSession() as session:
            response = await session.get(process.base + snapshot_url("big"))
            assert response.status == 200

            def a_part_sent() -> bool:
                uploads = s3.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", [])
                return bool(uploads) and bool(
                    s3.list_parts(
                        Bucket=s3_bucket, Key=uploads[0]["Key"], UploadId=uploads[0]["UploadId"]
                    ).get("Parts")
                )

            await until(a_part_sent, "a part uploaded", 30)
            process.proc.kill()
            await process.proc.wait()
            response.close()
    finally:
        await process.stop()
    assert s3.list_objects_v2(Bucket=s3_bucket).get("KeyCount", 0) == 0

    assert list((tmp_path / "a" / "uploads").iterdir())  # what the crash left in flight
    again = await start_gitcache(tmp_path, "a", upstream, **sections)
    try:
        await until(  # aborted in the background, once started
            lambda: not s3.list_multipart_uploads(Bucket=s3_bucket).get("Uploads"),
            "the upload left in flight to be aborted",
        )
        assert not list((tmp_path / "a" / "uploads").iterdir())
    finally:
        assert await again.stop() == 0
