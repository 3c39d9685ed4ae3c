"""Webhooks (``POST /hooks/github``, ``POST /hooks/gitlab``): a push upstream is a fresh
snapshot seconds later, instead of at the next periodic refresh."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from typing import Any

from aiohttp import web

from gitcache import keys
from gitcache.errors import BadRequest, NotFound, Unauthorized
from gitcache.repo import parse_repo

log = logging.getLogger(__name__)

MAX_BODY = 5 * 1024 * 1024  # GitHub caps payloads at 25 MB; pushes are far smaller


def _verify_github(request: web.Request, body: bytes, secret: str) -> None:
    signature = request.headers.get("X-Hub-Signature-256", "")
    expected = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(signature.encode(), expected.encode()):
        raise Unauthorized("missing or invalid X-Hub-Signature-256")


def _verify_gitlab(request: web.Request, body: bytes, secret: str) -> None:
    token = request.headers.get("X-Gitlab-Token", "")
    if not hmac.compare_digest(token.encode(), secret.encode()):
        raise Unauthorized("missing or invalid X-Gitlab-Token")


_KINDS = {
    "github": (_verify_github, ("repository", "full_name")),
    "gitlab": (_verify_gitlab, ("project", "path_with_namespace")),
}


async def hook(request: web.Request) -> web.Response:
    kind = request.match_info["kind"]
    hook_config = request.app[keys.CONFIG].hooks.get(kind)
    if kind not in _KINDS or hook_config is None:
        raise NotFound(f"no {kind} webhook is configured", code="not_found")
    body = await request.content.read(MAX_BODY + 1)
    verify, (outer, inner) = _KINDS[kind]
    verify(request, body[:MAX_BODY], hook_config.secret)  # before anything else is looked at
    if len(body) > MAX_BODY:
        raise BadRequest("payload too large", code="payload_too_large")
    if request.headers.get("X-GitHub-Event") == "ping":
        return web.json_response({"status": "pong"})
    try:
        payload: Any = json.loads(body)
        path = payload[outer][inner]
    except (ValueError, KeyError, TypeError):
        raise BadRequest(f"payload has no {outer}.{inner}", code="invalid_payload") from None
    repo = parse_repo(hook_config.host, str(path), request.app[keys.CONFIG].upstreams)
    refresher = request.app[keys.REFRESHER]
    if repo not in refresher.repos:
        # Only what clients asked for is kept fresh: a push elsewhere clones nothing.
        return web.json_response({"status": "ignored", "repo": repo.name}, status=202)
    refresher.trigger(repo)
    return web.json_response({"status": "refreshing", "repo": repo.name}, status=202)
