"""``GET|HEAD /git/{host}/{repo}/snapshot.tar.zst[?ref=…][&depth=N|&filter=blob:none]`` and
``GET|HEAD /git/{host}/{repo}/source.tar.zst[?ref=…]``."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import AsyncGenerator, Callable
from email.utils import formatdate

from aiohttp import web

from gitcache import keys
from gitcache.cache.s3 import S3Reader
from gitcache.errors import BadRequest, EntryGone, GitcacheError
from gitcache.repo import RefSpec, RepoRef, parse_ref, parse_repo
from gitcache.snapshot.generation import SLOW_READ_CHUNK
from gitcache.snapshot.service import Hit, Stream, Want
from gitcache.snapshot.source import Source
from gitcache.variant import Kind, parse_variant
from gitcache.web import conditional
from gitcache.web.access import authorize_read
from gitcache.web.follow import SourceFailed, copy, cut, follow, send_file

log = logging.getLogger(__name__)

CONTENT_TYPE = "application/zstd"


def _common_headers(commit: str, source: str) -> dict[str, str]:
    return {
        "Content-Type": CONTENT_TYPE,
        "X-Gitcache-Commit": commit,
        "X-Gitcache-Source": source,
    }


def _filename(repo: RepoRef, spec: RefSpec) -> str:
    suffix = "-source" if spec.variant.kind is Kind.SOURCE else ""
    return f"{repo.basename}{suffix}.tar.zst"


_MAX_AGE = re.compile(
    r"(?:^|,)[ \t]*max-age[ \t]*=[ \t]*\"?([0-9]{1,12})\"?[ \t]*(?:,|$)", re.IGNORECASE
)
_SECONDS = re.compile(r"[0-9]{1,12}")  # ASCII digits: str.isdigit() also takes "²"
IMMUTABLE = "public, max-age=31536000, immutable"
# What a 304 repeats of the 200 it stands for (RFC 9110 §15.4.5).
NOT_MODIFIED_HEADERS = (
    "ETag",
    "Last-Modified",
    "Cache-Control",
    "X-Gitcache-Commit",
    "X-Gitcache-Source",
    "X-Gitcache-Age",
)


def parse_max_age(request: web.Request) -> float | None:
    """The freshness the client asks for: ``?max_age=N`` or ``Cache-Control: max-age=N``
    (the stricter of the two)."""
    ages: list[float] = []
    if (value := request.query.get("max_age")) is not None:
        if not _SECONDS.fullmatch(value):
            raise BadRequest("max_age must be a whole number of seconds", code="invalid_max_age")
        ages.append(float(value))
    if (match := _MAX_AGE.search(request.headers.get("Cache-Control", ""))) is not None:
        ages.append(float(match[1]))
    return min(ages, default=None)


async def snapshot(request: web.Request) -> web.StreamResponse:
    """A clone: full, or the variant ``depth`` or ``filter`` asks for."""
    return await _serve(request, source=False)


async def source(request: web.Request) -> web.StreamResponse:
    """The working tree alone."""
    return await _serve(request, source=True)


async def _serve(request: web.Request, *, source: bool) -> web.StreamResponse:
    config = request.app[keys.CONFIG]
    repo = parse_repo(request.match_info["host"], request.match_info["repo"], config.upstreams)
    query = request.query
    variant = parse_variant(source=source, depth=query.get("depth"), filter_=query.get("filter"))
    spec = parse_ref(query.get("ref"), variant)
    max_age = parse_max_age(request)
    await authorize_read(request, repo)
    try:
        response = await _respond(request, repo, spec, max_age)
    except EntryGone:
        # Nothing was sent yet, and the entry is forgotten: serve the request again.
        response = await _respond(request, repo, spec, max_age)
    # Only what exists is kept fresh from now on: made-up names and commits that failed
    # (404) are not remembered.
    request.app[keys.REFRESHER].requested(repo, spec)
    return response


async def _respond(
    request: web.Request, repo: RepoRef, spec: RefSpec, max_age: float | None
) -> web.StreamResponse:
    config = request.app[keys.CONFIG]
    result = await request.app[keys.SNAPSHOTS].serve(
        repo, spec, want=Want.BODY if request.method == "GET" else Want.HEADERS, max_age=max_age
    )
    age = max(0, int(request.app[keys.CLOCK]() - result.fetched_at))
    if spec.sha is not None:
        cache_control = IMMUTABLE  # a commit's snapshot never changes meaning
    elif result.source == Source.STALE:
        cache_control = "max-age=0, must-revalidate"
    else:
        cache_control = f"max-age={max(0, int(config.mirrors.fetch_interval) - age)}"
    extra = {
        "Content-Disposition": f'attachment; filename="{_filename(repo, spec)}"',
        "X-Gitcache-Age": str(age),
        "Cache-Control": cache_control,
    }
    info = request[keys.REQUEST_INFO]
    info.update(source=result.source, commit=result.commit)
    metrics = request.app[keys.METRICS]
    tier = config.cache.backend if isinstance(result, Hit) else "spool"
    started = metrics.snapshot_responses.labels(result.source, tier).inc
    try:
        if isinstance(result, Hit):
            try:
                return await _send_hit(request, repo, result, extra, started)
            except EntryGone:
                await request.app[keys.SNAPSHOTS].forget(repo, result.reader.entry)
                raise
        started()
        return await _send_stream(request, repo, result, extra)
    finally:
        metrics.bytes_served.labels(result.source).inc(info.get("bytes", 0))


def _hit_headers(repo: RepoRef, hit: Hit, extra: dict[str, str]) -> dict[str, str]:
    entry = hit.reader.entry
    headers = _common_headers(entry.commit, hit.source) | extra
    headers["ETag"] = entry.etag
    headers["Last-Modified"] = formatdate(entry.created, usegmt=True)
    headers["Accept-Ranges"] = "bytes"
    return headers


async def _send_hit(
    request: web.Request,
    repo: RepoRef,
    hit: Hit,
    extra: dict[str, str],
    started: Callable[[], None],
) -> web.StreamResponse:
    """``started`` is called once the hit is sure to be answered (see :class:`EntryGone`)."""
    reader, entry = hit.reader, hit.reader.entry
    body: AsyncGenerator[bytes, None] | None = None
    try:
        plan = conditional.plan(
            request.headers,
            method=request.method,
            etag=entry.etag,
            modified=entry.created,
            size=entry.size,
        )
        headers = _hit_headers(repo, hit, extra)
        s3 = request.app[keys.CONFIG].cache.s3
        # A ranged or conditional answer stays with the proxy; the whole object may not.
        redirect = s3.redirect and plan.status == 200 and isinstance(reader, S3Reader)
        sending = request.method == "GET" and plan.status != 304 and plan.length > 0
        first = b""
        if sending and not redirect and reader.file is None:
            # A streamed tier (S3): its first read is the request to it, made before any
            # answer, so an object gone meanwhile is served again rather than cut.
            body = reader.chunks(plan.start, plan.length)
            first = await anext(body)
        started()
        if redirect and isinstance(reader, S3Reader):  # the whole object, from the bucket
            moved = {k: v for k, v in headers.items() if k.startswith("X-Gitcache")}
            moved["Location"] = await reader.presigned_url(s3.redirect_ttl)
            return web.Response(status=302, headers=moved)
        if plan.status == 304:
            return web.Response(status=304, headers={k: headers[k] for k in NOT_MODIFIED_HEADERS})
        if plan.status == 206:
            headers["Content-Range"] = plan.content_range(entry.size)
        return await _send_hit_body(request, repo, hit, headers, plan, first, body)
    finally:
        if body is not None:
            await body.aclose()
        await reader.close()


async def _send_hit_body(
    request: web.Request,
    repo: RepoRef,
    hit: Hit,
    headers: dict[str, str],
    plan: conditional.Plan,
    first: bytes,
    body: AsyncGenerator[bytes, None] | None,
) -> web.StreamResponse:
    """The status line, the headers and (for a GET) the bytes ``plan`` names: sent with
    sendfile from a file, or ``first`` and then the rest of ``body``."""
    response = web.StreamResponse(status=plan.status, headers=headers)
    response.content_length = plan.length
    await response.prepare(request)
    if request.method == "HEAD" or plan.length == 0:
        await response.write_eof()
        return response
    _first_byte(request, hit.source)
    try:
        if body is None:
            await send_file(request, response, hit.reader, plan.start, plan.length)
        else:
            await response.write(first)
            await copy(body, response)
    except SourceFailed as exc:
        # Cut at once: the client must not wait for bytes that will not come. The entry
        # is checked now; if its bytes are bad, it is evicted.
        entry = hit.reader.entry
        log.error("hit %s of %s failed mid-body: %s", entry.key, repo.name, exc.__cause__)
        request.app[keys.SCRUBBER].recheck(repo, entry)
        return cut(request, response)
    except OSError:  # the client went away mid-file
        return cut(request, response)
    request[keys.REQUEST_INFO]["bytes"] = plan.length
    await response.write_eof()
    return response


def _first_byte(request: web.Request, source: str) -> None:
    elapsed = time.monotonic() - request[keys.REQUEST_STARTED]
    request.app[keys.METRICS].ttfb.labels(source).observe(elapsed)


async def _send_stream(
    request: web.Request, repo: RepoRef, stream: Stream, extra: dict[str, str]
) -> web.StreamResponse:
    headers = _common_headers(stream.commit, stream.source) | extra
    if stream.body is None:  # HEAD: say what GET would send, start nothing
        response = web.StreamResponse(headers=headers)
        await response.prepare(request)
        return response
    body = stream.body
    try:
        # Wait for the first bytes before the status line, so a generation that fails
        # at once still gets a proper JSON error.
        first = await body.read(SLOW_READ_CHUNK)  # small: how fast the client is is unknown
        response = web.StreamResponse(headers=headers)
        response.enable_chunked_encoding()
        await response.prepare(request)
        info = request[keys.REQUEST_INFO]
        info["bytes"] = len(first)
        _first_byte(request, stream.source)
        try:
            await response.write(first)
            await follow(request, response, body)
        except GitcacheError:  # the generation failed (it logs why, once)
            return cut(request, response)
        except OSError:  # the client went away
            return cut(request, response)
        await response.write_eof()
        return response
    finally:
        await body.aclose()
