"""One generation's spool: :class:`SpoolWriter` compresses into it, :class:`Generation`
is its shared state, :class:`SpoolReader` is one client's view of it as it grows (see
docs/architecture.md, "Generations")."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path

import zstandard

from gitcache.errors import GenerationFailed, GitcacheError
from gitcache.files import CHUNK, Descriptor, sha256_of
from gitcache.tasks import run_blocking

log = logging.getLogger(__name__)

# What a reader reads stays in memory until its client took it (aiohttp copies it once
# more to frame it): 64 KiB a read keeps 200 slow clients of one miss under ~60 MB, and
# costs a fast client little.
READ_CHUNK = 64 * 1024  # per read of a reader that keeps up
SLOW_READ_CHUNK = 16 * 1024  # per read of a reader whose client is behind (see read())
PIPELINE_DEPTH = 4  # batches of CHUNK bytes between the tar producer and zstd


class SpoolWriter:
    """zstd-compresses into a new file, counting and hashing what it writes. Its methods
    block (compression is CPU work): call them off the event loop, one at a time."""

    def __init__(self, path: Path, level: int, threads: int) -> None:
        self.size = 0
        self._hash = hashlib.sha256()
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        # Content checksums: every decoder (plain ``zstd -d`` too) rejects a flipped byte.
        self._zstd = zstandard.ZstdCompressor(
            level=level, threads=threads, write_checksum=True
        ).compressobj()

    def write(self, data: bytes, *, flush: bool = False) -> int:
        out = self._zstd.compress(data)
        if flush:
            # Hand what we have to the readers now (the first bytes of a miss).
            out += self._zstd.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
        self._emit(out)
        return self.size

    def finish(self, data: bytes) -> int:
        self._emit(self._zstd.compress(data) + self._zstd.flush(zstandard.COMPRESSOBJ_FLUSH_FINISH))
        os.fsync(self._fd)
        self.close()
        return self.size

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    def _emit(self, out: bytes) -> None:
        view = memoryview(out)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        self._hash.update(out)
        self.size += len(out)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


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

    async def extent(self, want: int) -> int:
        """Until the spool holds ``want`` bytes or has ended: how many it holds, fewer than
        ``want`` only at its end. Raises if the generation failed."""
        generation = self._generation
        while True:
            if generation.size >= want:
                return want
            if generation.error is not None:
                error = generation.error
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
    generation: Generation, chunks: AsyncIterator[bytes], writer: SpoolWriter
) -> tuple[int, str]:
    """Compress ``chunks`` through ``writer`` into the generation's spool, advancing its
    readers; verify the file against what was written and return its size and sha256.
    The caller closes the writer and removes the spool on failure.

    Assembling the tar (reading packs, piping git archive) and compressing it overlap: a
    producer batches chunks into a small bounded queue while a worker thread compresses,
    so a miss costs about the slower of the two rather than their sum."""
    queue: asyncio.Queue[bytes | BaseException | None] = asyncio.Queue(PIPELINE_DEPTH)

    async def produce() -> None:
        try:
            batch = bytearray()
            first = True
            async for chunk in chunks:
                batch += chunk
                # The first batch (the small .git files) goes out at once: the first byte.
                if first or len(batch) >= CHUNK:
                    await queue.put(bytes(batch))
                    batch.clear()
                    first = False
            await queue.put(bytes(batch))
            await queue.put(None)
        except Exception as exc:
            await queue.put(exc)

    producer = asyncio.ensure_future(produce())
    try:
        first = True
        while (item := await queue.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            generation.advance(await run_blocking(writer.write, item, flush=first))
            first = False
        generation.advance(await run_blocking(writer.finish, b""))
    finally:
        producer.cancel()
        await asyncio.gather(producer, return_exceptions=True)
    size, sha256 = await asyncio.to_thread(sha256_of, generation.spool)
    if size != writer.size or sha256 != writer.sha256:
        raise GenerationFailed(
            f"spool verification failed: wrote {writer.size} bytes, read back {size}"
        )
    generation.verify()
    return size, sha256


def remove_spool(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
