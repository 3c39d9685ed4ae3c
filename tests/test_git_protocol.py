"""git clone, fetch, ls-remote and pull through gitcache's smart HTTP, from the mirror,
with shared and cached pack responses; pushes refused."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from dulwich.protocol import pkt_line

from gitcache import keys
from gitcache.smart import service as smart_service
from tests.helpers import HOST, sample, settled, status, tree
from tests.test_security import _tokens_file as tokens_file
from tests.test_security import basic, with_own_token
from tests.upstream import Upstream, agit, commit_all, git


def via(client: Any, repo: str) -> str:
    return str(client.make_url(f"/git/{HOST}/{repo}"))


def refs(repo: Path) -> list[str]:
    return git("for-each-ref", "--format=%(objectname) %(refname)", cwd=repo).splitlines()


def git_run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=False)


async def scrape(client: Any) -> str:
    return str(await (await client.get("/metrics")).text())


def upload_pack_posts(upstream: Upstream, repo: str) -> int:
    return sum(1 for path, _ in upstream.requests if path == f"/{repo}.git/git-upload-pack")


async def push_upstream(upstream: Upstream, repo: str, work: Path, name: str, ref: str) -> str:
    """A new commit (adding ``name``) pushed straight into the upstream's ``ref``."""
    await agit("clone", "-q", upstream.url(repo), str(work))
    (work / name).write_text(f"{name}\n")
    pushed = commit_all(work, f"add {name}")
    git("push", "-q", str(upstream.root / f"{repo}.git"), ref, cwd=work)
    return pushed


@pytest.mark.parametrize("version", [2, 0])
async def test_a_clone_through_gitcache_equals_a_direct_one(
    client: Any, upstream: Upstream, rich: str, scratch: Path, version: int
) -> None:
    ours, direct = scratch / "ours", scratch / "direct"
    await agit("-c", f"protocol.version={version}", "clone", "-q", via(client, rich), str(ours))
    await agit("clone", "-q", upstream.url(rich), str(direct))
    assert refs(ours) == refs(direct)
    assert tree(ours) == tree(direct)
    git("fsck", "--strict", cwd=ours)
    assert status(ours) == ""
    listed = await agit("-c", f"protocol.version={version}", "ls-remote", via(client, rich))
    assert listed == await agit("ls-remote", upstream.url(rich))
    # With or without .git, the same repository.
    assert await agit("ls-remote", via(client, rich) + ".git") == listed


async def test_fetch_and_pull_bring_new_commits(
    make_client: Any, upstream: Upstream, rich: str, rich_work: Any, scratch: Path
) -> None:
    client = await make_client(mirrors={"fetch_interval": "0s"})
    ours = scratch / "ours"
    await agit("clone", "-q", via(client, rich), str(ours))
    pushed = await push_upstream(upstream, rich, scratch / "work", "new.txt", "main")

    await agit("pull", "-q", "--ff-only", cwd=ours)
    assert git("rev-parse", "HEAD", cwd=ours).strip() == pushed
    assert (ours / "new.txt").read_text() == "new.txt\n"


async def test_a_fetch_of_a_just_pushed_commit_fetches_the_mirror_once(
    client: Any, upstream: Upstream, rich: str, scratch: Path
) -> None:
    """The mirror is fresh by mirrors.fetch_interval, but a want it lacks is fetched."""
    ours = scratch / "ours"
    await agit("clone", "-q", via(client, rich), str(ours))
    pushed = await push_upstream(
        upstream, rich, scratch / "work", "later.txt", "HEAD:refs/heads/topic"
    )

    await agit("fetch", "-q", "origin", pushed, cwd=ours)
    git("cat-file", "-e", f"{pushed}^{{commit}}", cwd=ours)
    missing = await asyncio.to_thread(git_run, "fetch", "-q", "origin", "1" * 40, cwd=ours)
    assert missing.returncode != 0
    assert "not our ref" in missing.stderr or "1111111111" in missing.stderr


async def test_shallow_and_partial_clones_and_their_later_fetches(
    client: Any, upstream: Upstream, rich: str, scratch: Path
) -> None:
    bare = upstream.root / f"{rich}.git"
    git("config", "uploadpack.allowFilter", "true", cwd=bare)
    shallow = scratch / "shallow"
    await agit("clone", "-q", "--depth=1", via(client, rich), str(shallow))
    assert git("rev-parse", "--is-shallow-repository", cwd=shallow).strip() == "true"
    assert len(git("log", "--format=%H", cwd=shallow).split()) == 1
    await agit("fetch", "-q", "--deepen=1", cwd=shallow)
    assert len(git("log", "--format=%H", cwd=shallow).split()) == 2
    await agit("fetch", "-q", "--unshallow", cwd=shallow)
    assert git("rev-parse", "--is-shallow-repository", cwd=shallow).strip() == "false"
    git("fsck", cwd=shallow)

    since = scratch / "since"
    await agit("clone", "-q", "--shallow-since=2000-01-01", via(client, rich), str(since))
    git("fsck", cwd=since)

    partial = scratch / "partial"
    await agit("clone", "-q", "--filter=blob:none", via(client, rich), str(partial))
    assert git("config", "remote.origin.promisor", cwd=partial).strip() == "true"
    # A lazy fetch of a blob only older commits have goes through gitcache as well.
    shown = await agit("show", "HEAD~1:dos.bat", cwd=partial)
    assert shown == "@echo off\necho one\necho two\n"
    tree_only = scratch / "tree0"
    await agit("clone", "-q", "--filter=tree:0", "--no-checkout", via(client, rich), str(tree_only))


async def test_a_herd_of_clones_costs_one_upload_pack_and_nothing_upstream(
    client: Any, upstream: Upstream, rich: str, scratch: Path
) -> None:
    await agit("ls-remote", via(client, rich))  # the mirror is cloned: warm
    posts = upload_pack_posts(upstream, rich)

    async def clone(n: int) -> None:
        # A process each, not a thread each: 20 threads blocked on git would starve the
        # default executor that the server, on this same loop, needs.
        proc = await asyncio.create_subprocess_exec(
            "git",
            "clone",
            "-q",
            via(client, rich),
            str(scratch / f"c{n}"),
            stderr=asyncio.subprocess.PIPE,
        )
        _, stderr = await proc.communicate()
        assert proc.returncode == 0, stderr.decode()

    await asyncio.gather(*(clone(n) for n in range(20)))
    await settled(client)
    page = await scrape(client)
    assert sample(page, "gitcache_generations_started_total", kind="pack") == 1
    assert sample(page, "gitcache_git_responses_total", service="upload-pack", source="miss") == 1
    shared = sum(
        sample(page, "gitcache_git_responses_total", service="upload-pack", source=s)
        for s in ("hit", "follower")
    )
    assert shared == 19
    assert upload_pack_posts(upstream, rich) == posts  # the upstream saw none of them
    for n in (0, 19):
        git("fsck", cwd=scratch / f"c{n}")
    # The pack is cached: after a restart of the process it is still a hit.
    assert any(e.ref == "upload-pack" for e in await cached(client, rich))


async def cached(client: Any, repo: str) -> list[Any]:
    mirror = client.app[keys.MIRRORS].known()[0]
    return list(await client.app[keys.CACHE].entries(mirror.repo))


async def test_a_push_is_refused_with_where_to_push(
    client: Any, upstream: Upstream, rich: str, scratch: Path
) -> None:
    ours = scratch / "ours"
    await agit("clone", "-q", via(client, rich), str(ours))
    before = refs(upstream.root / f"{rich}.git")
    (ours / "x.txt").write_text("x\n")
    commit_all(ours, "not welcome")
    pushed = await asyncio.to_thread(git_run, "push", "origin", "HEAD:refs/heads/evil", cwd=ours)
    assert pushed.returncode != 0
    assert "gitcache is read-only" in pushed.stderr
    assert upstream.url(rich) in pushed.stderr
    assert "pushInsteadOf" in pushed.stderr
    assert refs(upstream.root / f"{rich}.git") == before
    page = await scrape(client)
    assert sample(page, "gitcache_git_responses_total", service="receive-pack") == 1
    posted = await client.post(f"/git/{HOST}/{rich}/git-receive-pack", data=b"0000")
    assert posted.status == 403
    assert (await posted.json())["code"] == "read_only"


async def test_bad_git_requests_are_400(client: Any, rich: str) -> None:
    base = f"/git/{HOST}/{rich}"
    dumb = await client.get(f"{base}/info/refs")
    assert dumb.status == 400
    assert (await dumb.json())["code"] == "invalid_service"
    garbage = await client.post(f"{base}/git-upload-pack", data=b"zzzz not pkt-lines")
    assert garbage.status == 400
    assert (await garbage.json())["code"] == "invalid_git_request"
    outside = await client.get(f"/git/{HOST}/../etc/info/refs?service=git-upload-pack")
    assert outside.status in (400, 404)


async def test_a_passthrough_upstream_needs_the_clients_credentials(
    make_client: Any, upstream: Upstream, rich: str, tmp_path: Path, scratch: Path
) -> None:
    upstream.users = {"gitcache": "the-token", "alice": "alice-pw"}
    token_file = tmp_path / "token"
    token_file.write_text("the-token\n")
    client = await make_client(
        upstreams=with_own_token(upstream, token_file, auth="passthrough", auth_ttl="60s")
    )
    anonymous = await asyncio.to_thread(git_run, "ls-remote", via(client, rich))
    assert anonymous.returncode != 0
    header = f"http.extraHeader=Authorization: {basic('alice', 'alice-pw')}"
    listed = await agit("-c", header, "ls-remote", via(client, rich))
    assert "refs/heads/main" in listed
    await agit("-c", header, "clone", "-q", via(client, rich), str(scratch / "alice"))
    wrong = f"http.extraHeader=Authorization: {basic('alice', 'guess')}"
    refused = await asyncio.to_thread(git_run, "-c", wrong, "ls-remote", via(client, rich))
    assert refused.returncode != 0


V2 = {"Git-Protocol": "version=2", "Content-Type": "application/x-git-upload-pack-request"}


def clone_request(upstream: Upstream, repo: str) -> bytes:
    """A protocol v2 fetch of the default branch, as a fresh clone sends it."""
    head = git("rev-parse", "HEAD", cwd=upstream.root / f"{repo}.git").strip()
    return (
        pkt_line(b"command=fetch")
        + pkt_line(b"object-format=sha1")
        + b"0001"
        + pkt_line(b"ofs-delta")
        + pkt_line(f"want {head}\n".encode())
        + pkt_line(b"done\n")
        + b"0000"
    )


def slow_upload_pack(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every upload-pack response pause between chunks: it lasts long enough for a
    second client to join it, or for one to leave mid-pack."""
    real = smart_service.upload_pack

    async def slow(*args: Any, **kwargs: Any) -> Any:
        async for chunk in real(*args, **kwargs):
            await asyncio.sleep(0.005)
            yield chunk

    monkeypatch.setattr(smart_service, "upload_pack", slow)


async def test_pack_followers_are_limited_like_snapshot_ones(
    make_client: Any, upstream: Upstream, big_work: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    upstream.create("big", big_work)
    slow_upload_pack(monkeypatch)
    client = await make_client(server={"max_clients_per_generation": 1})
    await agit("ls-remote", via(client, "big"))
    url = client.make_url(f"/git/{HOST}/big/git-upload-pack")
    body = clone_request(upstream, "big")
    async with aiohttp.ClientSession() as session:
        first = await session.post(url, data=body, headers=V2)
        second = await session.post(url, data=body, headers=V2)
        assert second.status == 503
        assert (await second.json())["code"] == "overloaded"
        assert first.status == 200
        assert (await first.read()).endswith(b"0000")


async def test_a_client_that_leaves_mid_pack_does_not_stop_the_others(
    client: Any, upstream: Upstream, big_work: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    upstream.create("big", big_work)
    slow_upload_pack(monkeypatch)
    await agit("ls-remote", via(client, "big"))
    body = clone_request(upstream, "big")
    url = client.make_url(f"/git/{HOST}/big/git-upload-pack")
    async with aiohttp.ClientSession() as session:
        leaving = await session.post(url, data=body, headers=V2)
        staying = await session.post(url, data=body, headers=V2)
        await leaving.content.read(1024)
        leaving.close()  # gone mid-pack
        whole = await staying.read()
    assert staying.status == 200
    assert b"PACK" in whole and whole.endswith(b"0000")
    await settled(client)
    assert any(e.ref == "upload-pack" for e in await cached(client, "big"))


async def test_inbound_tokens_apply_to_git_as_to_snapshots(
    make_client: Any, upstream: Upstream, rich: str, tmp_path: Path, scratch: Path
) -> None:
    client = await make_client(auth={"tokens_file": str(tokens_file(tmp_path))})
    url = via(client, rich)
    anonymous = await asyncio.to_thread(git_run, "ls-remote", url)
    assert anonymous.returncode != 0
    bearer = "http.extraHeader=Authorization: Bearer read-token"
    assert "refs/heads/main" in await agit("-c", bearer, "ls-remote", url)
    # A credential helper's way: the token as the password.
    with_password = url.replace("http://", "http://ci:read-token@")
    await agit("clone", "-q", with_password, str(scratch / "ci"))
    upstream.create("other/repo", upstream.root / f"{rich}.git")
    hidden = await asyncio.to_thread(git_run, "-c", bearer, "ls-remote", via(client, "other/repo"))
    assert hidden.returncode != 0
    assert "not found" in hidden.stderr.lower() or "404" in hidden.stderr


async def test_a_pack_answer_cached_in_s3_serves_another_replica(
    make_client: Any, rich: str, s3_endpoint: str, s3_bucket: str, tmp_path: Path, scratch: Path
) -> None:
    cache = {"backend": "s3", "s3": {"bucket": s3_bucket, "endpoint_url": s3_endpoint}}
    first = await make_client(cache=cache)
    await agit("clone", "-q", via(first, rich), str(scratch / "first"))
    await settled(first)
    assert any(e.ref == "upload-pack" for e in await cached(first, rich))

    replica = await make_client(state=tmp_path / "replica", cache=cache)
    await agit("clone", "-q", via(replica, rich), str(scratch / "second"))
    page = await scrape(replica)
    assert sample(page, "gitcache_git_responses_total", service="upload-pack", source="hit") == 1
    assert sample(page, "gitcache_generations_started_total", kind="pack") == 0
    assert refs(scratch / "second") == refs(scratch / "first")
    git("fsck", cwd=scratch / "second")
