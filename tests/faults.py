"""Fault injection for tests: an S3 proxy that cuts object downloads part-way."""

from __future__ import annotations

from typing import Any

import aiohttp
from aiohttp import web


class CuttingProxy:
    """A reverse proxy in front of the S3 test server. While ``cut_after`` is set, a GET of
    a snapshot object sends that many body bytes and then drops the connection, as an S3
    endpoint or a network path failing mid-object does; everything else passes through."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.cut_after: int | None = None
        self.cuts = 0
        self.port = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1024**3)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() != "host"}
        async with (
            aiohttp.ClientSession(auto_decompress=False) as session,
            session.request(
                request.method,
                self.target + request.path_qs,
                headers=headers,
                data=body,
                allow_redirects=False,
            ) as upstream,
        ):
            response = web.StreamResponse(status=upstream.status, headers=_passed(upstream))
            await response.prepare(request)
            cut = self.cut_after
            cutting = request.method == "GET" and request.path.endswith(".tar.zst") and cut
            sent = 0
            async for chunk in upstream.content.iter_chunked(64 * 1024):
                if cutting and sent + len(chunk) >= cut:
                    await response.write(chunk[: cut - sent])
                    self.cuts += 1
                    assert request.transport is not None
                    request.transport.abort()
                    return response
                await response.write(chunk)
                sent += len(chunk)
            await response.write_eof()
            return response


def _passed(upstream: Any) -> dict[str, str]:
    skip = {"transfer-encoding", "connection", "content-encoding"}
    return {k: v for k, v in upstream.headers.items() if k.lower() not in skip}
