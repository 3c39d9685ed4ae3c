"""A multipart upload fed from a file while it is written (or from a whole file): parts
read from the file as they are sent, hashed as they are cut, completed only when size and
sha256 match what the writer verified; any failure aborts it, leaving nothing visible."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import os
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from botocore.exceptions import BotoCoreError, ClientError

from gitcache.bucket.client import Bucket
from gitcache.errors import GenerationFailed
from gitcache.files import Descriptor, hash_range
from gitcache.tasks import run_blocking

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer


class Tail(Protocol):
    """A file as it is written, up to its verified end."""

    async def extent(self, want: int) -> int:
        """Until the file holds ``want`` bytes or has ended: how many it holds, fewer
        than ``want`` only at its end. Raises if the file will never be complete."""

    def fileno(self) -> int:
        """A descriptor to read the bytes written so far from (with ``os.pread``)."""

    async def aclose(self) -> None: ...


class Described(Protocol):
    """What an uploaded object must be: the record published beside it says so."""

    @property
    def size(self) -> int: ...

    @property
    def sha256(self) -> str: ...


R = TypeVar("R", bound=Described)


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


class FileTail(Descriptor):
    """A whole, already verified file as a :class:`Tail`. It is opened at once, so a file
    renamed or removed meanwhile is still read whole."""

    def __init__(self, path: Path) -> None:
        super().__init__(Descriptor.open(path).fileno())
        self._size = os.fstat(self.fileno()).st_size

    async def extent(self, want: int) -> int:
        return min(want, self._size)


class MultipartUpload(Generic[R]):
    """One object's multipart upload, from a tail of its file (see the module). Once it
    is complete, ``publish`` makes it known (an entry beside it, a manifest)."""

    def __init__(
        self,
        bucket: Bucket,
        name: str,
        tail: Tail,
        publish: Callable[[R], Awaitable[None]],
        content_type: str = "application/zstd",
    ) -> None:
        self._bucket = bucket
        self._client = bucket.client
        self._config = bucket.config
        self._name = name
        self._content_type = content_type
        self._publish = publish
        self._record: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._handed = False
        self._handed_at = 0.0
        self._task = asyncio.ensure_future(self._run(tail))

    def complete(self, record: R) -> asyncio.Task[None]:
        """Hand over the verified ``record`` (from now on :meth:`abort` is a no-op);
        the task ends once the object is visible, and raises, leaving nothing visible,
        if what was sent does not match."""
        if not self._handed:
            self._handed = True
            self._handed_at = time.monotonic()
            self._record.set_result(record)
        return self._task

    async def abort(self) -> None:
        """Give the upload up, leaving nothing behind; a no-op once ``complete`` was called."""
        if not self._handed:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self, tail: Tail) -> None:
        metrics = self._bucket.metrics
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
        journal = self._bucket.journal
        try:
            upload_id = await self._create()
            if journal is not None:
                await asyncio.to_thread(journal.record, self._bucket.key(self._name), upload_id)
            try:
                record = await self._send_and_check(upload_id, tail)
            except BaseException as exc:
                await self._abort(upload_id)
                if isinstance(exc, ClientError | BotoCoreError):
                    raise self._bucket.failed("upload", exc) from exc
                raise
            await self._forget(upload_id)
        finally:
            await tail.aclose()
        await self._publish(record)
        self._bucket.metrics.s3_upload_bytes.inc(record.size)
        self._bucket.metrics.s3_upload_lag.observe(time.monotonic() - self._handed_at)

    async def _send_and_check(self, upload_id: str, tail: Tail) -> R:
        parts, size, sha256 = await self._send_parts(upload_id, tail)
        record = await self._record
        if size != record.size or sha256 != record.sha256:
            raise GenerationFailed(f"{self._name}: the upload does not match what was written")
        await self._client.complete_multipart_upload(
            Bucket=self._config.bucket,
            Key=self._bucket.key(self._name),
            UploadId=upload_id,
            MultipartUpload={"Parts": parts},
        )
        return record

    async def _abort(self, upload_id: str) -> None:
        with contextlib.suppress(ClientError, BotoCoreError):
            await self._client.abort_multipart_upload(
                Bucket=self._config.bucket, Key=self._bucket.key(self._name), UploadId=upload_id
            )
            # Only once S3 took the abort: otherwise the next start tries again.
            await self._forget(upload_id)

    async def _forget(self, upload_id: str) -> None:
        if self._bucket.journal is not None:
            await asyncio.to_thread(self._bucket.journal.done, upload_id)

    async def _create(self) -> str:
        self._bucket.check_available()  # S3 just failed to answer: do not queue behind it
        try:
            created = await self._client.create_multipart_upload(
                Bucket=self._config.bucket,
                Key=self._bucket.key(self._name),
                ContentType=self._content_type,
            )
        except (ClientError, BotoCoreError) as exc:
            raise self._bucket.failed("create_upload", exc) from exc
        return str(created["UploadId"])

    async def _send_parts(
        self, upload_id: str, tail: Tail
    ) -> tuple[list[dict[str, Any]], int, str]:
        """Cut the file into parts as it grows and send them; the parts, the size and
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
                    Key=self._bucket.key(self._name),
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
                    slots.release()  # the file ended on a part boundary
                    break
                try:
                    await run_blocking(hash_range, digest, tail.fileno(), offset, end - offset)
                except OSError as exc:
                    raise GenerationFailed("the spool is shorter than it said") from exc
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
