"""The admin API: what gitcache holds, per repository, and how to refresh or purge it.

    GET    /admin/repos                          every repository: mirror, refresh, snapshots
    GET    /admin/repos/{host}/{repo}            one of them
    DELETE /admin/repos/{host}/{repo}            purge its mirror and snapshots
    POST   /admin/repos/{host}/{repo}/refresh    refresh it now

Answers only on loopback, unless a tokens file is configured: then to admin tokens.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from gitcache import keys
from gitcache.errors import NotFound
from gitcache.mirror.store import objects_size
from gitcache.repo import RepoRef, parse_repo
from gitcache.web.access import authorize_admin

REPO_ROUTE = r"/admin/repos/{host}/{repo:[\s\S]+}"


def _repo(request: web.Request) -> RepoRef:
    authorize_admin(request)
    config = request.app[keys.CONFIG]
    return parse_repo(request.match_info["host"], request.match_info["repo"], config.upstreams)


def _known(app: web.Application) -> set[RepoRef]:
    return (
        set(app[keys.REFRESHER].repos)
        | set(app[keys.CACHE].repos())
        | {m.repo for m in app[keys.MIRRORS].known() if m.path.exists()}
    )


async def _describe(app: web.Application, repo: RepoRef) -> dict[str, Any]:
    now = app[keys.CLOCK]()
    mirror = app[keys.MIRRORS].mirror(repo)
    present = (mirror.path / "HEAD").exists()
    state = app[keys.REFRESHER].repos.get(repo)
    entries = await app[keys.CACHE].entries(repo)
    return {
        "repo": repo.name,
        "mirror": {
            "present": present,
            "fetched_at": mirror.fetched_at or None,
            "age_seconds": round(now - mirror.fetched_at) if mirror.fetched_at else None,
            "bytes": await asyncio.to_thread(objects_size, mirror.path) if present else 0,
        },
        "refresh": None
        if state is None
        else {
            "last_requested": state.last_requested,
            "last_run": state.last_run or None,
            "last_result": state.last_result or None,
            "next_run": state.next_run,
            "failures": state.failures,
            "refs": state.refs,
        },
        "snapshots": [
            {
                "key": e.key,
                "ref": e.ref,
                "commit": e.commit,
                "bytes": e.size,
                "sha256": e.sha256,
                "created": e.created,
                "age_seconds": round(now - e.created),
                "fetched_at": e.fetched_at,
                "tiers": [app[keys.CONFIG].cache.backend],
            }
            for e in sorted(entries, key=lambda e: e.created, reverse=True)
        ],
    }


async def list_repos(request: web.Request) -> web.Response:
    authorize_admin(request)
    repos = sorted(_known(request.app), key=lambda r: r.name)
    return web.json_response({"repos": [await _describe(request.app, r) for r in repos]})


async def show_repo(request: web.Request) -> web.Response:
    repo = _repo(request)
    if repo not in _known(request.app):
        raise NotFound(f"gitcache holds nothing of {repo.name}", code="repo_not_found")
    return web.json_response(await _describe(request.app, repo))


async def delete_repo(request: web.Request) -> web.Response:
    repo = _repo(request)
    if repo not in _known(request.app):
        raise NotFound(f"gitcache holds nothing of {repo.name}", code="repo_not_found")
    app = request.app
    app[keys.REFRESHER].forget(repo)
    await app[keys.MIRRORS].delete(app[keys.MIRRORS].mirror(repo))
    cache = app[keys.CACHE]
    await cache.delete(repo, *(e.key for e in await cache.entries(repo)))
    return web.json_response({"status": "deleted", "repo": repo.name})


async def refresh_repo(request: web.Request) -> web.Response:
    repo = _repo(request)
    request.app[keys.REFRESHER].trigger(repo)
    return web.json_response({"status": "refreshing", "repo": repo.name}, status=202)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/admin/repos", list_repos)
    app.router.add_post(REPO_ROUTE + "/refresh", refresh_repo)
    app.router.add_get(REPO_ROUTE, show_repo)
    app.router.add_delete(REPO_ROUTE, delete_repo)
