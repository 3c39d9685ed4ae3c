"""The objects a snapshot's ``.git`` holds, by variant: the mirror's own packs, pinned by
hard links (a full snapshot: nothing is recomputed), or one pack made for the snapshot by
``git pack-objects`` from the mirror (shallow and partial snapshots: only what such a
clone would have fetched). Never a temporary clone, never the upstream."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

from dulwich.object_store import find_shallow
from dulwich.objects import ObjectID
from dulwich.repo import Repo

from gitcache.mirror.mirror import Mirror
from gitcache.mirror.pin import pin_objects
from gitcache.mirror.refs import Checkout, RefState
from gitcache.mirror.runner import git_env, run_git
from gitcache.variant import Kind, Variant


@dataclass
class Objects:
    """What goes under ``.git``: ``files`` (paths relative to the work directory, which
    are also their paths under ``.git``), the refs the snapshot has, and for a shallow
    snapshot the boundary commits ``.git/shallow`` lists."""

    files: list[str]
    refs: RefState
    shallow: list[str] = field(default_factory=list)


async def gather(
    mirror: Mirror, checkout: Checkout, variant: Variant, work: Path, *, timeout: float
) -> Objects:
    assert mirror.refs is not None
    if variant.kind is Kind.SHALLOW:
        return await _shallow(mirror, checkout, variant.depth, work, timeout)
    if variant.kind is Kind.BLOBLESS:
        return await _blobless(mirror, checkout, work, timeout)
    async with mirror.lock.read():  # hard links taken in milliseconds, kept after
        files = await asyncio.to_thread(pin_objects, mirror.path, work)
    return Objects(files, mirror.refs)


async def _pack(
    mirror: Mirror,
    work: Path,
    timeout: float,
    *,
    revs: bytes | None = None,
    objects: Path | None = None,
) -> list[str]:
    """``git pack-objects`` of the history ``revs`` names (rev-list arguments, a line
    each), or of the ``objects`` a file lists, into ``work/objects/pack``: the pack and its
    index, both written by git (no ``index-pack`` pass over the data); their paths."""
    (work / "objects" / "pack").mkdir(parents=True, exist_ok=True)
    args = ["--git-dir", str(mirror.path), "pack-objects", "-q", "--delta-base-offset"]
    name = await run_git(
        [*args, *(["--revs"] if revs is not None else []), str(work / "objects/pack/pack")],
        timeout=timeout,
        env=git_env(hermetic=True),
        input=revs,
        stdin_path=objects,
    )
    base = f"objects/pack/pack-{name.decode().strip()}"
    return [f"{base}.pack", f"{base}.idx"]


def _depth_walk(mirror: Path, commit: str, depth: int) -> tuple[list[str], set[str]]:
    """The commits a ``--depth`` clone of ``commit`` gets, and those of them whose parents
    it does not get (``.git/shallow``), as ``upload-pack`` counts depth: a commit reached
    by several paths is as deep as its shortest."""
    with Repo(str(mirror)) as repo:
        store = repo.object_store
        reached, kept = find_shallow(store, [ObjectID(commit.encode())], depth)
        boundary = sorted(
            sha.decode()
            for sha in reached - kept
            if store[sha].parents  # type: ignore[attr-defined]
        )
        return boundary, {sha.decode() for sha in reached | kept}


async def _shallow(
    mirror: Mirror, checkout: Checkout, depth: int, work: Path, timeout: float
) -> Objects:
    assert mirror.refs is not None
    refs = mirror.refs
    boundary, commits = await asyncio.to_thread(_depth_walk, mirror.path, checkout.commit, depth)
    # Like ``git clone --depth`` (one branch): the branch checked out, and the tags that
    # point into the history the snapshot has.
    kept = {
        name: sha
        for name, sha in refs.refs.items()
        if name.startswith("refs/tags/") and refs.commit_of(name) in commits
    }
    if checkout.branch is not None:
        kept[f"refs/heads/{checkout.branch}"] = checkout.commit
    head = refs.head if refs.head in kept else None
    peeled = {name: sha for name, sha in refs.peeled.items() if name in kept}
    lines = [f"--shallow {sha}" for sha in boundary] + [checkout.commit, *kept.values()]
    files = await _pack(mirror, work, timeout, revs="".join(f"{x}\n" for x in lines).encode())
    return Objects(files, RefState(head, kept, peeled), boundary)


async def _blobless(mirror: Mirror, checkout: Checkout, work: Path, timeout: float) -> Objects:
    """Every commit and tree of every ref, and the blobs of the checkout only: what
    ``git clone --filter=blob:none`` holds once it has checked out. Blobs named on
    rev-list's input are kept by the filter; the list goes to pack-objects through a
    file, so its size costs no memory."""
    assert mirror.refs is not None
    git_dir = ["--git-dir", str(mirror.path)]
    env = git_env(hermetic=True)
    tree = await run_git(
        [*git_dir, "ls-tree", "-r", "-z", "--end-of-options", checkout.commit],
        timeout=timeout,
        env=env,
    )
    blobs = [
        entry.split(b"\t", 1)[0].split(b" ")[2]
        for entry in tree.split(b"\0")
        if entry and entry.split(b" ", 2)[1] == b"blob"
    ]
    tips = [sha.encode() for sha in mirror.refs.refs.values()] + [checkout.commit.encode()]
    listed = work / "objects.list"
    await run_git(
        [*git_dir, "rev-list", "--objects", "--filter=blob:none", "--stdin"],
        timeout=timeout,
        env=env,
        input=b"".join(sha + b"\n" for sha in [*tips, *blobs]),
        stdout_path=listed,
    )
    files = await _pack(mirror, work, timeout, objects=listed)
    promisor = files[0].removesuffix(".pack") + ".promisor"
    await asyncio.to_thread((work / promisor).write_bytes, b"")
    return Objects([*files, promisor], mirror.refs)
