"""Typed application keys: the resources ``create_app`` puts on the application."""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

from gitcache.cache.disk import DiskCache
from gitcache.config import Config
from gitcache.mirror.store import MirrorStore
from gitcache.refresh import Refresher
from gitcache.snapshot.service import SnapshotService
from gitcache.tasks import TaskSet

CONFIG = web.AppKey("config", Config)
TASKS = web.AppKey("tasks", TaskSet)
MIRRORS = web.AppKey("mirrors", MirrorStore)
CACHE = web.AppKey("cache", DiskCache)
SNAPSHOTS = web.AppKey("snapshots", SnapshotService)
REFRESHER = web.AppKey("refresher", Refresher)
CLOCK: web.AppKey[Callable[[], float]] = web.AppKey("clock")
