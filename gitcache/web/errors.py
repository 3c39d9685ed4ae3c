"""One boundary where every error becomes a JSON body: ``{"error": …, "code": …}``."""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.typedefs import Handler

from gitcache.errors import GitcacheError, Overloaded, RangeNotSatisfiable, Unauthorized

log = logging.getLogger(__name__)


def json_error(status: int, message: str, code: str) -> web.Response:
    return web.json_response({"error": message, "code": code}, status=status)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except GitcacheError as exc:
        if exc.status >= 500:
            log.error("%s %s: %s", request.method, request.path, exc.message)
        response = json_error(exc.status, exc.message, exc.code)
        if isinstance(exc, RangeNotSatisfiable):
            response.headers["Content-Range"] = f"bytes */{exc.size}"
        if isinstance(exc, Unauthorized):
            response.headers["WWW-Authenticate"] = exc.challenge
        if isinstance(exc, Overloaded):
            response.headers["Retry-After"] = str(exc.retry_after)
        return response
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = exc.reason.lower().replace(" ", "_")
        return json_error(exc.status, exc.reason, code)
    except ConnectionError:
        raise  # the client is gone: nobody to answer
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        return json_error(500, "internal error", "internal_error")
