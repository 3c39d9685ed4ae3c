"""Disk in front of S3: hits from disk when they can be, from the bucket when not (filling
the disk on the way, if the bytes match), and every snapshot ends up in both."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable
from pathlib import Path

from gitcache.bucket.checked import CheckedFile
from gitcache.bucket.client import S3Error
from gitcache.bucket.upload import FileTail, Tail
from gitcache.cache.base import Cache, Entry, Reader, Upload
from gitcache.cache.disk import DiskCache
from gitcache.cache.s3 import S3Cache
from gitcache.repo import RepoRef
from gitcache.tasks import TaskSet, run_blocking

log = logging.getLogger(__name__)


class FillingReader:
    """An S3 reader that also fills the disk tier when read from start to end."""

    file = None

    def __init__(self, inner: Reader, fill: TieredCache, repo: RepoRef) -> None:
        self.entry = inner.entry
        self._inner = inner
        self._fill = fill
        self._repo = repo

    async def chunks(self, offset: int, length: int) -> AsyncGenerator[bytes, None]:
        if offset != 0 or length != self.entry.size:
            async for chunk in self._inner.chunks(offset, length):
                yield chunk
            return
        spool = CheckedFile(self._fill.spool_path(self._repo, self.entry))
        try:
            async for chunk in self._inner.chunks(offset, length):
                await spool.write(chunk)
                yield chunk
            await spool.close()
            if spool.matches(self.entry):
                await self._fill.disk.commit(self._repo, spool.path, self.entry)
            else:
                log.warning("S3 object %s did not match its entry: not cached", self.entry.key)
        finally:
            await spool.close()
            await run_blocking(spool.path.unlink, missing_ok=True)

    async def close(self) -> None:
        await self._inner.close()


class TieredCache:
    """Every change to the S3 side of one repository runs in the order it was asked for,
    each after the one before has ended: an upload still completing in the background
    when a prune or a delete comes lands first, or it would bring a deleted entry back."""

    local = True

    def __init__(self, disk: DiskCache, s3: S3Cache, tasks: TaskSet, spool_dir: Path) -> None:
        self.disk = disk
        self.s3 = s3
        self._tasks = tasks
        self._spool_dir = spool_dir
        self._last: dict[RepoRef, asyncio.Task[None]] = {}

    def _in_order(
        self, repo: RepoRef, work: Callable[[], Awaitable[None]], name: str
    ) -> asyncio.Task[None]:
        """Run ``work`` once what was queued for ``repo`` before it has ended. S3 trouble
        never fails a disk operation: it is logged and counted where it happens."""
        before = self._last.get(repo)

        async def run() -> None:
            if before is not None:
                await asyncio.wait([before])
            try:
                await work()
            except S3Error:
                pass
            except Exception:
                log.exception("%s failed", name)

        task = self._tasks.spawn(run(), name=name)
        self._last[repo] = task
        task.add_done_callback(functools.partial(self._forget, repo))
        return task

    def _forget(self, repo: RepoRef, task: asyncio.Task[None]) -> None:
        if self._last.get(repo) is task:
            del self._last[repo]

    def spool_path(self, repo: RepoRef, entry: Entry) -> Path:
        self._spool_dir.mkdir(parents=True, exist_ok=True)
        return self._spool_dir / f"{repo.slug}.{entry.key}.{uuid.uuid4().hex[:8]}.fill"

    async def start(self) -> None:
        await self.disk.start()
        await self.s3.start()

    async def close(self) -> None:
        await self.s3.close()
        await self.disk.close()

    def repos(self) -> list[RepoRef]:
        return sorted(set(self.disk.repos()) | set(self.s3.repos()), key=lambda r: r.name)

    async def entries(self, repo: RepoRef) -> tuple[Entry, ...]:
        found: dict[str, Entry] = {}
        with contextlib.suppress(S3Error):
            found.update((e.key, e) for e in await self.s3.entries(repo))
        found.update((e.key, e) for e in await self.disk.entries(repo))
        return tuple(found.values())

    async def newest(self, repo: RepoRef, ref: str) -> Entry | None:
        candidates = [await self.disk.newest(repo, ref), await self.s3.newest(repo, ref)]
        return max((e for e in candidates if e), key=lambda e: e.created, default=None)

    async def get(self, repo: RepoRef, key: str) -> Entry | None:
        return await self.disk.get(repo, key) or await self.s3.get(repo, key)

    def layers(self) -> list[tuple[str, Cache]]:
        return [*self.disk.layers(), *self.s3.layers()]

    async def open(self, repo: RepoRef, entry: Entry, *, use: bool = True) -> Reader | None:
        if await self.disk.get(repo, entry.key) is not None:
            reader = await self.disk.open(repo, entry, use=use)
            if reader is not None:
                return reader
        return FillingReader(await self.s3.open(repo, entry), self, repo)

    def begin(self, repo: RepoRef, key: str, tail: Callable[[], Tail]) -> Upload:
        return self.s3.begin(repo, key, tail)

    async def commit(
        self, repo: RepoRef, spool: Path, entry: Entry, upload: Upload | None = None
    ) -> None:
        """Commit to disk now (the generation's clients see their end right after); the
        S3 upload completes in the background."""
        if upload is None:  # not begun while written: from the file, open before it moves
            upload = self.s3.begin(repo, entry.key, functools.partial(FileTail, spool))
        await self.disk.commit(repo, spool, entry)
        uploaded = upload.complete(entry)
        self._in_order(repo, lambda: uploaded, f"upload:{repo.name}:{entry.key}")

    async def touch(self, repo: RepoRef, entry: Entry, fetched_at: float) -> None:
        await self.disk.touch(repo, entry, fetched_at)
        # Not awaited: a request must not wait behind a large upload still completing.
        self._in_order(repo, lambda: self.s3.touch(repo, entry, fetched_at), "s3 touch")

    async def prune(self, repo: RepoRef, ref: str, keep: int) -> None:
        await self.disk.prune(repo, ref, keep)
        await self._in_order(repo, lambda: self.s3.prune(repo, ref, keep), "s3 prune")

    async def delete(self, repo: RepoRef, *keys: str) -> None:
        await self.disk.delete(repo, *keys)
        await self._in_order(repo, lambda: self.s3.delete(repo, *keys), "s3 delete")
