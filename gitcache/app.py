"""``create_app(config)``: the application and its resources, one cleanup context each."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from importlib import resources
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client.aiohttp import make_aiohttp_handler

from gitcache import keys
from gitcache.auth import Passthrough, Tokens
from gitcache.bucket.client import Bucket
from gitcache.bucket.leases import Leases
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
from gitcache.smart.service import PackService
from gitcache.snapshot.producer import Producer
from gitcache.snapshot.service import SnapshotService
from gitcache.tasks import TaskSet
from gitcache.web import admin, git
from gitcache.web.errors import error_middleware
from gitcache.web.git import GIT_ROUTE
from gitcache.web.hooks import hook
from gitcache.web.observe import observe_middleware
from gitcache.web.snapshot import snapshot, source

# [\s\S]: a newline in the path must reach the validator (and get its 400), not fall
# through to a 404 for want of a route.
SNAPSHOT_ROUTE = r"/git/{host}/{repo:[\s\S]+}/snapshot.tar.zst"
SOURCE_ROUTE = r"/git/{host}/{repo:[\s\S]+}/source.tar.zst"
SCRUB_LEASE = 86400.0  # a scrub claim when no interval is set (a pass run by hand)


async def healthz(request: web.Request) -> web.Response:
    """The process is alive."""
    return web.json_response({"status": "ok"})


async def client_py(request: web.Request) -> web.Response:
    """The restore client, for runners without gitcache installed:
    ``curl -sf http://gitcache:8080/client.py | python3 - clone REPOSITORY``."""
    source = resources.files("gitcache").joinpath("client.py").read_text("utf-8")
    return web.Response(text=source, content_type="text/x-python")


async def readyz(request: web.Request) -> web.Response:
    """Ready for traffic: 503 until start-up is done and from the moment shutdown begins."""
    if request.app[keys.HEALTH].ready:
        return web.json_response({"status": "ready"})
    return web.json_response({"status": "not ready"}, status=503)


async def _task_set(app: web.Application) -> AsyncIterator[None]:
    app[keys.TASKS] = TaskSet()
    yield
    # Generations and mirror updates belong to the app: abort them cleanly (their cleanup
    # removes spools and temp dirs and kills their git children).
    await app[keys.TASKS].close()


async def _bucket(app: web.Application) -> AsyncIterator[None]:
    """The shared bucket, with an S3 tier: the snapshot tier, mirror archives and leases
    all use it."""
    config = app[keys.CONFIG]
    bucket = None
    if config.cache.backend in ("s3", "tiered"):
        bucket = Bucket(config.cache.s3, app[keys.METRICS], config.server.paths.uploads)
        await bucket.open()
    app[keys.BUCKET] = bucket
    app[keys.LEASES] = Leases(bucket) if bucket is not None else None
    yield
    if bucket is not None:
        await bucket.close()


async def _cache(app: web.Application) -> AsyncIterator[None]:
    config, bucket = app[keys.CONFIG], app[keys.BUCKET]
    disk = None
    if config.cache.backend in ("disk", "tiered"):
        disk_config = config.cache.disk
        disk = DiskCache(config.server.paths.cache, disk_config.max_size, app[keys.METRICS])
    cache: Cache
    if bucket is None:
        assert disk is not None
        cache = disk
    elif disk is None:
        cache = S3Cache(bucket)
    else:
        cache = TieredCache(disk, S3Cache(bucket), app[keys.TASKS], config.server.paths.spool)
    await cache.start()
    app[keys.CACHE] = cache
    yield
    await cache.close()


async def _snapshots(app: web.Application) -> AsyncIterator[None]:
    config, clock = app[keys.CONFIG], app[keys.CLOCK]
    paths = config.server.paths
    archives, bucket = None, app[keys.BUCKET]
    if bucket is not None and config.mirrors.archive_interval:
        archives = MirrorArchives(bucket, paths.tmp, clock)
    mirrors = MirrorStore(config, app[keys.TASKS], app[keys.METRICS], clock, archives=archives)
    producer = Producer(config, app[keys.CACHE], app[keys.TASKS], app[keys.METRICS], clock)
    service = SnapshotService(mirrors, producer, clock)
    # What a gitcache killed outright left: its git processes first (they may still write),
    # then their lock files; clean_leftovers then empties spool/ and tmp/.
    await asyncio.to_thread(reap_orphans, paths.root)
    await asyncio.to_thread(clear_mirror_locks, mirrors.root)
    producer.clean_leftovers()
    app[keys.MIRRORS], app[keys.SNAPSHOTS] = mirrors, service
    app[keys.PACKS] = PackService(mirrors, producer, clock)
    yield


async def _scrubber(app: web.Application) -> AsyncIterator[None]:
    config, clock, leases = app[keys.CONFIG], app[keys.CLOCK], app[keys.LEASES]
    interval = config.cache.scrub_interval

    async def claim(repo: RepoRef) -> bool:
        assert leases is not None
        return await leases.claim("scrub", repo, interval or SCRUB_LEASE, clock())

    scrub = Scrubber(
        app[keys.CACHE],
        app[keys.METRICS],
        app[keys.TASKS],
        rate=config.cache.scrub_rate,
        claim=claim if leases is not None else None,
    )
    app[keys.SCRUBBER] = scrub
    async with _in_background(app, scrub.run(interval) if interval else None, "scrub-loop"):
        yield


async def _refresher(app: web.Application) -> AsyncIterator[None]:
    config = app[keys.CONFIG]
    upkeep = Upkeep(config, app[keys.MIRRORS], app[keys.METRICS])
    refresh = Refresher(
        config,
        app[keys.MIRRORS],
        app[keys.SNAPSHOTS],
        upkeep,
        app[keys.TASKS],
        app[keys.METRICS],
        app[keys.CLOCK],
        leases=app[keys.LEASES],
    )
    refresh.load()
    app[keys.REFRESHER] = refresh
    async with _in_background(app, refresh.run(), "refresh-loop"):
        yield
    refresh.save()


@contextlib.asynccontextmanager
async def _in_background(
    app: web.Application, loop: Coroutine[Any, Any, None] | None, name: str
) -> AsyncIterator[None]:
    """Run ``loop`` while the app runs (unless the app was made without background
    loops: tests drive them by hand), cancel it when the app closes."""
    if loop is not None and not app[keys.BACKGROUND]:
        loop.close()
        loop = None
    task = asyncio.create_task(loop, name=name) if loop is not None else None
    try:
        yield
    finally:
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


def create_app(
    config: Config, *, clock: Callable[[], float] = time.time, background: bool = True
) -> web.Application:
    """Build the application. Nothing starts until it runs: resources are opened by the
    cleanup contexts, in order, and closed in reverse. ``background=False`` leaves the
    refresh and scrub loops off (tests drive them by hand with an injected ``clock``)."""
    app = web.Application(middlewares=[observe_middleware, error_middleware])
    app[keys.CONFIG] = config
    app[keys.METRICS] = Metrics()
    tokens_file = config.auth.tokens_file
    app[keys.TOKENS] = Tokens.load(Path(tokens_file)) if tokens_file else None
    app[keys.PASSTHROUGH] = Passthrough(config, clock)
    app[keys.CLOCK] = clock
    app[keys.BACKGROUND] = background
    app[keys.RUNNING] = set()
    health = app[keys.HEALTH] = Health()
    app.cleanup_ctx.extend([_task_set, _bucket, _cache, _snapshots, _scrubber, _refresher])
    app.on_startup.append(health.startup_done)  # after every cleanup context has started
    app.on_shutdown.append(health.shutting_down)
    _add_routes(app)
    return app


def _add_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/client.py", client_py)
    # prometheus-client's own handler: OpenMetrics when asked for, gzip when accepted.
    app.router.add_get("/metrics", make_aiohttp_handler(app[keys.METRICS].registry))
    for path, handler in ((SNAPSHOT_ROUTE, snapshot), (SOURCE_ROUTE, source)):
        resource = app.router.add_get(path, handler).resource
        assert resource is not None
        for status in ("200", "500"):  # at 0 from the start, for the 5xx alert's rate()
            app[keys.METRICS].requests.labels(resource.canonical, "GET", status)
    app.router.add_get(GIT_ROUTE + "info/refs", git.info_refs)
    app.router.add_post(GIT_ROUTE + "git-upload-pack", git.upload_pack)
    app.router.add_post(GIT_ROUTE + "git-receive-pack", git.receive_pack)
    app.router.add_post("/hooks/{kind}", hook)
    admin.add_routes(app)
