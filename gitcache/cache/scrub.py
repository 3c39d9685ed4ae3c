"""The scrub: every cached snapshot, on every tier, is read back in the background at a
bounded rate and hashed; one whose bytes no longer match its entry (a flipped bit on disk,
a file truncated or replaced behind gitcache's back, an object rewritten in the bucket) is
evicted and counted, so it is never served again.

A response whose source failed mid-body asks for its entry to be checked at once
(:meth:`Scrubber.recheck`), without waiting for the next pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time
from collections.abc import Awaitable, Callable

from gitcache.cache.base import Cache, Entry
from gitcache.errors import EntryGone, GitcacheError
from gitcache.metrics import Metrics
from gitcache.repo import RepoRef
from gitcache.tasks import TaskSet

log = logging.getLogger(__name__)

START_DELAY = 60.0  # the first pass waits for start-up traffic to settle


class Scrubber:
    def __init__(
        self,
        cache: Cache,
        metrics: Metrics,
        tasks: TaskSet,
        *,
        rate: int,
        claim: Callable[[RepoRef], Awaitable[bool]] | None = None,
    ) -> None:
        """``rate``: bytes read per second at most, over all tiers. ``claim``: asks the
        shared bucket whether this replica scrubs a repository's S3 entries this time
        (one replica does, not all of them)."""
        self._layers = cache.layers()
        self._metrics = metrics
        self._tasks = tasks
        self._rate = rate
        self._claim = claim
        self._checking: set[tuple[str, RepoRef, str]] = set()
        for name, _ in self._layers:  # at 0 from the start: an alert's rate() has data
            for result in ("ok", "corrupt", "failed"):
                metrics.scrub_checks.labels(name, result)

    async def scrub(self) -> int:
        """One pass over every entry of every tier; how many were evicted."""
        evicted = 0
        for name, tier in self._layers:
            for repo in tier.repos():
                if name == "s3" and self._claim is not None and not await self._claim(repo):
                    continue
                try:
                    entries = await tier.entries(repo)
                except GitcacheError as exc:
                    log.warning("scrub: cannot list %s on %s: %s", repo.name, name, exc.message)
                    continue
                for entry in entries:
                    evicted += not await self._check(name, tier, repo, entry)
        return evicted

    def recheck(self, repo: RepoRef, entry: Entry) -> None:
        """Check ``entry`` on every tier now, in the background (a hit failed mid-body)."""
        for name, tier in self._layers:
            if (name, repo, entry.key) not in self._checking:
                self._tasks.spawn(
                    self._check(name, tier, repo, entry), name=f"recheck:{repo.name}:{entry.key}"
                )

    async def run(self, interval: float) -> None:
        """A pass every ``interval`` seconds, the first shortly after start-up."""
        await asyncio.sleep(min(START_DELAY, interval))
        while True:
            try:
                evicted = await self.scrub()
                log.info("scrub pass done: %d corrupt entries evicted", evicted)
            except Exception:
                log.exception("scrub pass failed")
            await asyncio.sleep(interval)

    async def _check(self, name: str, tier: Cache, repo: RepoRef, entry: Entry) -> bool:
        """Read ``entry`` back from ``tier``; evict it if it does not match. False if it
        was evicted; True if it matched, is gone already, or could not be read (an S3
        outage says nothing about the bytes)."""
        key = (name, repo, entry.key)
        self._checking.add(key)
        try:
            if await tier.get(repo, entry.key) != entry:
                return True  # replaced or removed meanwhile
            problem = await self._problem(tier, repo, entry)
        except (EntryGone, GitcacheError) as exc:
            log.warning("scrub: could not read %s %s on %s: %s", repo.name, entry.key, name, exc)
            self._metrics.scrub_checks.labels(name, "failed").inc()
            return True
        finally:
            self._checking.discard(key)
        if problem is None:
            self._metrics.scrub_checks.labels(name, "ok").inc()
            return True
        log.error(
            "scrub: %s %s on %s is corrupt (%s): evicting it", repo.name, entry.key, name, problem
        )
        self._metrics.scrub_checks.labels(name, "corrupt").inc()
        with contextlib.suppress(GitcacheError):
            await tier.delete(repo, entry.key)
        return False

    async def _problem(self, tier: Cache, repo: RepoRef, entry: Entry) -> str | None:
        """What is wrong with the bytes of ``entry`` (None: nothing)."""
        reader = await tier.open(repo, entry, use=False)
        if reader is None:
            return None  # gone: nothing left to serve
        digest = hashlib.sha256()
        read = 0
        started = time.monotonic()
        try:
            if reader.file is not None:
                size = os.fstat(reader.file.fileno()).st_size
                if size != entry.size:
                    return f"{size} bytes, not {entry.size}"
            async for chunk in reader.chunks(0, entry.size):
                await asyncio.to_thread(digest.update, chunk)
                read += len(chunk)
                self._metrics.scrub_bytes.inc(len(chunk))
                # Bounded: the scrub must never compete with clients for the disk.
                ahead = read / self._rate - (time.monotonic() - started)
                if ahead > 0:
                    await asyncio.sleep(ahead)
        except OSError as exc:
            return f"unreadable: {exc}"
        finally:
            await reader.close()
        if read != entry.size:
            return f"{read} bytes, not {entry.size}"
        if digest.hexdigest() != entry.sha256:
            return "sha256 mismatch"
        return None
