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

from gitcache.errors import GitError
from gitcache.files import CHUNK
from gitcache.mirror.mirror import Mirror
from gitcache.mirror.pin import pin_objects
from gitcache.mirror.refs import Checkout
from gitcache.mirror.runner import git_env, run_git
from gitcache.snapshot import gitdir
from gitcache.snapshot.tarstream import (
    BLOCK,
    dir_entry,
    file_entry,
    global_header_length,
    header,
    padding,
)


async def _file_chunks(
    name: str, path: Path, *, mtime: int, mode: int = 0o444
) -> AsyncGenerator[bytes, None]:
    with path.open("rb") as f:
        size = os.fstat(f.fileno()).st_size
        yield header(name, size=size, mode=mode, mtime=mtime)
        remaining = size
        while remaining:
            chunk = await asyncio.to_thread(f.read, min(CHUNK, remaining))
            if not chunk:
                raise GitError(f"{name} shrank while it was being read")
            remaining -= len(chunk)
            yield chunk
        yield padding(size)


async def _tail(path: Path, writer: asyncio.Future[bytes]) -> AsyncGenerator[bytes, None]:
    """The tar ``git archive`` is writing to ``path``, as it grows, without its leading
    pax global header (a comment holding the commit id); ends when git has exited and
    everything was read, raising if git failed."""
    skip: int | None = None  # bytes of global header still to drop, once known
    head = b""
    with path.open("rb") as f:
        while True:
            chunk = await asyncio.to_thread(f.read, CHUNK)
            if not chunk:
                if writer.done():
                    writer.result()
                    if not (chunk := await asyncio.to_thread(f.read, CHUNK)):
                        if skip is None:
                            raise GitError("git archive wrote no complete tar")
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


def _git_files(
    mirror: Mirror, checkout: Checkout, objformat: str, pinned: list[str], now: int
) -> bytes:
    """The small ``.git`` entries, generated in memory: the first bytes of a snapshot."""
    assert mirror.refs is not None
    refs = mirror.refs
    small = [dir_entry(".git", mtime=now)]
    small.append(file_entry(".git/HEAD", gitdir.head_file(checkout), mtime=now))
    config = gitdir.config_file(mirror.url, checkout, objformat)
    small.append(file_entry(".git/config", config, mtime=now))
    packed = gitdir.packed_refs_file(refs, checkout)
    small.append(file_entry(".git/packed-refs", packed, mtime=now))
    small.extend(dir_entry(f".git/{d}", mtime=now) for d in _GIT_DIRS)
    origin_head = gitdir.origin_head_file(refs)
    if origin_head is not None:
        small.append(file_entry(".git/refs/remotes/origin/HEAD", origin_head, mtime=now))
    small.append(file_entry(".git/info/exclude", gitdir.INFO_EXCLUDE, mtime=now))
    for d in sorted({p.rsplit("/", 1)[0] for p in pinned} - {"objects/pack"}):
        small.append(dir_entry(f".git/{d}", mtime=now))
    return b"".join(small)


async def build_tar(
    mirror: Mirror, checkout: Checkout, work: Path, *, git_timeout: float, archive_timeout: float
) -> AsyncGenerator[bytes, None]:
    """Yield the snapshot's tar stream in chunks. ``work`` is an empty directory on the
    same filesystem as the mirror, owned by the caller (it removes it afterwards).

    ``git archive`` starts at once and writes the working tree to a file in ``work`` while
    the packs are being sent: on two cores, resolving the tree's blobs (the slow part of
    archive) overlaps with compressing the packs, instead of following it."""
    commit, git_dir = checkout.commit, str(mirror.path)
    async with mirror.lock.read():
        pinned = await asyncio.to_thread(pin_objects, mirror.path, work)
        objformat = await asyncio.to_thread(gitdir.object_format, mirror.path)

    hermetic = git_env(hermetic=True)
    index = work / "index"
    read_tree = asyncio.ensure_future(
        run_git(
            ["--git-dir", git_dir, "read-tree", "--end-of-options", commit],
            timeout=git_timeout,
            env={**hermetic, "GIT_INDEX_FILE": str(index)},
        )
    )
    worktree = work / "worktree.tar"
    archive_args = [
        "--git-dir",
        git_dir,
        "-c",
        "tar.umask=022",
        "archive",
        "--format=tar",
        "--end-of-options",
        commit,
    ]
    archive = asyncio.ensure_future(
        run_git(archive_args, timeout=archive_timeout, env=hermetic, stdout_path=worktree)
    )
    try:
        now = int(time.time())
        yield _git_files(mirror, checkout, objformat, pinned, now)

        files = [(f".git/{rel}", work / rel, 0o444) for rel in pinned]
        for name, path, mode in [*files, (".git/index", index, 0o644)]:
            if path == index:
                await read_tree
            async with contextlib.aclosing(_file_chunks(name, path, mtime=now, mode=mode)) as it:
                async for chunk in it:
                    yield chunk

        async with contextlib.aclosing(_tail(worktree, archive)) as it:
            async for chunk in it:
                yield chunk
    finally:
        for task in (read_tree, archive):
            task.cancel()  # kills the git child if it still runs
        await asyncio.gather(read_tree, archive, return_exceptions=True)
