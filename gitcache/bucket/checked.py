"""A new file written from a stream, counted and hashed on the way, so that whoever copies
an object out of the bucket (an S3 hit filling the disk tier, a mirror archive) keeps it
only if it is exactly the bytes its record describes."""

from __future__ import annotations

import hashlib
from pathlib import Path

from gitcache.bucket.upload import Described
from gitcache.tasks import run_blocking


class CheckedFile:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = path.open("xb")
        self._digest = hashlib.sha256()
        self._size = 0

    def _write(self, chunk: bytes) -> None:
        self._file.write(chunk)
        self._digest.update(chunk)  # in the worker thread too: hashlib lets go of the GIL
        self._size += len(chunk)

    async def write(self, chunk: bytes) -> None:
        await run_blocking(self._write, chunk)

    async def close(self) -> None:
        await run_blocking(self._file.close)

    def matches(self, record: Described) -> bool:
        return self._size == record.size and self._digest.hexdigest() == record.sha256
