"""Files as gitcache reads them: one chunk size, one way to hash a file or a part of one,
and one holder of a descriptor that readers share the handling of."""

from __future__ import annotations

import hashlib
import os
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
