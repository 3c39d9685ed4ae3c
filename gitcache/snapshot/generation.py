"""One generation's spool: :class:`SpoolWriter` compresses into it, :class:`Generation`
is its shared state, :class:`SpoolReader` is one client's view of it as it grows (see
docs/architecture.md, "Generations")."""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path

import zstandard

from gitcache.errors import GenerationFailed, GitcacheError, StorageFull
from gitcache.files import CHUNK, Descriptor, HashBehind, SyncBehind
from gitcache.snapshot.frames import Framing, Stored, StoredFrame, Verbatim, framing
from gitcache.tasks import run_blocking

log = logging.getLogger(__name__)

# What a reader reads stays in memory until its client took it (aiohttp copies it once
# more to frame it): 64 KiB a read keeps 200 slow clients of one miss under ~60 MB, and
# costs a fast client little.
READ_CHUNK = 64 * 1024  # per read of a reader that keeps up
SLOW_READ_CHUNK = 16 * 1024  # per read of a reader whose client is behind (see read())
PIPELINE_DEPTH = 4  # batches of CHUNK bytes between the tar producer and zstd
_IOV_MAX = 512  # buffers per writev, well under the system's limit
# A miss's spool is written back to disk as it grows rather than all at the end.
SYNC_EVERY = 32 * 1024 * 1024


class SpoolWriter:
    """Writes a snapshot's tar into a new file as a sequence of zstd frames: compressed
    frames for what compresses, stored frames (see ``frames``) for what does not, which
    decode as one stream; or bytes as they are, for a spool that is not zstd. It counts
    and hashes what it writes. Its methods block (compression is CPU work): call them off
    the event loop, one at a time."""

    def __init__(self, path: Path, level: int, threads: int) -> None:
        self.size = 0
        self._hash = HashBehind()
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        self._sync = SyncBehind(self._fd, SYNC_EVERY)
        # Content checksums: every decoder (plain ``zstd -d`` too) rejects a flipped byte.
        self._cctx = zstandard.ZstdCompressor(level=level, threads=threads, write_checksum=True)
        self._compressing: zstandard.ZstdCompressionObj | None = None  # an open frame
        self._storing: StoredFrame | None = None  # or this one

    def write(
        self, data: bytes, *, framing: Framing = Framing.COMPRESSED, flush: bool = False
    ) -> int:
        """Add ``data`` to the stream, framed as ``framing`` says. ``flush``: hand
        everything so far to the readers now (the first bytes of a miss)."""
        pieces: list[bytes | memoryview] = []
        if framing is Framing.VERBATIM:
            pieces += [*self._end_compressed(), *self._end_stored(), data]
        elif framing is Framing.STORED:
            pieces += self._end_compressed()
            self._storing = self._storing or StoredFrame()
            pieces += self._storing.update(data)
        else:
            pieces += self._end_stored()
            self._compressing = self._compressing or self._cctx.compressobj()
            pieces.append(self._compressing.compress(data))
            if flush:
                pieces.append(self._compressing.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK))
        self._emit(pieces)
        return self.size

    def end(self) -> int:
        """End the last frame: the stream is complete."""
        self._emit([*self._end_compressed(), *self._end_stored()])
        return self.size

    def finish(self) -> int:
        """Make the file durable and check it holds what was written: fsync reports any
        error of the write-back, and the size on disk must be the count of bytes written
        (whose sha256 is :attr:`sha256`)."""
        self._sync.close()
        os.fsync(self._fd)
        on_disk = os.fstat(self._fd).st_size
        self.close()
        if on_disk != self.size:
            raise GenerationFailed(
                f"spool verification failed: wrote {self.size} bytes, {on_disk} on disk"
            )
        return self.size

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    def _end_compressed(self) -> list[bytes | memoryview]:
        if self._compressing is None:
            return []
        end = self._compressing.flush(zstandard.COMPRESSOBJ_FLUSH_FINISH)
        self._compressing = None
        return [end]

    def _end_stored(self) -> list[bytes | memoryview]:
        if self._storing is None:
            return []
        end = self._storing.finish()
        self._storing = None
        return end

    def _emit(self, pieces: list[bytes | memoryview]) -> None:
        pieces = [p for p in pieces if len(p)]
        total = sum(len(p) for p in pieces)
        written = 0
        for start in range(0, len(pieces), _IOV_MAX):
            written += os.writev(self._fd, pieces[start : start + _IOV_MAX])
        if written < total:  # a short write: the disk filled up, say; finish or fail
            rest = memoryview(b"".join(pieces))[written:]
            while rest:
                rest = rest[os.write(self._fd, rest) :]
        self._hash.update(pieces)
        self.size += total
        self._sync.wrote(self.size)

    def close(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):  # failing anyway: the file is discarded
                self._sync.close()
            os.close(self._fd)
            self._fd = -1
            self._hash.close()


class Generation:
    """The shared state of one running generation, as its readers see it."""

    def __init__(self, key: str, commit: str, spool: Path) -> None:
        self.key = key
        self.commit = commit
        self.spool = spool
        self.size = 0
        self.verified = False  # every byte is written and was read back intact
        self.done = False
        self.error: BaseException | None = None
        self.readers = 0  # clients reading the spool now
        self._changed = asyncio.Event()
        self._fd: int | None = None

    def open_spool(self) -> None:
        """Open the read side; from now on readers can join (call right after creating the
        spool). Readers duplicate this descriptor, so renaming or deleting the spool
        never cuts them off."""
        self._fd = os.open(self.spool, os.O_RDONLY)

    def close_spool(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    async def wait(self) -> None:
        """Until the generation has finished, one way or the other."""
        while not self.done and self.error is None:
            await self._changed.wait()

    async def changed(self) -> None:
        """Until the next write, the end, or a failure."""
        await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def advance(self, size: int) -> None:
        self.size = size
        self._notify()

    def verify(self) -> None:
        self.verified = True
        self._notify()

    def finish(self) -> None:
        if not self.done:
            self.done = True
            self._notify()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self._notify()

    def reader(self) -> SpoolReader:
        """A new client reader from the first byte (see :class:`SpoolReader`)."""
        if self._fd is None:
            raise GenerationFailed("the generation is not accepting readers")
        return SpoolReader(self, self._fd)

    def tail(self) -> SpoolReader:
        """A reader for a cache tier copying the spool while it is written (the S3
        upload): it ends once the spool is verified, not when the generation is done,
        since the generation is done only after that tier committed. It is not counted
        among the clients."""
        if self._fd is None:
            raise GenerationFailed("the generation is not accepting readers")
        return SpoolReader(self, self._fd, tier=True)


class SpoolReader(Descriptor):
    """One client's view of a generation: the spool's bytes as they are written, then the
    end of the stream once the generation is verified, or an error if it failed.

    The spool's descriptor is duplicated at once, in the step that found the generation,
    so the reader can never miss the spool however the generation ends; ``aclose`` gives
    it back whether or not the reader was ever iterated."""

    def __init__(self, generation: Generation, fd: int, *, tier: bool = False) -> None:
        super().__init__(os.dup(fd))
        self._generation = generation
        self._offset = 0
        self._tier = tier
        if not tier:
            generation.readers += 1

    def __aiter__(self) -> SpoolReader:
        return self

    async def __anext__(self) -> bytes:
        if chunk := await self.read(READ_CHUNK):
            return chunk
        raise StopAsyncIteration

    async def read(self, limit: int) -> bytes:
        """The next bytes, at most ``limit`` of them; b"" at the end. What a reader has
        read stays in memory until its client took it: a client that is behind is
        given small reads (the spool file, not memory, holds the rest)."""
        if self.closed or await self.extent(self._offset + 1) <= self._offset:
            return b""
        want = min(limit, self._generation.size - self._offset)
        # run_blocking: on cancel, the thread is done with the fd before aclose.
        chunk = await run_blocking(os.pread, self.fileno(), want, self._offset)
        self._offset += len(chunk)
        return chunk

    def file(self) -> io.FileIO:
        """A file object over the reader's descriptor (for ``loop.sendfile``)."""
        return io.FileIO(self.fileno(), closefd=False)

    async def span(self, limit: int) -> tuple[int, int]:
        """The next bytes, for a caller that sends them itself from :meth:`fileno` (with
        sendfile: no copy, and nothing held in memory for a slow client): their offset
        and length, at most ``limit``, once there is at least one; a length of 0 at the
        end. They count as read."""
        if self.closed or await self.extent(self._offset + 1) <= self._offset:
            return self._offset, 0
        start = self._offset
        self._offset = min(start + limit, self._generation.size)
        return start, self._offset - start

    async def extent(self, want: int) -> int:
        """Until the spool holds ``want`` bytes or has ended: how many it holds, fewer than
        ``want`` only at its end. Raises if the generation failed."""
        generation = self._generation
        while True:
            if generation.size >= want:
                return want
            if generation.error is not None:
                error = generation.error
                if isinstance(error, StorageFull):
                    raise StorageFull(error.message)
                detail = f": {error.message}" if isinstance(error, GitcacheError) else ""
                raise GenerationFailed(f"snapshot generation failed{detail}")
            if generation.done or (self._tier and generation.verified):
                return generation.size
            await generation.changed()

    async def aclose(self) -> None:
        if not self.closed:
            await super().aclose()
            if not self._tier:
                self._generation.readers -= 1


async def write_spool(
    generation: Generation,
    chunks: AsyncIterator[bytes | Stored | Verbatim],
    writer: SpoolWriter,
) -> tuple[int, str]:
    """Write ``chunks`` through ``writer`` into the generation's spool, advancing its
    readers; return the spool's size and sha256 once it is complete and checked. The
    caller closes the writer and removes the spool on failure.

    Assembling the tar (reading packs, piping git archive) and writing it overlap: a
    producer batches chunks into a small bounded queue while a worker thread frames and
    compresses them, so a miss costs about the slower of the two rather than their sum.
    Verbatim chunks (a git response, with its progress messages) are not held back."""
    queue: asyncio.Queue[tuple[bytes, Framing] | BaseException | None] = asyncio.Queue(
        PIPELINE_DEPTH
    )

    async def produce() -> None:
        try:
            batch, kind, first = bytearray(), Framing.COMPRESSED, True
            async for chunk in chunks:
                data, this = framing(chunk)
                if batch and this is not kind:
                    await queue.put((bytes(batch), kind))
                    batch.clear()
                kind = this
                if not batch and (len(data) >= CHUNK or kind is Framing.VERBATIM):
                    await queue.put((data, kind))  # a whole batch already: no copy
                    continue
                batch += data
                # The first batch (the small .git files) goes out at once: the first byte.
                if first or len(batch) >= CHUNK:
                    await queue.put((bytes(batch), kind))
                    batch.clear()
                    first = False
            await queue.put((bytes(batch), kind))
            await queue.put(None)
        except Exception as exc:
            await queue.put(exc)

    producer = asyncio.ensure_future(produce())
    try:
        first = True
        while (item := await queue.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            data, kind = item
            generation.advance(await run_blocking(writer.write, data, framing=kind, flush=first))
            first = False
        generation.advance(await run_blocking(writer.end))
        size = await run_blocking(writer.finish)
        sha256 = await run_blocking(lambda: writer.sha256)
    finally:
        producer.cancel()
        await asyncio.gather(producer, return_exceptions=True)
    generation.verify()
    return size, sha256


def remove_spool(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
