"""A snapshot's tar, built straight from a bare mirror (no temporary checkout): the
``.git`` files generated in memory, the mirror's packs pinned by hard links, the index from
``git read-tree``, the working tree from ``git archive`` (shared by the snapshots of one
commit: see ``trees``). See docs/architecture.md."""

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
from gitcache.mirror.refs import Checkout
from gitcache.mirror.runner import git_env, run_git
from gitcache.snapshot import gitdir
from gitcache.snapshot.frames import Stored, Verbatim
from gitcache.snapshot.objects import Objects, gather
from gitcache.snapshot.tarstream import dir_entry, file_entry, header, padding
from gitcache.snapshot.trees import TreeStore
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
    trees: TreeStore,
    git_timeout: float,
    objects_timeout: float,
) -> AsyncGenerator[bytes | Stored | Verbatim, None]:
    """Yield the snapshot's tar stream in chunks: bytes to compress, :class:`Stored`
    chunks (the packs) to store as they are, and the working tree as :class:`Verbatim`
    zstd frames (see ``trees``). ``work`` is an empty directory on the same filesystem as
    the mirror, owned by the caller (it removes it afterwards).

    A tree that is not stored yet starts at once (``git archive`` into a file in ``work``,
    compressed on a thread of its own as it grows) while the objects are gathered and
    sent: on two cores, resolving and compressing the tree's blobs overlaps with sending
    the packs, instead of following them."""
    tree = trees.tree(mirror, checkout.commit, work)
    parts: AsyncGenerator[bytes | Stored | Verbatim, None]
    if variant.kind is Kind.SOURCE:  # the tree alone, as git archive makes it
        parts = tree.frames(header=True)
    else:
        timeouts = (git_timeout, objects_timeout)
        parts = _clone(mirror, checkout, variant, work, tree.frames(header=False), timeouts)
    try:
        async with contextlib.aclosing(parts) as it:
            async for chunk in it:
                yield chunk
    finally:
        await tree.close()


async def _clone(
    mirror: Mirror,
    checkout: Checkout,
    variant: Variant,
    work: Path,
    tree: AsyncGenerator[Verbatim, None],
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
