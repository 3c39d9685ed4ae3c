"""Shutdown aborts generations cleanly: no child process, no spool, nothing committed."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gitcache import keys
from gitcache.snapshot import trees
from tests.helpers import processes_mentioning, snapshot_url, wrap_build_tar
from tests.upstream import Upstream
from tests.waiting import until


async def test_shutdown_mid_generation(
    make_client: Any,
    upstream: Upstream,
    big_work: Path,
    state_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    upstream.create("big", big_work)

    async def slowly(sent: int) -> None:
        await asyncio.sleep(0.2)

    wrap_build_tar(monkeypatch, slowly)
    real_run_git = trees.run_git

    async def napping_archive(args: list[str], **kwargs: Any) -> bytes:
        """git archive, after a git child that sleeps: one still runs at the shutdown."""
        if "archive" in args:
            nap = [*args[:2], "-c", "alias.nap=!sleep 60; :", "nap", "archive"]
            await real_run_git(nap, timeout=kwargs["timeout"])
        return await real_run_git(args, **kwargs)

    monkeypatch.setattr(trees, "run_git", napping_archive)
    client = await make_client()
    async with aiohttp.ClientSession() as session:
        response = await session.get(client.make_url(snapshot_url("big")))
        await response.content.read(100)
        assert client.app[keys.SNAPSHOTS].running == 1
        await until(
            lambda: any(" archive " in p for p in processes_mentioning(str(state_dir))),
            "git archive to run",
        )
        response.close()
        await client.close()
    assert processes_mentioning(str(state_dir)) == []
    assert list((state_dir / "spool").iterdir()) == []
    assert list((state_dir / "tmp").iterdir()) == []
    cache_root = state_dir / "cache"
    assert [p for p in cache_root.rglob("*") if p.is_file()] == []
