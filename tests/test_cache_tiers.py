"""The cache protocol, the same tests for every tier (disk, and S3 against a real
S3-compatible server process), plus what only S3 has: manifest races between writers,
aborted uploads, the listing fallback, replicas sharing a bucket, and S3 being down."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import boto3
import pytest
import zstandard

from gitcache import keys
from gitcache.bucket import client as bucket_module
from gitcache.bucket.client import Bucket
from gitcache.bucket.journal import UploadJournal
from gitcache.cache.base import Cache, Entry
from gitcache.cache.disk import DiskCache
from gitcache.cache.s3 import S3Cache
from gitcache.cache.tiered import TieredCache
from gitcache.config import S3CacheConfig
from gitcache.errors import EntryGone, GenerationFailed
from gitcache.metrics import Metrics
from gitcache.repo import RepoRef
from gitcache.tasks import TaskSet
from tests.helpers import HOST, extract, settled, snapshot_url, wrap_build_tar
from tests.servers import free_port, start_s3_server
from tests.upstream import Upstream, git
from tests.waiting import until

REPO = RepoRef(HOST, "group/repo")


def s3_config(endpoint: str, bucket: str, **kwargs: Any) -> S3CacheConfig:
    return S3CacheConfig(bucket=bucket, endpoint_url=endpoint, prefix="snapshots/", **kwargs)


async def s3_tier(
    endpoint: str, name: str, metrics: Metrics | None = None, journal: Path | None = None
) -> S3Cache:
    """The S3 tier on an open bucket (closed with ``close_s3``), parts of 5 MiB."""
    config = s3_config(endpoint, name, part_size=5 * 1024**2)
    bucket = Bucket(config, metrics or Metrics(), journal)
    await bucket.open()
    return S3Cache(bucket)


async def close_s3(cache: S3Cache) -> None:
    await cache.bucket.close()


@pytest.fixture(params=["disk", "s3", "tiered"])
async def tier(
    request: pytest.FixtureRequest, tmp_path: Path, s3_endpoint: str, s3_bucket: str
) -> AsyncIterator[Cache]:
    cache: Cache
    tasks = TaskSet()
    disk = DiskCache(tmp_path / "cache", 1024**3, Metrics())
    s3 = await s3_tier(s3_endpoint, s3_bucket)
    cache = {"disk": disk, "s3": s3, "tiered": TieredCache(disk, s3, tasks, tmp_path / "fill")}[
        request.param
    ]
    await cache.start()
    yield cache
    await tasks.close()
    await cache.close()
    await close_s3(s3)


def spool(tmp_path: Path, name: str, size: int) -> tuple[Path, str]:
    path = tmp_path / f"{name}.partial"
    data = os.urandom(size)
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


def entry(key: str, ref: str, size: int, sha256: str, created: float) -> Entry:
    return Entry(
        key=key,
        ref=ref,
        commit="c" * 40,
        refs_digest="d" * 64,
        size=size,
        sha256=sha256,
        created=created,
        fetched_at=created,
    )


async def read_all(cache: Cache, e: Entry, offset: int = 0, length: int | None = None) -> bytes:
    reader = await cache.open(REPO, e)
    assert reader is not None
    try:
        if reader.file is not None:
            reader.file.seek(offset)
            return reader.file.read(e.size - offset if length is None else length)
        chunks = [
            c async for c in reader.chunks(offset, e.size - offset if length is None else length)
        ]
        return b"".join(chunks)
    finally:
        await reader.close()


async def gone(cache: Cache, e: Entry) -> bool:
    """The entry cannot be read: ``open`` says so, or (S3) the first read does."""
    if await cache.open(REPO, e) is None:
        return True
    try:
        await read_all(cache, e)
    except EntryGone:
        return True
    return False


async def test_commit_lookup_read_prune_delete(tier: Cache, tmp_path: Path) -> None:
    size = 11 * 1024 * 1024  # three parts of 5 MiB on S3
    made = []
    for i in range(3):
        path, digest = spool(tmp_path, f"s{i}", size)
        data = path.read_bytes()
        e = entry(f"key{i}", "HEAD", size, digest, time.time() + i)
        await tier.commit(REPO, path, e)
        made.append((e, data))
    newest = await tier.newest(REPO, "HEAD")
    assert newest == made[-1][0]
    assert await tier.get(REPO, "key0") == made[0][0]
    assert await tier.newest(REPO, "other") is None
    assert await read_all(tier, made[1][0]) == made[1][1]
    assert await read_all(tier, made[1][0], 1000, 5000) == made[1][1][1000:6000]

    await tier.touch(REPO, made[2][0], made[2][0].fetched_at + 100)
    touched = await tier.get(REPO, "key2")
    assert touched is not None and touched.fetched_at == made[2][0].fetched_at + 100

    await tier.prune(REPO, "HEAD", 2)
    assert await tier.get(REPO, "key0") is None
    assert await gone(tier, made[0][0])
    assert {e.key for e in await tier.entries(REPO)} == {"key1", "key2"}
    await tier.delete(REPO, "key1")
    assert [e.key for e in await tier.entries(REPO)] == ["key2"]


async def test_manifest_race_between_two_writers_loses_nothing(
    s3_endpoint: str, s3_bucket: str, tmp_path: Path
) -> None:
    metrics = Metrics()
    writers = [await s3_tier(s3_endpoint, s3_bucket, metrics) for _ in range(2)]
    jobs = []
    for i in range(12):
        path, digest = spool(tmp_path, f"r{i}", 1024)
        jobs.append(writers[i % 2].commit(REPO, path, entry(f"k{i}", f"ref{i}", 1024, digest, i)))
    await asyncio.gather(*jobs)
    keys = {e.key for e in await writers[0].entries(REPO)}
    assert keys == {f"k{i}" for i in range(12)}
    for writer in writers:
        await close_s3(writer)


async def test_failed_upload_leaves_nothing_visible(
    s3_endpoint: str, s3_bucket: str, tmp_path: Path
) -> None:
    cache = await s3_tier(s3_endpoint, s3_bucket)
    path, _ = spool(tmp_path, "bad", 12 * 1024 * 1024)
    wrong = entry("bad", "HEAD", 12 * 1024 * 1024, "0" * 64, 1.0)  # sha256 does not match
    with pytest.raises(GenerationFailed):
        await cache.commit(REPO, path, wrong)
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    assert s3.list_objects_v2(Bucket=s3_bucket).get("KeyCount", 0) == 0
    assert s3.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []
    await close_s3(cache)


@pytest.mark.parametrize("outcome", ["verified", "failed"])
async def test_upload_runs_while_the_snapshot_is_generated(
    make_client: Any,
    upstream: Upstream,
    big_work: Path,
    s3_endpoint: str,
    s3_bucket: str,
    monkeypatch: pytest.MonkeyPatch,
    outcome: str,
) -> None:
    """The upload is a reader of the spool: parts reach S3 while the generation is still
    running, and only the verified end makes the object visible; a failed generation
    aborts the upload and leaves nothing."""
    upstream.create("big", big_work)
    gate = asyncio.Event()

    async def hold_at_12mib(sent: int) -> None:
        if sent >= 12 * 1024 * 1024:
            await gate.wait()
            if outcome == "failed":
                raise RuntimeError("the tar stream broke")

    wrap_build_tar(monkeypatch, hold_at_12mib)
    cache = {
        "backend": "s3",
        "s3": {"bucket": s3_bucket, "endpoint_url": s3_endpoint, "part_size": 5 * 1024**2},
    }
    # No mirror archive: the bucket holds only what this generation uploads.
    client = await make_client(cache=cache, mirrors={"archive_interval": 0})
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    response = await client.get(snapshot_url("big"))
    try:

        def a_part_sent() -> bool:
            uploads = s3.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", [])
            return any(
                s3.list_parts(Bucket=s3_bucket, Key=u["Key"], UploadId=u["UploadId"]).get("Parts")
                for u in uploads
            )

        await until(a_part_sent, "a part uploaded while the generation runs", 20)
        assert client.app[keys.SNAPSHOTS].running == 1  # still generating
        assert s3.list_objects_v2(Bucket=s3_bucket).get("KeyCount", 0) == 0  # nothing visible
    finally:
        gate.set()
    if outcome == "failed":
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()
    else:
        body = await response.read()
    await client.app[keys.TASKS].settle("generate:")
    assert s3.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []
    listed = [o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket).get("Contents", [])]
    metrics = client.app[keys.METRICS]
    if outcome == "failed":
        assert listed == []
        gave_up = [
            metrics.value("gitcache_s3_uploads_total", result=r) for r in ("failed", "aborted")
        ]
        assert sum(gave_up) == 1  # failed itself, or aborted by the failing generation
        return
    assert metrics.value("gitcache_s3_uploads_total", result="ok") == 1
    assert metrics.value("gitcache_s3_upload_bytes_total") == len(body)
    assert metrics.value("gitcache_s3_upload_lag_seconds_count") == 1
    assert sorted(name.rsplit("/", 1)[1].split(".", 1)[1] for name in listed) == [
        "entry.json",
        "json",
        "tar.zst",
    ]
    hit = await client.get(snapshot_url("big"))
    assert hit.headers["X-Gitcache-Source"] == "hit"
    assert await hit.read() == body


async def test_stale_uploads_aborted_at_start_and_manifest_rebuilt_from_listing(
    s3_endpoint: str, s3_bucket: str, tmp_path: Path
) -> None:
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")

    def upload_ids() -> set[str]:
        return {
            u["UploadId"] for u in s3.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", [])
        }

    journal = UploadJournal(tmp_path / "uploads")
    crashed = s3.create_multipart_upload(Bucket=s3_bucket, Key="snapshots/crashed.tar.zst")
    journal.record("snapshots/crashed.tar.zst", crashed["UploadId"])  # left by a crash here
    other = s3.create_multipart_upload(Bucket=s3_bucket, Key="snapshots/other.tar.zst")
    cache = await s3_tier(s3_endpoint, s3_bucket, journal=tmp_path / "uploads")
    assert cache.bucket.housekeeping is not None
    await cache.bucket.housekeeping
    assert upload_ids() == {other["UploadId"]}  # another replica's, in flight: left alone
    assert journal.leftovers() == []

    path, digest = spool(tmp_path, "x", 4096)
    e = entry("kept", "HEAD", 4096, digest, 5.0)
    await cache.commit(REPO, path, e)
    manifest = f"snapshots/{HOST}/group%2Frepo/manifest.json"
    s3.delete_object(Bucket=s3_bucket, Key=manifest)
    assert await cache.newest(REPO, "HEAD") == e  # found by listing the prefix
    assert b'"kept"' in s3.get_object(Bucket=s3_bucket, Key=manifest)["Body"].read()  # rebuilt

    s3.put_object(Bucket=s3_bucket, Key=manifest, Body=b"{not json")  # unreadable
    assert await cache.newest(REPO, "HEAD") == e
    path, digest = spool(tmp_path, "y", 4096)
    later = entry("later", "HEAD", 4096, digest, 6.0)
    await cache.commit(REPO, path, later)  # writes over the unreadable manifest's ETag
    assert {x.key for x in await cache.entries(REPO)} == {"kept", "later"}
    await close_s3(cache)


async def test_tiered_upload_and_fill_across_replicas(
    make_client: Any,
    rich: str,
    s3_endpoint: str,
    s3_bucket: str,
    tmp_path: Path,
    state_dir: Path,
) -> None:
    cache = {"backend": "tiered", "s3": {"bucket": s3_bucket, "endpoint_url": s3_endpoint}}
    first = await make_client(cache=cache)
    body = await (await first.get(snapshot_url(rich))).read()
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")

    def in_s3() -> bool:  # the upload completes in the background, after the disk commit
        listed = s3.list_objects_v2(Bucket=s3_bucket).get("Contents", [])
        return any(o["Key"].endswith("/manifest.json") for o in listed)

    await until(in_s3, "the snapshot in S3")

    replica_state = tmp_path / "replica-b"
    replica = await make_client(state=replica_state, cache=cache)
    from_s3 = await replica.get(snapshot_url(rich))
    assert from_s3.headers["X-Gitcache-Source"] == "hit"
    assert await from_s3.read() == body
    # Committed just after the last byte went out.
    await until(lambda: any((replica_state / "cache").rglob("*.tar.zst")), "the disk fill")
    filled = list((replica_state / "cache").rglob("*.tar.zst"))
    assert len(filled) == 1 and filled[0].read_bytes() == body  # verified, then committed
    again = await replica.get(snapshot_url(rich))
    assert await again.read() == body


async def test_s3_down_misses_still_stream(make_client: Any, rich: str) -> None:
    cache = {"backend": "s3", "s3": {"bucket": "nowhere", "endpoint_url": "http://127.0.0.1:9"}}
    client = await make_client(cache=cache)
    response = await client.get(snapshot_url(rich))
    assert response.status == 200
    assert response.headers["X-Gitcache-Source"] == "miss"
    await response.read()
    metrics = await (await client.get("/metrics")).text()
    assert "gitcache_s3_errors_total" in metrics and 'operation="get_manifest"' in metrics


async def test_redirect_to_a_presigned_url(
    make_client: Any, rich: str, s3_endpoint: str, s3_bucket: str
) -> None:
    cache = {
        "backend": "s3",
        "s3": {"bucket": s3_bucket, "endpoint_url": s3_endpoint, "redirect": True},
    }
    client = await make_client(cache=cache)
    body = await (await client.get(snapshot_url(rich))).read()
    await settled(client)
    redirected = await client.get(snapshot_url(rich), allow_redirects=False)
    assert redirected.status == 302
    assert redirected.headers["X-Gitcache-Source"] == "hit"
    location = redirected.headers["Location"]
    assert location.startswith(s3_endpoint) and "Signature" in location
    async with aiohttp.ClientSession() as session, session.get(location) as direct:
        assert direct.status == 200
        assert await direct.read() == body  # the bytes came from the bucket, not the proxy
    ranged = await client.get(snapshot_url(rich), headers={"Range": "bytes=0-9"})
    assert ranged.status == 206 and await ranged.read() == body[:10]


class FlakyS3:
    """An S3 server of a test's own, on a fixed port, that the test stops and starts."""

    bucket = "gitcache-flaky"

    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Up, with an empty bucket (moto keeps nothing across restarts)."""
        self._proc = start_s3_server(self.port)
        boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1").create_bucket(
            Bucket=self.bucket
        )

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait()
            self._proc = None

    @property
    def cache(self) -> dict[str, Any]:
        return {"backend": "s3", "s3": {"bucket": self.bucket, "endpoint_url": self.endpoint}}


@pytest.fixture
def flaky_s3() -> Iterator[FlakyS3]:
    server = FlakyS3()
    server.start()
    yield server
    server.stop()


async def test_s3_down_then_back(
    make_client: Any, rich: str, flaky_s3: FlakyS3, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Not skipped after it failed (another test covers that): back means back at once.
    monkeypatch.setattr(bucket_module, "SKIP_AFTER_FAILURE", 0.0)
    client = await make_client(cache=flaky_s3.cache)
    await (await client.get(snapshot_url(rich))).read()
    await settled(client)
    assert (await client.get(snapshot_url(rich))).headers["X-Gitcache-Source"] == "hit"

    flaky_s3.stop()
    down = await client.get(snapshot_url(rich))  # S3 is gone: a miss, streamed
    assert down.status == 200 and down.headers["X-Gitcache-Source"] == "miss"
    await down.read()
    assert (await client.get("/healthz")).status == 200

    flaky_s3.start()  # back, empty: the next miss fills it and hits follow
    again = await client.get(snapshot_url(rich))
    await again.read()
    await settled(client)
    back = await client.get(snapshot_url(rich))
    assert back.headers["X-Gitcache-Source"] == "hit"
    await back.read()


async def test_s3_dies_mid_upload_and_the_client_still_gets_its_snapshot(
    make_client: Any,
    upstream: Upstream,
    big_work: Path,
    flaky_s3: FlakyS3,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The upload fails part-way; the generation does not: its client gets every byte,
    verified, and the failure is counted."""
    upstream.create("big", big_work)
    gate = asyncio.Event()

    async def hold_at_12mib(sent: int) -> None:
        if sent >= 12 * 1024 * 1024:
            await gate.wait()

    wrap_build_tar(monkeypatch, hold_at_12mib)
    cache = flaky_s3.cache
    cache["s3"]["part_size"] = 5 * 1024**2
    client = await make_client(cache=cache, mirrors={"archive_interval": 0})
    s3 = boto3.client("s3", endpoint_url=flaky_s3.endpoint, region_name="us-east-1")
    response = await client.get(snapshot_url("big"))
    try:
        await until(
            lambda: bool(s3.list_multipart_uploads(Bucket=flaky_s3.bucket).get("Uploads")),
            "the upload to start",
            20,
        )
        flaky_s3.stop()
    finally:
        gate.set()
    body = await response.read()
    assert response.status == 200
    await settled(client)
    tar = (
        zstandard.ZstdDecompressor().stream_reader(io.BytesIO(body), read_across_frames=True).read()
    )
    assert len(tar) > 24 * 1000 * 1000  # the whole snapshot: every frame of it
    metrics = client.app[keys.METRICS]
    assert metrics.value("gitcache_s3_errors_total", operation="upload") >= 1


async def test_an_object_gone_from_the_bucket_is_served_again(
    make_client: Any, rich: str, s3_endpoint: str, s3_bucket: str, tmp_path: Path
) -> None:
    """The manifest still lists a snapshot whose object is gone (a lifecycle rule, another
    replica's prune): the first read finds out before anything was sent, the entry is
    forgotten, and the request is served again, from a new generation."""
    cache = {"backend": "s3", "s3": {"bucket": s3_bucket, "endpoint_url": s3_endpoint}}
    client = await make_client(cache=cache, mirrors={"archive_interval": 0})
    await (await client.get(snapshot_url(rich))).read()
    await settled(client)
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    listed = s3.list_objects_v2(Bucket=s3_bucket)["Contents"]
    (name,) = [o["Key"] for o in listed if o["Key"].endswith(".tar.zst")]
    s3.delete_object(Bucket=s3_bucket, Key=name)

    head = await client.head(snapshot_url(rich))  # a HEAD reads nothing: still a hit
    assert head.headers["X-Gitcache-Source"] == "hit"
    response = await client.get(snapshot_url(rich))
    assert response.status == 200
    assert response.headers["X-Gitcache-Source"] == "miss"
    checkout = extract(await response.read(), tmp_path / "checkout")
    git("fsck", "--no-progress", cwd=checkout)
    await client.app[keys.TASKS].settle("generate:")
    again = await client.get(snapshot_url(rich))
    assert again.headers["X-Gitcache-Source"] == "hit"
    await again.read()


async def test_a_hung_s3_is_skipped_and_disk_hits_stay_fast(make_client: Any, rich: str) -> None:
    """S3 that accepts connections and never answers: the first lookup gives up after a
    few seconds, then S3 is skipped for a while, so hits from the disk tier touch it no
    more (and uploads do not queue behind it)."""
    connections = 0

    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await reader.read()  # until the client gives up and closes
        writer.close()

    server = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    cache = {
        "backend": "tiered",
        "s3": {"bucket": "hung", "endpoint_url": f"http://127.0.0.1:{port}"},
    }
    try:
        client = await make_client(cache=cache, mirrors={"archive_interval": 0})
        first = await client.get(snapshot_url(rich))
        assert first.status == 200 and first.headers["X-Gitcache-Source"] == "miss"
        body = await first.read()
        await client.app[keys.TASKS].settle("generate:")
        seen = connections
        for _ in range(5):
            hit = await client.get(snapshot_url(rich))
            assert hit.headers["X-Gitcache-Source"] == "hit"
            assert await hit.read() == body
        assert connections == seen  # skipped: no request went to S3
        metrics = client.app[keys.METRICS]
        assert metrics.value("gitcache_s3_errors_total", operation="get_manifest") >= 1
    finally:
        server.close()
