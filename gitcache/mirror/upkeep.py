"""Mirror maintenance: repack, commit-graph, stale lock files, and integrity.

Runs under the mirror's write lock, so no fetch changes the mirror meanwhile and no
generation is pinning its files (generations hold the read lock only while hard-linking,
so a repack never removes a file a snapshot is being built from). A mirror that fails
``git fsck --connectivity-only`` is re-cloned beside it and swapped in.
"""

from __future__ import annotations

import logging
import time

from gitcache.config import Config
from gitcache.errors import GitError
from gitcache.metrics import Metrics
from gitcache.mirror.leftovers import remove_stale_locks
from gitcache.mirror.mirror import Mirror
from gitcache.mirror.runner import run_git
from gitcache.mirror.store import MirrorStore

log = logging.getLogger(__name__)

# Bounded in memory and CPU: the delta search is what costs, and it is capped per thread.
REPACK_CONFIG = (
    "-c",
    "pack.windowMemory=256m",
    "-c",
    "pack.threads=1",
    "-c",
    "pack.deltaCacheSize=64m",
)


class Upkeep:
    def __init__(self, config: Config, mirrors: MirrorStore, metrics: Metrics) -> None:
        self._config = config
        self._mirrors = mirrors
        self._metrics = metrics

    async def maintain(self, mirror: Mirror) -> None:
        git_dir = str(mirror.path)
        timeout = self._config.mirrors.fetch_timeout
        started = time.monotonic()
        try:
            async with mirror.lock.write():
                for path in remove_stale_locks(mirror.path):
                    log.warning("removed stale lock file %s", path)
                await run_git(
                    [
                        "-C",
                        git_dir,
                        *REPACK_CONFIG,
                        "repack",
                        "-d",
                        "-q",
                        "--geometric=2",
                        "--write-midx",
                        "--write-bitmap-index",
                    ],
                    timeout=timeout,
                )
                await run_git(
                    [
                        "-C",
                        git_dir,
                        "commit-graph",
                        "write",
                        "--reachable",
                        "--split",
                        "--no-progress",
                    ],
                    timeout=timeout,
                )
            self._metrics.mirror_operations.labels("repack", "ok").inc()
        except GitError as exc:
            self._metrics.mirror_operations.labels("repack", "failed").inc()
            log.warning("maintenance of %s failed: %s", mirror.repo.name, exc.message)
        self._metrics.mirror_duration.labels("repack").observe(time.monotonic() - started)
        healthy = await self.healthy(mirror)
        self._metrics.mirror_operations.labels("fsck", "ok" if healthy else "failed").inc()
        if not healthy:
            await self._mirrors.rebuild(mirror)
        log.info("maintained %s in %.2fs", mirror.repo.name, time.monotonic() - started)

    async def healthy(self, mirror: Mirror) -> bool:
        try:
            async with mirror.lock.read():
                await run_git(
                    ["-C", str(mirror.path), "fsck", "--connectivity-only", "--no-progress"],
                    timeout=self._config.mirrors.fetch_timeout,
                )
        except GitError as exc:
            log.error("mirror of %s is damaged: %s", mirror.repo.name, exc.message)
            return False
        return True
