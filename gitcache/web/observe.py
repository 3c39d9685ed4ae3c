"""The outermost middleware: one log line and the request metrics for every request.

Handlers add what they know (snapshot source, commit, bytes sent) to
``request[keys.REQUEST_INFO]``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from gitcache import keys
from gitcache.log import FIELDS

log = logging.getLogger("gitcache.access")


def route_of(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def observe_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = request[keys.REQUEST_STARTED] = time.monotonic()
    info: dict[str, Any] = {}
    request[keys.REQUEST_INFO] = info
    status = "aborted"  # unless a response comes back: the stream was cut
    task = asyncio.current_task()
    running = request.app[keys.RUNNING]
    if task is not None:
        running.add(task)
    try:
        response = await handler(request)
        status = "aborted" if info.get("aborted") else str(response.status)
        return response
    finally:
        running.discard(task)
        elapsed = time.monotonic() - started
        metrics = request.app[keys.METRICS]
        route = route_of(request)
        metrics.requests.labels(route, request.method, status).inc()
        metrics.request_duration.labels(route).observe(elapsed)
        # The path is logged without its query: no token or secret ever rides in it, but
        # a client may put one there by mistake.
        fields = {
            "method": request.method,
            "path": request.path,
            "status": status,
            "source": info.get("source", "-"),
            "bytes": info.get("bytes", 0),
            "duration": round(elapsed, 3),
            "commit": info.get("commit", "-"),
        }
        # The text line reads as ever; JSON logs carry the fields as keys of their own.
        log.info(
            "%(method)s %(path)s %(status)s source=%(source)s bytes=%(bytes)s "
            "duration=%(duration).3f commit=%(commit)s",
            fields,
            extra={FIELDS: fields},
        )
