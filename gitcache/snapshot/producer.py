"""Running a generation: what a job makes (a snapshot's tar, an upload-pack response)
written into its spool, verified, committed to the cache, with its clients following the
spool (see ``generation``)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import shutil
import time
import uuid
from collections.abc import AsyncGenerator, Callable
from pathlib import Path
from typing import Protocol

from gitcache.cache.base import Cache, Entry, Upload
from gitcache.config import Config
from gitcache.errors import GenerationFailed, GitcacheError, Overloaded, StorageFull
from gitcache.metrics import Metrics
from gitcache.mirror.mirror import Mirror
from gitcache.repo import RepoRef
from gitcache.snapshot.frames import Stored, Verbatim
from gitcache.snapshot.generation import (
    Generation,
    SpoolReader,
    SpoolWriter,
    remove_spool,
    write_spool,
)
from gitcache.tasks import TaskSet, run_blocking

log = logging.getLogger(__name__)


class Job(Protocol):
    """What one generation makes, from ``mirror``: the chunks of its spool, and what its
    cache entry is labelled with. ``kind`` names it in metrics; ``keep``: how many entries
    of its label the cache keeps."""

    @property
    def mirror(self) -> Mirror: ...
    @property
    def kind(self) -> str: ...
    @property
    def label(self) -> str: ...
    @property
    def commit(self) -> str: ...
    @property
    def keep(self) -> int: ...

    def chunks(self, work: Path) -> AsyncGenerator[bytes | Stored | Verbatim, None]:
        """The spool's chunks; ``work`` is an empty directory of the job's own."""


def _as_told(repo: RepoRef, exc: Exception) -> Exception:
    """A generation's failure as its clients are told it: a full disk is 507, as when a
    clone fills it."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        full = StorageFull(f"no space left on gitcache's disk for {repo.name}")
        full.__cause__ = exc
        return full
    return exc


class Producer:
    """The generations running now, at most one per key: one mechanism, whatever the
    job (a snapshot's tar, an upload-pack response)."""

    def __init__(
        self,
        config: Config,
        cache: Cache,
        tasks: TaskSet,
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.cache = cache
        self._tasks = tasks
        self.metrics = metrics
        self._clock = clock
        self._spool_dir = config.server.paths.spool
        self._tmp_dir = config.server.paths.tmp
        self.running: dict[tuple[RepoRef, str], Generation] = {}
        metrics.generations_in_flight.set_function(lambda: len(self.running))
        metrics.generation_readers.set_function(
            lambda: sum(g.readers for g in self.running.values())
        )

    def reader(self, generation: Generation) -> SpoolReader:
        """A client's reader of ``generation``; 503 past
        ``server.max_clients_per_generation``, whatever the job."""
        if generation.readers >= self.config.server.max_clients_per_generation:
            self.metrics.overloaded.labels("max_clients_per_generation").inc()
            raise Overloaded("too many clients are reading this generation already")
        return generation.reader()

    def clean_leftovers(self) -> None:
        """At start-up, before anything runs: spools and temporary directories of a
        previous process are incomplete by definition."""
        for directory in (self._spool_dir, self._tmp_dir):
            shutil.rmtree(directory, ignore_errors=True)
            directory.mkdir(parents=True, exist_ok=True)

    def start(self, repo: RepoRef, key: str, job: Job) -> Generation:
        if len(self.running) >= self.config.server.max_generations:
            self.metrics.overloaded.labels("max_generations").inc()
            raise Overloaded("too many snapshots are being generated")
        spool = self._spool_dir / f"{repo.slug}.{key}.{uuid.uuid4().hex[:8]}.partial"
        generation = Generation(key, job.commit, spool)
        cfg = self.config.snapshot
        # Created here, synchronously, so the first reader can join before this returns.
        writer = SpoolWriter(spool, cfg.zstd_level, cfg.zstd_threads)
        generation.open_spool()
        self.running[(repo, key)] = generation
        self.metrics.generations_started.labels(job.kind).inc()
        self._tasks.spawn(
            self._generate(repo, job, generation, writer),
            name=f"generate:{repo.name}:{key}",
        )
        return generation

    async def _generate(
        self, repo: RepoRef, job: Job, generation: Generation, writer: SpoolWriter
    ) -> None:
        started = time.monotonic()
        work = self._tmp_dir / f"gen-{uuid.uuid4().hex}"
        # A tier that copies the spool elsewhere (S3) starts now, reading it as it grows.
        upload = self.cache.begin(repo, generation.key, generation.tail)
        committed: Entry | None = None
        try:
            entry = await self._write(job, generation, writer, work)
            committed = await self._commit(repo, generation, entry, upload)
            self.metrics.generations.labels(job.kind, "ok").inc()
            self.metrics.generation_bytes.labels(job.kind).inc(entry.size)
            self.metrics.generation_duration.labels(job.kind).observe(time.monotonic() - started)
            log.info(
                "generated %s %s: %d bytes in %.2fs",
                repo.name,
                entry.key,
                entry.size,
                time.monotonic() - started,
            )
        except asyncio.CancelledError:
            aborted = GenerationFailed("gitcache is shutting down")
            self._failed(repo, job, generation, aborted, True)
            raise
        except Exception as exc:
            self._failed(repo, job, generation, _as_told(repo, exc))
        finally:
            writer.close()
            self.running.pop((repo, generation.key), None)
            generation.close_spool()
            if upload is not None:
                await upload.abort()  # a no-op once committed
            remove_spool(generation.spool)
            with contextlib.suppress(OSError):
                await run_blocking(shutil.rmtree, work, ignore_errors=True)
        if committed is not None:
            await self._prune(repo, committed, job.keep)

    async def _write(
        self, job: Job, generation: Generation, writer: SpoolWriter, work: Path
    ) -> Entry:
        """What the job makes, written into the spool and checked; its entry."""
        mirror = job.mirror
        assert mirror.refs is not None
        refs_digest, fetched_at = mirror.refs.digest, mirror.fetched_at
        await run_blocking(work.mkdir, parents=True)
        chunks = job.chunks(work)
        try:
            size, sha256 = await write_spool(generation, chunks, writer)
        finally:
            await chunks.aclose()
        return Entry(
            key=generation.key,
            ref=job.label,
            commit=job.commit,
            refs_digest=refs_digest,
            size=size,
            sha256=sha256,
            created=self._clock(),
            fetched_at=fetched_at,
        )

    async def _commit(
        self, repo: RepoRef, generation: Generation, entry: Entry, upload: Upload | None
    ) -> Entry | None:
        """Commit the verified spool to the cache (the entry, or None if it was not).

        The rule for when the generation's clients see the end of their stream: once the
        next request would find the snapshot where it looks. With a local tier that is
        after its commit. With a remote-only tier (S3) the commit is an upload finishing,
        which clients need not wait for: they see their end at once, and the generation
        stays joinable until it is done, so whoever asks meanwhile reads the complete
        spool. Whatever the commit does, clients keep their verified bytes."""
        end_after_commit = self.cache.local
        if not end_after_commit:
            generation.finish()
        committed = None
        try:
            if await self._disk_has_room():
                await self.cache.commit(repo, generation.spool, entry, upload)
                committed = entry
        except (GitcacheError, OSError) as exc:
            log.error("could not commit %s %s: %s", repo.name, generation.key, exc)
        except Exception:
            log.exception("could not commit %s %s to the cache", repo.name, generation.key)
        if end_after_commit:
            generation.finish()
        return committed

    def _failed(
        self,
        repo: RepoRef,
        job: Job,
        generation: Generation,
        exc: Exception,
        aborted: bool = False,
    ) -> None:
        generation.fail(exc)
        self.metrics.generations.labels(job.kind, "failed").inc()
        # A traceback only for the unexpected: known failures explain themselves.
        log.log(
            logging.WARNING if aborted else logging.ERROR,
            "generation of %s %s failed: %s",
            repo.name,
            generation.key,
            exc,
            exc_info=not isinstance(exc, GitcacheError),
        )

    async def _prune(self, repo: RepoRef, committed: Entry, keep: int) -> None:
        """After the clients saw their end: nobody waits on the retention sweep."""
        try:
            await self.cache.prune(repo, committed.ref, keep)
        except Exception:
            log.exception("could not prune the snapshots of %s", repo.name)

    async def _disk_has_room(self) -> bool:
        """The free-space watchdog: below ``cache.disk.min_free`` the disk tier is not
        filled (streams still serve), and a metric says so."""
        usage = await asyncio.to_thread(shutil.disk_usage, self.config.server.state_dir)
        low = usage.free < self.config.cache.disk.min_free
        self.metrics.disk_low_space.set(1 if low else 0)
        if low:
            log.warning("free space below cache.disk.min_free: not caching this snapshot")
        return not low
