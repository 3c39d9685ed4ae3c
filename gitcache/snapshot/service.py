"""From a validated request to the bytes of a snapshot: a hit, a follower of a running
generation, or a new one (the flow is drawn in docs/architecture.md)."""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import Enum

from gitcache.cache.base import Entry, Reader
from gitcache.errors import (
    GitcacheError,
    GitError,
    NotFound,
    UpstreamError,
)
from gitcache.mirror.mirror import Mirror
from gitcache.mirror.refs import Checkout
from gitcache.mirror.runner import run_git
from gitcache.mirror.store import MirrorStore
from gitcache.repo import RefSpec, RepoRef
from gitcache.snapshot.generation import (
    SpoolReader,
)
from gitcache.snapshot.jobs import SnapshotJob
from gitcache.snapshot.producer import Producer
from gitcache.snapshot.source import Source
from gitcache.snapshot.trees import TreeStore
from gitcache.variant import Kind

log = logging.getLogger(__name__)


class Want(Enum):
    """What a caller of :meth:`SnapshotService.serve` wants when there is no hit."""

    BODY = "body"  # GET: the bytes: a generation is joined, or started, and read
    HEADERS = "headers"  # HEAD: what a GET would get: nothing is started or read
    CACHED = "cached"  # a refresh: the snapshot made and cached: nothing is read


@dataclass
class Hit:
    """A cached snapshot; ``source`` is ``hit``, or ``stale`` when the upstream failed and
    an older snapshot stands in."""

    reader: Reader
    source: Source = Source.HIT

    @property
    def commit(self) -> str:
        return self.reader.entry.commit

    @property
    def fetched_at(self) -> float:
        return self.reader.entry.fetched_at


@dataclass
class Stream:
    """A snapshot being generated; ``body`` is None for a HEAD request."""

    commit: str
    source: Source
    body: SpoolReader | None
    fetched_at: float


@dataclass(frozen=True)
class Resolved:
    mirror: Mirror
    checkout: Checkout
    key: str


def snapshot_key(spec: RefSpec, checkout: Checkout, refs_digest: str) -> str:
    """Unique per what a snapshot contains: what it checks out and every ref in it, not
    the name it was asked by (two tags on one commit share one snapshot). A commit id's
    snapshot leaves the refs out: its URL names one sequence of bytes for as long as it is
    cached, however the branches move. A variant is part of the key; the working tree
    alone depends on the commit only. The commit prefix keeps cache listings readable."""
    refs = "immutable" if spec.sha is not None else refs_digest
    named = f"{checkout.commit}\n{checkout.branch}\n{refs}"
    if spec.variant.kind is Kind.SOURCE:  # no .git: the commit alone says what is in it
        named = f"{checkout.commit}\n{spec.variant.query}"
    elif spec.variant.query:
        named += f"\n{spec.variant.query}"
    h = hashlib.sha256(named.encode())
    return f"{checkout.commit[:12]}-{h.hexdigest()[:20]}"


class SnapshotService:
    def __init__(
        self,
        mirrors: MirrorStore,
        producer: Producer,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Finds snapshots in ``producer``'s cache and running generations; has it make
        the missing ones."""
        self._config = producer.config
        self._metrics = producer.metrics
        self._cache = producer.cache
        self._mirrors = mirrors
        self._clock = clock
        self.producer = producer
        self._generations = producer.running
        self._trees = TreeStore(self._config, self._metrics)

    @property
    def generations_started(self) -> int:
        return int(self._metrics.value("gitcache_generations_started_total", kind="snapshot"))

    @property
    def running(self) -> int:
        return len(self._generations)

    async def serve(
        self,
        repo: RepoRef,
        spec: RefSpec,
        *,
        want: Want = Want.BODY,
        max_age: float | None = None,
    ) -> Hit | Stream:
        """Find or make the snapshot of ``repo`` at ``spec``, from an upstream fetch no older
        than ``max_age`` seconds (default: the configured window); ``want`` says what a miss
        does. When the upstream
        fails, an older snapshot within ``refresh.stale_if_error`` is served instead."""
        window = self._fetch_interval if max_age is None else min(max_age, self._fetch_interval)
        entry = await self._cache.newest(repo, spec.label)
        # A commit id's snapshot never goes stale: the upstream is not asked again.
        fresh = entry is not None and self._clock() - entry.fetched_at < window
        if entry is not None and (fresh or spec.sha is not None):
            hit = await self._open(repo, entry)
            if hit is not None:
                return hit
        try:
            resolved = await self._resolve(repo, spec, window)
        except UpstreamError:
            stale = await self._stale(repo, entry)
            if stale is None:
                raise
            return stale
        return await self._find_or_start(repo, spec, resolved, want, known=entry)

    async def prepare(self, repo: RepoRef, spec: RefSpec) -> bool:
        """Make sure the snapshot for the mirror's current refs exists, generating it if
        needed and waiting for it: what a refresh job does so the next request is a hit.
        Returns whether a new snapshot was generated."""
        resolved = await self._resolve(repo, spec, self._fetch_interval)
        result = await self._find_or_start(repo, spec, resolved, Want.CACHED)
        if isinstance(result, Hit):
            await result.reader.close()
            return False
        generation = self._generations.get((repo, resolved.key))
        if generation is not None:
            await generation.wait()
        return result.source == Source.MISS

    async def _resolve(self, repo: RepoRef, spec: RefSpec, window: float) -> Resolved:
        asked = self._clock()
        mirror = await self._mirrors.ensure(repo, window)
        if spec.sha is not None and not await self._has_commit(mirror, spec.sha):
            if mirror.fetched_at <= asked:  # the mirror may predate the commit: fetch once
                mirror = await self._mirrors.ensure(repo, 0)
            if not await self._has_commit(mirror, spec.sha):
                raise NotFound(f"commit {spec.sha} not found in {repo.name}", code="ref_not_found")
        assert mirror.refs is not None
        checkout = mirror.refs.resolve(spec)
        return Resolved(mirror, checkout, snapshot_key(spec, checkout, mirror.refs.digest))

    async def _find_or_start(
        self,
        repo: RepoRef,
        spec: RefSpec,
        resolved: Resolved,
        want: Want,
        known: Entry | None = None,
    ) -> Hit | Stream:
        """A hit, a running generation joined, or one started, as ``want`` says. ``known``:
        an entry just looked up; if it is the one for the key, the cache is not
        asked again (one manifest read fewer on S3 when the upstream has not moved)."""
        mirror, checkout, key = resolved.mirror, resolved.checkout, resolved.key
        stream = self._follow(repo, key, want, mirror.fetched_at)
        if stream is not None:
            return stream
        entry = known if known is not None and known.key == key else None
        if entry is None:
            entry = await self._cache.get(repo, key)
        if entry is not None:
            if entry.fetched_at < mirror.fetched_at:
                await self._cache.touch(repo, entry, mirror.fetched_at)
                entry = replace(entry, fetched_at=mirror.fetched_at)
            hit = await self._open(repo, entry)
            if hit is not None:
                return hit
        # Looked up again: a generation may have started while the cache was read.
        stream = self._follow(repo, key, want, mirror.fetched_at)
        if stream is not None:
            return stream
        if want is Want.HEADERS:
            return Stream(checkout.commit, Source.MISS, None, mirror.fetched_at)
        job = SnapshotJob(mirror, spec, checkout, self._config, self._trees)
        generation = self.producer.start(repo, key, job)
        body = self.producer.reader(generation) if want is Want.BODY else None
        return Stream(checkout.commit, Source.MISS, body, mirror.fetched_at)

    async def _stale(self, repo: RepoRef, entry: Entry | None) -> Hit | None:
        limit = self._config.refresh.stale_if_error
        if entry is None or self._clock() - entry.fetched_at > limit:
            return None
        reader = await self._cache.open(repo, entry)
        if reader is None:
            return None
        log.warning("serving a stale snapshot of %s: the upstream failed", repo.name)
        return Hit(reader, source=Source.STALE)

    @property
    def _fetch_interval(self) -> float:
        return self._config.mirrors.fetch_interval

    async def forget(self, repo: RepoRef, entry: Entry) -> None:
        """Drop an entry whose file is gone, so the next lookup does not find it again."""
        log.warning("snapshot %s of %s is gone from the cache: forgetting it", entry.key, repo.name)
        try:
            await self._cache.delete(repo, entry.key)
        except GitcacheError as exc:
            log.warning("could not forget %s: %s", entry.key, exc.message)

    async def newest(self, repo: RepoRef, ref: str) -> Entry | None:
        return await self._cache.newest(repo, ref)

    async def _open(self, repo: RepoRef, entry: Entry) -> Hit | None:
        reader = await self._cache.open(repo, entry)
        return Hit(reader) if reader is not None else None

    def _follow(self, repo: RepoRef, key: str, want: Want, fetched_at: float) -> Stream | None:
        generation = self._generations.get((repo, key))
        if generation is None:
            return None
        if want is not Want.BODY:
            return Stream(generation.commit, Source.FOLLOWER, None, fetched_at)
        reader = self.producer.reader(generation)
        return Stream(generation.commit, Source.FOLLOWER, reader, fetched_at)

    async def _has_commit(self, mirror: Mirror, sha: str) -> bool:
        try:
            await run_git(
                [
                    "--git-dir",
                    str(mirror.path),
                    "cat-file",
                    "-e",
                    "--end-of-options",
                    f"{sha}^{{commit}}",
                ],
                timeout=self._config.mirrors.git_timeout,
            )
        except GitError:
            return False
        return True
