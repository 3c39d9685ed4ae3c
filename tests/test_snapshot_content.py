"""A snapshot is a ready-to-use clone: same tree as ``git clone``, valid ``.git``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.helpers import extract, snapshot_url, status, tree
from tests.upstream import Upstream, agit, git


async def test_snapshot_equals_git_clone(
    client: Any, upstream: Upstream, rich: str, scratch: Path, rich_work: Any
) -> None:
    response = await client.get(snapshot_url(rich))
    assert response.status == 200, await response.text()
    assert response.headers["Content-Type"] == "application/zstd"
    assert response.headers["X-Gitcache-Source"] == "miss"
    assert response.headers["X-Gitcache-Commit"] == rich_work[1]["second"]
    assert 'filename="rich.tar.zst"' in response.headers["Content-Disposition"]
    snap = extract(await response.read(), scratch / "snap")

    clone = scratch / "clone"
    await agit("clone", "-q", upstream.url(rich), str(clone))
    assert tree(snap) == tree(clone)
    listing = tree(snap)
    assert listing["link"] == ("link", "README.md")
    assert listing["bin/run.sh"][1][0] is True  # type: ignore[index]
    assert listing["dos.bat"][1][1] == b"@echo off\r\necho one\r\necho two\r\n"  # type: ignore[index]
    assert "ignored.txt" in listing  # export-ignore does not apply to a checkout
    assert listing["subst.txt"][1][1] == b"commit: $Format:%H$\n"  # type: ignore[index]
    assert listing["vendor/sub"] == ("dir", None)

    git("fsck", "--strict", cwd=snap)
    assert status(snap) == ""
    assert git("rev-parse", "--abbrev-ref", "HEAD", cwd=snap).strip() == "main"
    assert git("remote", "get-url", "origin", cwd=snap).strip() == upstream.url(rich)
    assert (
        git("branch", "-a", "--format=%(refname)", cwd=snap).split()
        == git("branch", "-a", "--format=%(refname)", cwd=clone).split()
    )
    assert git("tag", "-l", cwd=snap).split() == ["light", "v1.0"]
    assert git("cat-file", "-t", "v1.0", cwd=snap).strip() == "tag"
    assert git("rev-parse", "@{upstream}", cwd=snap) == git("rev-parse", "origin/main", cwd=snap)
    # The clone is usable: it fetches from origin like any other.
    await agit("fetch", "-q", "origin", cwd=snap)
    assert git("log", "--format=%s", cwd=snap).split("\n")[0] == "second: a submodule"


async def test_git_suffix_and_only_branches_and_tags(
    client: Any, upstream: Upstream, rich: str, scratch: Path
) -> None:
    bare = upstream.root / f"{rich}.git"
    head = git("rev-parse", "HEAD", cwd=bare).strip()
    git("update-ref", "refs/pull/1/head", head, cwd=bare)
    git("update-ref", "refs/changes/01/1/1", head, cwd=bare)

    response = await client.get(snapshot_url(f"{rich}.git"))
    assert response.status == 200
    snap = extract(await response.read(), scratch / "snap")
    refs = git("for-each-ref", "--format=%(refname)", cwd=snap).split()
    assert refs and all(r.startswith(("refs/heads/", "refs/remotes/", "refs/tags/")) for r in refs)
    # Same repository with or without the suffix: the second request is a hit.
    again = await client.get(snapshot_url(rich))
    assert again.headers["X-Gitcache-Source"] == "hit"


async def test_healthz(client: Any) -> None:
    response = await client.get("/healthz")
    assert response.status == 200
    assert await response.json() == {"status": "ok"}
