"""Bare mirrors under ``<state>/mirrors/<host>/<repo>.git``.

A mirror is cloned once (into a temporary directory, then renamed into place, so a killed
clone leaves nothing half-made) and fetched when it is older than the freshness window.
Concurrent requests for one repository share one clone or fetch. Only branches and tags
are mirrored: ``refs/pull/*`` and the like would bloat every snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from gitcache.config import Config
from gitcache.errors import (
    GitError,
    GitTimeout,
    NotFound,
    StorageFull,
    UpstreamError,
    UpstreamTimeout,
)
from gitcache.metrics import Metrics
from gitcache.mirror.addresses import upstream_env
from gitcache.mirror.archive import MirrorArchives
from gitcache.mirror.credentials import ConfigEntries, credential_config, credential_secrets
from gitcache.mirror.mirror import Mirror
from gitcache.mirror.refs import RefState, read_ref_state
from gitcache.mirror.runner import run_git
from gitcache.repo import RepoRef
from gitcache.tasks import Coalescer, TaskSet

log = logging.getLogger(__name__)

FETCH_STAMP = "gitcache-fetched"
LS_REMOTE_PATTERNS = ("HEAD", "refs/heads/*", "refs/tags/*")
REFSPECS = ("+refs/heads/*:refs/heads/*", "+refs/tags/*:refs/tags/*")
# Mirrors are maintained by gitcache itself; git must not start a detached gc or
# maintenance child that would outlive the fetch and repack under a running generation.
MIRROR_CONFIG = {
    "gc.auto": "0",
    "maintenance.auto": "false",
    "fetch.writeCommitGraph": "false",
    "core.logAllRefUpdates": "false",
}

_NOT_FOUND_HINTS = (
    "not found",
    "does not appear to be a git repository",
    "could not read username",
    "authentication failed",
    "terminal prompts disabled",
    "returned error: 401",
    "returned error: 403",
    "returned error: 404",
)


_DISK_FULL_HINTS = ("no space left on device", "disk quota exceeded")

_CORRUPT_HINTS = (
    "corrupt",
    "bad object",
    "missing object",
    "loose object",
    "packfile",
    "inflate",
    "did not send all necessary objects",
)


def upstream_failure(repo: RepoRef, exc: GitError) -> Exception:
    """Map a failed clone/fetch/ls-remote into what the client should be told: a local
    fault (a full disk while index-pack writes) is ours, not the upstream's."""
    if isinstance(exc, GitTimeout):
        return UpstreamTimeout(f"the upstream of {repo.name} did not answer in time")
    text = exc.stderr.lower()
    if any(hint in text for hint in _DISK_FULL_HINTS):
        return StorageFull(f"no space left on gitcache's disk while fetching {repo.name}")
    if any(hint in text for hint in _NOT_FOUND_HINTS):
        return NotFound(f"repository {repo.name} not found upstream", code="repo_not_found")
    last = exc.stderr.splitlines()[-1] if exc.stderr else str(exc)
    return UpstreamError(f"the upstream of {repo.name} failed: {last}")


class MirrorStore:
    def __init__(
        self,
        config: Config,
        tasks: TaskSet,
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
        archives: MirrorArchives | None = None,
    ) -> None:
        """``archives``: the shared bucket's mirror archives, to restore a missing mirror
        from before cloning it."""
        self._config = config
        self._metrics = metrics
        self.archives = archives
        self.root = config.server.paths.mirrors
        self.tmp = config.server.paths.tmp
        self._clock = clock
        self._mirrors: dict[RepoRef, Mirror] = {}
        self._updates: Coalescer[Mirror] = Coalescer(tasks)

    def mirror(self, repo: RepoRef) -> Mirror:
        """The in-memory handle of a repository's mirror (it may not exist on disk yet)."""
        mirror = self._mirrors.get(repo)
        if mirror is None:
            path = self.root / repo.host / f"{repo.slug}.git"
            upstream = self._config.upstreams[repo.host]
            url = upstream.url_for(repo.path)
            config: ConfigEntries = ()
            secrets: dict[str, str] = {}
            if upstream.token:
                config = credential_config(url)
                secrets = credential_secrets(upstream.username, upstream.token)
            trees = self._config.server.paths.trees / repo.host / repo.slug
            mirror = Mirror(repo, path, url, config, secrets, upstream.allow_private, trees)
            self._mirrors[repo] = mirror
            stamp = path / FETCH_STAMP
            if stamp.exists():
                mirror.fetched_at = stamp.stat().st_mtime
        return mirror

    @staticmethod
    async def _upstream_env(mirror: Mirror) -> dict[str, str]:
        return await upstream_env(
            mirror.url, mirror.config, mirror.secrets, allow_private=mirror.allow_private
        )

    def known(self) -> list[Mirror]:
        return list(self._mirrors.values())

    def on_disk(self) -> dict[RepoRef, float]:
        """Every mirror on disk of a configured upstream, with when it was last fetched."""
        found: dict[RepoRef, float] = {}
        for host in self._config.upstreams:
            for path in (self.root / host).glob("*.git"):
                stamp = path / FETCH_STAMP
                with contextlib.suppress(OSError):
                    fetched = (stamp if stamp.exists() else path).stat().st_mtime
                    found[RepoRef.from_slug(host, path.name.removesuffix(".git"))] = fetched
        return found

    async def ensure(self, repo: RepoRef, max_age: float | None = None) -> Mirror:
        """Return the mirror with its refs loaded, cloning it if missing and fetching it if
        its last fetch is older than ``max_age`` (default: the configured window)."""
        mirror = self.mirror(repo)
        window = self._config.mirrors.fetch_interval if max_age is None else max_age
        asked, waited = self._clock(), time.monotonic()
        updated = False
        try:
            for attempt in range(2):
                if mirror.refs is not None and self._clock() - mirror.fetched_at < window:
                    break
                updated = True
                await self._updates.run(repo, lambda: self._update(mirror, window))
                # The update joined may have been started for a wider window (only loading
                # refs, say): one more, which this caller's window then decides.
                if mirror.fetched_at >= asked or attempt:
                    break
        finally:
            if updated:
                self._metrics.upstream_wait.observe(time.monotonic() - waited)
        return mirror

    async def _update(self, mirror: Mirror, window: float) -> Mirror:
        if not (mirror.path / "HEAD").exists():
            await self._clone(mirror)
        elif self._clock() - mirror.fetched_at >= window:
            async with self._operation("fetch", mirror):
                await self._fetch(mirror)
        else:  # fresh on disk, first use since start-up
            mirror.refs = await asyncio.to_thread(read_ref_state, mirror.path)
        return mirror

    async def _clone(self, mirror: Mirror) -> None:
        started = time.monotonic()
        restored = await self._restore_into_tmp(mirror)
        if restored:
            tmp, refs = restored
        else:
            async with self._operation("clone", mirror):
                tmp, refs = await self._clone_into_tmp(mirror)
        try:
            mirror.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.rename(mirror.path)
        finally:
            await self._remove(tmp)
        mirror.refs, mirror.fetched_at = refs, self._clock()
        how = "restored from its archive and fetched" if restored else "cloned"
        log.info("%s %s in %.2fs", how, mirror.repo.name, time.monotonic() - started)

    async def _restore_into_tmp(self, mirror: Mirror) -> tuple[Path, RefState] | None:
        """Unpack the bucket's archive of the mirror into a new directory under ``tmp``
        and bring it up to date from the upstream; None (and nothing left behind) when
        there is no archive or any step fails: then the caller clones."""
        if self.archives is None:
            return None
        tmp = self.tmp / f"restore-{uuid.uuid4().hex}"
        try:
            archive = await self.archives.newest(mirror.repo)
            if archive is None:
                return None
            self.tmp.mkdir(parents=True, exist_ok=True)
            async with self._operation("restore", mirror):
                await self.archives.restore(mirror.repo, archive, tmp)
                # The archive's bytes were checked; that every object its refs reach is
                # there and readable is checked here, before anything is built from it.
                await run_git(
                    ["-C", str(tmp), "fsck", "--connectivity-only", "--no-progress"],
                    timeout=self._config.mirrors.clone_timeout,
                )
                await self._configure(tmp, mirror.url)
                known = await asyncio.to_thread(read_ref_state, tmp)
                refs = await self._sync(mirror, tmp, known, contextlib.nullcontext)
                (tmp / FETCH_STAMP).touch()
        except Exception as exc:
            # Whatever went wrong (the archive, the bucket, the fetch), a clone still can.
            log.warning("could not restore %s from its archive, cloning: %s", mirror.repo.name, exc)
            await self._remove(tmp)
            return None
        return tmp, refs or known

    @contextlib.asynccontextmanager
    async def _operation(self, operation: str, mirror: Mirror) -> AsyncIterator[None]:
        """Count and time a mirror operation."""
        started = time.monotonic()
        result = "failed"
        try:
            yield
            result = "ok"
        finally:
            self._metrics.mirror_operations.labels(operation, result).inc()
            self._metrics.mirror_duration.labels(operation).observe(time.monotonic() - started)

    async def archive(self, repo: RepoRef) -> bool:
        """Archive the mirror in the shared bucket (if its refs moved since the last
        archive); whether one was uploaded."""
        assert self.archives is not None
        mirror = await self.ensure(repo, max_age=float("inf"))  # as it is: no fetch for this
        async with self._operation("archive", mirror):
            uploaded = await self.archives.save(mirror)
        if uploaded:
            log.info("archived the mirror of %s in the bucket", repo.name)
        return uploaded

    async def rebuild(self, mirror: Mirror) -> None:
        """Re-clone a damaged mirror beside it and swap it in; until the swap, requests
        keep being served from the cache and the old mirror."""
        log.warning("rebuilding the mirror of %s", mirror.repo.name)
        async with self._operation("rebuild", mirror):
            await self._rebuild(mirror)

    async def _rebuild(self, mirror: Mirror) -> None:
        tmp, refs = await self._clone_into_tmp(mirror)
        trash = self.tmp / f"trash-{uuid.uuid4().hex}"
        try:
            async with mirror.lock.write():
                if mirror.path.exists():
                    mirror.path.rename(trash)
                tmp.rename(mirror.path)
                mirror.refs, mirror.fetched_at = refs, self._clock()
        finally:
            await self._remove(tmp)
            await self._remove(trash)

    async def delete(self, mirror: Mirror) -> None:
        """Remove a mirror (idle too long); a generation reading it finishes first."""
        trash = self.tmp / f"trash-{uuid.uuid4().hex}"
        async with mirror.lock.write():
            self.tmp.mkdir(parents=True, exist_ok=True)
            if mirror.path.exists():
                mirror.path.rename(trash)
            mirror.refs, mirror.fetched_at = None, 0.0
            # What was derived from it goes with it.
            await self._remove(mirror.trees)
        await self._remove(trash)
        log.info("deleted the idle mirror of %s", mirror.repo.name)

    async def _clone_into_tmp(self, mirror: Mirror) -> tuple[Path, RefState]:
        """Clone into a new directory under ``tmp``; it is removed again on failure."""
        cfg = self._config.mirrors
        self.tmp.mkdir(parents=True, exist_ok=True)
        tmp = self.tmp / f"clone-{uuid.uuid4().hex}"
        log.info("cloning %s", mirror.repo.name)
        try:
            config_args = [a for k, v in MIRROR_CONFIG.items() for a in ("-c", f"{k}={v}")]
            try:
                await run_git(
                    ["clone", "--bare", "--quiet", *config_args, "--", mirror.url, str(tmp)],
                    timeout=cfg.clone_timeout,
                    env=await self._upstream_env(mirror),
                )
            except GitError as exc:
                raise upstream_failure(mirror.repo, exc) from exc
            await self._configure(tmp, mirror.url)
            await self._pack_refs(tmp)
            refs = await asyncio.to_thread(read_ref_state, tmp)
            self._metrics.upstream_bytes.inc(await asyncio.to_thread(objects_size, tmp))
            (tmp / FETCH_STAMP).touch()
        except BaseException:
            await self._remove(tmp)
            raise
        return tmp, refs

    @staticmethod
    async def _remove(path: Path) -> None:
        await asyncio.to_thread(shutil.rmtree, path, True)

    async def _fetch(self, mirror: Mirror) -> None:
        started = time.monotonic()
        try:
            refs = await self._sync(mirror, mirror.path, mirror.refs, mirror.lock.write)
            if refs is not None:
                mirror.refs = refs
        except GitError as exc:
            if not _corrupt(exc):
                raise upstream_failure(mirror.repo, exc) from exc
            await self.rebuild(mirror)
        (mirror.path / FETCH_STAMP).touch()
        mirror.fetched_at = self._clock()
        log.info("fetched %s in %.2fs", mirror.repo.name, time.monotonic() - started)

    async def _sync(
        self,
        mirror: Mirror,
        git_dir: Path,
        known: RefState | None,
        lock: Callable[[], contextlib.AbstractAsyncContextManager[object]],
    ) -> RefState | None:
        """Bring the mirror at ``git_dir`` up to the upstream: its new refs, or None when
        they still equal ``known``. ``lock`` guards the fetch itself."""
        cfg = self._config.mirrors
        path = str(git_dir)
        # One small round trip first: most refreshes find nothing new, and then no
        # fetch negotiation, lock or ref rewrite is needed at all.
        env = await self._upstream_env(mirror)
        listing = await run_git(
            ["-C", path, "ls-remote", "--symref", "origin", *LS_REMOTE_PATTERNS],
            timeout=cfg.git_timeout,
            env=env,
        )
        head, advertised = parse_ls_remote(listing)
        if known is not None and (head, advertised) == (known.head, known.refs):
            return None
        async with lock():
            # What the upstream sent is what the object store grew by; measured only when
            # there is a fetch, not on every no-change refresh.
            before = await asyncio.to_thread(objects_size, git_dir)
            await run_git(
                ["-C", path, "fetch", "--prune", "--quiet", "origin"],
                timeout=cfg.fetch_timeout,
                env=env,
            )
            grown = await asyncio.to_thread(objects_size, git_dir) - before
            self._metrics.upstream_bytes.inc(max(0, grown))
            if head is not None:  # fetch does not follow a new default branch
                await run_git(["-C", path, "symbolic-ref", "HEAD", head], timeout=cfg.git_timeout)
            await self._pack_refs(git_dir)
            return await asyncio.to_thread(read_ref_state, git_dir)

    async def _configure(self, git_dir: Path, url: str) -> None:
        """The mirror's config, whoever made it (a clone, another replica's archive)."""
        timeout = self._config.mirrors.git_timeout
        base = ["-C", str(git_dir), "config"]
        for key, value in {"remote.origin.url": url, **MIRROR_CONFIG}.items():
            await run_git([*base, key, value], timeout=timeout)
        await run_git([*base, "--replace-all", "remote.origin.fetch", REFSPECS[0]], timeout=timeout)
        await run_git([*base, "--add", "remote.origin.fetch", REFSPECS[1]], timeout=timeout)
        # archive must give the tree a checkout gives: no export-ignore, no export-subst.
        (git_dir / "info").mkdir(exist_ok=True)
        (git_dir / "info" / "attributes").write_text("* -export-ignore -export-subst\n")

    async def _pack_refs(self, git_dir: Path) -> None:
        await run_git(
            ["-C", str(git_dir), "pack-refs", "--all", "--prune"],
            timeout=self._config.mirrors.git_timeout,
        )


def objects_size(git_dir: Path) -> int:
    """Bytes in a mirror's object store (0 if there is none)."""
    total = 0
    for path in (git_dir / "objects").rglob("*"):
        with contextlib.suppress(OSError):
            if path.is_file():
                total += path.stat().st_size
    return total


def _corrupt(exc: GitError) -> bool:
    """Does a failed fetch say the mirror itself is damaged (not the upstream)?"""
    text = exc.stderr.lower()
    if any(hint in text for hint in _DISK_FULL_HINTS):
        return False  # a rebuild would only fill the disk again
    return any(hint in text for hint in _CORRUPT_HINTS)


def parse_ls_remote(listing: bytes) -> tuple[str | None, dict[str, str]]:
    """``git ls-remote --symref`` output → (HEAD's target branch, {ref: sha}) for branches
    and tags; peeled ``^{}`` lines are left out, as in :class:`RefState`'s ``refs``."""
    head: str | None = None
    refs: dict[str, str] = {}
    for line in listing.decode("utf-8", "replace").splitlines():
        value, _, name = line.partition("\t")
        if value.startswith("ref: ") and name == "HEAD":
            target = value.removeprefix("ref: ")
            if target.startswith("refs/heads/") and ".." not in target:
                head = target
        elif name.startswith(("refs/heads/", "refs/tags/")) and not name.endswith("^{}"):
            refs[name] = value
    return head, refs
