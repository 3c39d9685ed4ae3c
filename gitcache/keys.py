"""Typed application keys: the resources ``create_app`` puts on the application."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from aiohttp import web

from gitcache.auth import Passthrough, Tokens
from gitcache.bucket.client import Bucket
from gitcache.bucket.leases import Leases
from gitcache.cache.base import Cache
from gitcache.cache.scrub import Scrubber
from gitcache.config import Config
from gitcache.health import Health
from gitcache.metrics import Metrics
from gitcache.mirror.store import MirrorStore
from gitcache.refresh import Refresher
from gitcache.smart.service import PackService
from gitcache.snapshot.service import SnapshotService
from gitcache.tasks import TaskSet

CONFIG = web.AppKey("config", Config)
HEALTH = web.AppKey("health", Health)
TOKENS: web.AppKey[Tokens | None] = web.AppKey("tokens")
PASSTHROUGH = web.AppKey("passthrough", Passthrough)
METRICS = web.AppKey("metrics", Metrics)
TASKS = web.AppKey("tasks", TaskSet)
MIRRORS = web.AppKey("mirrors", MirrorStore)
CACHE: web.AppKey[Cache] = web.AppKey("cache")
BUCKET: web.AppKey[Bucket | None] = web.AppKey("bucket")
LEASES: web.AppKey[Leases | None] = web.AppKey("leases")
BACKGROUND = web.AppKey("background", bool)  # whether periodic loops run by themselves
SNAPSHOTS = web.AppKey("snapshots", SnapshotService)
PACKS = web.AppKey("packs", PackService)
REFRESHER = web.AppKey("refresher", Refresher)
SCRUBBER = web.AppKey("scrubber", Scrubber)
CLOCK: web.AppKey[Callable[[], float]] = web.AppKey("clock")
# The tasks of the requests being handled now: shutdown cuts what is left at its deadline.
RUNNING: web.AppKey[set[asyncio.Task[Any]]] = web.AppKey("running")

# Per request: what the handler learned (source, commit, bytes) for the log line and
# metrics, and when the request arrived (for the duration and the time to first byte).
REQUEST_INFO: web.RequestKey[dict[str, Any]] = web.RequestKey("info")
REQUEST_STARTED = web.RequestKey("started", float)
