"""Sending a body that may fail after its headers went out: a cached entry, a
generation's spool as it is written, and the one way to end such a response abnormally."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncGenerator

from aiohttp import web

from gitcache import keys
from gitcache.cache.base import Reader
from gitcache.snapshot.generation import READ_CHUNK, SLOW_READ_CHUNK, SpoolReader
from gitcache.tasks import run_blocking

FOLLOW_SPAN = 16 * 1024 * 1024  # the most one sendfile of a spool sends


def cut(request: web.Request, response: web.StreamResponse) -> web.StreamResponse:
    """End a response that is under way abnormally: the connection is closed before the
    final chunk (or before Content-Length bytes), so ``curl -f`` fails rather than keep a
    truncated file. aiohttp's own write of the end then meets a closed transport, which it
    takes quietly: the failure is logged once, where it happened."""
    if request.transport is not None:
        request.transport.abort()
    request[keys.REQUEST_INFO]["aborted"] = True
    return response


async def follow(request: web.Request, response: web.StreamResponse, body: SpoolReader) -> None:
    """The rest of a generation's spool to the client as it is written."""
    transport = request.transport
    if transport is not None and await _with_sendfile(request, transport, body):
        return
    info = request[keys.REQUEST_INFO]
    while True:
        # A client that has not taken the last chunk yet gets small ones: 200 slow
        # clients then hold a few MiB between them, not a chunk each.
        behind = transport is not None and transport.get_write_buffer_size() > 0
        chunk = await body.read(SLOW_READ_CHUNK if behind else READ_CHUNK)
        if not chunk:
            return
        await response.write(chunk)
        info["bytes"] += len(chunk)


async def _with_sendfile(
    request: web.Request, transport: asyncio.Transport, body: SpoolReader
) -> bool:
    """Send the spool as it is written, each chunk of the chunked encoding with sendfile:
    no copy, no thread, nothing held in memory for a slow client. False if the transport
    has no sendfile (TLS, say), after the first chunk was copied: the caller copies the
    rest."""
    loop = asyncio.get_running_loop()
    info = request[keys.REQUEST_INFO]
    spool = body.file()
    while True:
        offset, length = await body.span(FOLLOW_SPAN)
        if not length:
            return True
        if transport.is_closing():
            raise ConnectionResetError("the client went away")
        # The chunk's framing, as the response's own writes would frame it.
        transport.write(b"%x\r\n" % length)
        try:
            await loop.sendfile(transport, spool, offset, length, fallback=False)
        except asyncio.SendfileNotAvailableError:
            transport.write(await run_blocking(os.pread, body.fileno(), length, offset))
            transport.write(b"\r\n")
            info["bytes"] += length
            return False
        transport.write(b"\r\n")
        info["bytes"] += length


class SourceFailed(Exception):
    """A hit's bytes could not be read to the end (the cause says why)."""


async def copy(body: AsyncGenerator[bytes, None], response: web.StreamResponse) -> None:
    """Every chunk of ``body`` to the client; a failure to read raises SourceFailed, a
    failure to write (the client is gone) raises what the write raised."""
    while True:
        try:
            chunk = await anext(body)
        except StopAsyncIteration:
            return
        except Exception as exc:
            raise SourceFailed(str(exc)) from exc
        await response.write(chunk)


async def send_file(
    request: web.Request, response: web.StreamResponse, reader: Reader, start: int, length: int
) -> None:
    """``length`` bytes of a cached entry from ``start``: with sendfile from its file, or
    copied from its tier; SourceFailed if they cannot all be read."""
    transport = request.transport
    if reader.file is not None and transport is not None:
        try:
            sent = await asyncio.get_running_loop().sendfile(transport, reader.file, start, length)
        except NotImplementedError:
            pass  # TLS or another transport without sendfile: copy instead
        else:
            if sent != length:  # the file is shorter than its entry says
                raise SourceFailed(f"sent {sent} of {length} bytes") from OSError(
                    "the cached file ended early"
                )
            return
    chunks = reader.chunks(start, length)
    try:
        await copy(chunks, response)
    finally:
        await chunks.aclose()
