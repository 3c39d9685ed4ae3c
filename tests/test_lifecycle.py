"""Freshness and lifecycle with injected time: refresh jobs, client-chosen freshness,
stale-if-error, webhooks, retention, idle repositories, and damaged mirrors."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
from pathlib import Path
from typing import Any

import pytest

from gitcache import keys
from gitcache.repo import RepoRef
from tests.helpers import HOST, Clock, snapshot_url
from tests.upstream import Upstream, agit, commit_all, git
from tests.waiting import until

REPO = RepoRef(HOST, "group/rich")


@pytest.fixture
async def work(upstream: Upstream, rich: str, scratch: Path) -> Path:
    """A clone of the upstream to push new commits from."""
    path = scratch / "work"
    await agit("clone", "-q", upstream.url(rich), str(path))
    return path


def rebuilds(client: Any) -> float:
    metrics = client.app[keys.METRICS]
    return metrics.value("gitcache_mirror_operations_total", operation="rebuild", result="ok")


def push(upstream: Upstream, work: Path, name: str) -> str:
    (work / f"{name}.txt").write_text(name)
    sha = commit_all(work, name)
    git("push", "-q", str(upstream.root / "group/rich.git"), "HEAD:main", cwd=work)
    return sha


async def get(client: Any, url: str, **headers: str) -> Any:
    response = await client.get(url, headers=headers)
    await response.read()
    return response


REFRESH = {"interval": "10m", "idle_after": "1h", "stale_if_error": "2h"}


async def test_refresh_picks_up_a_push_and_ignores_unchanged_refs(
    make_client: Any, upstream: Upstream, rich: str, work: Path, clock: Clock
) -> None:
    client = await make_client(clock=clock, background=False, refresh=REFRESH)
    refresher, snapshots = client.app[keys.REFRESHER], client.app[keys.SNAPSHOTS]
    first = await get(client, snapshot_url(rich))
    assert first.headers["X-Gitcache-Source"] == "miss"

    new = push(upstream, work, "second")
    clock.now += 5 * 60
    await refresher.run_due()  # not due yet
    assert snapshots.generations_started == 1

    clock.now += 6 * 60  # past the interval and its jitter
    await refresher.run_due()
    assert snapshots.generations_started == 2  # made in the background
    response = await get(client, snapshot_url(rich))
    assert response.headers["X-Gitcache-Source"] == "hit"
    assert response.headers["X-Gitcache-Commit"] == new

    advertised = upstream.clones(rich)
    clock.now += 11 * 60
    await refresher.run_due()
    assert upstream.clones(rich) == advertised + 1  # one ls-remote, no fetch
    assert snapshots.generations_started == 2  # unchanged refs: nothing regenerated
    assert refresher.repos[REPO].last_result.startswith("ok")

    clock.now += 2 * 3600  # idle for longer than idle_after: no more refreshes
    before = upstream.clones(rich)
    await refresher.run_due()
    assert upstream.clones(rich) == before


async def test_failures_back_off_and_state_survives_a_restart(
    make_client: Any, upstream: Upstream, rich: str, clock: Clock
) -> None:
    refresh = {**REFRESH, "idle_after": "7d"}
    client = await make_client(clock=clock, background=False, refresh=refresh)
    refresher = client.app[keys.REFRESHER]
    await get(client, snapshot_url(rich))
    upstream.fail = True
    delays = []
    for _ in range(4):
        clock.now = refresher.repos[REPO].next_run
        await refresher.run_due()
        delays.append(refresher.repos[REPO].next_run - clock.now)
    assert delays == [600, 1200, 2400, 3600]  # doubling, capped at backoff_max (1h)
    assert refresher.repos[REPO].last_result.startswith("error")
    next_run = refresher.repos[REPO].next_run
    await client.close()

    again = await make_client(clock=clock, background=False, refresh=refresh)
    assert again.app[keys.REFRESHER].repos[REPO].next_run == next_run


async def test_max_age_forces_a_fetch(
    make_client: Any, upstream: Upstream, rich: str, clock: Clock
) -> None:
    client = await make_client(clock=clock, background=False)
    await get(client, snapshot_url(rich))
    clock.now += 30
    before = upstream.clones(rich)
    cached = await get(client, snapshot_url(rich))
    assert cached.headers["X-Gitcache-Age"] == "30"
    assert cached.headers["Cache-Control"] == "max-age=30"
    assert upstream.clones(rich) == before

    fresh = await get(client, snapshot_url(rich) + "?max_age=10")
    assert upstream.clones(rich) == before + 1
    assert fresh.headers["X-Gitcache-Source"] == "hit"  # refs unchanged: same snapshot
    assert fresh.headers["X-Gitcache-Age"] == "0"
    clock.now += 1
    header = await get(client, snapshot_url(rich), **{"Cache-Control": "max-age=0"})
    assert upstream.clones(rich) == before + 2
    assert header.status == 200

    bad = await client.get(snapshot_url(rich) + "?max_age=soon")
    assert bad.status == 400
    assert (await bad.json())["code"] == "invalid_max_age"


async def test_full_sha_the_mirror_lacks_triggers_one_fetch(
    make_client: Any, upstream: Upstream, rich: str, work: Path, clock: Clock
) -> None:
    client = await make_client(clock=clock, background=False)
    await get(client, snapshot_url(rich))
    new = push(upstream, work, "later")
    response = await get(client, snapshot_url(rich, new))
    assert response.status == 200
    assert response.headers["X-Gitcache-Commit"] == new
    assert response.headers["Cache-Control"] == "public, max-age=31536000, immutable"
    before = upstream.clones(rich)
    missing = await client.get(snapshot_url(rich, "f" * 40))
    assert missing.status == 404
    assert upstream.clones(rich) == before + 1  # one fetch, then a clear 404


async def test_stale_if_error_then_5xx_past_the_limit(
    make_client: Any, upstream: Upstream, rich: str, clock: Clock
) -> None:
    client = await make_client(clock=clock, background=False, refresh=REFRESH)
    first = await get(client, snapshot_url(rich))
    upstream.fail = True
    clock.now += 3600
    stale = await get(client, snapshot_url(rich))
    assert stale.status == 200
    assert stale.headers["X-Gitcache-Source"] == "stale"
    assert stale.headers["X-Gitcache-Commit"] == first.headers["X-Gitcache-Commit"]
    assert stale.headers["Cache-Control"] == "max-age=0, must-revalidate"
    metrics = client.app[keys.METRICS]
    assert metrics.value("gitcache_snapshot_responses_total", source="stale", tier="disk") == 1

    clock.now += 2 * 3600  # past stale_if_error
    failed = await client.get(snapshot_url(rich))
    assert failed.status == 502
    assert (await failed.json())["code"] == "upstream_error"


async def test_retention_keeps_the_newest_n(
    make_client: Any, upstream: Upstream, rich: str, work: Path, clock: Clock, state_dir: Path
) -> None:
    client = await make_client(clock=clock, background=False, cache={"keep": 2})
    for i in range(4):
        if i:
            push(upstream, work, f"change{i}")
            clock.now += 120
        await get(client, snapshot_url(rich))
    await client.app[keys.TASKS].settle("generate:")  # retention runs after the stream ends
    cache = client.app[keys.CACHE]
    entries = [e for e in cache._manifests[REPO].entries if e.ref == "HEAD"]
    assert len(entries) == 2
    files = list((state_dir / "cache" / HOST / "group%2Frich").glob("*.tar.zst"))
    assert sorted(f.name for f in files) == sorted(f"{e.key}.tar.zst" for e in entries)


def _signed(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


async def test_webhooks(
    make_client: Any, upstream: Upstream, rich: str, work: Path, tmp_path: Path
) -> None:
    (tmp_path / "gh").write_text("gh-secret\n")
    (tmp_path / "gl").write_text("gl-token")
    hooks = {
        "github": {"host": HOST, "secret_file": str(tmp_path / "gh")},
        "gitlab": {"host": HOST, "secret_file": str(tmp_path / "gl")},
    }
    client = await make_client(hooks=hooks)
    snapshots = client.app[keys.SNAPSHOTS]
    await get(client, snapshot_url(rich))
    new = push(upstream, work, "pushed")
    body = json.dumps({"repository": {"full_name": rich}}).encode()
    before = upstream.clones(rich)

    for headers in (
        {},
        {"X-Hub-Signature-256": "sha256=" + "0" * 64},
        {"X-Hub-Signature-256": _signed("wrong", body)},
    ):
        response = await client.post("/hooks/github", data=body, headers=headers)
        assert response.status == 401
        assert (await response.json())["code"] == "unauthorized"
    await client.app[keys.TASKS].settle("refresh:")  # nothing was started, nothing to wait for
    assert upstream.clones(rich) == before  # nothing was done

    good = await client.post(
        "/hooks/github", data=body, headers={"X-Hub-Signature-256": _signed("gh-secret", body)}
    )
    assert good.status == 202
    assert (await good.json())["status"] == "refreshing"
    await until(
        lambda: snapshots.generations_started == 2 and not snapshots.running,
        "the pushed commit's snapshot",
    )
    response = await get(client, snapshot_url(rich))
    assert (response.headers["X-Gitcache-Source"], response.headers["X-Gitcache-Commit"]) == (
        "hit",
        new,
    )

    gl_body = json.dumps({"project": {"path_with_namespace": rich}}).encode()
    bad = await client.post("/hooks/gitlab", data=gl_body, headers={"X-Gitlab-Token": "nope"})
    assert bad.status == 401
    ok = await client.post("/hooks/gitlab", data=gl_body, headers={"X-Gitlab-Token": "gl-token"})
    assert ok.status == 202
    unknown = json.dumps({"project": {"path_with_namespace": "other/repo"}}).encode()
    ignored = await client.post(
        "/hooks/gitlab", data=unknown, headers={"X-Gitlab-Token": "gl-token"}
    )
    assert (await ignored.json())["status"] == "ignored"
    assert (await client.post("/hooks/bitbucket", data=b"{}")).status == 404


async def test_manual_refresh_from_loopback(
    make_client: Any, upstream: Upstream, rich: str, work: Path
) -> None:
    client = await make_client()
    await get(client, snapshot_url(rich))
    new = push(upstream, work, "manual")
    response = await client.post(f"/admin/repos/{HOST}/{rich}/refresh")
    assert response.status == 202

    async def refreshed() -> bool:
        got = await get(client, snapshot_url(rich))
        return (got.headers["X-Gitcache-Commit"], got.headers["X-Gitcache-Source"]) == (new, "hit")

    await until(refreshed, "the manual refresh's new snapshot")


async def test_pinned_repository_is_prewarmed(
    make_client: Any, upstream: Upstream, rich: str, clock: Clock
) -> None:
    client = await make_client(
        clock=clock, background=False, refresh={"pinned": [f"{HOST}/{rich}"]}
    )
    await client.app[keys.REFRESHER].run_due()
    response = await get(client, snapshot_url(rich))
    assert response.headers["X-Gitcache-Source"] == "hit"


async def test_idle_mirror_is_evicted(
    make_client: Any, rich: str, clock: Clock, state_dir: Path
) -> None:
    client = await make_client(clock=clock, background=False, mirrors={"evict_after": "1d"})
    await get(client, snapshot_url(rich))
    mirror = state_dir / "mirrors" / HOST / "group%2Frich.git"
    trees = state_dir / "trees" / HOST / "group%2Frich"
    assert mirror.exists()
    assert list(trees.iterdir())
    clock.now += 2 * 86400
    await client.app[keys.REFRESHER].run_due()
    assert not mirror.exists()
    assert not trees.exists()  # what was derived from the mirror goes with it
    assert REPO not in client.app[keys.REFRESHER].repos


async def test_a_mirror_the_state_file_forgot_is_still_evicted(
    make_client: Any, rich: str, clock: Clock, state_dir: Path
) -> None:
    first = await make_client(clock=clock, background=False, mirrors={"evict_after": "1d"})
    await get(first, snapshot_url(rich))
    await first.close()
    (state_dir / "refresh.json").unlink()  # lost: the mirror is known to nobody
    mirror = state_dir / "mirrors" / HOST / "group%2Frich.git"
    os.utime(mirror / "gitcache-fetched", (clock.now, clock.now))

    client = await make_client(clock=clock, background=False, mirrors={"evict_after": "1d"})
    await client.app[keys.REFRESHER].run_due()
    assert mirror.exists()  # adopted, not idle yet
    clock.now += 2 * 86400
    await client.app[keys.REFRESHER].run_due()
    assert not mirror.exists()


async def test_damaged_mirror_is_rebuilt_while_hits_keep_serving(
    make_client: Any, upstream: Upstream, rich: str, clock: Clock, state_dir: Path
) -> None:
    client = await make_client(clock=clock, background=False)
    body = await (await client.get(snapshot_url(rich))).read()
    mirror = state_dir / "mirrors" / HOST / "group%2Frich.git"
    for pack in (mirror / "objects" / "pack").glob("*.pack"):
        pack.chmod(0o644)
        with pack.open("r+b") as f:
            f.truncate(pack.stat().st_size // 2)

    clock.now += 2 * 86400  # maintenance is due
    sweep = asyncio.ensure_future(client.app[keys.REFRESHER].run_due())
    hit = await client.get(snapshot_url(rich) + "?max_age=999999")
    assert hit.headers["X-Gitcache-Source"] in {"hit", "stale"}
    assert await hit.read() == body
    await sweep
    assert rebuilds(client) == 1
    git("fsck", "--connectivity-only", cwd=mirror)


async def test_maintenance_repacks_and_clears_stale_locks(
    make_client: Any, rich: str, clock: Clock, state_dir: Path
) -> None:
    client = await make_client(clock=clock, background=False)
    await get(client, snapshot_url(rich))
    mirror = state_dir / "mirrors" / HOST / "group%2Frich.git"
    (mirror / "packed-refs.lock").write_text("left by a killed git")
    clock.now += 2 * 86400
    await client.app[keys.REFRESHER].run_due()
    assert not (mirror / "packed-refs.lock").exists()
    assert (mirror / "objects" / "info" / "commit-graphs").is_dir()
    assert list((mirror / "objects" / "pack").glob("*.bitmap"))
    assert rebuilds(client) == 0
    response = await get(client, snapshot_url(rich, "feature"))
    assert response.status == 200
