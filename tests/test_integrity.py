"""Bad bytes are never served as good ones, and a hit that fails mid-body never hangs its
client: checksummed zstd frames, the scrub on every tier, cuts on source failures."""

from __future__ import annotations

import asyncio
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp
import boto3
import pytest

from gitcache import keys
from gitcache.cache.disk import DiskCache
from tests.faults import CuttingProxy, fill, small_filesystem
from tests.helpers import HOST, settled, snapshot_url
from tests.upstream import Upstream
from tests.waiting import until

BACKENDS = ["disk", "s3", "tiered"]


def cache_section(backend: str, endpoint: str, bucket: str) -> dict[str, Any]:
    return {"backend": backend, "s3": {"bucket": bucket, "endpoint_url": endpoint}}


def flip_byte(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x40]) + data[at + 1 :]


def zstd_test(data: bytes) -> int:
    return subprocess.run(["zstd", "-t", "-q"], input=data, check=False).returncode


def disk_file(state_dir: Path) -> Path:
    (path,) = (state_dir / "cache" / HOST).rglob("*.tar.zst")
    return path


def s3_object(endpoint: str, bucket: str) -> tuple[Any, str]:
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    listed = s3.list_objects_v2(Bucket=bucket).get("Contents", [])
    (name,) = [o["Key"] for o in listed if o["Key"].endswith(".tar.zst")]
    return s3, name


async def test_a_flipped_byte_fails_every_decoder(client: Any, rich: str) -> None:
    body = await (await client.get(snapshot_url(rich))).read()
    assert zstd_test(body) == 0
    assert zstd_test(flip_byte(body, len(body) // 2)) != 0


@pytest.mark.parametrize("backend", BACKENDS)
async def test_the_scrub_evicts_a_corrupt_entry_on_each_tier(
    make_client: Any, rich: str, state_dir: Path, s3_endpoint: str, s3_bucket: str, backend: str
) -> None:
    client = await make_client(
        cache=cache_section(backend, s3_endpoint, s3_bucket), mirrors={"archive_interval": 0}
    )
    good = await (await client.get(snapshot_url(rich))).read()
    await settled(client)
    scrubber = client.app[keys.SCRUBBER]
    metrics = client.app[keys.METRICS]
    assert await scrubber.scrub() == 0  # intact: nothing to do

    if backend == "s3":
        s3, name = s3_object(s3_endpoint, s3_bucket)
        s3.put_object(Bucket=s3_bucket, Key=name, Body=flip_byte(good, len(good) // 2))
    else:  # the disk copy (tiered: the S3 copy stays intact)
        path = disk_file(state_dir)
        path.write_bytes(flip_byte(path.read_bytes(), len(good) // 2))

    assert await scrubber.scrub() == 1
    tier = "s3" if backend == "s3" else "disk"
    assert metrics.value("gitcache_scrub_checks_total", tier=tier, result="corrupt") == 1
    response = await client.get(snapshot_url(rich))
    body = await response.read()
    assert zstd_test(body) == 0
    if backend == "tiered":  # the bucket's intact copy is served, and fills the disk again
        assert response.headers["X-Gitcache-Source"] == "hit" and body == good
    else:  # nothing cached any more: a new snapshot is made
        assert response.headers["X-Gitcache-Source"] == "miss"


async def _cut_within(session: aiohttp.ClientSession, url: str, seconds: float) -> None:
    """GET ``url``; the response starts as a hit and must fail well before ``seconds``."""
    started = time.monotonic()
    async with session.get(url) as response:
        assert response.status == 200 and response.headers["X-Gitcache-Source"] == "hit"
        with pytest.raises(aiohttp.ClientPayloadError):
            await asyncio.wait_for(response.read(), seconds)
    assert time.monotonic() - started < seconds


async def test_a_disk_file_truncated_under_the_server_cuts_the_hit(
    make_client: Any, upstream: Upstream, big_work: Path, state_dir: Path
) -> None:
    upstream.create("big", big_work)
    client = await make_client()
    good = await (await client.get(snapshot_url("big"))).read()
    await settled(client)
    path = disk_file(state_dir)
    with path.open("r+b") as f:
        f.truncate(len(good) // 2)
    async with aiohttp.ClientSession() as session:
        await _cut_within(session, str(client.make_url(snapshot_url("big"))), 5)
    # The entry was checked at once and evicted: the next request makes a new snapshot.
    await client.app[keys.TASKS].settle("recheck:")
    again = await client.get(snapshot_url("big"))
    assert again.headers["X-Gitcache-Source"] == "miss"
    assert zstd_test(await again.read()) == 0


@pytest.mark.parametrize("backend", ["s3", "tiered"])
async def test_s3_dropping_mid_object_cuts_the_hit(
    make_client: Any,
    upstream: Upstream,
    big_work: Path,
    state_dir: Path,
    s3_endpoint: str,
    s3_bucket: str,
    aiohttp_server: Any,
    backend: str,
) -> None:
    upstream.create("big", big_work)
    proxy = CuttingProxy(s3_endpoint)
    proxy.port = (await aiohttp_server(proxy.app())).port
    client = await make_client(
        cache=cache_section(backend, proxy.endpoint, s3_bucket), mirrors={"archive_interval": 0}
    )
    good = await (await client.get(snapshot_url("big"))).read()
    await settled(client)
    if backend == "tiered":  # the hit must come from the bucket
        disk = client.app[keys.CACHE].layers()[0][1]
        entry = await disk.newest(client.app[keys.CACHE].repos()[0], "HEAD")
        await disk.delete(client.app[keys.CACHE].repos()[0], entry.key)
    proxy.cut_after = len(good) // 3
    async with aiohttp.ClientSession() as session:
        await _cut_within(session, str(client.make_url(snapshot_url("big"))), 5)
    assert proxy.cuts >= 1
    proxy.cut_after = None
    await client.app[keys.TASKS].settle("recheck:")
    # The partial fill of the disk tier is dropped (by the handler, once it saw the cut).
    await until(lambda: not list((state_dir / "spool").glob("*.fill")), "the fill's removal")
    # A dropped connection says nothing against the object: it is still served, whole.
    again = await client.get(snapshot_url("big"))
    assert again.headers["X-Gitcache-Source"] == "hit"
    assert await again.read() == good


async def test_a_full_disk_at_the_manifest_write_leaves_the_cache_as_it_was(
    make_client: Any, rich: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The snapshot file is in place, then the manifest cannot be written (ENOSPC on a real
    full file system): the commit is undone at once, the client still gets its bytes."""
    with small_filesystem(tmp_path / "small", "64m") as state:
        real = DiskCache._commit_files
        filler: list[Path] = []

        def full_before_the_manifest(self: DiskCache, *args: Any) -> None:
            filler.append(fill(state))
            real(self, *args)

        monkeypatch.setattr(DiskCache, "_commit_files", full_before_the_manifest)
        client = await make_client(state=state, cache={"disk": {"min_free": 0}})
        response = await client.get(snapshot_url(rich))
        body = await response.read()
        assert response.status == 200 and zstd_test(body) == 0
        await settled(client)
        cache_files = [p.name for p in (state / "cache").rglob("*") if p.is_file()]
        assert cache_files == []  # no unlisted snapshot, no manifest, no temp file
        assert client.app[keys.CACHE].repos() == []  # and none listed

        monkeypatch.setattr(DiskCache, "_commit_files", real)
        filler[0].unlink()  # room again: the next miss is cached
        await (await client.get(snapshot_url(rich))).read()
        await settled(client)
        assert (await client.get(snapshot_url(rich))).headers["X-Gitcache-Source"] == "hit"
        await client.close()


async def test_a_full_disk_during_a_clone_is_our_507_not_the_upstreams_502(
    make_client: Any, upstream: Upstream, big_work: Path, tmp_path: Path
) -> None:
    upstream.create("big", big_work)
    with small_filesystem(tmp_path / "small", "8m") as state:
        client = await make_client(state=state, cache={"disk": {"min_free": 0}})
        response = await client.get(snapshot_url("big"))
        assert response.status == 507
        body = await response.json()
        assert body["code"] == "insufficient_storage" and "disk" in body["error"]
        assert list((state / "tmp").iterdir()) == []  # the half-made clone is gone
        await client.close()
