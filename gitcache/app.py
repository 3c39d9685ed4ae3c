"""``create_app(config)``: the application and its resources, one cleanup context each."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from aiohttp import web
from prometheus_client.aiohttp import make_aiohttp_handler

from gitcache import keys
from gitcache.auth import Passthrough, Tokens
from gitcache.cache.base import Cache
from gitcache.cache.disk import DiskCache
from gitcache.cache.s3 import S3Cache
from gitcache.cache.scrub import Scrubber
from gitcache.cache.tiered import TieredCache
from gitcache.config import Config
from gitcache.health import Health
from gitcache.metrics import Metrics
from gitcache.mirror.archive import MirrorArchives
from gitcache.mirror.leftovers import clear_mirror_locks, reap_orphans
from gitcache.mirror.store import MirrorStore
from gitcache.mirror.upkeep import Upkeep
from gitcache.refresh import Refresher
from gitcache.repo import RepoRef
from gitcache.snapshot.service import SnapshotService
from gitcache.tasks import TaskSet
from gitcache.web import admin
from gitcache.web.errors import error_middleware
from gitcache.web.hooks import hook
from gitcache.web.observe import observe_middleware
from gitcache.web.snapshot import snapshot

# [\s\S]: a newline in the path must reach the validator (and get its 400), not fall
# through to a 404 for want of a route.
SNAPSHOT_ROUTE = r"/git/{host}/{repo:[\s\S]+}/snapshot.tar.zst"


async def healthz(request: web.Request) -> web.Response:
    """The process is alive."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready for traffic: 503 until start-up is done and from the moment shutdown begins."""
    if request.app[keys.HEALTH].ready:
        return web.json_response({"status": "ready"})
    return web.json_response({"status": "not ready"}, status=503)


def _shared_bucket(cache: Cache) -> S3Cache | None:
    """The S3 tier, when there is one: replicas coordinate through it."""
    if isinstance(cache, S3Cache):
        return cache
    if isinstance(cache, TieredCache):
        return cache.s3
    return None


def create_app(
    config: Config, *, clock: Callable[[], float] = time.time, background: bool = True
) -> web.Application:
    """Build the application. Nothing starts until it runs: resources are opened by the
    cleanup contexts, in order, and closed in reverse. ``background=False`` leaves the
    refresh loop off (tests drive it by hand with an injected ``clock``)."""
    app = web.Application(middlewares=[observe_middleware, error_middleware])
    app[keys.CONFIG] = config
    app[keys.METRICS] = Metrics()
    tokens_file = config.auth.tokens_file
    app[keys.TOKENS] = Tokens.load(Path(tokens_file)) if tokens_file else None
    app[keys.PASSTHROUGH] = Passthrough(config, clock)
    app[keys.CLOCK] = clock
    app[keys.RUNNING] = set()
    health = app[keys.HEALTH] = Health()
    state = config.server.state_dir

    async def task_set(app: web.Application) -> AsyncIterator[None]:
        app[keys.TASKS] = TaskSet()
        yield
        # Generations and mirror updates belong to the app: abort them cleanly (their
        # cleanup removes spools and temp dirs and kills their git children).
        await app[keys.TASKS].close()

    async def disk_cache(app: web.Application) -> AsyncIterator[None]:
        metrics = app[keys.METRICS]
        cache: Cache
        if config.cache.backend == "s3":
            cache = S3Cache(config.cache.s3, metrics, state / "uploads")
        else:
            cache = DiskCache(state / "cache", config.cache.disk.max_size, metrics)
            if config.cache.backend == "tiered":
                s3 = S3Cache(config.cache.s3, metrics, state / "uploads")
                cache = TieredCache(cache, s3, app[keys.TASKS], state / "spool")
        await cache.start()
        app[keys.CACHE] = cache
        yield
        await cache.close()

    async def snapshots(app: web.Application) -> AsyncIterator[None]:
        bucket = _shared_bucket(app[keys.CACHE])
        archives = None
        if bucket is not None and config.mirrors.archive_interval:
            archives = MirrorArchives(bucket, state / "tmp", clock)
        app[keys.MIRRORS] = MirrorStore(
            config, app[keys.TASKS], app[keys.METRICS], clock, archives=archives
        )
        service = SnapshotService(
            config, app[keys.MIRRORS], app[keys.CACHE], app[keys.TASKS], app[keys.METRICS], clock
        )
        # What a gitcache killed outright left: its git processes first (they may still
        # write), then their lock files; clean_leftovers then empties spool/ and tmp/.
        await asyncio.to_thread(reap_orphans, state)
        await asyncio.to_thread(clear_mirror_locks, app[keys.MIRRORS].root)
        service.clean_leftovers()
        app[keys.SNAPSHOTS] = service
        yield

    async def scrubber(app: web.Application) -> AsyncIterator[None]:
        bucket = _shared_bucket(app[keys.CACHE])
        owner = uuid.uuid4().hex
        interval = config.cache.scrub_interval

        async def claim(repo: RepoRef) -> bool:
            assert bucket is not None
            return await bucket.claim(repo, owner, interval or 86400.0, clock(), "scrub")

        scrub = Scrubber(
            app[keys.CACHE],
            app[keys.METRICS],
            app[keys.TASKS],
            rate=config.cache.scrub_rate,
            claim=claim if bucket is not None else None,
        )
        app[keys.SCRUBBER] = scrub
        loop = None
        if background and interval:
            loop = asyncio.create_task(scrub.run(interval), name="scrub-loop")
        yield
        if loop is not None:
            loop.cancel()
            await asyncio.gather(loop, return_exceptions=True)

    async def refresher(app: web.Application) -> AsyncIterator[None]:
        upkeep = Upkeep(config, app[keys.MIRRORS], app[keys.METRICS])
        refresh = Refresher(
            config,
            app[keys.MIRRORS],
            app[keys.SNAPSHOTS],
            upkeep,
            app[keys.TASKS],
            app[keys.METRICS],
            clock,
            leases=_shared_bucket(app[keys.CACHE]),
        )
        refresh.load()
        app[keys.REFRESHER] = refresh
        loop = asyncio.create_task(refresh.run(), name="refresh-loop") if background else None
        yield
        if loop is not None:
            loop.cancel()
            await asyncio.gather(loop, return_exceptions=True)
        refresh.save()

    app.cleanup_ctx.extend([task_set, disk_cache, snapshots, scrubber, refresher])
    app.on_startup.append(health.startup_done)  # after every cleanup context has started
    app.on_shutdown.append(health.shutting_down)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    # prometheus-client's own handler: OpenMetrics when asked for, gzip when accepted.
    app.router.add_get("/metrics", make_aiohttp_handler(app[keys.METRICS].registry))
    snapshots_route = app.router.add_get(SNAPSHOT_ROUTE, snapshot).resource
    assert snapshots_route is not None
    for status in ("200", "500"):  # at 0 from the start, for the 5xx alert's rate()
        app[keys.METRICS].requests.labels(snapshots_route.canonical, "GET", status)
    app.router.add_post("/hooks/{kind}", hook)
    admin.add_routes(app)
    return app
