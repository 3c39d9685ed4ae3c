"""The S3 bucket replicas share, as gitcache uses it: one client, failures counted and
mapped into :class:`S3Error` here, a dead or hung S3 skipped for a while, and the few
requests the layers above need (reads, conditional writes, ranged streams, listings).

Names are relative to ``cache.s3.prefix``; every method takes and gives names without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import Any

import aioboto3
import aiohttp
from aiobotocore.config import AioConfig
from botocore.exceptions import BotoCoreError, ClientError

from gitcache.bucket.journal import UploadJournal
from gitcache.config import S3CacheConfig
from gitcache.errors import EntryGone, GitcacheError
from gitcache.files import CHUNK
from gitcache.metrics import Metrics

log = logging.getLogger(__name__)

# S3 sits on the request path of every lookup: when it is down, fail fast and serve from
# the upstream rather than retry for tens of seconds.
CLIENT_CONFIG = AioConfig(
    connect_timeout=3, read_timeout=20, retries={"max_attempts": 2, "mode": "standard"}
)
QUICK_TIMEOUT = 5.0  # a manifest, an entry or a lease is a few KiB: S3 slower than this is down
SKIP_AFTER_FAILURE = 10.0
CONFLICT_CODES = {"PreconditionFailed", "ConditionalRequestConflict", "412", "409"}
MISSING_CODES = {"NoSuchKey", "404", "NotFound"}
# Every ``operation`` label of gitcache_s3_errors_total (see Bucket.failed).
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


class Conflict(Exception):
    """A conditional write lost: the object is not (or no longer) what the condition said."""


def error_code(exc: Exception) -> str:
    """S3's error code ("" for a failure that never reached S3)."""
    if isinstance(exc, ClientError):
        return str(exc.response.get("Error", {}).get("Code", ""))
    return ""


class Bucket:
    def __init__(
        self, config: S3CacheConfig, metrics: Metrics, journal_dir: Path | None = None
    ) -> None:
        """``journal_dir``: where this process records its multipart uploads in flight,
        so that the next start aborts those a crash left (see :class:`UploadJournal`)."""
        self.config = config
        self.metrics = metrics
        self.journal = UploadJournal(journal_dir) if journal_dir is not None else None
        self.housekeeping: asyncio.Task[None] | None = None
        for operation in OPERATIONS:  # at 0 from the start, for the S3 alert's rate()
            metrics.s3_errors.labels(operation)
        self.client: Any = None
        self._skip_until = 0.0  # see failed()
        self._stack = contextlib.AsyncExitStack()

    async def open(self) -> None:
        """Open the client (credentials from the standard AWS chain) and, in the
        background, abort the multipart uploads this replica left in flight when it last
        stopped: a slow or hung S3 must not hold up start-up."""
        session = aioboto3.Session()
        self.client = await self._stack.enter_async_context(
            session.client(
                "s3",
                endpoint_url=self.config.endpoint_url or None,
                region_name=self.config.region,
                config=CLIENT_CONFIG,
            )
        )
        self.housekeeping = asyncio.ensure_future(self._abort_stale_uploads())

    async def _abort_stale_uploads(self) -> None:
        """Abort the uploads this replica had in flight when it stopped (its journal).
        Uploads in the bucket that it did not record may be other replicas' in flight and
        are left alone; those of a replica that never comes back are S3's to expire (an
        ``AbortIncompleteMultipartUpload`` lifecycle rule, see the README)."""
        if self.journal is None:
            return
        for key, upload_id in await asyncio.to_thread(self.journal.leftovers):
            log.info("aborting the multipart upload of %s left by the last run", key)
            try:
                await self.client.abort_multipart_upload(
                    Bucket=self.config.bucket, Key=key, UploadId=upload_id
                )
            except ClientError as exc:
                if error_code(exc) not in MISSING_CODES | {"NoSuchUpload"}:
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

    def key(self, name: str) -> str:
        return self.config.prefix + name

    # --- failures -------------------------------------------------------------------------

    def failed(self, operation: str, exc: BaseException) -> S3Error:
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
    async def quick(self, operation: str) -> AsyncIterator[None]:
        """A small request on a client's path (a manifest, an entry, a lease): refused at
        once while S3 is skipped, given up after ``QUICK_TIMEOUT``, and any S3 failure
        inside turned into :class:`S3Error` (counted once)."""
        self.check_available()
        try:
            async with asyncio.timeout(QUICK_TIMEOUT):
                yield
        except (TimeoutError, ClientError, BotoCoreError) as exc:
            raise self.failed(operation, exc) from exc

    # --- small objects --------------------------------------------------------------------

    async def read(self, name: str, operation: str) -> tuple[bytes, str] | None:
        """An object's bytes and ETag; None if there is no such object."""
        async with self.quick(operation):
            try:
                response = await self.client.get_object(
                    Bucket=self.config.bucket, Key=self.key(name)
                )
            except ClientError as exc:
                if error_code(exc) in MISSING_CODES:
                    return None
                raise
            async with response["Body"] as body:
                return await body.read(), str(response["ETag"])

    async def write(
        self,
        name: str,
        data: bytes,
        operation: str,
        *,
        if_match: str | None = None,
        if_absent: bool = False,
    ) -> str:
        """Write an object (only if its ETag is ``if_match``, or only if there is none);
        its new ETag. Raises :class:`Conflict` if the condition failed."""
        condition: dict[str, str] = {}
        if if_match is not None:
            condition["IfMatch"] = if_match
        elif if_absent:
            condition["IfNoneMatch"] = "*"
        async with self.quick(operation):
            try:
                response = await self.client.put_object(
                    Bucket=self.config.bucket,
                    Key=self.key(name),
                    Body=data,
                    ContentType="application/json",
                    **condition,
                )
            except ClientError as exc:
                if error_code(exc) in CONFLICT_CODES:
                    raise Conflict(name) from exc
                raise
        return str(response["ETag"])

    async def delete(self, name: str) -> None:
        try:
            await self.client.delete_object(Bucket=self.config.bucket, Key=self.key(name))
        except (ClientError, BotoCoreError) as exc:
            raise self.failed("delete", exc) from exc

    async def names(self, prefix: str) -> set[str]:
        """Every object name under ``prefix``, relative to it."""
        found: set[str] = set()
        try:
            paginator = self.client.get_paginator("list_objects_v2")
            async for page in paginator.paginate(
                Bucket=self.config.bucket, Prefix=self.key(prefix)
            ):
                start = len(self.key(prefix))
                found.update(item["Key"][start:] for item in page.get("Contents", []))
        except (ClientError, BotoCoreError) as exc:
            raise self.failed("list", exc) from exc
        return found

    # --- large objects --------------------------------------------------------------------

    async def stream(self, name: str, offset: int, length: int) -> AsyncGenerator[bytes, None]:
        """``length`` bytes of an object from ``offset``. Raises :class:`EntryGone` at the
        first read if there is no such object, :class:`S3Error` on any other failure,
        the connection dropping mid-object included."""
        try:
            response = await self.client.get_object(
                Bucket=self.config.bucket,
                Key=self.key(name),
                Range=f"bytes={offset}-{offset + length - 1}",
            )
        except (ClientError, BotoCoreError) as exc:
            if error_code(exc) in MISSING_CODES:
                raise EntryGone(f"{name} is gone from the bucket") from exc
            raise self.failed("get", exc) from exc
        body = response["Body"]
        try:
            while True:
                try:
                    chunk = await body.read(CHUNK)
                except (BotoCoreError, aiohttp.ClientError, OSError, TimeoutError) as exc:
                    raise self.failed("get", exc) from exc
                if not chunk:
                    return
                yield chunk
        finally:
            body.close()

    async def presigned_url(self, name: str, ttl: float) -> str:
        """A short-lived URL for the object itself: its bytes bypass gitcache."""
        url: str = await self.client.generate_presigned_url(
            "get_object",
            Params={"Bucket": self.config.bucket, "Key": self.key(name)},
            ExpiresIn=int(ttl),
        )
        return url
