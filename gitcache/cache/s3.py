"""The S3 tier: ``<prefix><host>/<repo slug>/<key>.tar.zst`` and ``manifest.json`` in one
bucket that every replica shares.

Objects are uploaded multipart with concurrent parts, hashed while read, and completed only
when size and sha256 match the verified spool; any failure aborts the upload, so nothing
half-written is ever visible. The object is written first and the manifest last, with a
conditional write (``If-Match`` on the manifest's ETag, ``If-None-Match: *`` for a new
one) retried on conflict, so two replicas never lose each other's entries. Each object also
carries its entry in its metadata: a missing or unreadable manifest is rebuilt from a
listing of the repository's prefix.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import random
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, BinaryIO

import aioboto3
from aiobotocore.config import AioConfig
from botocore.exceptions import BotoCoreError, ClientError

from gitcache.cache.base import Entry
from gitcache.cache.manifest import MANIFEST_NAME, Manifest
from gitcache.config import S3CacheConfig
from gitcache.errors import GenerationFailed, GitcacheError
from gitcache.metrics import Metrics
from gitcache.repo import RepoRef

log = logging.getLogger(__name__)

TIER = "s3"
# S3 sits on the request path of every lookup: when it is down, fail fast and serve from
# the upstream rather than retry for tens of seconds.
CLIENT_CONFIG = AioConfig(
    connect_timeout=3, read_timeout=60, retries={"max_attempts": 2, "mode": "standard"}
)
CHUNK = 1024 * 1024
META_ENTRY = "gitcache-entry"
MANIFEST_ATTEMPTS = 8
_CONFLICT_CODES = {"PreconditionFailed", "ConditionalRequestConflict", "412", "409"}
_MISSING_CODES = {"NoSuchKey", "404", "NotFound"}


class S3Error(GitcacheError):
    code = "s3_error"


def _code(exc: Exception) -> str:
    if isinstance(exc, ClientError):
        return str(exc.response.get("Error", {}).get("Code", ""))
    return ""


class S3Reader:
    """Streams an object with ranged GETs (no sendfile)."""

    file = None

    def __init__(self, entry: Entry, client: Any, bucket: str, key: str) -> None:
        self.entry = entry
        self._client, self._bucket, self._key = client, bucket, key

    async def chunks(self, offset: int, length: int) -> AsyncIterator[bytes]:
        response = await self._client.get_object(
            Bucket=self._bucket, Key=self._key, Range=f"bytes={offset}-{offset + length - 1}"
        )
        body = response["Body"]
        try:
            while chunk := await body.read(CHUNK):
                yield chunk
        finally:
            body.close()

    async def close(self) -> None:
        return None

    async def presigned_url(self, ttl: float) -> str:
        """A short-lived URL for the object itself: the bytes bypass the proxy."""
        url: str = await self._client.generate_presigned_url(
            "get_object", Params={"Bucket": self._bucket, "Key": self._key}, ExpiresIn=int(ttl)
        )
        return url


class S3Cache:
    def __init__(self, config: S3CacheConfig, metrics: Metrics) -> None:
        self._config = config
        self._metrics = metrics
        self._bucket = config.bucket
        self._client: Any = None
        self._stack = contextlib.AsyncExitStack()
        self._seen: set[RepoRef] = set()

    # --- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        """Open the client (credentials from the standard AWS chain) and abort multipart
        uploads a crashed process left behind under the prefix."""
        session = aioboto3.Session()
        self._client = await self._stack.enter_async_context(
            session.client(
                "s3",
                endpoint_url=self._config.endpoint_url or None,
                region_name=self._config.region,
                config=CLIENT_CONFIG,
            )
        )
        with contextlib.suppress(ClientError, BotoCoreError):
            uploads = await self._client.list_multipart_uploads(
                Bucket=self._bucket, Prefix=self._config.prefix
            )
            for upload in uploads.get("Uploads", []):
                log.info("aborting stale multipart upload of %s", upload["Key"])
                await self._client.abort_multipart_upload(
                    Bucket=self._bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                )

    async def close(self) -> None:
        await self._stack.aclose()

    # --- names ------------------------------------------------------------------------

    def _name(self, repo: RepoRef, name: str) -> str:
        return f"{self._config.prefix}{repo.host}/{repo.slug}/{name}"

    def _object(self, repo: RepoRef, key: str) -> str:
        return self._name(repo, f"{key}.tar.zst")

    def _failed(self, operation: str, exc: Exception) -> S3Error:
        """Count and log an S3 failure once, here; callers decide whether it is fatal."""
        self._metrics.s3_errors.labels(operation).inc()
        log.warning("S3 %s failed: %s", operation, exc)
        return S3Error(f"the S3 cache failed ({operation})")

    # --- manifest ---------------------------------------------------------------------

    async def _read_manifest(self, repo: RepoRef) -> tuple[Manifest, str | None]:
        """The manifest and its ETag (None: there is none yet)."""
        try:
            response = await self._client.get_object(
                Bucket=self._bucket, Key=self._name(repo, MANIFEST_NAME)
            )
            async with response["Body"] as body:
                data = await body.read()
            return Manifest.loads(data), str(response["ETag"])
        except ClientError as exc:
            if _code(exc) not in _MISSING_CODES:
                raise self._failed("get_manifest", exc) from exc
        except ValueError:
            log.warning("manifest of %s is unreadable: rebuilding it", repo.name)
        except BotoCoreError as exc:
            raise self._failed("get_manifest", exc) from exc
        return await self._rebuild_manifest(repo), None

    async def _rebuild_manifest(self, repo: RepoRef) -> Manifest:
        """The slow fallback: list the repository's prefix and read each object's entry."""
        entries = []
        prefix = self._name(repo, "")
        try:
            paginator = self._client.get_paginator("list_objects_v2")
            async for page in paginator.paginate(Bucket=self._bucket, Prefix=prefix):
                for item in page.get("Contents", []):
                    if not item["Key"].endswith(".tar.zst") or "/" in item["Key"][len(prefix) :]:
                        continue
                    head = await self._client.head_object(Bucket=self._bucket, Key=item["Key"])
                    raw = head.get("Metadata", {}).get(META_ENTRY)
                    if raw:
                        with contextlib.suppress(ValueError, KeyError, TypeError):
                            entries.append(Entry.from_json(json.loads(base64.b64decode(raw))))
        except (ClientError, BotoCoreError) as exc:
            raise self._failed("list", exc) from exc
        return Manifest(tuple(entries))

    async def _update_manifest(
        self, repo: RepoRef, change: Callable[[Manifest], Manifest]
    ) -> Manifest:
        """Read, change, write back only if nobody wrote in between; else again."""
        for _ in range(MANIFEST_ATTEMPTS):
            manifest, etag = await self._read_manifest(repo)
            changed = change(manifest)
            condition = {"IfMatch": etag} if etag else {"IfNoneMatch": "*"}
            try:
                await self._client.put_object(
                    Bucket=self._bucket,
                    Key=self._name(repo, MANIFEST_NAME),
                    Body=changed.dumps(),
                    ContentType="application/json",
                    **condition,
                )
            except ClientError as exc:
                if _code(exc) in _CONFLICT_CODES:
                    self._metrics.manifest_conflicts.inc()
                    await asyncio.sleep(random.uniform(0.01, 0.1))  # noqa: S311 (jitter)
                    continue
                raise self._failed("put_manifest", exc) from exc
            except BotoCoreError as exc:
                raise self._failed("put_manifest", exc) from exc
            self._seen.add(repo)
            return changed
        raise self._failed("put_manifest", RuntimeError("kept conflicting"))

    # --- leases -------------------------------------------------------------------------

    async def claim(self, repo: RepoRef, owner: str, ttl: float, now: float) -> bool:
        """Claim the periodic work on ``repo`` for ``ttl`` seconds, so that N replicas do
        not all regenerate and upload the same snapshot. A lease object is created with
        ``If-None-Match: *``, or taken over once expired with ``If-Match`` on its ETag.
        Claims fail open: if S3 cannot say, the work is done anyway."""
        name = f"{self._config.prefix}leases/{repo.host}/{repo.slug}.json"
        body = json.dumps({"owner": owner, "expires": now + ttl}).encode()
        try:
            try:
                await self._client.put_object(
                    Bucket=self._bucket, Key=name, Body=body, IfNoneMatch="*"
                )
                return True
            except ClientError as exc:
                if _code(exc) not in _CONFLICT_CODES:
                    raise
            current = await self._client.get_object(Bucket=self._bucket, Key=name)
            async with current["Body"] as stream:
                held = json.loads(await stream.read())
            if held.get("owner") != owner and float(held.get("expires", 0)) > now:
                return False
            await self._client.put_object(
                Bucket=self._bucket, Key=name, Body=body, IfMatch=current["ETag"]
            )
            return True
        except ClientError as exc:
            if _code(exc) in _CONFLICT_CODES:
                return False  # another replica took it over first
            self._failed("lease", exc)
            return True
        except (BotoCoreError, ValueError) as exc:
            self._failed("lease", exc)
            return True

    # --- the protocol -----------------------------------------------------------------

    def repos(self) -> list[RepoRef]:
        return sorted(self._seen, key=lambda r: r.name)

    async def entries(self, repo: RepoRef) -> tuple[Entry, ...]:
        return (await self._read_manifest(repo))[0].entries

    async def newest(self, repo: RepoRef, ref: str) -> Entry | None:
        try:
            entry = (await self._read_manifest(repo))[0].newest(ref)
        except S3Error:
            return None  # S3 down: a miss, and the snapshot is generated instead
        if entry is not None:
            self._seen.add(repo)
        return entry

    async def get(self, repo: RepoRef, key: str) -> Entry | None:
        try:
            return (await self._read_manifest(repo))[0].get(key)
        except S3Error:
            return None

    async def open(self, repo: RepoRef, entry: Entry) -> S3Reader | None:
        name = self._object(repo, entry.key)
        try:
            await self._client.head_object(Bucket=self._bucket, Key=name)
        except ClientError as exc:
            if _code(exc) in _MISSING_CODES:
                return None
            raise self._failed("head", exc) from exc
        except BotoCoreError as exc:
            raise self._failed("head", exc) from exc
        return S3Reader(entry, self._client, self._bucket, name)

    async def commit(self, repo: RepoRef, spool: Path, entry: Entry) -> None:
        """Upload the verified spool (which stays where it is), then list it."""
        with spool.open("rb") as file:
            await self.commit_file(repo, file, entry)

    async def commit_file(self, repo: RepoRef, file: BinaryIO, entry: Entry) -> None:
        """Upload an open snapshot file: the object first, the manifest last."""
        await self._upload(self._object(repo, entry.key), file, entry)
        await self._update_manifest(repo, lambda m: m.with_entry(entry))

    async def touch(self, repo: RepoRef, entry: Entry, fetched_at: float) -> None:
        await self._update_manifest(repo, lambda m: m.touched(entry.key, fetched_at))

    async def prune(self, repo: RepoRef, ref: str, keep: int) -> None:
        manifest, _ = await self._read_manifest(repo)
        entries = sorted((e for e in manifest.entries if e.ref == ref), key=lambda e: -e.created)
        if len(entries) > keep:
            await self.delete(repo, *(e.key for e in entries[keep:]))

    async def delete(self, repo: RepoRef, *keys: str) -> None:
        # Manifest first: once it no longer lists an entry, nothing serves it.
        await self._update_manifest(repo, lambda m: m.without(*keys))
        for key in keys:
            try:
                await self._client.delete_object(Bucket=self._bucket, Key=self._object(repo, key))
            except (ClientError, BotoCoreError) as exc:
                raise self._failed("delete", exc) from exc

    # --- upload -----------------------------------------------------------------------

    async def _upload(self, name: str, file: BinaryIO, entry: Entry) -> None:
        """Multipart upload with ``upload_concurrency`` parts in flight: memory grows with
        ``part_size * upload_concurrency`` (about twice that: the SDK copies a part while it
        signs and sends it), whatever the size of the snapshot."""
        meta = base64.b64encode(json.dumps(entry.to_json()).encode()).decode()
        try:
            created = await self._client.create_multipart_upload(
                Bucket=self._bucket,
                Key=name,
                ContentType="application/zstd",
                Metadata={META_ENTRY: meta},
            )
        except (ClientError, BotoCoreError) as exc:
            raise self._failed("create_upload", exc) from exc
        upload_id = created["UploadId"]
        try:
            parts = await self._upload_parts(name, upload_id, file, entry)
            await self._client.complete_multipart_upload(
                Bucket=self._bucket,
                Key=name,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
            )
        except BaseException as exc:
            with contextlib.suppress(ClientError, BotoCoreError):
                await self._client.abort_multipart_upload(
                    Bucket=self._bucket, Key=name, UploadId=upload_id
                )
            if isinstance(exc, ClientError | BotoCoreError):
                raise self._failed("upload", exc) from exc
            raise

    async def _upload_parts(
        self, name: str, upload_id: str, file: BinaryIO, entry: Entry
    ) -> list[dict[str, Any]]:
        slots = asyncio.Semaphore(self._config.upload_concurrency)
        digest = hashlib.sha256()
        size = 0
        tasks: list[asyncio.Task[dict[str, Any]]] = []

        async def send(number: int, data: bytes) -> dict[str, Any]:
            try:
                result = await self._client.upload_part(
                    Bucket=self._bucket,
                    Key=name,
                    UploadId=upload_id,
                    PartNumber=number,
                    Body=data,
                )
                return {"ETag": result["ETag"], "PartNumber": number}
            finally:
                slots.release()

        def read_part(f: Any) -> bytes:
            data: bytes = f.read(self._config.part_size)
            digest.update(data)
            return data

        try:
            while True:
                await slots.acquire()
                data = await asyncio.to_thread(read_part, file)
                if not data:
                    slots.release()
                    break
                size += len(data)
                tasks.append(asyncio.ensure_future(send(len(tasks) + 1, data)))
            parts = await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        if size != entry.size or digest.hexdigest() != entry.sha256:
            raise GenerationFailed(f"{name}: the upload does not match the verified snapshot")
        return list(parts)
