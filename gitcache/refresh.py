"""The periodic scheduler: keeps requested (and pinned) repositories fresh, with jitter,
bounded concurrency and backoff; also evicts idle mirrors, runs their maintenance and
archives them into the bucket. Run times persist in ``refresh.json``."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from gitcache.bucket.leases import Leases
from gitcache.config import Config
from gitcache.errors import GitcacheError
from gitcache.metrics import Metrics
from gitcache.mirror.store import MirrorStore
from gitcache.mirror.upkeep import Upkeep
from gitcache.repo import RefSpec, RepoRef, parse_label, parse_repo
from gitcache.snapshot.service import SnapshotService
from gitcache.tasks import Coalescer, TaskSet, run_blocking

log = logging.getLogger(__name__)

TICK = 1.0  # seconds between looks at what is due
JITTER = 0.1


@dataclass
class RepoState:
    last_requested: float = 0.0
    refs: list[str] = field(default_factory=list)
    next_run: float = 0.0
    last_run: float = 0.0
    last_result: str = ""
    failures: int = 0
    last_maintenance: float = 0.0
    last_archive: float = 0.0  # 0: due as soon as the mirror exists


class Refresher:
    def __init__(
        self,
        config: Config,
        mirrors: MirrorStore,
        snapshots: SnapshotService,
        upkeep: Upkeep,
        tasks: TaskSet,
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        leases: Leases | None = None,
    ) -> None:
        self._config = config
        self._metrics = metrics
        self._leases = leases
        self._cfg = config.refresh
        self._mirrors = mirrors
        self._snapshots = snapshots
        self._upkeep = upkeep
        self._clock = clock
        self._rng = rng or random.Random()  # noqa: S311 (jitter, not secrets)
        self._path = config.server.paths.refresh_state
        self._tasks = tasks
        self._jobs: Coalescer[None] = Coalescer(tasks)
        self._pending: set[asyncio.Task[None]] = set()
        self._evict_after = config.mirrors.evict_after
        metrics.refresh_queue.set_function(lambda: len(self._pending))
        self._slots = asyncio.Semaphore(self._cfg.concurrency)
        self.repos: dict[RepoRef, RepoState] = {}
        self._saved = ""  # what the state file holds, so an idle tick writes nothing
        self.pinned = {_pinned(name, config) for name in self._cfg.pinned}

    # --- state -------------------------------------------------------------------------

    def load(self) -> None:
        """Read persisted run times; adopt mirrors on disk it does not name; register
        pinned repositories, due at once. A state file that cannot be read as one is set
        aside (renamed, for a person to look at) and the server starts with empty state."""
        try:
            text: bytes | None = self._path.read_bytes()
        except FileNotFoundError:
            text = None
        except OSError as exc:
            text = None
            log.error("cannot read %s: %s; starting with empty refresh state", self._path, exc)
        if text is not None:
            try:
                self.repos = parse_state(text, self._config)
            except ValueError as exc:
                aside = self._path.with_name(f"{self._path.name}.bad-{int(self._clock())}")
                with contextlib.suppress(OSError):
                    self._path.rename(aside)
                log.error(
                    "%s is not a refresh state (%s): set aside as %s; starting empty",
                    self._path,
                    exc,
                    aside.name,
                )
        now = self._clock()
        for repo, fetched in self._mirrors.on_disk().items():
            if repo not in self.repos:
                # A mirror the state file does not know (the file was lost): adopted as
                # last requested when it was last fetched, so that it is evicted once idle.
                self.repos[repo] = RepoState(
                    last_requested=fetched, next_run=now + self._interval(), last_maintenance=now
                )
        for repo in self.pinned:
            state = self.repos.setdefault(repo, RepoState(refs=["HEAD"], last_maintenance=now))
            if "HEAD" not in state.refs:
                state.refs.append("HEAD")
            if not (self._mirrors.mirror(repo).path / "HEAD").exists():
                state.next_run = now  # prewarm: clone at start-up

    def save(self) -> None:
        data = {"repos": {repo.name: asdict(state) for repo, state in self.repos.items()}}
        text = json.dumps(data, indent=1, sort_keys=True)
        if text == self._saved:
            return
        tmp = self._path.with_name(f".{self._path.name}.{uuid.uuid4().hex[:8]}.tmp")
        tmp.write_text(text, "utf-8")
        tmp.replace(self._path)
        self._saved = text

    def requested(self, repo: RepoRef, spec: RefSpec) -> None:
        """A client was served ``spec`` of ``repo``: keep it fresh from now on. A commit
        id's snapshot never changes, so there is nothing to refresh for it but the mirror."""
        now = self._clock()
        state = self.repos.get(repo)
        if state is None:
            # A fresh clone needs no maintenance: its first is an interval away.
            state = self.repos[repo] = RepoState(
                next_run=now + self._interval(), last_maintenance=now
            )
        state.last_requested = now
        if spec.sha is None and spec.label not in state.refs:
            state.refs.append(spec.label)

    def _interval(self, failures: int = 0) -> float:
        if failures:
            return float(min(self._cfg.backoff_max, self._cfg.interval * 2 ** (failures - 1)))
        return self._cfg.interval * self._rng.uniform(1 - JITTER, 1 + JITTER)

    def _active(self, repo: RepoRef, state: RepoState, now: float) -> bool:
        return repo in self.pinned or now - state.last_requested <= self._cfg.idle_after

    # --- jobs --------------------------------------------------------------------------

    def tick(self) -> None:
        """Start whatever is due, in the background: refreshes, mirror maintenance and
        evictions. Each runs as a job of its own (one per repository and kind at a time,
        at most ``refresh.concurrency`` at once), so one slow fetch or repack never holds
        up the others or the next tick."""
        now = self._clock()
        maintenance_interval = self._config.mirrors.maintenance_interval
        for repo, state in list(self.repos.items()):
            if repo not in self.pinned and now - state.last_requested > self._evict_after:
                self._start("evict", repo, functools.partial(self._evict, repo))
                continue
            if state.next_run <= now and self._active(repo, state, now):
                self._start("refresh", repo, functools.partial(self._refresh, repo))
            if now - state.last_maintenance > maintenance_interval:
                # The mirror's write lock orders it with a refresh of the same repository.
                state.last_maintenance = now
                self._start("maintain", repo, functools.partial(self._maintain, repo))
            if self._archive_due(repo, state, now):
                state.last_archive = now
                self._start("archive", repo, functools.partial(self._archive, repo))

    async def settle(self) -> None:
        """Until every job started so far has finished."""
        while self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)

    async def run_due(self) -> None:
        """Start what is due and wait for all of it (tests drive time this way)."""
        self.tick()
        await self.settle()
        await self._after_tick()

    async def _after_tick(self) -> None:
        await self._pinned_ages(self._clock())
        await run_blocking(self.save)

    def _start(self, kind: str, repo: RepoRef, work: Callable[[], Awaitable[None]]) -> None:
        key = (kind, repo)
        if self._jobs.running(key):
            return
        task = self._tasks.spawn(self._jobs.run(key, work), name=f"{kind}:{repo.name}")
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def refresh(self, repo: RepoRef) -> None:
        """Refresh one repository now (or join the refresh already running)."""
        now = self._clock()
        self.repos.setdefault(
            repo, RepoState(refs=["HEAD"], last_requested=now, last_maintenance=now)
        )
        await self._jobs.run(("refresh", repo), lambda: self._refresh(repo))

    def trigger(self, repo: RepoRef) -> None:
        """Refresh ``repo`` now, in the background (a webhook, an admin request)."""
        self._tasks.spawn(self.refresh(repo), name=f"refresh:{repo.name}")
        log.info("refresh of %s triggered", repo.name)

    def forget(self, repo: RepoRef) -> None:
        self.repos.pop(repo, None)

    async def _refresh(self, repo: RepoRef) -> None:
        state = self.repos[repo]
        async with self._slots:
            started = self._clock()
            try:
                await self._mirrors.ensure(repo, max_age=0)
                generated = 0
                # Replicas sharing a bucket: one of them makes and uploads the snapshots.
                lease_ttl = self._cfg.interval
                claimed = self._leases is None or await self._leases.claim(
                    "refresh", repo, lease_ttl, self._clock()
                )
                for ref in list(state.refs) if claimed else []:
                    try:
                        generated += await self._snapshots.prepare(repo, parse_label(ref))
                    except GitcacheError as exc:
                        if exc.status != 404:  # a deleted branch is no failure of the repo
                            raise
                        state.refs.remove(ref)
            except GitcacheError as exc:
                state.failures += 1
                state.last_result = f"error: {exc.message}"
                state.next_run = started + self._interval(state.failures)
                log.warning(
                    "refresh of %s failed (%d in a row): %s", repo.name, state.failures, exc.message
                )
                self._metrics.refresh_jobs.labels("failed").inc()
            else:
                state.failures = 0
                state.last_result = f"ok: {generated} new snapshots"
                self._metrics.refresh_jobs.labels("ok").inc()
                self._metrics.refresh_last_success.set(self._clock())
                state.next_run = started + self._interval()
            state.last_run = started

    async def _evict(self, repo: RepoRef) -> None:
        await self._mirrors.delete(self._mirrors.mirror(repo))
        self.repos.pop(repo, None)

    async def _maintain(self, repo: RepoRef) -> None:
        mirror = self._mirrors.mirror(repo)
        if (mirror.path / "HEAD").exists():
            async with self._slots:
                await self._upkeep.maintain(mirror)

    def _archive_due(self, repo: RepoRef, state: RepoState, now: float) -> bool:
        interval = self._config.mirrors.archive_interval
        if self._mirrors.archives is None or not interval or now - state.last_archive < interval:
            return False
        return (self._mirrors.mirror(repo).path / "HEAD").exists()

    async def _archive(self, repo: RepoRef) -> None:
        assert self._leases is not None
        interval = self._config.mirrors.archive_interval
        if not await self._leases.claim("archive", repo, interval, self._clock()):
            return
        async with self._slots:
            try:
                await self._mirrors.archive(repo)
            except Exception as exc:  # counted by the store; the next interval tries again
                log.warning("could not archive the mirror of %s: %s", repo.name, exc)

    async def _pinned_ages(self, now: float) -> None:
        """Per-repository labels only for pinned repositories: bounded cardinality."""
        for repo in self.pinned:
            entry = await self._snapshots.newest(repo, "HEAD")
            if entry is not None:
                self._metrics.pinned_snapshot_age.labels(repo.name).set(now - entry.fetched_at)

    async def run(self) -> None:
        """The background loop: a look every second at what is due."""
        while True:
            try:
                self.tick()
                await self._after_tick()
            except Exception:
                log.exception("refresh tick failed")
            await asyncio.sleep(TICK)


_FIELDS = {f.name: f.type for f in fields(RepoState)}


def parse_state(text: bytes, config: Config) -> dict[RepoRef, RepoState]:
    """The repositories of a state file; ValueError if it is not one. Repositories of
    hosts no longer configured are dropped, and so are commit ids among the refs (their
    snapshots never change: nothing to refresh)."""
    try:
        data = json.loads(text)
    except ValueError as exc:  # not UTF-8, or not JSON
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("repos"), dict):
        raise ValueError('expected {"repos": {"host/repository": {...}}}')
    repos: dict[RepoRef, RepoState] = {}
    for name, raw in data["repos"].items():
        host, _, path = str(name).partition("/")
        if host not in config.upstreams:
            continue
        try:
            repo = parse_repo(host, path, config.upstreams)
        except GitcacheError as exc:
            raise ValueError(f"{name!r}: {exc.message}") from None
        repos[repo] = _repo_state(str(name), raw)
    return repos


def _repo_state(name: str, raw: object) -> RepoState:
    if not isinstance(raw, dict):
        raise ValueError(f"{name!r}: expected an object")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        kind = _FIELDS.get(key)
        if kind is None:
            continue  # a field of another version: ignored
        if kind == "float" and isinstance(value, int | float) and not isinstance(value, bool):
            values[key] = float(value)
        elif kind == "int" and isinstance(value, int) and not isinstance(value, bool):
            values[key] = max(0, value)
        elif kind == "str" and isinstance(value, str):
            values[key] = value
        elif kind == "list[str]" and isinstance(value, list):
            values[key] = [_label(name, v) for v in value]
        else:
            raise ValueError(f"{name!r}.{key}: {value!r} is not a {kind}")
    values["refs"] = [ref for ref in values.get("refs", []) if ref is not None]
    return RepoState(**values)


def _label(name: str, value: object) -> str | None:
    """A ref label of a state file, checked as a request's would be; None for a commit id."""
    if isinstance(value, str):
        try:
            spec = parse_label(value)
        except GitcacheError:
            pass
        else:
            return None if spec.sha is not None else spec.label
    raise ValueError(f"{name!r}.refs: {value!r} is not a ref")


def _pinned(name: str, config: Config) -> RepoRef:
    host, path = name.split("/", 1)
    return parse_repo(host, path, config.upstreams)
