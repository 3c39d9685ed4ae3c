"""Git over smart HTTP, from the mirrors: ``GET …/info/refs?service=git-upload-pack`` and
``POST …/git-upload-pack`` (protocol v0, v1 and v2) for clone, fetch, ls-remote and pull.
Pushes are refused with a message git shows, naming where to push instead."""

from __future__ import annotations

from aiohttp import web
from dulwich.protocol import pkt_line

from gitcache import keys
from gitcache.errors import BadRequest, Forbidden, GitcacheError, PayloadTooLarge
from gitcache.repo import RepoRef, parse_repo
from gitcache.smart.request import parse_request, protocol_version
from gitcache.smart.service import Answer
from gitcache.snapshot.generation import SLOW_READ_CHUNK
from gitcache.snapshot.gitdir import public_url
from gitcache.web.access import authorize_read
from gitcache.web.follow import SourceFailed, cut, follow, send_file

GIT_ROUTE = r"/git/{host}/{repo:[\s\S]+}/"
MAX_REQUEST = 64 * 1024 * 1024  # an upload-pack request: wants and haves, not data
NO_CACHE = {"Cache-Control": "no-cache, max-age=0, must-revalidate", "Expires": "0"}


def _repo(request: web.Request) -> RepoRef:
    config = request.app[keys.CONFIG]
    return parse_repo(request.match_info["host"], request.match_info["repo"], config.upstreams)


def _count(request: web.Request, service: str, source: str, sent: int = 0) -> None:
    metrics = request.app[keys.METRICS]
    metrics.git_responses.labels(service, source).inc()
    metrics.git_bytes.labels(service, source).inc(sent)
    request[keys.REQUEST_INFO].update(source=source, bytes=sent)


async def info_refs(request: web.Request) -> web.StreamResponse:
    repo = _repo(request)
    service = request.query.get("service")
    if service == "git-receive-pack":
        return _refuse_push(request, repo)
    if service != "git-upload-pack":
        raise BadRequest(
            "gitcache speaks git's smart HTTP only: ?service=git-upload-pack",
            code="invalid_service",
        )
    await authorize_read(request, repo)
    version = protocol_version(request.headers.get("Git-Protocol"))
    body = await request.app[keys.PACKS].advertise(repo, version)
    if version < 2:  # v2 starts with its capabilities (gitprotocol-http)
        body = pkt_line(b"# service=git-upload-pack\n") + b"0000" + body
    _count(request, "info-refs", "mirror", len(body))
    content_type = "application/x-git-upload-pack-advertisement"
    return web.Response(body=body, content_type=content_type, headers=NO_CACHE)


def _refuse_push(request: web.Request, repo: RepoRef) -> web.Response:
    """A push answered with git's own error packet, so that ``git push`` prints it:
    nothing reaches the upstream."""
    upstream = request.app[keys.CONFIG].upstreams[repo.host]
    base = public_url(upstream.url.split("{repo}", 1)[0])
    ours = f"{request.scheme}://{request.host}/git/{repo.host}/"
    message = (
        f"gitcache is read-only: push to {public_url(upstream.url_for(repo.path))} instead. "
        f'To make git do that by itself: git config --global url."{base}".pushInsteadOf {ours}'
        f' (or, where url."{ours}".insteadOf {base} sends fetches here: '
        f'git config --global url."{base}".pushInsteadOf {base})'
    )
    body = pkt_line(b"# service=git-receive-pack\n") + b"0000" + pkt_line(f"ERR {message}".encode())
    _count(request, "receive-pack", "refused", len(body))
    content_type = "application/x-git-receive-pack-advertisement"
    return web.Response(body=body, content_type=content_type, headers=NO_CACHE)


async def receive_pack(request: web.Request) -> web.StreamResponse:
    _repo(request)
    raise Forbidden("gitcache is read-only: push to the upstream", code="read_only")


async def _read_body(request: web.Request) -> bytes:
    """The request body (gzip, as git sends large ones, is undone by aiohttp), bounded."""
    if (request.content_length or 0) > MAX_REQUEST:
        raise PayloadTooLarge(f"an upload-pack request is at most {MAX_REQUEST} bytes")
    body = bytearray()
    while chunk := await request.content.read(1024 * 1024):
        body += chunk
        if len(body) > MAX_REQUEST:
            raise PayloadTooLarge(f"an upload-pack request is at most {MAX_REQUEST} bytes")
    return bytes(body)


async def upload_pack(request: web.Request) -> web.StreamResponse:
    repo = _repo(request)
    await authorize_read(request, repo)
    body = await _read_body(request)
    parsed = parse_request(body, protocol_version(request.headers.get("Git-Protocol")))
    answer = await request.app[keys.PACKS].answer(repo, parsed, body)
    headers = {**NO_CACHE, "X-Gitcache-Source": answer.source}
    response = web.StreamResponse(headers=headers)
    response.content_type = "application/x-git-upload-pack-result"
    if answer.hit is not None:
        return await _send_hit(request, response, repo, answer)
    return await _send_stream(request, response, answer)


async def _send_hit(
    request: web.Request, response: web.StreamResponse, repo: RepoRef, answer: Answer
) -> web.StreamResponse:
    assert answer.hit is not None
    reader = answer.hit.reader
    try:
        size = reader.entry.size
        response.content_length = size
        await response.prepare(request)
        try:
            await send_file(request, response, reader, 0, size)
        except SourceFailed:  # the file or tier failed mid-body: its entry is checked now
            request.app[keys.SCRUBBER].recheck(repo, reader.entry)
            return cut(request, response)
        except OSError:  # the client went away
            return cut(request, response)
        _count(request, "upload-pack", answer.source, size)
        await response.write_eof()
        return response
    finally:
        await reader.close()


async def _send_stream(
    request: web.Request, response: web.StreamResponse, answer: Answer
) -> web.StreamResponse:
    """A generation's spool as it is written, or the mirror's own answer: the first bytes
    are read before the status line, so a request git fails at once gets a proper error."""
    spool, direct = answer.spool, answer.direct
    try:
        if spool is not None:
            first = await spool.read(SLOW_READ_CHUNK)
        else:
            assert direct is not None
            first = await anext(direct, b"")
        response.enable_chunked_encoding()
        await response.prepare(request)
        request[keys.REQUEST_INFO]["bytes"] = len(first)
        try:
            await response.write(first)
            if spool is not None:
                await follow(request, response, spool)
            else:
                assert direct is not None
                async for chunk in direct:
                    await response.write(chunk)
                    request[keys.REQUEST_INFO]["bytes"] += len(chunk)
        except (GitcacheError, OSError):  # git failed (it was logged), or the client left
            return cut(request, response)
        _count(request, "upload-pack", answer.source, request[keys.REQUEST_INFO]["bytes"])
        await response.write_eof()
        return response
    finally:
        if spool is not None:
            await spool.aclose()
        if direct is not None:
            await direct.aclose()
