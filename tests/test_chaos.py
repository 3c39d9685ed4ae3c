"""gitcache killed outright (SIGKILL) and restarted, as an operator's machine would do it:
no git child survives it for long, the next start is not tripped up by what they left,
and nothing partial is ever served."""

from __future__ import annotations

import asyncio
import random
import subprocess
from pathlib import Path

import aiohttp
import pytest

from gitcache.mirror.leftovers import working_in
from tests.helpers import HOST, extract, snapshot_url, status, stored_trees
from tests.processes import GitcacheProcess, start_gitcache
from tests.upstream import Upstream, agit, commit_all, git
from tests.waiting import until


async def kill(process: GitcacheProcess) -> None:
    process.proc.kill()
    await process.proc.wait()


async def test_git_children_do_not_outlive_a_killed_gitcache(
    upstream: Upstream, rich: str, tmp_path: Path
) -> None:
    """A clone is under way (the upstream answers slowly) when gitcache is SIGKILLed: its
    git child dies with it; whatever helper is still waiting on the upstream is killed by
    the next start, before it serves anything."""
    upstream.delay = 30.0
    process = await start_gitcache(tmp_path, "s", upstream)
    state = process.state_dir
    async with aiohttp.ClientSession() as session:
        request = asyncio.ensure_future(session.get(process.base + snapshot_url(rich)))
        await until(lambda: bool(working_in(state)), "a git child")
        await kill(process)
        with pytest.raises(aiohttp.ClientError):
            await request
    # The child itself was killed with its parent; a helper of its may still wait.
    await until(lambda: not any("clone" in _argv(p) for p in working_in(state)), "git clone", 5)
    again = await start_gitcache(tmp_path, "s", upstream)
    try:
        assert working_in(state) == []  # reaped before it was ready
        upstream.release()
        async with (
            aiohttp.ClientSession() as session,
            session.get(again.base + snapshot_url(rich)) as response,
        ):
            assert response.status == 200
            checkout = extract(await response.read(), tmp_path / "checkout")
        git("fsck", "--no-progress", cwd=checkout)
    finally:
        await again.stop()


def _argv(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


async def test_lock_files_left_in_a_mirror_do_not_fail_the_next_fetch(
    upstream: Upstream, rich: str, rich_work: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    process = await start_gitcache(tmp_path, "s", upstream)
    async with aiohttp.ClientSession() as session:
        async with session.get(process.base + snapshot_url(rich)) as response:
            await response.read()
        await kill(process)
        # What a fetch killed mid-way leaves: ref and packed-refs locks.
        mirror = process.state_dir / "mirrors" / HOST / "group%2Frich.git"
        (mirror / "packed-refs.lock").write_text("")
        (mirror / "refs" / "heads").mkdir(parents=True, exist_ok=True)
        (mirror / "refs" / "heads" / "main.lock").write_text("")
        work = tmp_path / "work"
        await agit("clone", "-q", upstream.url(rich), str(work))
        (work / "new.txt").write_text("pushed while gitcache was down\n")
        new = commit_all(work, "new")
        git("push", "-q", str(upstream.root / f"{rich}.git"), "HEAD:main", cwd=work)

        again = await start_gitcache(tmp_path, "s", upstream)
        try:
            url = again.base + snapshot_url(rich) + "?max_age=0"
            async with session.get(url) as response:
                assert response.status == 200
                assert response.headers["X-Gitcache-Commit"] == new
                await response.read()
        finally:
            await again.stop()
    assert not list(mirror.rglob("*.lock"))


async def test_sigkill_at_random_moments_never_serves_a_partial_snapshot(
    upstream: Upstream, big_work: Path, tmp_path: Path
) -> None:
    """Twenty times: start, ask for a snapshot, SIGKILL gitcache at a random moment of the
    miss (cloning, packing, streaming, committing), restart. Every snapshot served after a
    restart extracts to a clean clone, and nothing half-made is left on disk."""
    upstream.create("big", big_work)
    rng = random.Random(1234)
    served = 0
    for round_ in range(20):
        process = await start_gitcache(tmp_path, "s", upstream)
        state = process.state_dir
        async with aiohttp.ClientSession() as session:
            response = await session.get(process.base + snapshot_url("big"))
            await asyncio.sleep(rng.uniform(0, 0.6))
            await kill(process)
            response.close()
        again = await start_gitcache(tmp_path, "s", upstream)
        try:
            assert working_in(state) == []
            assert list((state / "spool").iterdir()) == []
            assert list((state / "tmp").iterdir()) == []
            stored_trees(state)  # only complete working trees were ever stored
            async with (
                aiohttp.ClientSession() as session,
                session.get(again.base + snapshot_url("big")) as response,
            ):
                assert response.status == 200
                body = await response.read()
                source = response.headers["X-Gitcache-Source"]
            assert subprocess.run(["zstd", "-t", "-q"], input=body, check=False).returncode == 0
            if source == "hit" or round_ % 5 == 0:  # every hit, and a miss now and then
                checkout = extract(body, tmp_path / f"checkout{round_}")
                git("fsck", "--no-progress", cwd=checkout)
                assert status(checkout) == ""
                served += source == "hit"
        finally:
            await again.stop()
    assert served >= 1  # some kills came after the commit: a hit after restart
