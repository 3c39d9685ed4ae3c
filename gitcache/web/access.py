"""Who may read what: inbound tokens, pass-through to the upstream, and admin rights."""

from __future__ import annotations

import ipaddress

from aiohttp import web

from gitcache import keys
from gitcache.errors import Forbidden, NotFound
from gitcache.repo import RepoRef


async def authorize_read(request: web.Request, repo: RepoRef) -> None:
    """Raise unless this request may read ``repo``'s snapshots. For a pass-through
    upstream the client's ``Authorization`` is the upstream's business; otherwise, with a
    tokens file, a token must allow the repository (a 404 if not, like a repository that
    does not exist, so that a private one is not revealed)."""
    if request.app[keys.CONFIG].upstreams[repo.host].passthrough:
        await request.app[keys.PASSTHROUGH].check(repo, request.headers.get("Authorization"))
        return
    tokens = request.app[keys.TOKENS]
    if tokens is None:
        return
    token = tokens.identify(request.headers.get("Authorization", ""))
    if not token.may_read(repo):
        raise NotFound(f"repository {repo.name} not found", code="repo_not_found")


# Set by a reverse proxy: the request came from elsewhere, whatever its socket says.
FORWARDING_HEADERS = ("Forwarded", "X-Forwarded-For", "X-Real-IP")


def authorize_admin(request: web.Request) -> None:
    """Admin routes: with a tokens file, an admin token from anywhere; without one, only
    requests from loopback that no proxy forwarded (behind a proxy on the same host every
    client would otherwise be "loopback")."""
    tokens = request.app[keys.TOKENS]
    if tokens is not None:
        if not tokens.identify(request.headers.get("Authorization", "")).admin:
            raise Forbidden("this token may not use admin routes")
        return
    if any(name in request.headers for name in FORWARDING_HEADERS):
        raise Forbidden("a forwarded request needs an admin token for admin routes")
    try:
        if ipaddress.ip_address(request.remote or "").is_loopback:
            return
    except ValueError:
        pass
    raise Forbidden("admin routes answer only on loopback unless an admin token is configured")
