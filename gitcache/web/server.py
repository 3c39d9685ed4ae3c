"""The HTTP server around the application: connection limits, a deadline for request
heads, JSON for the errors aiohttp answers itself, and a shutdown that keeps its timeout.

aiohttp's keep-alive timer also runs while a connection waits for its first request
head, and fires on a connection whose head is still incomplete: set to
``server.header_timeout``, it closes connections that send a head a byte at a time (and
idle keep-alive connections) after that long.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from gitcache import keys
from gitcache.web.errors import error_code, json_error

log = logging.getLogger(__name__)

_REFUSED = json.dumps(
    {"error": "too many connections: try again shortly", "code": "overloaded"}
).encode()
REFUSED_RESPONSE = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"Content-Type: application/json; charset=utf-8\r\n"
    b"Retry-After: 1\r\n"
    b"Connection: close\r\n"
    b"Content-Length: " + str(len(_REFUSED)).encode() + b"\r\n\r\n" + _REFUSED
)


@dataclass(frozen=True)
class Gate:
    """What every connection is held to."""

    max_connections: int
    on_refused: Callable[[], None]


class GatedRequestHandler(RequestHandler):
    """One connection: refused at once past ``max_connections``; its own errors (a
    malformed request line, headers too large) answered in JSON like every other error."""

    def __init__(self, manager: web.Server, gate: Gate, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._gate = gate

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        manager = self._manager
        if manager is not None and len(manager.connections) > self._gate.max_connections:
            assert isinstance(transport, asyncio.Transport)
            transport.write(REFUSED_RESPONSE)
            self._gate.on_refused()
            self.force_close()

    def handle_error(
        self,
        request: Any,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:
            raise ConnectionError("the response is under way: no error can be sent")
        if status >= 500:
            log.error("error handling a request from %s", request.remote, exc_info=exc)
            message = "internal error"
        else:
            log.info("bad request from %s: %s", request.remote, message)
        code = "bad_http_request" if status == 400 else error_code(status)
        response = json_error(status, message or HTTPStatus(status).phrase, code)
        response.force_close()
        return response


class GatedServer(web.Server):
    """aiohttp's connection factory, making :class:`GatedRequestHandler` connections."""

    gate: Gate

    def __call__(self) -> RequestHandler:
        return GatedRequestHandler(self, self.gate, loop=self._loop, **self._kwargs)


class GatedRunner(web.AppRunner):
    """An :class:`web.AppRunner` whose connections are gated (see the module)."""

    def __init__(
        self, app: web.Application, *, gate: Gate, header_timeout: float, **kwargs: Any
    ) -> None:
        super().__init__(app, keepalive_timeout=header_timeout, **kwargs)
        self._gate = gate

    async def _make_server(self) -> web.Server:
        # aiohttp builds its Server inside the application; it is made gated in place
        # (only its factory method differs), before it has made any connection.
        server = await super()._make_server()
        server.__class__ = GatedServer
        assert isinstance(server, GatedServer)
        server.gate = self._gate
        return server


async def shut_down(runner: web.AppRunner, timeout: float) -> None:
    """Stop listening, give running requests ``timeout`` seconds, cut whatever still runs,
    then close the application (which aborts generations and kills git children).

    aiohttp's own shutdown waits the timeout twice (once for handlers to finish, once more
    after asking them to stop); here each request is cancelled at the deadline."""
    for site in list(runner.sites):
        await site.stop()
    running = runner.app[keys.RUNNING]
    if running:
        await asyncio.wait(list(running), timeout=timeout)
    for task in list(running):
        task.cancel()
    if running:
        await asyncio.wait(list(running), timeout=1.0)
    await runner.cleanup()
