"""gitcache clone: restore a snapshot from a gitcache server into a directory, safely, or
fall back to ``git clone`` when the server cannot be reached.

One module, Python 3.9+ standard library only, ``git`` and ``zstd`` on the PATH: a CI
runner uses it without installing anything (``curl -sf http://gitcache:8080/client.py |
python3 - clone …``). It imports nothing from the server.

Correct or nothing: the download is hashed as it streams (a hit's size and sha256 must
match its ``Content-Length`` and ``ETag``; a miss's chunked stream must end properly),
``zstd -d`` checks every frame's checksum, the tar is extracted into a temporary sibling
of the target that no member may escape, and only when all of that held is it renamed
into place. Any failure leaves neither the target nor the temporary directory behind.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import functools
import hashlib
import http.client
import itertools
import os
import queue
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, NamedTuple, Union

CHUNK = 1024 * 1024
SEGMENT = 8 * 1024 * 1024  # what one ranged request fetches of a hit
PARALLEL = 4  # ranged requests at once (and segments held in memory at most)
RETRIES = 3  # times a dropped connection is resumed
LARGE = 16 * 1024 * 1024  # a member larger is written as it streams, never held whole
Buffer = Union[bytes, bytearray]  # noqa: UP007 (a runtime alias: Python 3.9 has no X | Y)
_SHA256 = re.compile(r"[0-9a-f]{64}")  # an ETag that is the snapshot's sha256
PROGRESS_EVERY = 5.0  # seconds between progress lines when stderr is not a terminal


class Failed(Exception):
    """The clone failed; the message is the one line the user sees."""


class ServerDown(Failed):
    """gitcache could not be reached or answered 5xx: ``git clone`` may stand in."""


# --- what to clone ----------------------------------------------------------------------


def parse_repository(text: str) -> tuple[str, str, str]:
    """``https://github.com/org/repo``, ``git@github.com:org/repo.git`` or
    ``github.com/org/repo`` → (``github.com``, ``org/repo``, the URL ``git clone`` would
    use: the one given, or ``https://…`` for the bare form)."""
    scp = re.fullmatch(r"[\w.-]+@([\w.-]+):(.+)", text)
    if scp:
        host, path, url = scp.group(1), scp.group(2), text
    else:
        parts = urllib.parse.urlsplit(text if "://" in text else "https://" + text)
        host, path = parts.netloc.rpartition("@")[2], parts.path
        url = text if "://" in text else ""
    path = path.strip("/")
    if path.endswith(".git"):
        path = path[: -len(".git")]
    if not host or not path or ".." in path.split("/"):
        raise Failed(f"not a repository: {text!r} (expected https://HOST/PATH or HOST/PATH)")
    return host.lower(), path, url or f"https://{host}/{path}.git"


def snapshot_url(
    server: str,
    host: str,
    path: str,
    ref: str | None,
    max_age: int | None,
    depth: int | None = None,
) -> str:
    query = {}
    if ref:
        query["ref"] = ref
    if max_age is not None:
        query["max_age"] = str(max_age)
    if depth is not None:
        query["depth"] = str(depth)
    url = f"{server.rstrip('/')}/git/{host}/{urllib.parse.quote(path)}/snapshot.tar.zst"
    return url + ("?" + urllib.parse.urlencode(query) if query else "")


# --- download and verify ----------------------------------------------------------------


class Progress:
    """Bytes, rate and ETA on stderr: a bar on a terminal, a line every few seconds
    otherwise (CI logs), nothing with ``--quiet``."""

    def __init__(self, total: int | None, quiet: bool) -> None:
        self.total = total
        self.done = 0
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self.started = self.shown = time.monotonic()

    def add(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.quiet or now - self.shown < (0.2 if self.tty else PROGRESS_EVERY):
            return
        self.shown = now
        self._show(now)

    def _show(self, now: float) -> None:
        rate = self.done / max(now - self.started, 1e-6)
        text = f"{self.done / 1e6:8.1f} MB  {rate / 1e6:6.1f} MB/s"
        if self.total:
            left = (self.total - self.done) / rate if rate else 0
            text = f"{100 * self.done / self.total:5.1f}% {text}  ETA {left:4.0f}s"
        sys.stderr.write(("\r" + text) if self.tty else text + "\n")
        sys.stderr.flush()

    def finish(self) -> None:
        if not self.quiet and self.tty:
            self._show(time.monotonic())
            sys.stderr.write("\n")


def open_snapshot(
    url: str, token: str | None, headers: dict[str, str] | None = None
) -> http.client.HTTPResponse:
    """The server's response; :class:`ServerDown` if it cannot answer, :class:`Failed`
    (no fallback) for a 4xx, whose JSON error says why."""
    # http(s) only: the server URL was checked in clone().
    request = urllib.request.Request(url, headers={"User-Agent": "gitcache-client"})  # noqa: S310
    for name, value in (headers or {}).items():
        request.add_header(name, value)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        response: http.client.HTTPResponse = urllib.request.urlopen(  # noqa: S310
            request, timeout=60
        )
        return response
    except urllib.error.HTTPError as exc:
        detail = exc.read(4096).decode("utf-8", "replace")
        match = re.search(r'"error":\s*"([^"]*)"', detail)
        reason = match.group(1) if match else exc.reason
        if exc.code >= 500:
            raise ServerDown(f"gitcache answered {exc.code}: {reason}") from None
        raise Failed(f"gitcache answered {exc.code}: {reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise ServerDown(f"gitcache cannot be reached: {getattr(exc, 'reason', exc)}") from None


def _no_signals() -> None:
    """Run at the start of every thread but the main one: the kernel then delivers Ctrl-C
    (SIGINT) and SIGTERM to the main thread, whose blocking read or wait it interrupts.
    Delivered to another thread, it would only set a flag that the main thread, blocked
    on a pipe or a queue, never looks at."""
    if hasattr(signal, "pthread_sigmask"):  # POSIX
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})


class Download:
    """A snapshot's bytes, in order, verified at the end.

    The first request asks for the first segment. A hit answers 206 with its size and
    ETag: the rest comes in segments fetched by up to ``PARALLEL`` threads, still handed
    over in order (at most ``PARALLEL`` segments held), each resumed with ``Range`` and
    ``If-Range`` where its connection dropped. A miss (streamed while it is made) answers
    200 with no size: it is read as it comes and cannot be resumed."""

    def __init__(self, url: str, token: str | None, quiet: bool) -> None:
        self.url, self.token = url, token
        self.first = open_snapshot(url, token, {"Range": f"bytes=0-{SEGMENT - 1}"})
        self.headers = self.first.headers
        self.etag = self.headers.get("ETag", "")
        self.size: int | None = None
        if self.first.status == 206:
            self.size = int(self.headers.get("Content-Range", "/0").rpartition("/")[2])
        elif self.headers.get("Content-Length") is not None:
            self.size = int(self.headers["Content-Length"])
        self.progress = Progress(self.size, quiet)
        self._digest = hashlib.sha256()
        self._received = 0

    @property
    def checked_whole(self) -> bool:
        """Whether the end of :meth:`chunks` checks every byte against a sha256."""
        return self.size is not None and _SHA256.fullmatch(self.etag.strip('"')) is not None

    def chunks(self) -> Iterator[Buffer]:
        ranged = self.first.status == 206
        pieces = self._segments() if ranged else self._stream(self.first, 0)
        # Hashed on a thread of its own, one piece behind: while zstd takes a piece, the
        # pipe between us holds 64 KiB, so hashing it first would stall zstd meanwhile.
        hashing = concurrent.futures.ThreadPoolExecutor(1, initializer=_no_signals)
        try:
            hashed: concurrent.futures.Future[None] | None = None
            for piece in pieces:
                if hashed is not None:
                    hashed.result()
                hashed = hashing.submit(self._digest.update, piece)
                self._received += len(piece)
                self.progress.add(len(piece))
                yield piece
            if hashed is not None:
                hashed.result()
        finally:
            hashing.shutdown(wait=True)
        self._check()

    def _check(self) -> None:
        if self.size is not None and self._received != self.size:
            raise Failed(f"the download was cut: {self._received} of {self.size} bytes")
        etag = self.etag.strip('"')
        if _SHA256.fullmatch(etag) and self._digest.hexdigest() != etag:
            raise Failed("the download does not match its checksum (ETag)")

    def _stream(self, response: http.client.HTTPResponse, start: int) -> Iterator[bytes]:
        """A whole response's body from ``start``; resumed where it dropped, if the
        server said what it is (size and ETag)."""
        position = start
        for attempt in range(RETRIES + 1):
            try:
                while chunk := response.read(CHUNK):
                    position += len(chunk)
                    yield chunk
                return
            except (http.client.HTTPException, OSError) as exc:
                response.close()
                if self.size is None or not self.etag or attempt == RETRIES:
                    raise Failed(f"the download was cut after {position} bytes ({exc})") from None
                response = self._resume(position, self.size - 1)

    def _resume(self, start: int, end: int) -> http.client.HTTPResponse:
        """The bytes from ``start`` to ``end`` of the same snapshot, or :class:`Failed`."""
        headers = {"Range": f"bytes={start}-{end}", "If-Range": self.etag}
        response = open_snapshot(self.url, self.token, headers)
        if response.status != 206 or not response.headers.get("Content-Range", "").startswith(
            f"bytes {start}-"
        ):
            response.close()
            raise Failed("the snapshot changed on the server during the download")
        return response

    def _segment(
        self, start: int, end: int, response: http.client.HTTPResponse | None
    ) -> bytearray:
        """``start``..``end`` whole, resumed where a connection dropped; read straight
        into one buffer (no pieces to join)."""
        buffer = bytearray(end - start + 1)
        view = memoryview(buffer)
        got = 0
        for attempt in range(RETRIES + 1):
            if response is None:
                response = self._resume(start + got, end)
            try:
                while got < len(buffer) and (n := response.readinto(view[got : got + CHUNK])):
                    got += n
                if got == len(buffer):
                    return buffer
            except (http.client.HTTPException, OSError):
                pass
            response.close()
            response = None
            if attempt == RETRIES:
                break
        raise Failed(f"the download was cut at byte {start + got}, retried {RETRIES} times")

    def _segments(self) -> Iterator[Buffer]:
        assert self.size is not None
        bounds = [(a, min(a + SEGMENT, self.size) - 1) for a in range(0, self.size, SEGMENT)]
        yield self._segment(*bounds[0], self.first)
        with concurrent.futures.ThreadPoolExecutor(PARALLEL, initializer=_no_signals) as pool:
            ahead: collections.deque[concurrent.futures.Future[bytearray]] = collections.deque()
            rest = iter(bounds[1:])
            for start, end in itertools.islice(rest, PARALLEL):
                ahead.append(pool.submit(self._segment, start, end, None))
            while ahead:
                piece = ahead.popleft().result()
                for start, end in itertools.islice(rest, 1):
                    ahead.append(pool.submit(self._segment, start, end, None))
                yield piece


# --- extract ------------------------------------------------------------------------------


class Member(NamedTuple):
    """A tar member as the extraction needs it."""

    name: str
    kind: bytes  # the tar type flag, as ``_TYPES`` names it
    size: int
    mode: int
    mtime: float
    linkname: str


def _checked(member: Member, symlinks: set[str]) -> str:
    """The member's relative path, or :class:`Failed` for what could write outside the
    target: an absolute name, ``..``, a hard link, a device, a path through a symlink of
    the snapshot's own (the target is new: no other symlink can be in it)."""
    name = member.name.rstrip("/")
    parts = name.split("/")
    if not name or name.startswith("/") or ".." in parts or "\\" in name:
        raise Failed(f"refused an unsafe path in the snapshot: {member.name!r}")
    if member.kind not in (_FILE, _DIRECTORY, _SYMLINK):
        raise Failed(f"refused a link or device in the snapshot: {member.name!r}")
    for end in range(1, len(parts) + 1):
        if "/".join(parts[:end]) in symlinks:
            raise Failed(f"refused a path through a symlink in the snapshot: {member.name!r}")
    return name


def write_file(
    path: str,
    data: Iterator[bytes] | list[bytes],
    mode: int,
    mtime: float,
    fill: Callable[[int], None] | None = None,
) -> None:
    """A new file (never through a link, never over another), its mode and mtime as the
    snapshot says, as a checkout would have them. ``fill``, if given, writes the rest
    of its content into the descriptor by other means."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        for piece in data:
            _write_all(fd, piece)
        if fill is not None:
            fill(fd)
        os.fchmod(fd, 0o755 if mode & 0o100 else 0o644)
        os.utime(fd, (mtime, mtime))
    finally:
        os.close(fd)


# --- the tar ------------------------------------------------------------------------------

_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)
_FILE, _DIRECTORY, _SYMLINK = b"0", b"5", b"2"
# What else a tar may hold: the same as a file (old and contiguous files), or headers that
# describe the next member (pax, GNU long names), or a pax global header (git archive
# writes one, a comment holding the commit id). Anything else is refused by _checked.
_AS_FILE = (b"\0", b"7")
_PAX, _PAX_GLOBAL, _LONG_NAME, _LONG_LINK = b"x", b"g", b"L", b"K"


def _number(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256, for sizes of 8 GiB and more
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0  # ValueError: see TarReader.__iter__


def _text(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _pax_records(data: bytes) -> dict[str, str]:
    """``LENGTH KEY=VALUE\\n`` records (POSIX pax)."""
    records, at = {}, 0
    while at < len(data) and data[at] != 0:
        length = int(data[at : data.index(b" ", at)])
        if length <= 0:
            raise ValueError(f"a pax record of length {length}")
        record = data[at : at + length]
        key, _, value = record[record.index(b" ") + 1 : -1].partition(b"=")
        records[key.decode("utf-8", "replace")] = value.decode("utf-8", "surrogateescape")
        at += length
    return records


class TarReader:
    """The members of the tar read from ``stream``, parsed here rather than by the
    tarfile module, whose pure-Python header parsing and buffering cost more than the
    creation of a small file: the header fields the extraction needs, checked against
    their checksum; long names from pax and GNU headers."""

    def __init__(self, stream: Joined) -> None:
        self._stream = stream
        self._buf = bytearray()

    def _fill(self, n: int) -> None:
        while len(self._buf) < n:
            data = self._stream.read(CHUNK)
            if not data:
                raise Failed("the snapshot is not a complete tar: it ends inside a member")
            self._buf += data

    def read(self, n: int) -> bytes:
        """The next ``n`` bytes of the tar (a member's content and padding)."""
        self._fill(n)
        with memoryview(self._buf) as view:
            data = bytes(view[:n])
        del self._buf[:n]  # from the front of a bytearray: no copy of the rest
        return data

    def copy_to(self, fd: int, n: int, name: str) -> None:
        """Write the next ``n`` bytes into ``fd``: what was read ahead, then straight from
        the stream (spliced, or from the download's buffers)."""
        ahead = min(n, len(self._buf))
        with memoryview(self._buf) as view:
            _write_all(fd, view[:ahead])
        del self._buf[:ahead]
        self._stream.copy_to(fd, n - ahead, name)

    def skip(self, n: int) -> None:
        self.read(n)

    def __iter__(self) -> Iterator[Member]:
        try:
            yield from self._members()
        except (ValueError, IndexError) as exc:  # a number, a record that does not parse
            raise Failed(f"the snapshot is not a valid tar: {exc}") from None

    def _members(self) -> Iterator[Member]:
        extended: dict[str, str] = {}
        while True:
            block = self.read(_BLOCK)
            if block == _ZERO_BLOCK:
                return  # the end of the archive
            stored = _number(block[148:156])
            if sum(block) - sum(block[148:156]) + 8 * 32 != stored:
                raise Failed("the snapshot is not a valid tar: a header checksum is wrong")
            kind, size = block[156:157], _number(block[124:136])
            if kind in (_PAX, _PAX_GLOBAL, _LONG_NAME, _LONG_LINK):
                data = self.read(size + (-size % _BLOCK))[:size]
                if kind == _PAX:
                    extended.update(_pax_records(data))
                elif kind == _LONG_NAME:
                    extended["path"] = _text(data)
                elif kind == _LONG_LINK:
                    extended["linkpath"] = _text(data)
                continue
            name = _text(block[0:100])
            if block[257:263] == b"ustar\0" and block[345]:  # a POSIX prefix
                name = _text(block[345:500]) + "/" + name
            kind = _FILE if kind in _AS_FILE else kind
            mtime = float(extended.get("mtime", _number(block[136:148])))
            yield Member(
                name=extended.get("path", name),
                kind=kind,
                size=int(extended.get("size", size)) if kind == _FILE else 0,
                mode=_number(block[100:108]),
                mtime=mtime,
                linkname=extended.get("linkpath", _text(block[157:257])),
            )
            extended = {}


def extract(stream: Joined, root: Path) -> None:
    """Extract the tar read from ``stream`` into the new directory ``root``."""
    symlinks: set[str] = set()
    made: set[str] = {""}
    tar = TarReader(stream)
    try:
        for member in tar:
            name = _checked(member, symlinks)
            target = os.path.join(root, name)
            parent = name.rpartition("/")[0]
            if parent not in made:
                os.makedirs(os.path.join(root, parent), exist_ok=True)
                made.add(parent)
            if member.kind == _DIRECTORY:
                os.makedirs(target, exist_ok=True)
                made.add(name)
            elif member.kind == _SYMLINK:  # kept as git would check it out, wherever it points
                os.symlink(member.linkname, target)
                symlinks.add(name)
            elif member.size <= LARGE:
                # Written here: a thread of writers costs more in handing over than
                # the creation of a small file does (measured on ext4 and tmpfs).
                data = tar.read(member.size + (-member.size % _BLOCK))[: member.size]
                write_file(target, [data], member.mode, member.mtime)
            else:  # a large file (a pack): never held, never copied through Python
                write_file(
                    target,
                    [],
                    member.mode,
                    member.mtime,
                    fill=functools.partial(tar.copy_to, n=member.size, name=member.name),
                )
                tar.skip(-member.size % _BLOCK)
    except FileExistsError as exc:
        raise Failed(f"refused a path the snapshot writes twice: {exc.filename!r}") from None


# --- decompress ---------------------------------------------------------------------------

# The skippable frame gitcache writes before each stored frame, and that frame's header
# (frames of raw blocks, see the server's snapshot/frames.py: a test holds them equal).
STORED_MARK = b"\x5e\x2a\x4d\x18" + (15).to_bytes(4, "little") + b"gitcache:stored"
STORED_HEADER = b"\x28\xb5\x2f\xfd\x04\x38"
_ZSTD_MAGIC = 0xFD2FB528
_RAW_BLOCK, _RLE_BLOCK, _COMPRESSED_BLOCK = 0, 1, 2
STOP_WAIT = 2.0  # seconds a failed or interrupted clone waits for the decoding thread
RAW_AHEAD = 4  # stored blocks (128 KiB at most) handed over and not yet written, at most


class _Cursor:
    """The download as one sequence of bytes, taken in views of its buffers (no copy)."""

    def __init__(self, chunks: Iterator[Buffer]) -> None:
        self._chunks = chunks
        self._view = memoryview(b"")

    def at_end(self) -> bool:
        while not self._view:
            chunk = next(self._chunks, None)
            if chunk is None:
                return True
            self._view = memoryview(chunk)
        return False

    def take(self, n: int) -> Iterator[memoryview]:
        while n:
            if self.at_end():
                raise Failed("the snapshot ends inside a zstd frame")
            piece, self._view = self._view[:n], self._view[n:]
            n -= len(piece)
            yield piece

    def read(self, n: int) -> bytes:
        return b"".join(self.take(n))

    def rest(self) -> Iterator[memoryview]:
        while not self.at_end():
            view, self._view = self._view, memoryview(b"")
            yield view


class _Run:
    """A stretch of the tar: the output of one ``zstd -d``, or the content of stored
    frames as the download hands it over."""

    def read(self, n: int) -> bytes:
        raise NotImplementedError

    def copy_to(self, fd: int, n: int) -> int:
        """Write up to ``n`` bytes into ``fd``; how many (0 at the run's end)."""
        raise NotImplementedError

    def finish(self) -> None:
        """Wait for the run's end, after the extraction read it all."""

    def close(self) -> None:
        """Stop early: something failed."""


class _ZstdFailed(Failed):
    """``zstd -d`` rejected the stream (its own words are added to the message)."""


class _ZstdRun(_Run):
    def __init__(self, complaints: IO[bytes]) -> None:
        self.process = subprocess.Popen(
            ["zstd", "-d", "-q", "-c"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=complaints,
            bufsize=0,  # no read-ahead of our own: large files are spliced from the pipe
        )
        assert self.process.stdin is not None and self.process.stdout is not None
        self.stdin, self.stdout = self.process.stdin, self.process.stdout

    def write(self, pieces: list[memoryview]) -> None:
        for piece in pieces:
            _write_all(self.stdin.fileno(), piece)

    def read(self, n: int) -> bytes:
        return self.stdout.read(n) or self._end()

    def copy_to(self, fd: int, n: int) -> int:
        splice = getattr(os, "splice", None)  # Python 3.10+, Linux
        if splice is not None:
            return splice(self.stdout.fileno(), fd, n) or len(self._end())
        data = self.read(min(n, CHUNK))
        _write_all(fd, data)
        return len(data)

    def _end(self) -> bytes:
        code = self.process.wait()
        if code != 0:
            raise _ZstdFailed("zstd -d failed, the snapshot is damaged")
        return b""

    def finish(self) -> None:
        self.process.wait()

    def close(self) -> None:
        self.process.kill()
        self.process.wait()
        for pipe in (self.stdin, self.stdout):
            with contextlib.suppress(OSError):
                pipe.close()


class _Stopped(Exception):
    """The extraction failed: the decoding stops."""


class _RawRun(_Run):
    """Stored frames' content, handed over by the decoding thread as views of the
    download's buffers (at most ``RAW_AHEAD`` of them waiting); ``None`` ends it."""

    def __init__(self) -> None:
        self._pieces: queue.Queue[memoryview | None] = queue.Queue(RAW_AHEAD)
        self._view: memoryview | None = memoryview(b"")
        self._closed = False

    def put(self, piece: memoryview | None) -> None:
        while not self._closed:
            with contextlib.suppress(queue.Full):
                self._pieces.put(piece, timeout=0.1)
                return
        raise _Stopped

    def _next(self) -> memoryview | None:
        while self._view is not None and not self._view:
            self._view = self._pieces.get()
        return self._view

    def read(self, n: int) -> bytes:
        view = self._next()
        if view is None:
            return b""
        piece, self._view = view[:n], view[n:]
        return bytes(piece)

    def copy_to(self, fd: int, n: int) -> int:
        view = self._next()
        if view is None:
            return 0
        piece, self._view = view[:n], view[n:]
        _write_all(fd, piece)
        return len(piece)

    def close(self) -> None:
        self._closed = True


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class Joined:
    """The snapshot's tar as one stream, read by the extraction: the runs in the order
    the decoding thread starts them, ``None`` after the last."""

    def __init__(self) -> None:
        self._runs: queue.Queue[_Run | None] = queue.Queue()
        self._started: list[_Run] = []
        self._lock = threading.Lock()
        self._stopped = False
        self._run: _Run | None = None
        self._done = False

    def start(self, run: _Run) -> None:
        """(decoding thread) Append a run; :class:`_Stopped` if the extraction failed."""
        with self._lock:
            self._started.append(run)
            if self._stopped:
                run.close()
                raise _Stopped
        self._runs.put(run)

    def end(self) -> None:
        """(decoding thread) No more runs."""
        self._runs.put(None)

    def stop(self) -> None:
        """(extraction) Something failed: end every run, to unblock the decoding."""
        with self._lock:
            self._stopped = True
            for run in self._started:
                run.close()

    def finish(self) -> None:
        for run in self._started:
            run.finish()

    def _current(self) -> _Run | None:
        if self._run is None and not self._done:
            self._run = self._runs.get()
            self._done = self._run is None
        return self._run

    def read(self, n: int = CHUNK) -> bytes:
        while (run := self._current()) is not None:
            data = run.read(n)
            if data:
                return data
            self._run = None
        return b""

    def copy_to(self, fd: int, n: int, name: str) -> None:
        while n:
            run = self._current()
            if run is None:
                raise Failed(f"the snapshot ended inside {name!r}")
            moved = run.copy_to(fd, n)
            if not moved:
                self._run = None
            n -= moved


class _Decoder:
    """Splits the download into runs for the extraction (on a thread of its own): all of
    it through ``zstd -d``; or, if ``stored``, stored frames taken as they are and each
    stretch between them through a ``zstd -d`` of its own."""

    def __init__(self, joined: Joined, complaints: IO[bytes], stored: bool) -> None:
        self._joined, self._complaints, self._stored = joined, complaints, stored
        self._zstd: _ZstdRun | None = None

    def run(self, chunks: Iterator[Buffer], failure: list[BaseException]) -> None:
        _no_signals()
        cursor = _Cursor(chunks)
        try:
            if not self._stored:
                for piece in cursor.rest():
                    self._to_zstd([piece])
            while not cursor.at_end():
                magic = cursor.read(4)
                if magic == STORED_MARK[:4]:
                    size = cursor.read(4)
                    payload = cursor.read(int.from_bytes(size, "little"))
                    if magic + size + payload == STORED_MARK:
                        self._end_zstd()
                        self._stored_frame(cursor)
                    # any other skippable frame: nothing to decode
                else:
                    self._to_zstd([memoryview(magic), *_frame(cursor, magic)])
        except _Stopped:
            pass
        except BaseException as exc:  # reported by the extraction's thread, before the end
            failure.append(exc)
        finally:
            with contextlib.suppress(OSError):
                self._end_zstd()
            self._joined.end()

    def _to_zstd(self, pieces: Iterable[memoryview]) -> None:
        if self._zstd is None:
            self._zstd = _ZstdRun(self._complaints)
            self._joined.start(self._zstd)
        try:
            self._zstd.write(list(pieces))
        except BrokenPipeError:
            raise _Stopped from None  # zstd is gone: failed, or killed by stop()

    def _end_zstd(self) -> None:
        if self._zstd is not None:
            zstd, self._zstd = self._zstd, None
            zstd.stdin.close()

    def _stored_frame(self, cursor: _Cursor) -> None:
        """A stored frame's content as a run of its own. Its xxh64 is not checked: the
        whole download's sha256 is (``stored`` is only set when it will be)."""
        if cursor.read(len(STORED_HEADER)) != STORED_HEADER:
            raise Failed("the snapshot has a damaged stored frame")
        run = _RawRun()
        self._joined.start(run)
        try:
            last = False
            while not last:
                value = int.from_bytes(cursor.read(3), "little")
                last, kind, size = bool(value & 1), (value >> 1) & 3, value >> 3
                if kind != _RAW_BLOCK:
                    raise Failed("the snapshot has a damaged stored frame")
                for piece in cursor.take(size):
                    run.put(piece)
            cursor.read(4)  # the checksum
        finally:
            with contextlib.suppress(_Stopped):
                run.put(None)


def _frame(cursor: _Cursor, magic: bytes) -> Iterator[memoryview]:
    """The rest of a frame (RFC 8878) that begins with ``magic``, walked block by block
    to find where it ends."""
    if int.from_bytes(magic, "little") & 0xFFFFFFF0 == 0x184D2A50:  # skippable
        length = cursor.read(4)
        yield memoryview(length)
        yield from cursor.take(int.from_bytes(length, "little"))
        return
    if int.from_bytes(magic, "little") != _ZSTD_MAGIC:
        raise Failed("the snapshot is not zstd: it is damaged")
    descriptor = cursor.read(1)
    yield memoryview(descriptor)
    single, checksum = descriptor[0] & 0x20, descriptor[0] & 0x04
    rest = (0 if single else 1) + (0, 1, 2, 4)[descriptor[0] & 0x03]  # window, dictionary
    rest += (1 if single else 0, 2, 4, 8)[descriptor[0] >> 6]  # content size
    yield from cursor.take(rest)
    last = False
    while not last:
        block = cursor.read(3)
        yield memoryview(block)
        value = int.from_bytes(block, "little")
        last, kind, size = bool(value & 1), (value >> 1) & 3, value >> 3
        if kind > _COMPRESSED_BLOCK:
            raise Failed("the snapshot has a damaged zstd block")
        yield from cursor.take(1 if kind == _RLE_BLOCK else size)
    if checksum:
        yield from cursor.take(4)


def restore(chunks: Iterator[Buffer], root: Path, *, stored: bool = False) -> None:
    """Decompress the chunks and extract the tar into ``root``, as one pipeline.
    ``stored``: the whole download will be checked (its sha256), so stored frames may be
    taken as they are rather than through ``zstd -d``."""
    with tempfile.TemporaryFile() as complaints:  # zstd's own words, for the reason
        failure = _pipeline(chunks, root, complaints, stored)
        complaints.seek(0)
        said = complaints.read().decode("utf-8", "replace").strip().splitlines()
    if failure:
        first = failure[0]
        if isinstance(first, _ZstdFailed) and said:
            raise Failed(f"{first}: {said[-1]}")
        raise first if isinstance(first, Failed) else Failed(str(first))


def _pipeline(
    chunks: Iterator[Buffer], root: Path, complaints: IO[bytes], stored: bool
) -> list[BaseException]:
    """Decode the download on a thread, extract its tar here; what failed, first
    first (the download, the decoding, or the tar)."""
    joined = Joined()
    failure: list[BaseException] = []
    decoder = threading.Thread(
        target=_Decoder(joined, complaints, stored).run, args=(chunks, failure), daemon=True
    )
    decoder.start()
    done = False
    try:
        extract(joined, root)
        # The tar ends before the stream does (padding): read it all, so zstd checks the
        # last frame's checksum too and exits by itself, and the download is all hashed.
        while joined.read(CHUNK):
            pass
        done = True
    except (Failed, OSError) as exc:
        failure.append(exc)
    finally:
        if not done:  # failed, or interrupted (Ctrl-C): stop zstd and the decoding
            joined.stop()
        # A download stalled on the network is not waited for: the decoding thread writes
        # no file, so the caller may remove the directory and exit while it still waits.
        decoder.join(timeout=None if done else STOP_WAIT)
        joined.finish()
    return failure


# --- the index's stat data ---------------------------------------------------------------

_ENTRY = struct.Struct(">10I")  # ctime s/ns, mtime s/ns, dev, ino, mode, uid, gid, size


def stamp_index(root: Path) -> bool:
    """Write into ``root/.git/index`` the stat data of the files just extracted, which are
    known to match it (their bytes were verified), so the first ``git status`` does not
    rehash the whole tree. Each entry gets what ``lstat`` says now, exactly what a
    checkout records, so a later change to a file is still seen. Whether it was done:
    an index of a version this does not know is left as it is."""
    try:
        return _stamp_index(root)
    except (OSError, ValueError, IndexError, struct.error) as exc:
        raise Failed(f"the snapshot's git index cannot be used: {exc}") from None


def _stamp_index(root: Path) -> bool:
    path = root / ".git" / "index"
    data = path.read_bytes()
    if data[:4] != b"DIRC" or struct.unpack(">I", data[4:8])[0] not in (2, 3):
        return False
    hash_size = 32 if _object_format(root) == "sha256" else 20
    out = bytearray(data[:12])
    offset = 12
    for _ in range(struct.unpack(">I", data[8:12])[0]):
        fixed = _ENTRY.size + hash_size + 2
        flags = struct.unpack(">H", data[offset + fixed - 2 : offset + fixed])[0]
        extended = 2 if flags & 0x4000 else 0
        name_at = offset + fixed + extended
        name_end = data.index(b"\0", name_at)
        length = (name_end + 1 - offset + 7) // 8 * 8  # NUL-padded to a multiple of 8
        entry = bytearray(data[offset : offset + length])
        name = data[name_at:name_end].decode("utf-8", "surrogateescape")
        mode = _ENTRY.unpack_from(entry)[6]
        if mode >> 12 != 0o16:  # not a gitlink (a submodule: nothing checked out there)
            st = os.lstat(root / name)
            fields = list(_ENTRY.unpack_from(entry))
            fields[0:6] = (
                int(st.st_ctime) & 0xFFFFFFFF,
                st.st_ctime_ns % 1_000_000_000,
                int(st.st_mtime) & 0xFFFFFFFF,
                st.st_mtime_ns % 1_000_000_000,
                st.st_dev & 0xFFFFFFFF,
                st.st_ino & 0xFFFFFFFF,
            )
            fields[7:10] = (st.st_uid, st.st_gid, st.st_size & 0xFFFFFFFF)
            _ENTRY.pack_into(entry, 0, *fields)
        out += entry
        offset += length
    out += data[offset : len(data) - hash_size]  # extensions, as they are
    digest = hashlib.sha256 if hash_size == 32 else hashlib.sha1
    out += digest(out).digest()
    temporary = path.with_name("index.gitcache")
    temporary.write_bytes(out)
    os.replace(temporary, path)
    return True


def _object_format(root: Path) -> str:
    config = (root / ".git" / "config").read_text("utf-8", "replace")
    match = re.search(r"objectformat\s*=\s*(\w+)", config, re.IGNORECASE)
    return match.group(1).lower() if match else "sha1"


# --- the command -------------------------------------------------------------------------


def clone(args: argparse.Namespace) -> int:
    host, path, upstream = parse_repository(args.repository)
    target = Path(args.directory or path.rsplit("/", 1)[-1]).absolute()
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise Failed(f"destination path '{target}' already exists and is not an empty directory")
    if args.depth is not None and args.depth < 1:
        raise Failed(f"--depth must be a positive number, not {args.depth}")
    server = args.server or os.environ.get("GITCACHE_URL")
    if not server:
        raise Failed("no server: pass --server URL or set GITCACHE_URL")
    if not server.startswith(("http://", "https://")):
        raise Failed(f"the server must be an http:// or https:// URL, not {server!r}")
    token = os.environ.get(args.token_env) if args.token_env else None
    try:
        return from_gitcache(args, server, host, path, target, token)
    except ServerDown as exc:
        if args.no_fallback:
            raise
        print(f"gitcache: {exc}; cloning {upstream} with git instead", file=sys.stderr)
        command = ["git", "clone", "--quiet"] if args.quiet else ["git", "clone"]
        if args.ref:
            command += ["--branch", args.ref]
        if args.depth is not None:
            command += ["--depth", str(args.depth)]
        if args.via_proxy:
            print("gitcache: --via-proxy not applied: gitcache is down", file=sys.stderr)
        return subprocess.call([*command, "--", upstream, str(target)])


def from_gitcache(
    args: argparse.Namespace, server: str, host: str, path: str, target: Path, token: str | None
) -> int:
    url = snapshot_url(server, host, path, args.ref, args.max_age, args.depth)
    download = Download(url, token, args.quiet)
    temporary = target.parent / f".{target.name}.gitcache-{os.getpid()}"
    try:
        temporary.mkdir(parents=True)
        restore(download.chunks(), temporary, stored=download.checked_whole)
        download.progress.finish()
        stamp_index(temporary)
        if args.via_proxy:
            via_proxy(temporary, server, host, path)
        if target.exists():
            target.rmdir()  # empty, checked above
        temporary.rename(target)
    except BaseException:
        # Not download.first.close(): a decoding thread still reading it (a stalled
        # server) holds its lock, and the close would wait for it. It goes with the process.
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    download.first.close()
    headers = download.headers
    if not args.quiet:
        print(
            f"gitcache: {target.name} at {headers.get('X-Gitcache-Commit', '?')[:12]} "
            f"({headers.get('X-Gitcache-Source', '?')}, fetched "
            f"{headers.get('X-Gitcache-Age', '?')}s ago)",
            file=sys.stderr,
        )
    return 0


def via_proxy(root: Path, server: str, host: str, path: str) -> None:
    """Send the clone's later fetches through gitcache's git endpoint: an ``insteadOf``
    line in its own config, from the upstream's prefix of ``origin`` to gitcache's."""
    origin = subprocess.run(
        ["git", "-C", str(root), "config", "remote.origin.url"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    at = origin.find("/" + path)
    if at < 0:
        raise Failed(f"--via-proxy: origin {origin!r} does not end in {path!r}")
    ours = f"{server.rstrip('/')}/git/{host}/"
    key = f"url.{ours}.insteadOf"
    subprocess.run(["git", "-C", str(root), "config", key, origin[: at + 1]], check=True)


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="gitcache", description=__doc__.split("\n\n")[0])
    commands = root.add_subparsers(dest="command", required=True)
    sub = commands.add_parser("clone", help="restore a snapshot into a directory")
    sub.add_argument("repository", help="https://HOST/PATH, git@HOST:PATH or HOST/PATH")
    sub.add_argument("directory", nargs="?", help="where to (default: the repository's name)")
    sub.add_argument("--server", help="gitcache's URL (default: $GITCACHE_URL)")
    sub.add_argument("--ref", help="branch, tag or full commit id (default: the default branch)")
    sub.add_argument("--depth", type=int, help="a shallow clone of the last N commits")
    sub.add_argument("--max-age", type=int, help="seconds: how fresh the snapshot must be")
    sub.add_argument("--token-env", help="environment variable holding a gitcache token")
    sub.add_argument("--no-fallback", action="store_true", help="never fall back to git clone")
    sub.add_argument(
        "--via-proxy",
        action="store_true",
        help="later fetches of the clone through gitcache's git endpoint (an insteadOf line)",
    )
    sub.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")
    return root


class _Terminated(KeyboardInterrupt):
    """SIGTERM (a CI job cancelled): cleaned up after as Ctrl-C is."""


def _terminate(signum: int, frame: object) -> None:
    raise _Terminated


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
    try:
        return clone(args)
    except Failed as exc:
        print(f"gitcache: {exc}", file=sys.stderr)
        return _leave(1)
    except KeyboardInterrupt as exc:
        terminated = isinstance(exc, _Terminated)
        print("gitcache: " + ("terminated" if terminated else "interrupted"), file=sys.stderr)
        return _leave(128 + (signal.SIGTERM if terminated else signal.SIGINT))


def _leave(code: int) -> int:
    """Exit now if a download thread still waits on the network (a stalled server): its
    work is abandoned, its directory already removed, and the interpreter would otherwise
    wait for it at exit (the thread pools' workers are joined, daemons or not) until the
    socket times out."""
    if threading.active_count() > 1:
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
