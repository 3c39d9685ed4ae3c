"""``gitcache clone``, run as a user runs it (a separate Python process, standard library
only) against a real gitcache and a real git upstream, and against servers that misbehave."""

from __future__ import annotations

import ast
import asyncio
import hashlib
import io
import re
import signal
import stat
import sys
import tarfile
from pathlib import Path
from typing import Any

import zstandard
from aiohttp import web

from gitcache import client as client_module
from gitcache.snapshot import frames
from tests.helpers import HOST, sample, snapshot_url, status, tree
from tests.upstream import Upstream, agit, git

CLIENT = str(Path(client_module.__file__))


async def run_client(*args: str, stdin: bytes | None = None) -> tuple[int, str]:
    """The client as its own process: (exit status, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        CLIENT if stdin is None else "-",
        "clone",
        "--quiet",
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await proc.communicate(stdin)
    assert proc.returncode is not None
    return proc.returncode, err.decode()


def base(test_client: Any) -> str:
    return str(test_client.make_url("/")).rstrip("/")


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


async def test_a_clone_equals_git_clone(
    client: Any, upstream: Upstream, rich: str, scratch: Path
) -> None:
    tmp_path = scratch
    code, err = await run_client("--server", base(client), f"{HOST}/{rich}", str(tmp_path / "a"))
    assert code == 0, err
    await agit("clone", "-q", upstream.url(rich), str(tmp_path / "b"))
    ours, theirs = tmp_path / "a", tmp_path / "b"
    assert tree(ours) == tree(theirs)  # contents, exec bits, symlinks
    refs = ["for-each-ref", "--format=%(refname) %(objectname)"]
    assert git(*refs, cwd=ours) == git(*refs, cwd=theirs)
    git("fsck", "--no-progress", cwd=ours)
    assert status(ours) == ""
    assert git("remote", "get-url", "origin", cwd=ours).strip() == upstream.url(rich)
    assert leftovers(tmp_path) == ["a", "b"]  # no temporary directory


async def test_the_served_client_runs_from_stdin(client: Any, rich: str, scratch: Path) -> None:
    tmp_path = scratch
    source = await (await client.get("/client.py")).read()
    code, err = await run_client(
        "--server", base(client), f"{HOST}/{rich}", str(tmp_path / "a"), stdin=source
    )
    assert code == 0, err
    assert (tmp_path / "a" / "README.md").exists()


async def test_refusals_touch_nothing(client: Any, rich: str, scratch: Path) -> None:
    tmp_path = scratch
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "file").write_text("mine")
    code, err = await run_client("--server", base(client), f"{HOST}/{rich}", str(taken))
    assert code == 1 and "already exists" in err
    assert (taken / "file").read_text() == "mine"
    depth = ("--server", base(client), "--depth", "0", f"{HOST}/{rich}", str(tmp_path / "d"))
    code, err = await run_client(*depth)
    assert code == 1 and "--depth" in err
    code, err = await run_client("--server", base(client), f"{HOST}/no/such", str(tmp_path / "x"))
    assert code == 1 and "404" in err and "git clone" not in err  # no fallback on a 4xx
    assert leftovers(tmp_path) == ["taken"]


async def test_gitcache_down_falls_back_to_git_clone(
    upstream: Upstream, rich: str, scratch: Path
) -> None:
    tmp_path = scratch
    down = "http://127.0.0.1:9"  # nothing listens there
    code, err = await run_client("--server", down, upstream.url(rich), str(tmp_path / "a"))
    assert code == 0, err
    assert "cloning" in err and "git instead" in err
    git("fsck", "--no-progress", cwd=tmp_path / "a")
    code, err = await run_client(
        "--server", down, "--no-fallback", upstream.url(rich), str(tmp_path / "b")
    )
    assert code == 1 and "cannot be reached" in err
    assert leftovers(tmp_path) == ["a"]


async def serve_bytes(aiohttp_server: Any, body: bytes, **headers: str) -> str:
    """A server that answers every snapshot with ``body`` (whatever its headers say)."""

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers=headers)
        if "Content-Length" in headers:
            response.content_length = int(headers["Content-Length"])
        await response.prepare(request)
        await response.write(body)
        if "Content-Length" in headers and int(headers["Content-Length"]) > len(body):
            assert request.transport is not None
            request.transport.close()  # cut: the client must notice
        else:
            await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    server = await aiohttp_server(app)
    return f"http://127.0.0.1:{server.port}"


async def test_a_cut_or_damaged_download_leaves_nothing(
    client: Any, rich: str, scratch: Path, aiohttp_server: Any
) -> None:
    tmp_path = scratch
    good = await (await client.get(snapshot_url(rich))).read()
    etag = '"' + hashlib.sha256(good).hexdigest() + '"'
    half = len(good) // 2
    flipped = good[:half] + bytes([good[half] ^ 1]) + good[half + 1 :]
    cases = {
        "cut": (good[: len(good) // 2], {"Content-Length": str(len(good))}),
        "flipped, with its ETag": (flipped, {"Content-Length": str(len(good)), "ETag": etag}),
        "flipped, streamed": (flipped, {}),
    }
    for name, (body, headers) in cases.items():
        server = await serve_bytes(aiohttp_server, body, **headers)
        code, err = await run_client("--server", server, f"{HOST}/{rich}", str(tmp_path / "a"))
        assert code == 1, name
        assert err.startswith("gitcache: ") and len(err.strip().splitlines()) == 1, err
        assert leftovers(tmp_path) == [], name


async def test_a_damaged_stored_frame_is_caught_with_or_without_zstd(
    client: Any, rich: str, scratch: Path, aiohttp_server: Any
) -> None:
    """A flipped byte inside a pack's stored frame: a download checked by its ETag takes
    the frame's bytes without zstd and must still fail on the sha256; a streamed one goes
    through zstd -d, whose frame checksum must catch it."""
    good = await (await client.get(snapshot_url(rich))).read()
    at = good.index(frames.MARK) + len(frames.MARK) + len(frames.HEADER) + 3 + 100
    flipped = good[:at] + bytes([good[at] ^ 0x40]) + good[at + 1 :]
    sha = '"' + hashlib.sha256(good).hexdigest() + '"'
    for headers in ({"Content-Length": str(len(good)), "ETag": sha}, {}):
        server = await serve_bytes(aiohttp_server, flipped, **headers)
        code, err = await run_client("--server", server, f"{HOST}/{rich}", str(scratch / "a"))
        assert code == 1, err
        assert "checksum" in err if headers else "zstd" in err, err
        assert leftovers(scratch) == []
    # and the intact bytes, taken the same two ways, give the same clone
    for headers in ({"Content-Length": str(len(good)), "ETag": sha}, {}):
        server = await serve_bytes(aiohttp_server, good, **headers)
        target = scratch / ("checked" if headers else "streamed")
        code, err = await run_client("--server", server, f"{HOST}/{rich}", str(target))
        assert code == 0, err
        git("fsck", "--strict", "--no-progress", cwd=target)
    assert tree(scratch / "checked") == tree(scratch / "streamed")


async def test_frames_of_every_kind_are_walked_where_stored_frames_are_looked_for(
    client: Any, rich: str, scratch: Path, aiohttp_server: Any
) -> None:
    """A checked download is walked frame by frame: a skippable frame that is not ours,
    frames with their content size, RLE blocks (zeros after the tar's end), all of it
    still decoded by zstd -d into the same clone."""
    good = await (await client.get(snapshot_url(rich))).read()
    tar = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(good), read_across_frames=True)
    plain = tar.read()
    one = zstandard.ZstdCompressor(write_checksum=True)
    other = b"\x50\x2a\x4d\x18" + (5).to_bytes(4, "little") + b"other"
    half = len(plain) // 2
    body = other + one.compress(plain[:half]) + one.compress(plain[half:] + bytes(300_000))
    sha = '"' + hashlib.sha256(body).hexdigest() + '"'
    server = await serve_bytes(
        aiohttp_server, body, **{"Content-Length": str(len(body)), "ETag": sha}
    )
    code, err = await run_client("--server", server, f"{HOST}/{rich}", str(scratch / "a"))
    assert code == 0, err
    git("fsck", "--strict", "--no-progress", cwd=scratch / "a")
    assert status(scratch / "a") == ""


def test_the_client_knows_the_servers_stored_frames() -> None:
    """The client keeps its own copy of the frame markers (it imports nothing)."""
    assert client_module.STORED_MARK == frames.MARK
    assert client_module.STORED_HEADER == frames.HEADER


async def interrupted(
    server: str, repo: str, target: Path, how: signal.Signals = signal.SIGINT
) -> tuple[int | None, bytes]:
    """Run the client against ``server``, Ctrl-C it (or ``how``) once its download is
    under way."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        CLIENT,
        "clone",
        "--quiet",
        "--server",
        server,
        f"{HOST}/{repo}",
        str(target),
        stderr=asyncio.subprocess.PIPE,
    )
    for _ in range(100):  # until the download is under way
        if any(p.name.startswith(f".{target.name}.gitcache-") for p in target.parent.iterdir()):
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)
    proc.send_signal(how)
    _, err = await asyncio.wait_for(proc.communicate(), timeout=10)
    return proc.returncode, err


async def test_ctrl_c_or_sigterm_mid_download_stops_at_once_and_leaves_nothing(
    client: Any, upstream: Upstream, big_work: Path, scratch: Path, aiohttp_server: Any
) -> None:
    """A server that sends part of the snapshot and then nothing, in one stream or in
    ranged segments: Ctrl-C ends the client at once (zstd and the download threads are
    stopped or abandoned, not waited for), with nothing left behind."""
    upstream.create("big", big_work)
    good = await (await client.get(snapshot_url("big"))).read()
    sha = '"' + hashlib.sha256(good).hexdigest() + '"'

    async def stall(request: web.Request) -> web.StreamResponse:
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", request.headers.get("Range", ""))
        ranged = request.path.startswith("/ranged/") and match is not None
        response = web.StreamResponse(status=206 if ranged else 200, headers={"ETag": sha})
        start, end = 0, len(good) - 1
        if ranged and match is not None:
            start, end = int(match[1]), min(int(match[2] or end), end)
            response.headers["Content-Range"] = f"bytes {start}-{end}/{len(good)}"
        response.content_length = end - start + 1
        await response.prepare(request)
        if start == 0:  # the first request: all its segment, or half the whole; then nothing
            await response.write(good[: end + 1 if ranged else len(good) // 2])
            if ranged:
                await response.write_eof()
                return response
        await asyncio.sleep(60)
        return response

    app = web.Application()
    app.router.add_get("/{tail:.*}", stall)
    port = (await aiohttp_server(app)).port
    for prefix in ("/whole", "/ranged"):
        server = f"http://127.0.0.1:{port}{prefix}"
        code, err = await interrupted(server, "big", scratch / "a")
        assert code == 130, err
        assert b"interrupted" in err
        assert leftovers(scratch) == []
    # SIGTERM (a cancelled CI job) is cleaned up after the same way
    code, err = await interrupted(server, "big", scratch / "a", signal.SIGTERM)
    assert code == 143 and b"terminated" in err, err
    assert leftovers(scratch) == []


def malicious(member: str, *, link: str | None = None, then: str | None = None) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        info = tarfile.TarInfo(member)
        if link is not None:
            info.type, info.linkname = tarfile.SYMTYPE, link
            tar.addfile(info)
        else:
            info.size = 5
            tar.addfile(info, io.BytesIO(b"evil\n"))
        if then is not None:
            follow = tarfile.TarInfo(then)
            follow.size = 5
            tar.addfile(follow, io.BytesIO(b"evil\n"))
    return zstandard.ZstdCompressor(write_checksum=True).compress(out.getvalue())


async def test_a_malicious_tar_writes_nothing_outside(tmp_path: Path, aiohttp_server: Any) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    for body in (
        malicious("../escaped"),
        malicious(str(outside / "absolute")),
        malicious("link", link=str(outside), then="link/through"),
        malicious("file-link", link=str(outside / "target"), then="file-link"),
    ):
        server = await serve_bytes(aiohttp_server, body)
        code, err = await run_client("--server", server, f"{HOST}/group/x", str(work / "a"))
        assert code == 1 and "refused" in err, err
        assert leftovers(outside) == [] and leftovers(work) == []
    assert leftovers(tmp_path) == ["outside", "work"]


def odd_tar(info: tarfile.TarInfo, fmt: int = tarfile.PAX_FORMAT, damage: bool = False) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tar:
        tar.addfile(info, io.BytesIO(b"evil\n") if info.isreg() else None)
    raw = bytearray(out.getvalue())
    if damage:
        raw[0] ^= 1  # the first header's name: its checksum no longer holds
    return zstandard.ZstdCompressor(write_checksum=True).compress(bytes(raw))


def pax_tar(records: bytes) -> bytes:
    """A pax header holding ``records`` as they are, then a small file."""
    head = tarfile.TarInfo("PaxHeader")
    head.type, head.size = tarfile.XHDTYPE, len(records)
    body = head.tobuf(format=tarfile.USTAR_FORMAT) + records + b"\0" * (-len(records) % 512)
    member = tarfile.TarInfo("x")
    member.size = 5
    body += member.tobuf(format=tarfile.USTAR_FORMAT) + b"evil\n".ljust(512, b"\0")
    return zstandard.ZstdCompressor().compress(body + b"\0" * 1024)


async def test_the_tar_reader_refuses_links_devices_long_escapes_and_damage(
    tmp_path: Path, aiohttp_server: Any
) -> None:
    """The client parses the tar itself: each of these is refused, nothing is written."""

    def info(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
        made = tarfile.TarInfo(name)
        made.type, made.linkname, made.size = kind, link, 5 if kind == tarfile.REGTYPE else 0
        return made

    deep_escape = "a/" * 60 + "../" * 61 + "escaped"  # over 100 bytes: a long-name header
    cases = {
        odd_tar(info("hard", tarfile.LNKTYPE, "README.md")): "refused",
        odd_tar(info("dev", tarfile.CHRTYPE)): "refused",
        odd_tar(info("fifo", tarfile.FIFOTYPE)): "refused",
        odd_tar(info(deep_escape)): "refused",  # pax path record
        odd_tar(info(deep_escape), fmt=tarfile.GNU_FORMAT): "refused",  # GNU ././@LongLink
        odd_tar(info("fine"), damage=True): "not a valid tar",
        pax_tar(b"0 path=x\n"): "not a valid tar",  # a record of length 0: no endless loop
        pax_tar(b"12 size=abc\n"): "not a valid tar",
        pax_tar(b"11 comment\n"): "git index",  # a valid tar, but not a clone
    }
    work = tmp_path / "work"
    work.mkdir()
    for body, says in cases.items():
        server = await serve_bytes(aiohttp_server, body)
        code, err = await run_client("--server", server, f"{HOST}/group/x", str(work / "a"))
        assert code == 1 and says in err, err
        assert leftovers(work) == []
    assert leftovers(tmp_path) == ["work"]


def test_the_client_needs_only_the_standard_library() -> None:
    source = Path(CLIENT).read_text()
    tree = ast.parse(source, feature_version=(3, 9))  # and it parses as Python 3.9
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert imported - {"__future__"} <= sys.stdlib_module_names


class RangeServer:
    """Serves one snapshot as gitcache serves a hit (ETag, Range, If-Range), dropping the
    connection after ``drop_after`` bytes of its first ``drops`` responses."""

    def __init__(self, body: bytes, drop_after: int, drops: int = 1) -> None:
        self.body, self.drop_after, self.drops = body, drop_after, drops
        self.etag = '"' + hashlib.sha256(body).hexdigest() + '"'
        self.ranges: list[str] = []
        self.sent = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        asked = request.headers.get("Range", "")
        self.ranges.append(asked)
        start, end = 0, len(self.body) - 1
        status = 200
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", asked)
        if match and request.headers.get("If-Range", self.etag) == self.etag:
            start, status = int(match[1]), 206
            end = min(int(match[2]), end) if match[2] else end
        headers = {"ETag": self.etag, "Accept-Ranges": "bytes"}
        if status == 206:
            headers["Content-Range"] = f"bytes {start}-{end}/{len(self.body)}"
        response = web.StreamResponse(status=status, headers=headers)
        response.content_length = end - start + 1
        await response.prepare(request)
        part = self.body[start : end + 1]
        if self.drops and len(part) > self.drop_after:
            self.drops -= 1
            await response.write(part[: self.drop_after])
            self.sent += self.drop_after
            assert request.transport is not None
            request.transport.close()
            return response
        await response.write(part)
        self.sent += len(part)
        await response.write_eof()
        return response


async def test_a_dropped_connection_is_resumed_from_where_it_stopped(
    client: Any, rich: str, scratch: Path, aiohttp_server: Any
) -> None:
    good = await (await client.get(snapshot_url(rich))).read()
    server = RangeServer(good, drop_after=len(good) // 3)
    app = web.Application()
    app.router.add_get("/{tail:.*}", server.handle)
    url = f"http://127.0.0.1:{(await aiohttp_server(app)).port}"
    code, err = await run_client("--server", url, f"{HOST}/{rich}", str(scratch / "a"))
    assert code == 0, err
    git("fsck", "--no-progress", cwd=scratch / "a")
    resumed_at = len(good) // 3
    assert server.ranges[1].startswith(f"bytes={resumed_at}-")  # only the rest, once
    assert server.sent == len(good)


async def test_a_large_hit_comes_in_parallel_segments(
    client: Any, upstream: Upstream, big_work: Path, scratch: Path
) -> None:
    upstream.create("big", big_work)
    await (await client.get(snapshot_url("big"))).read()  # cached: the next one is a hit
    code, err = await run_client("--server", base(client), f"{HOST}/big", str(scratch / "a"))
    assert code == 0, err
    assert tree(scratch / "a") == tree(big_work)
    assert status(scratch / "a") == ""
    # The pack (over 16 MiB) was written from the download's buffers: intact.
    packs = list((scratch / "a" / ".git" / "objects" / "pack").glob("*.pack"))
    assert packs and max(p.stat().st_size for p in packs) > 16 * 1024 * 1024
    git("fsck", "--strict", "--no-progress", cwd=scratch / "a")


async def test_the_index_has_the_stat_data_of_the_files(
    client: Any, rich: str, scratch: Path
) -> None:
    work = scratch / "a"
    code, err = await run_client("--server", base(client), f"{HOST}/{rich}", str(work))
    assert code == 0, err
    entries = git("-c", "core.quotepath=off", "ls-files", "--debug", cwd=work)
    for name, block in re.findall(r"(?m)^(\S.*)\n((?:  .*\n)+)", entries):
        st = (work / name).lstat()
        if stat.S_ISDIR(st.st_mode):
            continue  # a gitlink
        fields = dict(re.findall(r"(\w+): ([\d:]+)", block))
        assert fields["mtime"] == f"{int(st.st_mtime)}:{st.st_mtime_ns % 10**9}", name
        assert (int(fields["ino"]), int(fields["size"])) == (st.st_ino, st.st_size), name
    assert status(work) == ""
    # Change detection is intact: the same size, new bytes, and git sees it.
    readme = work / "README.md"
    readme.write_text(readme.read_text().upper())
    assert " M README.md" in status(work)


async def test_depth_and_via_proxy(
    client: Any, upstream: Upstream, rich: str, scratch: Path
) -> None:
    """A shallow snapshot; and a clone whose later fetches go through gitcache."""
    target = scratch / "shallow"
    args = ("--server", base(client), "--depth", "1", "--via-proxy", f"{HOST}/{rich}")
    code, err = await run_client(*args, str(target))
    assert code == 0, err
    assert git("rev-parse", "--is-shallow-repository", cwd=target).strip() == "true"
    assert len(git("log", "--format=%H", cwd=target).split()) == 1
    assert git("config", "remote.origin.url", cwd=target).strip() == upstream.url(rich)
    git("fsck", "--no-progress", cwd=target)
    assert status(target) == ""

    before = len(upstream.requests)
    await agit("fetch", "-q", "--unshallow", cwd=target)  # through gitcache, from its mirror
    assert git("rev-parse", "--is-shallow-repository", cwd=target).strip() == "false"
    page = await (await client.get("/metrics")).text()
    assert sample(page, "gitcache_git_responses_total", service="upload-pack") >= 1
    # The mirror was fresh: the upstream was not asked for the unshallow.
    assert not any("upload-pack" in p for p, _ in upstream.requests[before:])
