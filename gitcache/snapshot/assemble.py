"""A snapshot's tar, built straight from a bare mirror (no temporary checkout): the
``.git`` files generated in memory, the mirror's packs pinned by hard links, the index from
``git read-tree``, the working tree from ``git archive``. See docs/architecture.md."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

import zstandard

from gitcache.errors import GitError
from gitcache.files import CHUNK
from gitcache.mirror.mirror import Mirror
from gitcache.mirror.refs import Checkout
from gitcache.mirror.runner import git_env, run_git
from gitcache.snapshot import gitdir
from gitcache.snapshot.frames import Stored, Verbatim
from gitcache.snapshot.objects import Objects, gather
from gitcache.snapshot.tarstream import (
    BLOCK,
    dir_entry,
    file_entry,
    global_header_length,
    header,
    padding,
)
from gitcache.variant import Kind, Variant


async def _file_chunks(
    name: str, path: Path, *, mtime: int, mode: int = 0o444, stored: bool = False
) -> AsyncGenerator[bytes | Stored, None]:
    """A file's tar entry; its content as :class:`Stored` chunks if ``stored``."""
    with path.open("rb") as f:
        size = os.fstat(f.fileno()).st_size
        yield header(name, size=size, mode=mode, mtime=mtime)
        remaining = size
        while remaining:
            chunk = await asyncio.to_thread(f.read, min(CHUNK, remaining))
            if not chunk:
                raise GitError(f"{name} shrank while it was being read")
            remaining -= len(chunk)
            yield Stored(chunk) if stored else chunk
        yield padding(size)


async def _tail(
    path: Path, writer: asyncio.Future[bytes], *, whole: bool = False
) -> AsyncGenerator[bytes, None]:
    """The tar ``git archive`` is writing to ``path``, as it grows, without its leading
    pax global header (a comment holding the commit id) unless ``whole``; ends when git
    has exited and everything was read, raising if git failed."""
    skip: int | None = 0 if whole else None  # bytes of global header still to drop
    head = b""
    with path.open("rb") as f:
        while True:
            chunk = await asyncio.to_thread(f.read, CHUNK)
            if not chunk:
                if writer.done():
                    writer.result()
                    if not (chunk := await asyncio.to_thread(f.read, CHUNK)):
                        if skip is None or (whole and not f.tell()):
                            raise GitError(f"{path.name} ended before it began")
                        return
                else:
                    await asyncio.wait([writer], timeout=0.01)
                    continue
            if skip is None:
                head += chunk
                if len(head) < BLOCK:
                    continue
                skip, chunk, head = global_header_length(head[:BLOCK]), head, b""
            if skip:
                dropped = min(skip, len(chunk))
                skip -= dropped
                chunk = chunk[dropped:]
            if chunk:
                yield chunk


async def _compress(
    tree: AsyncGenerator[bytes, None], path: Path, compressor: zstandard.ZstdCompressor
) -> None:
    """Compress ``tree`` into one zstd frame in a new file ``path``, as it comes. The tree
    is compressed on a thread of its own while the packs before it in the snapshot are
    stored: it costs about a quarter of a second per 60 MB, which then overlaps with the
    rest of the snapshot instead of following it."""
    frame = compressor.compressobj()

    with path.open("wb") as out:

        def add(data: bytes) -> None:  # one hop to a thread per chunk, not two
            out.write(frame.compress(data))

        async with contextlib.aclosing(tree) as chunks:
            async for chunk in chunks:
                await asyncio.to_thread(add, chunk)
        await asyncio.to_thread(out.write, frame.flush(zstandard.COMPRESSOBJ_FLUSH_FINISH))


_GIT_DIRS = (
    "refs",
    "refs/heads",
    "refs/tags",
    "refs/remotes",
    "refs/remotes/origin",
    "info",
    "objects",
    "objects/info",
    "objects/pack",
)


def _head_files(
    mirror: Mirror, checkout: Checkout, variant: Variant, objformat: str, now: int
) -> bytes:
    """The small ``.git`` entries that depend on nothing but the request, generated in
    memory: the first bytes of a snapshot, sent before its objects are ready."""
    small = [dir_entry(".git", mtime=now)]
    small.append(file_entry(".git/HEAD", gitdir.head_file(checkout), mtime=now))
    config = gitdir.config_file(mirror.url, checkout, objformat, variant)
    small.append(file_entry(".git/config", config, mtime=now))
    small.extend(dir_entry(f".git/{d}", mtime=now) for d in _GIT_DIRS)
    small.append(file_entry(".git/info/exclude", gitdir.INFO_EXCLUDE, mtime=now))
    return b"".join(small)


def _ref_files(objects: Objects, checkout: Checkout, now: int) -> bytes:
    """The refs, the shallow list, and the directories of the object files."""
    packed = gitdir.packed_refs_file(objects.refs, checkout)
    small = [file_entry(".git/packed-refs", packed, mtime=now)]
    origin_head = gitdir.origin_head_file(objects.refs)
    if origin_head is not None:
        small.append(file_entry(".git/refs/remotes/origin/HEAD", origin_head, mtime=now))
    if objects.shallow:
        shallow = "".join(f"{sha}\n" for sha in objects.shallow).encode()
        small.append(file_entry(".git/shallow", shallow, mtime=now))
    for d in sorted({p.rsplit("/", 1)[0] for p in objects.files} - {"objects/pack"}):
        small.append(dir_entry(f".git/{d}", mtime=now))
    return b"".join(small)


async def build_tar(
    mirror: Mirror,
    checkout: Checkout,
    variant: Variant,
    work: Path,
    *,
    git_timeout: float,
    archive_timeout: float,
    compressor: zstandard.ZstdCompressor | None = None,
) -> AsyncGenerator[bytes | Stored | Verbatim, None]:
    """Yield the snapshot's tar stream in chunks: bytes to compress, :class:`Stored`
    chunks (the packs) to store as they are, and, given a ``compressor``, the working
    tree as :class:`Verbatim` zstd frames compressed beside the rest. ``work`` is an
    empty directory on the same filesystem as the mirror, owned by the caller (it
    removes it afterwards).

    ``git archive`` starts at once and writes the working tree to a file in ``work`` while
    the objects are gathered and sent: on two cores, resolving the tree's blobs (the slow
    part of archive) overlaps with sending the packs, instead of following it."""
    worktree = work / "worktree.tar"
    worktree.touch()  # there to be tailed before git has started
    archive = asyncio.ensure_future(
        run_git(
            [
                *("--git-dir", str(mirror.path), "-c", "tar.umask=022", "archive"),
                *("--format=tar", "--end-of-options", checkout.commit),
            ],
            timeout=archive_timeout,
            env=git_env(hermetic=True),
            stdout_path=worktree,
        )
    )
    tasks: list[asyncio.Future[Any]] = [archive]
    parts: AsyncGenerator[bytes | Stored | Verbatim, None]
    if variant.kind is Kind.SOURCE:  # the tree alone, as git archive makes it
        parts = _tail(worktree, archive, whole=True)
    else:
        tree: AsyncGenerator[bytes | Verbatim, None]
        if compressor is None:
            tree = _tail(worktree, archive)
        else:
            frames = work / "worktree.tar.zst"
            frames.touch()
            compressing = _compress(_tail(worktree, archive), frames, compressor)
            tasks.append(asyncio.ensure_future(compressing))
            tree = _verbatim(_tail(frames, tasks[-1], whole=True))
        timeouts = (git_timeout, archive_timeout)
        parts = _clone(mirror, checkout, variant, work, tree, timeouts)
    try:
        async with contextlib.aclosing(parts) as it:
            async for chunk in it:
                yield chunk
    finally:
        for task in tasks:
            task.cancel()  # kills the git child if it still runs
        await asyncio.gather(*tasks, return_exceptions=True)


async def _verbatim(chunks: AsyncGenerator[bytes, None]) -> AsyncGenerator[Verbatim, None]:
    async with contextlib.aclosing(chunks) as it:
        async for chunk in it:
            yield Verbatim(chunk)


async def _clone(
    mirror: Mirror,
    checkout: Checkout,
    variant: Variant,
    work: Path,
    tree: AsyncGenerator[bytes | Verbatim, None],
    timeouts: tuple[float, float],
) -> AsyncGenerator[bytes | Stored | Verbatim, None]:
    """A clone's tar: ``.git`` (its objects gathered as the variant says, its index from
    ``git read-tree``), then the working tree ``tree`` yields."""
    git_timeout, objects_timeout = timeouts
    objects = asyncio.ensure_future(
        gather(mirror, checkout, variant, work, timeout=objects_timeout)
    )
    index = work / "index"
    read_tree = asyncio.ensure_future(
        run_git(
            ["--git-dir", str(mirror.path), "read-tree", "--end-of-options", checkout.commit],
            timeout=git_timeout,
            env={**git_env(hermetic=True), "GIT_INDEX_FILE": str(index)},
        )
    )
    try:
        now = int(time.time())
        objformat = await asyncio.to_thread(gitdir.object_format, mirror.path)
        yield _head_files(mirror, checkout, variant, objformat, now)
        gathered = await objects
        yield _ref_files(gathered, checkout, now)
        for rel in [*gathered.files, "index"]:
            if rel == "index":
                await read_tree
            # Packs hold deflated objects: zstd would save about 1% of them, slowly.
            chunks = _file_chunks(
                f".git/{rel}",
                work / rel,
                mtime=now,
                mode=0o644 if rel == "index" else 0o444,
                stored=rel.endswith(".pack"),
            )
            async with contextlib.aclosing(chunks) as it:
                async for chunk in it:
                    yield chunk
        async with contextlib.aclosing(tree) as it:
            async for data in it:
                yield data
    finally:
        for task in (objects, read_tree):
            task.cancel()  # kills the git child if it still runs
        await asyncio.gather(objects, read_tree, return_exceptions=True)
