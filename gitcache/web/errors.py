"""One boundary where every error becomes a JSON body: ``{"error": …, "code": …}``."""

from __future__ import annotations

import logging
from http import HTTPStatus

from aiohttp import web
from aiohttp.typedefs import Handler

from gitcache.errors import GitcacheError, Overloaded, RangeNotSatisfiable, Unauthorized

log = logging.getLogger(__name__)


def json_error(status: int, message: str, code: str) -> web.Response:
    return web.json_response({"error": message, "code": code}, status=status)


def error_code(status: int) -> str:
    """The code of an error aiohttp or HTTP itself names: ``method_not_allowed`` for 405,
    ``request_header_fields_too_large`` for 431."""
    try:
        return HTTPStatus(status).phrase.lower().replace(" ", "_").replace("-", "_")
    except ValueError:
        return "http_error"


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ConnectionError:
        raise  # the client is gone: nobody to answer
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return json_error(exc.status, exc.reason, error_code(exc.status))
    except Exception as exc:
        if request.writer.output_size > 0 and request.transport is not None:
            # A response is under way: no error can follow it. Cut the connection, so the
            # client sees a failure at once instead of waiting for the rest.
            request.transport.abort()
            raise
        return _error_response(request, exc)


def _error_response(request: web.Request, exc: Exception) -> web.Response:
    if not isinstance(exc, GitcacheError):
        log.error("%s %s failed", request.method, request.path, exc_info=exc)
        return json_error(500, "internal error", "internal_error")
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
