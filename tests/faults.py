"""Fault injection for tests: an S3 proxy that cuts object downloads part-way, and a
small real file system to fill up."""

from __future__ import annotations

import contextlib
import errno
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web


class CuttingProxy:
    """A reverse proxy in front of the S3 test server. While ``cut_after`` is set, a GET of
    a snapshot object sends that many body bytes and then drops the connection, as an S3
    endpoint or a network path failing mid-object does; everything else passes through."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.cut_after: int | None = None
        self.cuts = 0
        self.port = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1024**3)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() != "host"}
        async with (
            aiohttp.ClientSession(auto_decompress=False) as session,
            session.request(
                request.method,
                self.target + request.path_qs,
                headers=headers,
                data=body,
                allow_redirects=False,
            ) as upstream,
        ):
            response = web.StreamResponse(status=upstream.status, headers=_passed(upstream))
            await response.prepare(request)
            cut = self.cut_after
            cutting = request.method == "GET" and request.path.endswith(".tar.zst") and cut
            sent = 0
            async for chunk in upstream.content.iter_chunked(64 * 1024):
                if cutting and sent + len(chunk) >= cut:
                    await response.write(chunk[: cut - sent])
                    self.cuts += 1
                    assert request.transport is not None
                    request.transport.abort()
                    return response
                await response.write(chunk)
                sent += len(chunk)
            await response.write_eof()
            return response


def _passed(upstream: Any) -> dict[str, str]:
    skip = {"transfer-encoding", "connection", "content-encoding"}
    return {k: v for k, v in upstream.headers.items() if k.lower() not in skip}


@contextlib.contextmanager
def small_filesystem(path: Path, size: str) -> Iterator[Path]:
    """A real file system of ``size`` (tmpfs) mounted at ``path``; skips the test where
    mounting is not allowed (not root, or no privilege in this sandbox)."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small file system: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(directory: Path) -> Path:
    """Fill the file system holding ``directory`` to the last byte; the filler's path."""
    filler = directory / "filler"
    with filler.open("wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    with contextlib.suppress(OSError), filler.open("ab") as f:  # the last partial block
        while True:
            f.write(b"\0")
            f.flush()
    return filler
