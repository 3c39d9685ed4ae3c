"""Files as gitcache reads them: one chunk size, one way to hash a file or a part of one,
and one holder of a descriptor that readers share the handling of."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

CHUNK = 1024 * 1024  # what gitcache reads, hashes and copies at a time


def sha256_of(path: Path) -> tuple[int, str]:
    """The size and sha256 of a file, as it is on disk now."""
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def hash_range(digest: Any, fd: int, start: int, length: int) -> None:
    """Feed ``length`` bytes of ``fd`` from ``start`` to ``digest``; OSError if the file
    is shorter."""
    end = start + length
    while start < end:
        chunk = os.pread(fd, min(CHUNK, end - start), start)
        if not chunk:
            raise OSError(f"the file ended at {start}, before {end}")
        digest.update(chunk)
        start += len(chunk)


class HashBehind:
    """A sha256 computed in a thread of its own, one batch behind its caller: on two cores
    the hashing of what was just written overlaps the making of what is written next
    (hashlib lets go of the GIL on large buffers). The buffers handed in must not change."""

    def __init__(self) -> None:
        self._digest = hashlib.sha256()
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="sha256")
        self._pending: Future[None] | None = None

    def _update(self, pieces: Sequence[bytes | memoryview]) -> None:
        for piece in pieces:
            self._digest.update(piece)

    def _wait(self) -> None:
        if self._pending is not None:
            self._pending.result()
            self._pending = None

    def update(self, pieces: Sequence[bytes | memoryview]) -> None:
        self._wait()  # at most one batch behind: memory stays bounded
        self._pending = self._thread.submit(self._update, pieces)

    def hexdigest(self) -> str:
        self._wait()
        return self._digest.hexdigest()

    def close(self) -> None:
        self._thread.shutdown(wait=True)


class SyncBehind:
    """Writes a growing file back to disk in a thread of its own, every ``every`` bytes,
    so that the fsync that makes it durable at the end has little left to do. A failed
    write-back is raised by the next call: a file whose write-back failed once must not
    be taken as durable (the error is reported once per open file)."""

    def __init__(self, fd: int, every: int) -> None:
        self._fd = fd
        self._every = every
        self._synced = 0
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="fdatasync")
        self._pending: Future[None] | None = None

    def wrote(self, size: int) -> None:
        """The file now holds ``size`` bytes."""
        if self._pending is not None and self._pending.done():
            self._pending.result()
            self._pending = None
        if self._pending is None and size - self._synced >= self._every:
            self._synced = size
            self._pending = self._thread.submit(os.fdatasync, self._fd)

    def close(self) -> None:
        """Wait for a write-back under way (the descriptor outlives it); raise its error."""
        self._thread.shutdown(wait=True)
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()


class Descriptor:
    """A reader's own descriptor of a file (a duplicate, or one it opened): renaming or
    deleting the file never cuts the reader off, and closing is idempotent."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    @classmethod
    def duplicate(cls, fd: int) -> Descriptor:
        return cls(os.dup(fd))

    @classmethod
    def open(cls, path: Path) -> Descriptor:
        return cls(os.open(path, os.O_RDONLY))

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def fileno(self) -> int:
        return self._fd

    async def aclose(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
