"""The server around the app, run as an operator runs it: request-head deadline, connection
cap, JSON for aiohttp's own errors, and a shutdown that keeps its timeout."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path

import aiohttp

from tests.helpers import snapshot_url
from tests.processes import GitcacheProcess, start_gitcache
from tests.upstream import Upstream
from tests.waiting import until


async def _open(process: GitcacheProcess) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = process.base.removeprefix("http://").split(":")
    return await asyncio.open_connection(host, int(port))


async def _closed_within(reader: asyncio.StreamReader, seconds: float) -> bytes:
    """What the server sent before it closed the connection; fails if it did not close."""
    return await asyncio.wait_for(reader.read(), seconds)


def _json_body(raw: bytes) -> dict[str, str]:
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"application/json" in head, head
    return json.loads(body)  # type: ignore[no-any-return]


async def test_a_request_head_sent_byte_by_byte_is_cut_at_the_deadline(
    upstream: Upstream, tmp_path: Path
) -> None:
    process = await start_gitcache(tmp_path, "s", upstream, server={"header_timeout": "1s"})
    try:
        reader, writer = await _open(process)
        started = time.monotonic()

        async def drip() -> None:
            for byte in b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100:
                writer.write(bytes([byte]))
                await asyncio.sleep(0.1)

        dripping = asyncio.ensure_future(drip())
        try:
            assert await _closed_within(reader, 10) == b""
        finally:
            dripping.cancel()
        assert time.monotonic() - started < 5  # the deadline is 1 s: cut long before 10
        # A client that sends its head at once is served as ever.
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{process.base}/healthz") as response,
        ):
            assert response.status == 200
    finally:
        await process.stop()


async def test_connections_past_the_cap_get_a_json_503(upstream: Upstream, tmp_path: Path) -> None:
    process = await start_gitcache(
        tmp_path, "s", upstream, server={"max_connections": 3, "header_timeout": "30s"}
    )
    try:
        held = [await _open(process) for _ in range(3)]
        reader, _ = await _open(process)
        raw = await _closed_within(reader, 10)
        assert raw.startswith(b"HTTP/1.1 503")
        assert _json_body(raw)["code"] == "overloaded"
        for _, writer in held:
            writer.close()

        async def room_again() -> bool:  # the held ones are gone
            try:
                async with (
                    aiohttp.ClientSession() as session,
                    session.get(f"{process.base}/healthz") as response,
                ):
                    return response.status == 200
            except aiohttp.ClientError:
                return False

        await until(room_again, "connections accepted again")
    finally:
        await process.stop()


async def test_aiohttp_own_errors_are_json(upstream: Upstream, tmp_path: Path) -> None:
    process = await start_gitcache(tmp_path, "s", upstream)
    try:
        for request in (
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n",
            b"NOT A REQUEST LINE\r\n\r\n",
            b"GET /" + b"a" * 10000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        ):
            reader, writer = await _open(process)
            writer.write(request)
            raw = await _closed_within(reader, 10)
            assert raw.split(b" ", 2)[1] == b"400", raw[:80]
            body = _json_body(raw)
            assert body["code"] == "bad_http_request" and body["error"]
            writer.close()
    finally:
        await process.stop()


async def test_shutdown_keeps_its_timeout(
    upstream: Upstream, big_work: Path, tmp_path: Path
) -> None:
    upstream.create("big", big_work)
    process = await start_gitcache(tmp_path, "s", upstream, server={"shutdown_timeout": "3s"})
    async with aiohttp.ClientSession() as session:
        warm = await session.get(process.base + snapshot_url("big"))
        await warm.read()  # a hit from now on
        # A client that reads nothing: its response never finishes by itself.
        slow = await session.get(process.base + snapshot_url("big"))
        assert slow.status == 200
        started = time.monotonic()
        process.proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.proc.wait(), 30) == 0
        took = time.monotonic() - started
        slow.close()
    # shutdown_timeout for the response, then about a second to close: not twice over (6 s).
    assert 3 <= took < 5.5, took
