"""Readiness: false until start-up is done, false again from the moment shutdown begins."""

from __future__ import annotations

from aiohttp import web


class Health:
    def __init__(self) -> None:
        self.ready = False

    async def startup_done(self, app: web.Application) -> None:
        self.ready = True

    async def shutting_down(self, app: web.Application) -> None:
        self.ready = False
