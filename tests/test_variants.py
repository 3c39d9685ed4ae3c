"""Snapshot variants: shallow (``?depth=N``), partial (``?filter=blob:none``) and the
working tree alone (``source.tar.zst``), each equal to what the matching git command
makes, each its own cache entry."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gitcache.errors import BadRequest
from gitcache.repo import parse_label, parse_ref
from gitcache.variant import Kind, Variant
from tests.helpers import HOST, extract, snapshot_url, status, tree
from tests.upstream import Upstream, agit, commit_all, git

COMMITS = 6


@pytest.fixture
def history(upstream: Upstream, tmp_path: Path) -> str:
    """``group/hist``: six commits on main, each changing and adding files, a side
    branch, an annotated tag on the tip and a lightweight one deep in the history. The
    upstream allows filters and any wanted object, as partial clones' lazy fetches need."""
    work = tmp_path / "hist-work"
    git("init", "-q", "-b", "main", str(work))
    for n in range(COMMITS):
        (work / "common.txt").write_text(f"version {n}\n" * 50)
        (work / f"file{n}.txt").write_text(f"file {n}\n")
        (work / "run.sh").write_text(f"#!/bin/sh\necho {n}\n")
        (work / "run.sh").chmod(0o755)
        commit_all(work, f"commit {n}")
        if n == 1:
            git("tag", "old", cwd=work)
            git("branch", "side", cwd=work)
    git("tag", "-a", "v1", "-m", "release", cwd=work)
    bare = upstream.create("group/hist", work)
    git("config", "uploadpack.allowFilter", "true", cwd=bare)
    git("config", "uploadpack.allowAnySHA1InWant", "true", cwd=bare)
    return "group/hist"


def refs(repo: Path) -> list[str]:
    return git("for-each-ref", "--format=%(objectname) %(refname)", cwd=repo).splitlines()


async def fetch(client: Any, url: str, source: str = "miss") -> bytes:
    response = await client.get(url)
    assert response.status == 200, await response.text()
    assert response.headers["X-Gitcache-Source"] == source
    return bytes(await response.read())


@pytest.mark.parametrize("depth", [1, 3])
async def test_shallow_snapshot_equals_a_depth_clone(
    client: Any, upstream: Upstream, history: str, scratch: Path, depth: int
) -> None:
    body = await fetch(client, f"{snapshot_url(history)}?depth={depth}")
    snap = extract(body, scratch / "snap")
    clone = scratch / "clone"
    await agit("clone", "-q", f"--depth={depth}", upstream.url(history), str(clone))

    assert tree(snap) == tree(clone)
    assert (snap / ".git" / "shallow").read_text() == (clone / ".git" / "shallow").read_text()
    assert git("rev-parse", "--is-shallow-repository", cwd=snap).strip() == "true"
    assert git("log", "--format=%H", cwd=snap) == git("log", "--format=%H", cwd=clone)
    assert refs(snap) == refs(clone)  # one branch, the tags in its history, no others
    assert git("config", "remote.origin.fetch", cwd=snap) == git(
        "config", "remote.origin.fetch", cwd=clone
    )
    git("fsck", "--strict", cwd=snap)
    assert status(snap) == ""

    await agit("fetch", "-q", "--deepen=1", cwd=snap)
    assert len(git("log", "--format=%H", cwd=snap).split()) == depth + 1
    await agit("fetch", "-q", "--unshallow", cwd=snap)
    assert git("rev-parse", "--is-shallow-repository", cwd=snap).strip() == "false"
    assert len(git("log", "--format=%H", cwd=snap).split()) == COMMITS
    git("fsck", "--strict", cwd=snap)


async def test_blobless_snapshot_equals_a_filtered_clone(
    client: Any, upstream: Upstream, history: str, scratch: Path
) -> None:
    body = await fetch(client, f"{snapshot_url(history)}?filter=blob:none")
    snap = extract(body, scratch / "snap")
    clone = scratch / "clone"
    await agit("clone", "-q", "--filter=blob:none", upstream.url(history), str(clone))

    assert tree(snap) == tree(clone)
    assert refs(snap) == refs(clone)
    for key in ("remote.origin.promisor", "remote.origin.partialclonefilter"):
        assert git("config", key, cwd=snap) == git("config", key, cwd=clone)
    assert git("config", "core.repositoryformatversion", cwd=snap).strip() == "1"
    # Every commit and tree is there; a blob of an older commit is not, yet.
    assert len(git("log", "--format=%H", "--all", cwd=snap).split()) == COMMITS
    old_blob = git("rev-parse", "HEAD~3:common.txt", cwd=snap).strip()
    missing = git("rev-list", "--objects", "--all", "--missing=print", cwd=snap)
    assert f"?{old_blob}" in missing.split()
    git("fsck", cwd=snap)
    assert status(snap) == ""

    # git fetches it from origin when asked for it, as after git clone --filter.
    shown = await agit("show", "HEAD~3:common.txt", cwd=snap)
    assert shown == "version 2\n" * 50
    await agit("fetch", "-q", "origin", cwd=snap)


async def test_source_is_the_working_tree_alone(
    client: Any, upstream: Upstream, history: str, scratch: Path
) -> None:
    url = f"/git/{HOST}/{history}/source.tar.zst"
    response = await client.get(url)
    assert response.status == 200
    head = git("rev-parse", "HEAD", cwd=upstream.root / f"{history}.git").strip()
    assert response.headers["X-Gitcache-Commit"] == head
    assert 'filename="hist-source.tar.zst"' in response.headers["Content-Disposition"]
    snap = extract(await response.read(), scratch / "source")
    clone = scratch / "clone"
    await agit("clone", "-q", upstream.url(history), str(clone))
    assert not (snap / ".git").exists()
    assert tree(snap) == tree(clone)
    # git archive's own header is kept: the commit it came from.
    first = await client.get(f"{url}?ref=side")
    assert (
        first.headers["X-Gitcache-Commit"]
        == git("rev-parse", "side", cwd=upstream.root / f"{history}.git").strip()
    )


@pytest.mark.parametrize(
    "query",
    ["", "?depth=1", "?depth=2&ref=side", "?filter=blob:none", "?ref=old&depth=1"],
)
async def test_each_variant_is_its_own_entry_and_a_hit_repeats_the_miss(
    client: Any, history: str, query: str
) -> None:
    url = snapshot_url(history) + query
    full = await fetch(client, snapshot_url(history))  # another key: not this one's hit
    miss = await fetch(client, url) if query else full
    hit = await fetch(client, url, source="hit")
    assert hit == miss
    assert query == "" or miss != full


async def test_source_miss_and_hit_are_the_same_bytes(client: Any, history: str) -> None:
    url = f"/git/{HOST}/{history}/source.tar.zst"
    assert await fetch(client, url) == await fetch(client, url, source="hit")


@pytest.mark.parametrize(
    ("query", "code"),
    [
        ("snapshot.tar.zst?depth=0", "invalid_depth"),
        ("snapshot.tar.zst?depth=-1", "invalid_depth"),
        ("snapshot.tar.zst?depth=01", "invalid_depth"),
        ("snapshot.tar.zst?depth=1.5", "invalid_depth"),
        ("snapshot.tar.zst?depth=%C2%B2", "invalid_depth"),
        ("snapshot.tar.zst?depth=10000000", "invalid_depth"),
        ("snapshot.tar.zst?filter=tree:0", "invalid_filter"),
        ("snapshot.tar.zst?filter=", "invalid_filter"),
        ("snapshot.tar.zst?depth=1&filter=blob:none", "invalid_variant"),
        ("source.tar.zst?depth=1", "invalid_variant"),
        ("source.tar.zst?filter=blob:none", "invalid_variant"),
    ],
)
async def test_bad_variants_are_400_and_touch_nothing(
    client: Any, history: str, state_dir: Path, query: str, code: str
) -> None:
    response = await client.get(f"/git/{HOST}/{history}/{query}")
    assert response.status == 400
    assert (await response.json())["code"] == code
    assert not (state_dir / "mirrors").exists() or not any((state_dir / "mirrors").rglob("*.git"))


@pytest.mark.parametrize(
    "label",
    ["HEAD", "main", "HEAD?depth=1", "v1?depth=50", "main?filter=blob:none", "HEAD?source"],
)
def test_labels_round_trip(label: str) -> None:
    assert parse_label(label).label == label


def test_a_label_names_its_variant() -> None:
    assert parse_ref(None, Variant(Kind.SHALLOW, 2)).label == "HEAD?depth=2"
    assert parse_label("main?depth=2").variant == Variant(Kind.SHALLOW, 2)
    with pytest.raises(BadRequest):
        parse_label("main?colour=blue")
