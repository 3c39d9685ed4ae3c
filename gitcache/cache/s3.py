"""The S3 tier: ``<prefix><host>/<repo slug>/<key>.tar.zst`` and ``manifest.json`` in one
bucket that every replica shares.

A snapshot is uploaded while it is generated: the upload is one more reader of the spool,
sending multipart parts as they fill, hashing them on the way, and completing only when
size and sha256 match the verified spool; any failure aborts it, so nothing half-written is
ever visible. The object is written first, then its entry beside it (``<key>.entry.json``),
then the manifest, last, with a conditional write (``If-Match`` on the manifest's ETag,
``If-None-Match: *`` for a new one) retried on conflict, so two replicas never lose each
other's entries. A missing or unreadable manifest is rebuilt from a listing of the
repository's prefix and those entries, and written back.

The bucket also holds ``<prefix>leases/<work>/<host>/<repo slug>.json`` (see :meth:`claim`)
and ``<prefix>mirrors/<host>/<repo slug>.tar.zst`` (see ``gitcache.mirror.archive``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import random
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aioboto3
import aiohttp
from aiobotocore.config import AioConfig
from botocore.exceptions import BotoCoreError, ClientError

from gitcache.cache.base import Cache, Entry, Tail, Upload
from gitcache.cache.checked import CheckedFile
from gitcache.cache.manifest import MANIFEST_NAME, Manifest
from gitcache.cache.upload import FileTail, S3Upload, UploadJournal
from gitcache.config import S3CacheConfig
from gitcache.errors import EntryGone, GenerationFailed, GitcacheError
from gitcache.metrics import Metrics
from gitcache.repo import RepoRef
from gitcache.tasks import run_blocking

log = logging.getLogger(__name__)

TIER = "s3"
# S3 sits on the request path of every lookup: when it is down, fail fast and serve from
# the upstream rather than retry for tens of seconds.
CLIENT_CONFIG = AioConfig(
    connect_timeout=3, read_timeout=20, retries={"max_attempts": 2, "mode": "standard"}
)
CHUNK = 1024 * 1024
SNAPSHOT_SUFFIX = ".tar.zst"
ENTRY_SUFFIX = ".entry.json"  # the entry beside its object, for the listing fallback
MANIFEST_ATTEMPTS = 8
QUICK_TIMEOUT = 5.0  # a manifest, an entry or a lease is a few KiB: S3 slower than this is down
SKIP_AFTER_FAILURE = 10.0
_CONFLICT_CODES = {"PreconditionFailed", "ConditionalRequestConflict", "412", "409"}
_MISSING_CODES = {"NoSuchKey", "404", "NotFound"}
# Every ``operation`` label of gitcache_s3_errors_total (see S3Cache.failed).
OPERATIONS = (
    "get",
    "get_manifest",
    "put_manifest",
    "get_entry",
    "put_entry",
    "list",
    "delete",
    "lease",
    "create_upload",
    "upload",
    "abort_upload",
)


class S3Error(GitcacheError):
    code = "s3_error"


def _code(exc: Exception) -> str:
    """S3's error code ("" for a failure that never reached S3)."""
    if isinstance(exc, ClientError):
        return str(exc.response.get("Error", {}).get("Code", ""))
    return ""


class S3Reader:
    """Streams an object with ranged GETs (no sendfile)."""

    file = None

    def __init__(self, entry: Entry, cache: S3Cache, key: str) -> None:
        self.entry = entry
        self._cache = cache
        self._client, self._bucket, self._key = cache.client, cache.config.bucket, key

    async def chunks(self, offset: int, length: int) -> AsyncGenerator[bytes, None]:
        try:
            response = await self._client.get_object(
                Bucket=self._bucket, Key=self._key, Range=f"bytes={offset}-{offset + length - 1}"
            )
        except (ClientError, BotoCoreError) as exc:
            if _code(exc) in _MISSING_CODES:
                raise EntryGone(f"{self._key} is gone from the bucket") from exc
            raise self._cache.failed("get", exc) from exc
        body = response["Body"]
        try:
            while True:
                try:
                    chunk = await body.read(CHUNK)
                except (BotoCoreError, aiohttp.ClientError, OSError, TimeoutError) as exc:
                    # The connection to S3 dropped or stalled mid-object.
                    raise self._cache.failed("get", exc) from exc
                if not chunk:
                    break
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
    local = False

    def __init__(
        self, config: S3CacheConfig, metrics: Metrics, journal_dir: Path | None = None
    ) -> None:
        """``journal_dir``: where this process records its uploads in flight (see
        :class:`UploadJournal`)."""
        self.config = config
        self.journal = UploadJournal(journal_dir) if journal_dir is not None else None
        self.housekeeping: asyncio.Task[None] | None = None
        self.metrics = metrics
        for operation in OPERATIONS:  # at 0 from the start, for the S3 alert's rate()
            metrics.s3_errors.labels(operation)
        self._bucket = config.bucket
        self.client: Any = None
        self._skip_until = 0.0  # see failed()
        self._stack = contextlib.AsyncExitStack()
        self._seen: set[RepoRef] = set()

    # --- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        """Open the client (credentials from the standard AWS chain) and, in the
        background, abort the multipart uploads this replica left in flight when it last
        stopped."""
        session = aioboto3.Session()
        self.client = await self._stack.enter_async_context(
            session.client(
                "s3",
                endpoint_url=self.config.endpoint_url or None,
                region_name=self.config.region,
                config=CLIENT_CONFIG,
            )
        )
        # In the background: a slow or hung S3 must not hold up start-up.
        self.housekeeping = asyncio.ensure_future(self._abort_stale_uploads())

    async def _abort_stale_uploads(self) -> None:
        """Abort the uploads this replica had in flight when it stopped (its journal).
        Uploads in the bucket that it did not record may be other replicas' in flight and
        are left alone; those of a replica that never comes back are S3's to expire (an
        ``AbortIncompleteMultipartUpload`` lifecycle rule, see the README)."""
        if self.journal is None:
            return
        for name, upload_id in await asyncio.to_thread(self.journal.leftovers):
            log.info("aborting the multipart upload of %s left by the last run", name)
            try:
                await self.client.abort_multipart_upload(
                    Bucket=self._bucket, Key=name, UploadId=upload_id
                )
            except ClientError as exc:
                if _code(exc) not in _MISSING_CODES | {"NoSuchUpload"}:
                    self.failed("abort_upload", exc)
                    continue  # kept in the journal: the next start tries again
            except BotoCoreError as exc:
                self.failed("abort_upload", exc)
                return
            await asyncio.to_thread(self.journal.done, upload_id)

    async def close(self) -> None:
        if self.housekeeping is not None:
            self.housekeeping.cancel()
            await asyncio.gather(self.housekeeping, return_exceptions=True)
        await self._stack.aclose()

    # --- names ------------------------------------------------------------------------

    def _name(self, repo: RepoRef, name: str) -> str:
        return f"{self.config.prefix}{repo.host}/{repo.slug}/{name}"

    def object_name(self, repo: RepoRef, key: str) -> str:
        return self._name(repo, f"{key}{SNAPSHOT_SUFFIX}")

    def _sidecar(self, repo: RepoRef, key: str) -> str:
        return self._name(repo, f"{key}{ENTRY_SUFFIX}")

    def failed(self, operation: str, exc: Exception) -> S3Error:
        """Count and log an S3 failure once, here; callers decide whether it is fatal.
        One that never got an answer from S3 (unreachable, timed out) makes requests skip
        S3 for ``SKIP_AFTER_FAILURE`` seconds: a dead or hung S3 must not make every
        client wait for it."""
        self.metrics.s3_errors.labels(operation).inc()
        log.warning("S3 %s failed: %s", operation, exc or type(exc).__name__)
        if isinstance(exc, BotoCoreError | TimeoutError):
            if self.available():
                log.warning("S3 does not answer: skipping it for %.0fs", SKIP_AFTER_FAILURE)
            self._skip_until = time.monotonic() + SKIP_AFTER_FAILURE
        return S3Error(f"the S3 cache failed ({operation})")

    def available(self) -> bool:
        return time.monotonic() >= self._skip_until

    def check_available(self) -> None:
        if not self.available():
            raise S3Error("the S3 cache is skipped after a failure")

    @contextlib.asynccontextmanager
    async def _quick(self, operation: str) -> AsyncIterator[None]:
        """A small request on a client's path (a manifest, an entry, a lease): refused at
        once while S3 is skipped, and given up after ``QUICK_TIMEOUT``."""
        self.check_available()
        try:
            async with asyncio.timeout(QUICK_TIMEOUT):
                yield
        except TimeoutError as exc:
            raise self.failed(operation, exc) from exc

    # --- manifest ---------------------------------------------------------------------

    async def _read_manifest(self, repo: RepoRef) -> tuple[Manifest, str | None]:
        """The manifest and its ETag (None: there is none yet). A missing or unreadable
        one is rebuilt from a listing and, if that found entries, written back."""
        etag = None
        try:
            async with self._quick("get_manifest"):
                response = await self.client.get_object(
                    Bucket=self._bucket, Key=self._name(repo, MANIFEST_NAME)
                )
                etag = str(response["ETag"])
                async with response["Body"] as body:
                    data = await body.read()
            return Manifest.loads(data), etag
        except (ClientError, BotoCoreError) as exc:
            if _code(exc) not in _MISSING_CODES:
                raise self.failed("get_manifest", exc) from exc
        except ValueError:
            log.warning("manifest of %s is unreadable: rebuilding it", repo.name)
        manifest = await self._rebuild_manifest(repo)
        if manifest.entries:
            # Written back (over the unreadable one, if that is what there was), so the
            # next lookup is one read again; losing a race to another writer is fine.
            etag = await self._put_manifest(repo, manifest, etag) or etag
        return manifest, etag

    async def _put_manifest(
        self, repo: RepoRef, manifest: Manifest, etag: str | None
    ) -> str | None:
        """Write the manifest if it is still the one with ``etag`` (None: if there is
        none); its new ETag, or None if another writer came first."""
        condition = {"IfMatch": etag} if etag else {"IfNoneMatch": "*"}
        try:
            response = await self.client.put_object(
                Bucket=self._bucket,
                Key=self._name(repo, MANIFEST_NAME),
                Body=manifest.dumps(),
                ContentType="application/json",
                **condition,
            )
        except (ClientError, BotoCoreError) as exc:
            if _code(exc) in _CONFLICT_CODES:
                self.metrics.manifest_conflicts.inc()
                return None
            raise self.failed("put_manifest", exc) from exc
        self._seen.add(repo)
        return str(response["ETag"])

    async def _rebuild_manifest(self, repo: RepoRef) -> Manifest:
        """The slow fallback: list the repository's prefix and read the entry written beside
        each complete object (an object without one never finished publishing)."""
        prefix = self._name(repo, "")
        names: set[str] = set()
        try:
            paginator = self.client.get_paginator("list_objects_v2")
            async for page in paginator.paginate(Bucket=self._bucket, Prefix=prefix):
                names.update(item["Key"][len(prefix) :] for item in page.get("Contents", []))
            entries = []
            for name in sorted(names):
                key = name.removesuffix(SNAPSHOT_SUFFIX)
                if "/" in name or key == name or f"{key}{ENTRY_SUFFIX}" not in names:
                    continue
                response = await self.client.get_object(
                    Bucket=self._bucket, Key=self._sidecar(repo, key)
                )
                async with response["Body"] as body:
                    raw = await body.read()
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    found = Entry.from_json(json.loads(raw))
                    if found.key == key:
                        entries.append(found)
        except (ClientError, BotoCoreError) as exc:
            raise self.failed("list", exc) from exc
        return Manifest(tuple(entries))

    async def _update_manifest(
        self, repo: RepoRef, change: Callable[[Manifest], Manifest]
    ) -> Manifest:
        """Read, change, write back only if nobody wrote in between; else again."""
        for _ in range(MANIFEST_ATTEMPTS):
            manifest, etag = await self._read_manifest(repo)
            changed = change(manifest)
            if await self._put_manifest(repo, changed, etag) is not None:
                return changed
            await asyncio.sleep(random.uniform(0.01, 0.1))  # noqa: S311 (jitter)
        raise self.failed("put_manifest", RuntimeError("kept conflicting"))

    # --- leases -------------------------------------------------------------------------

    async def claim(
        self, repo: RepoRef, owner: str, ttl: float, now: float, work: str = "refresh"
    ) -> bool:
        """Claim the periodic ``work`` on ``repo`` for ``ttl`` seconds, so that N replicas
        do not all regenerate and upload the same snapshot (or archive the same mirror). A
        lease object is created with ``If-None-Match: *``, or taken over once expired with
        ``If-Match`` on its ETag. Claims fail open: if S3 cannot say, the work is done."""
        name = self.shared_name("leases", work, repo.host, f"{repo.slug}.json")
        body = json.dumps({"owner": owner, "expires": now + ttl}).encode()
        try:
            async with self._quick("lease"):
                return await self._claim(name, body, owner, now)
        except S3Error:
            return True

    async def _claim(self, name: str, body: bytes, owner: str, now: float) -> bool:
        try:
            try:
                await self.client.put_object(
                    Bucket=self._bucket, Key=name, Body=body, IfNoneMatch="*"
                )
                return True
            except ClientError as exc:
                if _code(exc) not in _CONFLICT_CODES:
                    raise
            current = await self.client.get_object(Bucket=self._bucket, Key=name)
            async with current["Body"] as stream:
                held = json.loads(await stream.read())
            if held.get("owner") != owner and float(held.get("expires", 0)) > now:
                return False
            await self.client.put_object(
                Bucket=self._bucket, Key=name, Body=body, IfMatch=current["ETag"]
            )
            return True
        except ClientError as exc:
            if _code(exc) in _CONFLICT_CODES:
                return False  # another replica took it over first
            self.failed("lease", exc)
            return True
        except (BotoCoreError, ValueError) as exc:
            self.failed("lease", exc)
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

    def layers(self) -> list[tuple[str, Cache]]:
        return [(TIER, self)]

    async def open(self, repo: RepoRef, entry: Entry, *, use: bool = True) -> S3Reader:
        """No request yet: the first read is the GET itself (one round trip per hit, none
        for a HEAD or a 304); an object gone by then raises :class:`EntryGone` there."""
        return S3Reader(entry, self, self.object_name(repo, entry.key))

    async def commit(
        self, repo: RepoRef, spool: Path, entry: Entry, upload: Upload | None = None
    ) -> None:
        """Complete the upload begun while the spool was written, or upload the verified
        spool now (it stays where it is); the object first, the manifest last."""
        if upload is None:
            upload = self.begin(repo, entry.key, functools.partial(FileTail, spool))
        await upload.complete(entry)

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
            for name in (self.object_name(repo, key), self._sidecar(repo, key)):
                try:
                    await self.client.delete_object(Bucket=self._bucket, Key=name)
                except (ClientError, BotoCoreError) as exc:
                    raise self.failed("delete", exc) from exc

    # --- upload -----------------------------------------------------------------------

    def begin(self, repo: RepoRef, key: str, tail: Callable[[], Tail]) -> S3Upload:
        async def publish(entry: Entry) -> None:
            # The entry beside the object (for the listing fallback), the manifest last.
            await self.put_entry(self._sidecar(repo, key), entry)
            await self._update_manifest(repo, lambda m: m.with_entry(entry))

        return S3Upload(self, self.object_name(repo, key), tail(), publish)

    async def put_entry(self, name: str, entry: Entry) -> None:
        try:
            await self.client.put_object(
                Bucket=self._bucket,
                Key=name,
                Body=json.dumps(entry.to_json()).encode(),
                ContentType="application/json",
            )
        except (ClientError, BotoCoreError) as exc:
            raise self.failed("put_entry", exc) from exc

    # --- files outside the snapshot manifest (mirror archives) --------------------------

    def shared_name(self, *parts: str) -> str:
        return self.config.prefix + "/".join(parts)

    async def upload_file(self, name: str, path: Path, entry: Entry) -> None:
        """A verified local file as the object ``name``, then its entry beside it
        (``name`` + ``.entry.json``): a reader that finds the entry finds the object."""

        async def publish(done: Entry) -> None:
            await self.put_entry(name + ENTRY_SUFFIX, done)

        await S3Upload(self, name, FileTail(path), publish).complete(entry)

    async def read_entry(self, name: str) -> Entry | None:
        """The entry published beside the object ``name``; None if there is none."""
        try:
            async with self._quick("get_entry"):
                response = await self.client.get_object(
                    Bucket=self._bucket, Key=name + ENTRY_SUFFIX
                )
                async with response["Body"] as body:
                    raw = await body.read()
            return Entry.from_json(json.loads(raw))
        except (ClientError, BotoCoreError) as exc:
            if _code(exc) in _MISSING_CODES:
                return None
            raise self.failed("get_entry", exc) from exc
        except (ValueError, KeyError, TypeError):
            return None

    async def download(self, name: str, entry: Entry, dest: Path) -> None:
        """The object ``name`` into the new file ``dest``, checked against ``entry``;
        raises (and removes ``dest``) if it does not match."""
        out = CheckedFile(dest)
        try:
            async for chunk in S3Reader(entry, self, name).chunks(0, entry.size):
                await out.write(chunk)
            await out.close()
            if not out.matches(entry):
                raise GenerationFailed(f"{name} does not match its entry")
        except BaseException:
            await out.close()
            await run_blocking(dest.unlink, missing_ok=True)
            raise
