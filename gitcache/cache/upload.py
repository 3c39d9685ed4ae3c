"""A multipart upload to S3 fed from a spool file while it is written.

Parts are not copied into memory: each part's body is a window onto the spool file that
the HTTP client reads 64 KiB at a time as it sends (and botocore reads once more to sign),
so what an upload holds is a few small buffers per part in flight, whatever
``part_size`` is. ``upload_concurrency`` parts are in flight at most; a slow S3 leaves the
rest of the snapshot in the spool file, not in memory. Each part is hashed as it is cut;
the upload is completed only when the generation hands over its verified entry and size
and sha256 match it. Any failure or an abort cancels it with ``AbortMultipartUpload``:
nothing half-written is ever visible.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import os
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from botocore.exceptions import BotoCoreError, ClientError

from gitcache.cache.base import Entry, Tail
from gitcache.errors import GenerationFailed
from gitcache.tasks import run_blocking

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

    from gitcache.cache.s3 import S3Cache

HASH_CHUNK = 1024 * 1024


class FileRange(io.RawIOBase):
    """``length`` bytes of a file from ``start``, as a seekable file of their own: the body
    of one part, read in small pieces while it is sent and again if botocore retries.

    It reads through a descriptor of its own, and closing waits for a read in progress
    (the HTTP client reads in worker threads that a cancelled upload does not stop), so a
    descriptor number is never read after it was closed and perhaps reused."""

    def __init__(self, fd: int, start: int, length: int) -> None:
        super().__init__()
        self._fd = os.dup(fd)
        self._start, self._length = start, length
        self._pos = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self._length

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer: WriteableBuffer) -> int:
        view = memoryview(buffer).cast("B")
        with self._lock:
            if self._fd < 0:
                raise ValueError("read of a closed part")
            want = min(len(view), self._length - self._pos)
            if want <= 0:
                return 0
            data = os.pread(self._fd, want, self._start + self._pos)
        view[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
        super().close()


class FileTail:
    """A whole, already verified file as a :class:`Tail`. It is opened at once, so a spool
    renamed or an entry evicted meanwhile is still read whole."""

    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_RDONLY)
        self._size = os.fstat(self._fd).st_size

    async def extent(self, want: int) -> int:
        return min(want, self._size)

    def fileno(self) -> int:
        return self._fd

    async def aclose(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class UploadJournal:
    """This process's multipart uploads in flight, one small file each in ``directory``:
    what a crash leaves there is what the next start aborts. Other replicas' uploads in
    flight in the same bucket are never in it, so they are never aborted by this one."""

    def __init__(self, directory: Path) -> None:
        self._dir = directory

    def _path(self, upload_id: str) -> Path:
        return self._dir / f"{hashlib.sha256(upload_id.encode()).hexdigest()[:32]}.json"

    def record(self, name: str, upload_id: str) -> None:
        self._dir.mkdir(parents=True, exist_ok=True)
        self._path(upload_id).write_text(json.dumps({"key": name, "upload_id": upload_id}))

    def done(self, upload_id: str) -> None:
        self._path(upload_id).unlink(missing_ok=True)

    def leftovers(self) -> list[tuple[str, str]]:
        """(object name, upload id) of every upload recorded and never done."""
        found = []
        for path in sorted(self._dir.glob("*.json")) if self._dir.is_dir() else ():
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                data = json.loads(path.read_text())
                found.append((str(data["key"]), str(data["upload_id"])))
        return found


def hash_range(digest: Any, fd: int, start: int, length: int) -> None:
    end = start + length
    while start < end:
        chunk = os.pread(fd, min(HASH_CHUNK, end - start), start)
        if not chunk:
            raise GenerationFailed("the spool is shorter than it said")
        digest.update(chunk)
        start += len(chunk)


class S3Upload:
    """One object's multipart upload, from a tail of its spool (see the module)."""

    def __init__(
        self,
        cache: S3Cache,
        name: str,
        tail: Tail,
        publish: Callable[[Entry], Awaitable[None]],
    ) -> None:
        """Upload ``tail`` as the object ``name``; once complete, ``publish`` its entry."""
        self._cache = cache
        self._client = cache.client
        self._config = cache.config
        self._name = name
        self._publish = publish
        self._entry: asyncio.Future[Entry] = asyncio.get_running_loop().create_future()
        self._handed = False
        self._handed_at = 0.0
        self._task = asyncio.ensure_future(self._run(tail))

    def complete(self, entry: Entry) -> asyncio.Task[None]:
        if not self._handed:
            self._handed = True
            self._handed_at = time.monotonic()
            self._entry.set_result(entry)
        return self._task

    async def abort(self) -> None:
        if not self._handed:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self, tail: Tail) -> None:
        metrics = self._cache.metrics
        try:
            await self._upload(tail)
        except asyncio.CancelledError:
            metrics.s3_uploads.labels("aborted").inc()
            raise
        except BaseException:
            metrics.s3_uploads.labels("failed").inc()
            raise
        metrics.s3_uploads.labels("ok").inc()

    async def _upload(self, tail: Tail) -> None:
        try:
            upload_id = await self._create()
            if self._cache.journal is not None:
                await asyncio.to_thread(self._cache.journal.record, self._name, upload_id)
            try:
                parts, size, sha256 = await self._send_parts(upload_id, tail)
                entry = await self._entry
                if size != entry.size or sha256 != entry.sha256:
                    raise GenerationFailed(
                        f"{self._name}: the upload does not match the verified snapshot"
                    )
                await self._client.complete_multipart_upload(
                    Bucket=self._config.bucket,
                    Key=self._name,
                    UploadId=upload_id,
                    MultipartUpload={"Parts": parts},
                )
            except BaseException as exc:
                with contextlib.suppress(ClientError, BotoCoreError):
                    await self._client.abort_multipart_upload(
                        Bucket=self._config.bucket, Key=self._name, UploadId=upload_id
                    )
                    # Only once S3 took the abort: otherwise the next start tries again.
                    await self._forget(upload_id)
                if isinstance(exc, ClientError | BotoCoreError):
                    raise self._cache.failed("upload", exc) from exc
                raise
            await self._forget(upload_id)
        finally:
            await tail.aclose()
        await self._publish(entry)
        self._cache.metrics.s3_upload_bytes.inc(entry.size)
        self._cache.metrics.s3_upload_lag.observe(time.monotonic() - self._handed_at)

    async def _forget(self, upload_id: str) -> None:
        if self._cache.journal is not None:
            await asyncio.to_thread(self._cache.journal.done, upload_id)

    async def _create(self) -> str:
        self._cache.check_available()  # S3 just failed to answer: do not queue behind it
        try:
            created = await self._client.create_multipart_upload(
                Bucket=self._config.bucket, Key=self._name, ContentType="application/zstd"
            )
        except (ClientError, BotoCoreError) as exc:
            raise self._cache.failed("create_upload", exc) from exc
        return str(created["UploadId"])

    async def _send_parts(
        self, upload_id: str, tail: Tail
    ) -> tuple[list[dict[str, Any]], int, str]:
        """Cut the spool into parts as it grows and send them; the parts, the size and
        the sha256 of everything sent."""
        part_size = self._config.part_size
        slots = asyncio.Semaphore(self._config.upload_concurrency)
        digest = hashlib.sha256()
        tasks: list[asyncio.Task[dict[str, Any]]] = []
        bodies: list[FileRange] = []

        async def send(number: int, body: FileRange) -> dict[str, Any]:
            try:
                result = await self._client.upload_part(
                    Bucket=self._config.bucket,
                    Key=self._name,
                    UploadId=upload_id,
                    PartNumber=number,
                    Body=body,
                )
                return {"ETag": result["ETag"], "PartNumber": number}
            finally:
                body.close()
                slots.release()

        offset = 0
        try:
            while True:
                await slots.acquire()
                end = await tail.extent(offset + part_size)
                if end == offset and tasks:
                    slots.release()  # the spool ended on a part boundary
                    break
                await run_blocking(hash_range, digest, tail.fileno(), offset, end - offset)
                body = FileRange(tail.fileno(), offset, end - offset)
                tasks.append(asyncio.ensure_future(send(len(tasks) + 1, body)))
                bodies.append(body)
                offset = end
                if len(body) < part_size:
                    break  # a short part is the last one
            parts = await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        finally:
            for body in bodies:  # a part cancelled before it started never closed its own
                body.close()
        return list(parts), offset, digest.hexdigest()
