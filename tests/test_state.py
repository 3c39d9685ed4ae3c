"""What gitcache remembers: refresh state it cannot read is set aside, strangers' names are
not remembered, and a commit id's snapshot keeps its bytes while cached."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from gitcache import keys
from gitcache.repo import RepoRef
from tests.helpers import HOST, Clock, snapshot_url
from tests.test_lifecycle import get, push
from tests.upstream import Upstream, agit, git

REPO = RepoRef(HOST, "group/rich")
STATE_FILE = "refresh.json"


@pytest.mark.parametrize(
    "text",
    [
        '{"repos": []}',
        '{"repos": {"example.test/group/rich": {"next_run": "y"}}}',
        '{"repos": {"example.test/group/rich": {"refs": [1]}}}',
        '{"repos": {"example.test/../x": {}}}',
        "[]",
        "not json",
        "\xff\xfe",
    ],
)
async def test_unreadable_refresh_state_is_set_aside(
    make_client: Any, state_dir: Path, rich: str, clock: Clock, text: str
) -> None:
    state_dir.mkdir(parents=True)
    (state_dir / STATE_FILE).write_text(text, "latin-1")
    client = await make_client(clock=clock, background=False)
    refresher = client.app[keys.REFRESHER]
    assert refresher.repos == {}
    (aside,) = state_dir.glob(f"{STATE_FILE}.*")
    assert aside.read_text("latin-1") == text  # kept for a person to look at
    # And the scheduler works: a request is remembered, refreshed, saved.
    await get(client, snapshot_url(rich))
    clock.now += 3600
    await refresher.run_due()
    assert refresher.repos[REPO].last_result.startswith("ok")
    saved = json.loads((state_dir / STATE_FILE).read_text())
    assert list(saved["repos"]) == [REPO.name]


async def test_a_good_state_file_loads(make_client: Any, state_dir: Path, clock: Clock) -> None:
    state_dir.mkdir(parents=True)
    state = {
        "repos": {
            "example.test/group/rich": {"refs": ["HEAD", "v1.0", "a" * 40], "failures": 2},
            "gone.example/x/y": {},  # a host no longer configured
        }
    }
    (state_dir / STATE_FILE).write_text(json.dumps(state))
    client = await make_client(clock=clock, background=False)
    repos = client.app[keys.REFRESHER].repos
    assert list(repos) == [REPO]
    assert repos[REPO].refs == ["HEAD", "v1.0"]  # a commit id has nothing to refresh
    assert repos[REPO].failures == 2
    assert not list(state_dir.glob(f"{STATE_FILE}.*"))


async def test_only_what_was_served_is_remembered(
    client: Any, rich: str, rich_work: tuple[Path, dict[str, str]]
) -> None:
    refresher = client.app[keys.REFRESHER]
    for i in range(20):
        assert (await client.get(snapshot_url(f"made/up{i}"))).status == 404
    assert (await client.get(snapshot_url(rich, "f" * 40))).status == 404
    assert (await client.get(snapshot_url(rich, "no-such-branch"))).status == 404
    assert refresher.repos == {}
    await get(client, snapshot_url(rich, "feature"))
    await get(client, snapshot_url(rich, rich_work[1]["first"]))
    assert list(refresher.repos) == [REPO]
    assert refresher.repos[REPO].refs == ["feature"]


async def test_a_commit_snapshot_keeps_its_bytes_after_a_push_and_a_refresh(
    make_client: Any,
    upstream: Upstream,
    rich: str,
    rich_work: tuple[Path, dict[str, str]],
    scratch: Path,
    clock: Clock,
) -> None:
    client = await make_client(clock=clock, background=False)
    sha = rich_work[1]["first"]
    first = await get(client, snapshot_url(rich, sha))
    assert first.headers["Cache-Control"] == "public, max-age=31536000, immutable"
    body = await first.read()
    await client.app[keys.TASKS].settle("generate:")

    work = scratch / "work"
    await agit("clone", "-q", upstream.url(rich), str(work))
    push(upstream, work, "unrelated")
    clock.now += 3600  # past every freshness window
    await client.app[keys.REFRESHER].run_due()
    before = len(upstream.requests)
    again = await get(client, snapshot_url(rich, sha))
    assert again.headers["X-Gitcache-Source"] == "hit"
    assert await again.read() == body
    assert len(upstream.requests) == before  # a commit id needs no word from the upstream


async def test_two_tags_on_one_commit_share_one_snapshot(
    client: Any, upstream: Upstream, rich: str
) -> None:
    bare = upstream.root / f"{rich}.git"
    git("tag", "also-light", "light", cwd=bare)  # a second tag on the same commit
    first = await get(client, snapshot_url(rich, "light"))
    await client.app[keys.TASKS].settle("generate:")
    second = await get(client, snapshot_url(rich, "also-light"))
    assert second.headers["X-Gitcache-Source"] == "hit"
    assert await second.read() == await first.read()
    assert len(await client.app[keys.CACHE].entries(REPO)) == 1
