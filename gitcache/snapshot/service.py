"""From a validated request to the bytes of a snapshot: a hit from the cache, a follower
of a running generation, or a new generation (a miss).

    newest cached entry for the ref, still fresh  ──yes──► hit
    (or any age, for a commit id)?
    │no
    mirror.ensure (clone / fetch when stale) → resolve the ref → key
    generation running for the key?  ──yes──► follower
    cached entry for the key?        ──yes──► hit (and it is fresh again)
    start a generation               ───────► miss
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace

from gitcache.cache.base import Cache, Entry, Reader
from gitcache.config import Config
from gitcache.errors import (
    GenerationFailed,
    GitcacheError,
    GitError,
    NotFound,
    Overloaded,
    UpstreamError,
)
from gitcache.metrics import Metrics
from gitcache.mirror.mirror import Mirror
from gitcache.mirror.refs import Checkout
from gitcache.mirror.runner import run_git
from gitcache.mirror.store import MirrorStore
from gitcache.repo import RefSpec, RepoRef
from gitcache.snapshot.assemble import build_tar
from gitcache.snapshot.generation import (
    Generation,
    SpoolReader,
    SpoolWriter,
    remove_spool,
    write_spool,
)
from gitcache.snapshot.source import Source
from gitcache.tasks import TaskSet, run_blocking

log = logging.getLogger(__name__)


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
    cached, however the branches move. The commit prefix keeps cache listings readable."""
    refs = "immutable" if spec.sha is not None else refs_digest
    h = hashlib.sha256(f"{checkout.commit}\n{checkout.branch}\n{refs}".encode())
    return f"{checkout.commit[:12]}-{h.hexdigest()[:20]}"


class SnapshotService:
    def __init__(
        self,
        config: Config,
        mirrors: MirrorStore,
        cache: Cache,
        tasks: TaskSet,
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._config = config
        self._metrics = metrics
        metrics.generations_in_flight.set_function(lambda: len(self._generations))
        metrics.generation_readers.set_function(
            lambda: sum(g.readers for g in self._generations.values())
        )
        self._mirrors = mirrors
        self._cache = cache
        self._tasks = tasks
        self._clock = clock
        self._spool_dir = config.server.paths.spool
        self._tmp_dir = config.server.paths.tmp
        self._generations: dict[tuple[RepoRef, str], Generation] = {}

    def clean_leftovers(self) -> None:
        """At start-up, before anything runs: spools and temp dirs of a previous process
        are incomplete by definition."""
        for directory in (self._spool_dir, self._tmp_dir):
            shutil.rmtree(directory, ignore_errors=True)
            directory.mkdir(parents=True, exist_ok=True)

    @property
    def generations_started(self) -> int:
        return int(self._metrics.value("gitcache_generations_started_total"))

    @property
    def running(self) -> int:
        return len(self._generations)

    async def serve(
        self, repo: RepoRef, spec: RefSpec, *, start: bool = True, max_age: float | None = None
    ) -> Hit | Stream:
        """Find or make the snapshot of ``repo`` at ``spec``, from an upstream fetch no older
        than ``max_age`` seconds (default: the configured window). With ``start=False``
        (HEAD) no generation is started: a miss comes back with no body. When the upstream
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
        return await self._find_or_start(repo, spec, resolved, start=start, read=start, known=entry)

    async def prepare(self, repo: RepoRef, spec: RefSpec) -> bool:
        """Make sure the snapshot for the mirror's current refs exists, generating it if
        needed and waiting for it: what a refresh job does so the next request is a hit.
        Returns whether a new snapshot was generated."""
        resolved = await self._resolve(repo, spec, self._fetch_interval)
        result = await self._find_or_start(repo, spec, resolved, start=True, read=False)
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
        *,
        start: bool,
        read: bool,
        known: Entry | None = None,
    ) -> Hit | Stream:
        """``start``: start a generation on a miss; ``read``: join it as a reader.
        ``known``: an entry just looked up; if it is the one for the key, the cache is not
        asked again (one manifest read fewer on S3 when the upstream has not moved)."""
        mirror, checkout, key = resolved.mirror, resolved.checkout, resolved.key
        stream = self._follow(repo, key, read, mirror.fetched_at)
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
        stream = self._follow(repo, key, read, mirror.fetched_at)
        if stream is not None:
            return stream
        if not start:
            return Stream(checkout.commit, Source.MISS, None, mirror.fetched_at)
        generation = self._start(repo, mirror, spec, checkout, key)
        body = generation.reader() if read else None
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

    async def _disk_has_room(self) -> bool:
        """The free-space watchdog: below ``cache.disk.min_free`` the disk tier is not
        filled (streams still serve), and a metric says so."""
        usage = await asyncio.to_thread(shutil.disk_usage, self._config.server.state_dir)
        low = usage.free < self._config.cache.disk.min_free
        self._metrics.disk_low_space.set(1 if low else 0)
        if low:
            log.warning("free space below cache.disk.min_free: not caching this snapshot")
        return not low

    def _follow(self, repo: RepoRef, key: str, read: bool, fetched_at: float) -> Stream | None:
        generation = self._generations.get((repo, key))
        if generation is None:
            return None
        if not read:
            return Stream(generation.commit, Source.FOLLOWER, None, fetched_at)
        if generation.readers >= self._config.server.max_clients_per_generation:
            self._metrics.overloaded.labels("max_clients_per_generation").inc()
            raise Overloaded("too many clients are reading this snapshot already")
        return Stream(generation.commit, Source.FOLLOWER, generation.reader(), fetched_at)

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

    def _start(
        self, repo: RepoRef, mirror: Mirror, spec: RefSpec, checkout: Checkout, key: str
    ) -> Generation:
        if self.running >= self._config.server.max_generations:
            self._metrics.overloaded.labels("max_generations").inc()
            raise Overloaded("too many snapshots are being generated")
        spool = self._spool_dir / f"{repo.slug}.{key}.{uuid.uuid4().hex[:8]}.partial"
        generation = Generation(key, checkout.commit, spool)
        cfg = self._config.snapshot
        # Created here, synchronously, so the first reader can join before this returns.
        writer = SpoolWriter(spool, cfg.zstd_level, cfg.zstd_threads)
        generation.open_spool()
        self._generations[(repo, key)] = generation
        self._metrics.generations_started.inc()
        self._tasks.spawn(
            self._generate(repo, mirror, spec, checkout, generation, writer),
            name=f"generate:{repo.name}:{key}",
        )
        return generation

    async def _generate(
        self,
        repo: RepoRef,
        mirror: Mirror,
        spec: RefSpec,
        checkout: Checkout,
        generation: Generation,
        writer: SpoolWriter,
    ) -> None:
        assert mirror.refs is not None
        refs_digest, fetched_at = mirror.refs.digest, mirror.fetched_at
        work = self._tmp_dir / f"gen-{uuid.uuid4().hex}"
        started = time.monotonic()
        # A tier that copies the spool elsewhere (S3) starts now, reading it as it grows.
        upload = self._cache.begin(repo, generation.key, generation.tail)
        committed: Entry | None = None
        try:
            await run_blocking(work.mkdir, parents=True)
            chunks = build_tar(
                mirror,
                checkout,
                work,
                git_timeout=self._config.mirrors.git_timeout,
                # An archive of a large tree may take as long as its clone did.
                archive_timeout=self._config.mirrors.clone_timeout,
            )
            try:
                size, sha256 = await write_spool(generation, chunks, writer)
            finally:
                await chunks.aclose()
            entry = Entry(
                key=generation.key,
                ref=spec.label,
                commit=checkout.commit,
                refs_digest=refs_digest,
                size=size,
                sha256=sha256,
                created=self._clock(),
                fetched_at=fetched_at,
            )
            if not self._cache.local:
                # Committing means an upload still finishing: clients need not wait for it.
                # The generation stays joinable until it is done, so whoever asks for this
                # snapshot meanwhile is served from the (complete) spool.
                generation.finish()
            try:
                if await self._disk_has_room():
                    await self._cache.commit(repo, generation.spool, entry, upload)
                    committed = entry
            except (GitcacheError, OSError) as exc:
                # Clients still get their verified bytes; only the cache misses out.
                log.error("could not commit %s %s: %s", repo.name, generation.key, exc)
            except Exception:
                log.exception("could not commit %s %s to the cache", repo.name, generation.key)
            # Readers of a local tier see the end only now: whoever has a whole snapshot
            # finds it cached.
            generation.finish()
            self._metrics.generations.labels("ok").inc()
            self._metrics.generation_bytes.inc(size)
            self._metrics.generation_duration.observe(time.monotonic() - started)
            log.info(
                "generated %s %s: %d bytes in %.2fs",
                repo.name,
                generation.key,
                size,
                time.monotonic() - started,
            )
        except asyncio.CancelledError:
            generation.fail(GenerationFailed("gitcache is shutting down"))
            self._metrics.generations.labels("failed").inc()
            log.warning("generation of %s %s aborted: shutting down", repo.name, generation.key)
            raise
        except Exception as exc:
            generation.fail(exc)
            self._metrics.generations.labels("failed").inc()
            # A traceback only for the unexpected: known failures explain themselves.
            log.error(
                "generation of %s %s failed: %s",
                repo.name,
                generation.key,
                exc,
                exc_info=not isinstance(exc, GitcacheError),
            )
        finally:
            writer.close()
            self._generations.pop((repo, generation.key), None)
            generation.close_spool()
            if upload is not None:
                await upload.abort()  # a no-op once committed
            remove_spool(generation.spool)
            with contextlib.suppress(OSError):
                await run_blocking(shutil.rmtree, work, ignore_errors=True)
        if committed is not None:
            # After the clients saw their end: nobody waits on the retention sweep.
            try:
                await self._cache.prune(repo, committed.ref, self._config.cache.keep)
            except Exception:
                log.exception("could not prune the snapshots of %s", repo.name)
