"""Compressed working trees, kept per commit and shared by the snapshots of that commit.

A snapshot's working tree is ``git archive`` of its commit through zstd: on a
pack-heavy repository most of a miss's CPU (resolving the blobs, compressing them; the
packs are only copied). Every snapshot of one commit holds the same tree: its variants
(full, shallow, blobless, source-only), a branch and a tag on it, the same snapshot made
again after eviction. The first of them builds the tree; the others splice its frames in
as they are.

A tree is one file, ``<commit>.<level>.<xxh3-128>.tar.zst`` under the mirror's ``trees``
directory: a stored frame holding git archive's pax global header (a comment with the
commit id, which only a source-only snapshot keeps), then compressed frames of the rest
of git archive's tar. It is linked into place only once complete, and checked against the
digest in its name before each use: a damaged tree is removed and built again, never
spliced into a snapshot. The newest ``snapshot.keep_trees`` of a repository are kept (a
use counts as new); they go with the mirror.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

import xxhash
import zstandard

from gitcache.config import Config
from gitcache.errors import GitError
from gitcache.files import CHUNK, hash_range
from gitcache.metrics import Metrics
from gitcache.mirror.mirror import Mirror
from gitcache.mirror.runner import git_env, run_git
from gitcache.snapshot.frames import (
    BLOCK_MAX,
    SINGLE_PREFIX,
    StoredFrame,
    Verbatim,
    single_stored_length,
)
from gitcache.snapshot.tarstream import BLOCK, global_header_length

log = logging.getLogger(__name__)

SUFFIX = ".tar.zst"


class TreeStore:
    """The trees of every mirror (see the module), as the snapshot jobs use them."""

    def __init__(self, config: Config, metrics: Metrics) -> None:
        cfg = config.snapshot
        self.level, self.keep = cfg.zstd_level, cfg.keep_trees
        self._threads = cfg.zstd_threads
        self._min_free = config.cache.disk.min_free
        # An archive of a large tree may take as long as its clone did.
        self.archive_timeout = config.mirrors.clone_timeout
        self.metrics = metrics

    def tree(self, mirror: Mirror, commit: str, work: Path) -> Tree:
        """The working tree of ``commit``, for a generation whose own directory is
        ``work``: taken from the store if it is there (once checked), built otherwise.
        Building starts at once; close the tree when done with it."""
        return Tree(self, mirror, commit, work)

    def compressor(self) -> zstandard.ZstdCompressor:
        # Content checksums: every decoder (plain ``zstd -d`` too) rejects a flipped byte.
        return zstandard.ZstdCompressor(
            level=self.level, threads=self._threads, write_checksum=True
        )

    def find(self, mirror: Mirror, commit: str) -> tuple[Path, str] | None:
        """A stored tree of ``commit`` at this level, and its digest."""
        if not self.keep:
            return None
        for path in mirror.trees.glob(f"{commit}.{self.level}.*{SUFFIX}"):
            return path, path.name.removesuffix(SUFFIX).rsplit(".", 1)[-1]
        return None

    def publish(self, mirror: Mirror, commit: str, built: Path, digest: str) -> None:
        """Link a complete tree into the store (unless one of the commit is there, or the
        disk is short of room) and drop the least recently used beyond ``keep``. It is
        a cache: failing to keep a tree costs a later snapshot time, nothing else."""
        if not self.keep or not mirror.path.exists():  # deleted meanwhile: trees go with it
            return
        try:
            mirror.trees.mkdir(parents=True, exist_ok=True)
            if self.find(mirror, commit) is not None:
                return
            if shutil.disk_usage(mirror.trees).free < self._min_free:
                return
            with contextlib.suppress(FileExistsError):  # another generation's, just now
                os.link(built, mirror.trees / f"{commit}.{self.level}.{digest}{SUFFIX}")
            used: list[tuple[float, Path]] = []
            for path in mirror.trees.glob(f"*{SUFFIX}"):
                with contextlib.suppress(FileNotFoundError):  # pruned by another, just now
                    used.append((path.stat().st_mtime, path))
            for _, old in sorted(used, reverse=True)[self.keep :]:
                old.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("could not keep the working tree of %s: %s", commit[:12], exc)


def _intact(path: Path, digest: str) -> bool:
    """Whether the file at ``path`` holds what its name promises; a stored tree that is
    used is also marked as recently used. It is read once for this before it is spliced
    in (from the page cache, then): checked as it streamed, a damaged tree could only fail
    the snapshot; checked first, it is built again and the snapshot is whole."""
    try:
        with path.open("rb") as f:
            actual = xxhash.xxh3_128()
            hash_range(actual, f.fileno(), 0, os.fstat(f.fileno()).st_size)
        if actual.hexdigest() != digest:
            return False
        os.utime(path)
        return True
    except OSError:
        return False


class Tree:
    """One generation's working tree (see the module): the frames of a stored tree,
    linked into ``work`` (pruning cannot pull it away), or of a new one, read as
    ``git archive | zstd`` writes them there."""

    def __init__(self, store: TreeStore, mirror: Mirror, commit: str, work: Path) -> None:
        self._store, self._mirror, self._commit = store, mirror, commit
        self._path = work / "worktree.tar.zst"
        self._work = work
        self._tasks: list[asyncio.Future[Any]] = []
        self._checked: asyncio.Future[bool] | None = None
        self._stored: Path | None = None
        self._writer: asyncio.Future[str] | None = None
        found = store.find(mirror, commit)
        if found is not None:
            with contextlib.suppress(OSError):  # gone since, say: build it
                os.link(found[0], self._path)
                self._stored = found[0]
                self._checked = asyncio.ensure_future(
                    asyncio.to_thread(_intact, self._path, found[1])
                )
                self._tasks.append(self._checked)
        if self._checked is None:
            self._build()

    def _build(self) -> None:
        tar = self._work / "worktree.tar"
        tar.touch()  # there to be tailed before git has started
        archive = asyncio.ensure_future(
            run_git(
                [
                    *("--git-dir", str(self._mirror.path), "-c", "tar.umask=022", "archive"),
                    *("--format=tar", "--end-of-options", self._commit),
                ],
                timeout=self._store.archive_timeout,
                env=git_env(hermetic=True),
                stdout_path=tar,
            )
        )
        self._path.touch()
        self._writer = asyncio.ensure_future(self._compress(_tail(tar, archive)))
        self._tasks += [archive, self._writer]

    async def frames(self, *, header: bool) -> AsyncGenerator[Verbatim, None]:
        """The tree's zstd frames as they come; with git archive's global header (the
        source-only snapshot) or without it (a clone's working tree)."""
        metrics = self._store.metrics.trees
        if self._checked is not None:
            if await self._checked:
                metrics.labels("reused").inc()
                done: asyncio.Future[str] = asyncio.get_running_loop().create_future()
                done.set_result("")
                self._writer = done
            else:
                metrics.labels("damaged").inc()
                log.warning(
                    "the stored working tree %s was damaged: building it again", self._stored
                )
                assert self._stored is not None
                with contextlib.suppress(OSError):
                    self._stored.unlink()
                self._path.unlink()
                self._build()
        assert self._writer is not None
        chunks = _tail(self._path, self._writer)
        if not header:
            chunks = _after_header(chunks)
        async with contextlib.aclosing(chunks) as it:
            async for chunk in it:
                yield Verbatim(chunk)
        if digest := self._writer.result():  # built here: kept for the next snapshots
            metrics.labels("built").inc()
            await asyncio.to_thread(
                self._store.publish, self._mirror, self._commit, self._path, digest
            )

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()  # kills the git child if it still runs
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _compress(self, tar: AsyncGenerator[bytes, None]) -> str:
        """Write git archive's tar ``tar`` into a new tree file as it comes (see the
        module); its digest. The tree is compressed on a thread of its own while the
        packs before it in a snapshot are stored: it then overlaps with the rest of the
        snapshot instead of following it."""
        digest = xxhash.xxh3_128()
        frame = self._store.compressor().compressobj()
        head: bytes | None = b""  # the tar's start until its global header is split off

        with self._path.open("wb") as out:

            def write(data: bytes) -> None:
                out.write(data)
                digest.update(data)

            def add(data: bytes) -> None:  # one hop to a thread per chunk, not two
                write(frame.compress(data))

            async with contextlib.aclosing(tar) as chunks:
                async for chunk in chunks:
                    if head is not None:
                        head += chunk
                        if len(head) < BLOCK:
                            continue
                        if len(head) < (length := global_header_length(head[:BLOCK])):
                            continue
                        if length > BLOCK_MAX:
                            raise GitError("git archive wrote a global header of over 128 KiB")
                        stored = StoredFrame()
                        write(b"".join([*stored.update(head[:length]), *stored.finish()]))
                        chunk = head[length:]
                        head = None
                    await asyncio.to_thread(add, chunk)
            if head is not None:
                raise GitError("git archive ended before its tar began")
            await asyncio.to_thread(write, frame.flush(zstandard.COMPRESSOBJ_FLUSH_FINISH))
        return digest.hexdigest()


async def _tail(path: Path, writer: asyncio.Future[Any]) -> AsyncGenerator[bytes, None]:
    """The file ``writer`` is writing to ``path``, as it grows; ends when the writer is
    done and everything was read, raising if it failed."""
    with path.open("rb") as f:
        while True:
            chunk = await asyncio.to_thread(f.read, CHUNK)
            if not chunk:
                if not writer.done():
                    await asyncio.wait([writer], timeout=0.01)
                    continue
                writer.result()
                if not (chunk := await asyncio.to_thread(f.read, CHUNK)):
                    return
            yield chunk


async def _after_header(chunks: AsyncGenerator[bytes, None]) -> AsyncGenerator[bytes, None]:
    """A tree's frames without the first, the stored frame of the global header."""
    head = b""
    skip: int | None = None
    async with contextlib.aclosing(chunks) as it:
        async for chunk in it:
            if skip is None:
                head += chunk
                if len(head) < SINGLE_PREFIX:
                    continue
                try:
                    skip = single_stored_length(head)
                except ValueError:
                    raise GitError("a working tree's file does not start as it should") from None
                chunk, head = head, b""
            if skip:
                dropped = min(skip, len(chunk))
                skip -= dropped
                chunk = chunk[dropped:]
            if chunk:
                yield chunk
    if skip is None or skip:
        raise GitError("a working tree's file ended in its first frame")
