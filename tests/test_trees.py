"""The tree store: the snapshots of one commit share its compressed working tree (see
gitcache/snapshot/trees.py), which is checked before each use and never stored unless
complete."""

from __future__ import annotations

import io
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import zstandard

from gitcache import keys
from gitcache.snapshot import trees as trees_module
from tests.faults import fill, small_filesystem
from tests.helpers import HOST, extract, snapshot_url, status, stored_trees, tree, wrap_build_tar
from tests.upstream import Upstream, git

SOURCE = f"/git/{HOST}/group/rich/source.tar.zst"


async def fetch(client: Any, url: str) -> bytes:
    response = await client.get(url)
    assert response.status == 200, await response.text()
    assert response.headers["X-Gitcache-Source"] == "miss"
    return bytes(await response.read())


def trees(client: Any, outcome: str) -> float:
    return client.app[keys.METRICS].value("gitcache_trees_total", outcome=outcome)


def decompressed(body: bytes) -> bytes:
    reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(body), read_across_frames=True)
    return bytes(reader.read())


def archive(state_dir: Path, ref: str) -> bytes:
    """What ``git archive`` of ``ref`` writes from the mirror (whose attributes make it
    a clone's working tree: nothing export-ignored or substituted), with the umask
    gitcache gives it: a source-only snapshot holds exactly these bytes."""
    command = ["git", "-c", "tar.umask=022", "archive", "--format=tar", ref]
    mirror = state_dir / "mirrors" / HOST / "group%2Frich.git"
    return subprocess.run(command, cwd=mirror, capture_output=True, check=True).stdout


def checked_clone(body: bytes, dest: Path) -> dict[str, tuple[str, object]]:
    snap = extract(body, dest)
    git("fsck", "--no-progress", cwd=snap)
    assert status(snap) == ""
    return tree(snap)


async def test_the_snapshots_of_one_commit_share_its_tree(
    client: Any, upstream: Upstream, rich: str, state_dir: Path, scratch: Path
) -> None:
    full = checked_clone(await fetch(client, snapshot_url(rich)), scratch / "full")
    assert (trees(client, "built"), trees(client, "reused")) == (1, 0)
    head = git("rev-parse", "main", cwd=upstream.root / "group/rich.git").strip()
    [kept] = stored_trees(state_dir)
    assert kept.name.startswith(f"{head}.3.")

    # A tag on the same commit, and the variants: each splices the stored tree.
    assert checked_clone(await fetch(client, snapshot_url(rich, "light")), scratch / "l") == full
    shallow = extract(await fetch(client, snapshot_url(rich) + "?depth=1"), scratch / "shallow")
    assert status(shallow) == "" and tree(shallow) == full
    blobless = await fetch(client, snapshot_url(rich) + "?filter=blob:none")
    assert tree(extract(blobless, scratch / "blobless")) == full
    source = await fetch(client, SOURCE)
    assert decompressed(source) == archive(state_dir, "main")  # git's own header kept
    assert (trees(client, "built"), trees(client, "reused")) == (1, 4)
    assert stored_trees(state_dir) == [kept]


async def test_a_tree_a_source_snapshot_built_serves_a_clone(
    client: Any, upstream: Upstream, rich: str, state_dir: Path, scratch: Path
) -> None:
    source = await fetch(client, SOURCE)
    assert decompressed(source) == archive(state_dir, "main")
    full = checked_clone(await fetch(client, snapshot_url(rich)), scratch / "full")
    assert (trees(client, "built"), trees(client, "reused")) == (1, 1)
    assert full == tree(extract(source, scratch / "source"))


@pytest.mark.parametrize("damage", ["flip", "truncate"])
async def test_a_damaged_tree_is_built_again_not_served(
    client: Any, rich: str, state_dir: Path, scratch: Path, damage: str
) -> None:
    full = checked_clone(await fetch(client, snapshot_url(rich)), scratch / "full")
    [kept] = stored_trees(state_dir)
    size = kept.stat().st_size
    with kept.open("r+b") as f:
        if damage == "flip":
            f.seek(size // 2)
            byte = f.read(1)
            f.seek(size // 2)
            f.write(bytes([byte[0] ^ 0x01]))
        else:
            f.truncate(size - 100)

    assert checked_clone(await fetch(client, snapshot_url(rich, "light")), scratch / "l") == full
    assert (trees(client, "damaged"), trees(client, "built"), trees(client, "reused")) == (1, 2, 0)
    assert len(stored_trees(state_dir)) == 1  # built again, intact (stored_trees checks)


async def test_trees_beyond_keep_trees_are_dropped(
    make_client: Any, rich: str, state_dir: Path
) -> None:
    client = await make_client(snapshot={"keep_trees": 1})
    await fetch(client, snapshot_url(rich))
    await fetch(client, snapshot_url(rich, "feature"))  # another commit
    [kept] = stored_trees(state_dir)
    feature = await fetch(client, snapshot_url(rich, "feature") + "&depth=1")
    assert feature and trees(client, "reused") == 1
    assert stored_trees(state_dir) == [kept]


async def test_keep_trees_0_keeps_none(make_client: Any, rich: str, state_dir: Path) -> None:
    client = await make_client(snapshot={"keep_trees": 0})
    await fetch(client, snapshot_url(rich))
    await fetch(client, snapshot_url(rich, "light"))
    assert (trees(client, "built"), trees(client, "reused")) == (2, 0)
    assert stored_trees(state_dir) == []


async def test_a_failed_generation_stores_no_tree(
    client: Any, rich: str, state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def fail(sent: int) -> None:
        raise OSError("the disk went away")

    wrap_build_tar(monkeypatch, fail)
    response = await client.get(snapshot_url(rich))
    with pytest.raises(aiohttp.ClientPayloadError):
        await response.read()
    await client.app[keys.TASKS].settle("generate:")
    assert stored_trees(state_dir) == []
    assert list((state_dir / "tmp").iterdir()) == []


async def test_a_full_disk_while_a_tree_is_built_keeps_nothing_half_made(
    make_client: Any, rich: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file system fills up (a real one, ENOSPC) as the tree starts: that generation
    fails, nothing of it is kept; with room again the next one builds and keeps the tree."""
    with small_filesystem(tmp_path / "small", "64m") as state:
        real = trees_module.Tree._build
        filler: list[Path] = []

        def full_as_it_starts(self: trees_module.Tree) -> None:
            if not filler:
                filler.append(fill(state))
            real(self)

        monkeypatch.setattr(trees_module.Tree, "_build", full_as_it_starts)
        client = await make_client(state=state, cache={"disk": {"min_free": 0}})
        response = await client.get(snapshot_url(rich))
        if response.status == 200:  # the headers were out: the connection is cut
            with pytest.raises(aiohttp.ClientPayloadError):
                await response.read()
        else:
            assert response.status == 507
            assert (await response.json())["code"] == "insufficient_storage"
        await client.app[keys.TASKS].settle("generate:")
        assert stored_trees(state) == []
        assert list((state / "tmp").iterdir()) == []

        filler[0].unlink()  # room again
        body = await fetch(client, snapshot_url(rich))
        checked_clone(body, tmp_path / "clone")
        assert len(stored_trees(state)) == 1
        await client.close()
