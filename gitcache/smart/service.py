"""``git upload-pack`` against the mirrors: the ref advertisement, and the answers to
upload-pack requests, shared and cached when they end in a pack (see ``request``)."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from pathlib import Path

from gitcache.config import Config
from gitcache.errors import GitError, Overloaded
from gitcache.metrics import Metrics
from gitcache.mirror.mirror import Mirror
from gitcache.mirror.runner import git_env, run_git, stream_git
from gitcache.mirror.store import MirrorStore
from gitcache.repo import RepoRef
from gitcache.smart.request import UploadRequest
from gitcache.snapshot.frames import Stored, Verbatim
from gitcache.snapshot.generation import SpoolReader
from gitcache.snapshot.producer import Producer
from gitcache.snapshot.service import Hit
from gitcache.snapshot.source import Source

log = logging.getLogger(__name__)

LABEL = "upload-pack"  # the cache label of every pack response of a repository
# What the mirror's upload-pack allows, as the big forges do: shallow and partial clones,
# and a lazy fetch of any object by id. Not refs in wants: with them, git 2.39's client
# fails a shallow clone (its server sends wanted-refs before shallow-info).
UPLOAD_PACK = [
    *("-c", "uploadpack.allowFilter=true"),
    *("-c", "uploadpack.allowAnySHA1InWant=true"),
    "upload-pack",
    "--stateless-rpc",
]


def _env(version: int) -> dict[str, str]:
    return git_env({"GIT_PROTOCOL": f"version={version}"} if version else None, hermetic=True)


async def upload_pack(
    mirror: Mirror, request: bytes, version: int, timeout: float
) -> AsyncGenerator[bytes, None]:
    args = [*UPLOAD_PACK, str(mirror.path)]
    async for chunk in stream_git(args, input=request, timeout=timeout, env=_env(version)):
        yield chunk


@dataclass
class PackJob:
    """One upload-pack response, as a generation's job: shared by every client that
    sends the same request while it runs, then cached under its key."""

    mirror: Mirror
    request: UploadRequest
    body: bytes
    timeout: float
    keep: int
    kind: str = "pack"
    label: str = LABEL

    @property
    def commit(self) -> str:
        return self.request.wants[0]

    async def chunks(self, work: Path) -> AsyncGenerator[bytes | Stored | Verbatim, None]:
        async for chunk in upload_pack(self.mirror, self.body, self.request.version, self.timeout):
            yield Verbatim(chunk)


@dataclass
class Answer:
    """How an upload-pack request is answered: ``hit`` (a cached response), ``spool``
    (a generation's, being written), or ``direct`` (from the mirror, not shared)."""

    source: str
    hit: Hit | None = None
    spool: SpoolReader | None = None
    direct: AsyncGenerator[bytes, None] | None = None


class PackService:
    def __init__(
        self,
        mirrors: MirrorStore,
        producer: Producer,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._mirrors = mirrors
        self._producer = producer
        self._config: Config = producer.config
        self._metrics: Metrics = producer.metrics
        self._cache = producer.cache
        self._clock = clock
        self._direct = 0  # upload-pack runs answering one client each, now

    def _window(self, lists_refs: bool) -> float:
        """How fresh the mirror must be for a request: checked against the upstream within
        ``mirrors.fetch_interval`` where refs are listed (v0's ``info/refs``, v2's
        ``ls-refs``); any age for the rest of a clone or fetch, which wants what that
        listing showed (or fetches the mirror if it lacks it)."""
        return self._config.mirrors.fetch_interval if lists_refs else math.inf

    async def advertise(self, repo: RepoRef, version: int) -> bytes:
        """The mirror's refs (v0) or capabilities (v2), as ``info/refs`` sends them."""
        mirror = await self._mirrors.ensure(repo, self._window(version < 2))
        return await run_git(
            [*UPLOAD_PACK, "--advertise-refs", str(mirror.path)],
            timeout=self._config.mirrors.git_timeout,
            env=_env(version),
        )

    async def answer(self, repo: RepoRef, request: UploadRequest, body: bytes) -> Answer:
        asked = self._clock()
        mirror = await self._mirrors.ensure(repo, self._window(request.command == "ls-refs"))
        if request.wants and mirror.fetched_at <= asked and await self._lacks(mirror, request):
            # A commit pushed after the mirror's last fetch: fetch once, then answer;
            # if the upstream lacks it too, git says so as it would.
            mirror = await self._mirrors.ensure(repo, 0)
        timeout = self._config.mirrors.clone_timeout
        if not request.shareable:
            return Answer(Source.MIRROR, direct=self._direct_run(mirror, request, body, timeout))
        assert mirror.refs is not None
        key = request.key(mirror.refs.digest)
        running = self._producer.running
        if (generation := running.get((repo, key))) is None:
            entry = await self._cache.get(repo, key)
            if entry is not None and (reader := await self._cache.open(repo, entry)) is not None:
                return Answer(Source.HIT, hit=Hit(reader))
        # Looked up again: a generation may have started while the cache was read.
        if (generation := running.get((repo, key))) is not None:
            return Answer(Source.FOLLOWER, spool=self._producer.reader(generation))
        job = PackJob(mirror, request, body, timeout, self._config.cache.keep_packs)
        generation = self._producer.start(repo, key, job)
        return Answer(Source.MISS, spool=self._producer.reader(generation))

    async def _lacks(self, mirror: Mirror, request: UploadRequest) -> bool:
        """Whether the mirror lacks an object ``request`` wants by id."""
        listed = await run_git(
            ["--git-dir", str(mirror.path), "cat-file", "--batch-check=%(objectname)"],
            timeout=self._config.mirrors.git_timeout,
            env=git_env(hermetic=True),
            input="".join(f"{oid}\n" for oid in request.wants).encode(),
        )
        return b" missing" in listed

    def _direct_run(
        self, mirror: Mirror, request: UploadRequest, body: bytes, timeout: float
    ) -> AsyncGenerator[bytes, None]:
        """Negotiation rounds and listings, answered by the mirror for one client: as many
        at once as there may be generations."""
        if self._direct >= self._config.server.max_git_requests:
            self._metrics.overloaded.labels("max_git_requests").inc()
            raise Overloaded("too many git requests are being answered")

        async def run() -> AsyncGenerator[bytes, None]:
            self._direct += 1
            try:
                async for chunk in upload_pack(mirror, body, request.version, timeout):
                    yield chunk
            except GitError as exc:
                log.warning("upload-pack for %s failed: %s", mirror.repo.name, exc.message)
                raise
            finally:
                self._direct -= 1

        return run()
