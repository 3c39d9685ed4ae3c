"""gitcache benchmarks: every figure is a ratio against a baseline run in the same invocation.

    python -m bench.run                       # a generated repository (see --files, --commits)
    python -m bench.run --repo /path/to/bare  # any local bare repository

It serves the repository through ``git http-backend`` on loopback, runs ``gitcache serve``
as a separate process (so that its memory can be measured), and prints:

- miss with a warm mirror: time to first byte and total, against "clone the mirror to a
  temporary checkout, then ``tar | zstd -T0``" (what the reference implementation does),
  and the floor: the least work any miss must do, by C code on all cores, nothing sent;
  for commits new to gitcache, and for a commit whose working tree it has stored (another
  ref or variant of the commit, a snapshot made again after eviction);
- hit throughput against aiohttp's ``web.FileResponse`` serving the same file;
- restore (``curl | zstd -d | tar -x``) against ``git clone`` over HTTP from the upstream;
- peak RSS of the server while 20 clients stream one miss, and while 200 slow clients
  (1 KiB/s each) follow one miss.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from bench.harness import run_in_work_dir, serve_in_thread, served_upstream
from gitcache.files import SyncBehind
from gitcache.snapshot.generation import SYNC_EVERY
from tests.servers import free_port
from tests.upstream import git

HOST = "bench.test"
CLIENTS = 20
SLOW_CLIENTS = 200
SLOW_SECONDS = 15


def sh(command: str) -> float:
    """Run a shell pipeline (bash: process substitution); return its wall time in seconds."""
    started = time.perf_counter()
    subprocess.run(command, shell=True, check=True, executable=shutil.which("bash") or "/bin/sh")
    return time.perf_counter() - started


def curl(url: str) -> tuple[float, float, int]:
    """(time to first byte, total, bytes) as curl measures them."""
    result = subprocess.run(
        [
            "curl",
            "-sf",
            "-o",
            "/dev/null",
            "-w",
            "%{time_starttransfer} %{time_total} %{size_download}",
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    ttfb, total, size = result.stdout.split()
    return float(ttfb), float(total), int(size)


def floor(mirror: Path, size: int, work: Path, archive: bool = True) -> float:
    """The least a miss must do, by C code on every core at once: writing as many bytes
    as the snapshot has into a file (the cache entry, fsynced), and, on a thread of its
    own, their sha256 (OpenSSL's, through hashlib, which lets go of the GIL), both read
    from the mirror's packs; beside them (``archive``: a commit whose working tree is not
    stored yet) ``git archive`` of the tree through ``zstd -3``. Nothing is sent to a
    client: a real miss does more."""
    packs = sorted((mirror / "objects" / "pack").glob("*.pack"))
    spool = work / "floor.spool"

    def chunks() -> Iterator[bytes]:
        left = size
        while left:
            for pack in packs:
                with pack.open("rb") as f:
                    while left and (data := f.read(min(1 << 20, left))):
                        yield data
                        left -= len(data)

    def store() -> None:
        with spool.open("wb", buffering=0) as out:
            behind, written = SyncBehind(out.fileno(), SYNC_EVERY), 0
            for data in chunks():
                written += out.write(data)
                behind.wrote(written)  # written back as it grows, as a spool is
            behind.close()
            os.fsync(out.fileno())

    def digest() -> None:
        sha256 = hashlib.sha256()
        for data in chunks():
            sha256.update(data)

    started = time.perf_counter()
    threads = [threading.Thread(target=store), threading.Thread(target=digest)]
    for thread in threads:
        thread.start()
    if archive:
        sh(f"git --git-dir {mirror} archive --format=tar HEAD | zstd -q -3 > /dev/null")
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    spool.unlink()
    return elapsed


def new_commit(bare: Path, parent: str, branch: str) -> None:
    """A commit on ``branch`` whose tree is ``parent``'s plus one small file."""
    blob = git("--git-dir", str(bare), "hash-object", "-w", "--stdin", input=branch.encode())
    listing = git("--git-dir", str(bare), "ls-tree", parent)
    listing += f"100644 blob {blob.strip()}\t{branch}.txt\n"
    tree = git("--git-dir", str(bare), "mktree", input=listing.encode()).strip()
    who = ("-c", "user.name=bench", "-c", "user.email=bench@bench.test")
    message = ("-m", f"bench: {branch}")
    commit = git(*who, "--git-dir", str(bare), "commit-tree", tree, "-p", parent, *message)
    git("--git-dir", str(bare), "branch", "-f", branch, commit.strip())


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


@contextmanager
def gitcache_server(state: Path, upstream_url: str, extra: str = "") -> Iterator[tuple[str, int]]:
    """``gitcache serve`` as a child process; yields its base URL and pid. ``extra``: more
    TOML tables for its config."""
    port = free_port()
    config = state / "gitcache.toml"
    config.write_text(
        f'[server]\nlisten = "127.0.0.1:{port}"\nstate_dir = "{state}"\n'
        '[mirrors]\nfetch_interval = "1h"\n[log]\nlevel = "WARNING"\n'
        f'[upstreams."{HOST}"]\nurl = "{upstream_url}"\nallow_private = true\n' + extra
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "gitcache.cli", "serve", "--config", str(config)]
    )
    base = f"http://127.0.0.1:{port}"
    for _ in range(100):
        if subprocess.run(["curl", "-sf", f"{base}/healthz"], capture_output=True).returncode == 0:
            break
        time.sleep(0.1)
    try:
        yield base, proc.pid
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


@dataclass
class Bench:
    bare: Path
    work: Path
    runs: int
    upstream_port: int
    base: str = ""
    pid: int = 0

    @property
    def name(self) -> str:
        return self.bare.name.removesuffix(".git")

    def url(self, ref: str) -> str:
        return f"{self.base}/git/{HOST}/{self.name}/snapshot.tar.zst?ref={ref}"

    def miss(self, mirror: Path) -> None:
        """Misses of commits new to gitcache, and of a commit whose working tree it has
        stored (another ref or variant of it, a snapshot made again), interleaved."""
        new, known = [], []
        for i in range(self.runs):
            new.append(curl(self.url(f"new-{i}")))
            known.append(curl(self.url(f"bench-{i}")))
        ttfb = statistics.median(t[0] for t in new + known)
        reference = statistics.median(
            sh(
                f"git clone -q {mirror} {self.work}/co-{i} && tar -cf - -C {self.work}/co-{i} . "
                f"| zstd -q -T0 -3 -o {self.work}/ref-{i}.tar.zst && rm -rf {self.work}/co-{i}"
            )
            for i in range(self.runs)
        )
        size = known[0][2]
        print("\nmiss, warm mirror: gitcache vs clone-then-tar|zstd -T0")
        print(
            f"  first byte    {ttfb * 1e3:8.1f} ms  reference {reference * 1e3:8.1f} ms"
            f"  {reference / ttfb:7.1f}x sooner"
        )
        for name, timings, archive in (("new commit", new, True), ("known tree", known, False)):
            total = statistics.median(t[1] for t in timings)
            least = statistics.median(
                floor(mirror, size, self.work, archive) for _ in range(self.runs)
            )
            print(
                f"  {name:<13} {total * 1e3:8.1f} ms  reference {reference * 1e3:8.1f} ms"
                f"  {reference / total:7.2f}x faster   ({size / 1e6:.1f} MB; floor "
                f"{least * 1e3:.0f} ms: at most {reference / least:.2f}x)"
            )

    def hit(self, entry: Path) -> None:
        app = web.Application()

        async def file_response(request: web.Request) -> web.FileResponse:
            return web.FileResponse(entry)

        app.router.add_get("/file", file_response)
        port = free_port()
        with serve_in_thread(app, port):
            ours = statistics.median(curl(self.url("bench-0"))[1] for _ in range(self.runs * 3))
            plain = statistics.median(
                curl(f"http://127.0.0.1:{port}/file")[1] for _ in range(self.runs * 3)
            )
        mb = entry.stat().st_size / 1e6
        print("\nhit throughput: gitcache vs web.FileResponse of the same file")
        print(
            f"  gitcache {mb / ours:7.0f} MB/s  FileResponse {mb / plain:7.0f} MB/s"
            f"  ratio {plain / ours:.2f}"
        )

    def restore(self) -> None:
        ours, clone = [], []
        for i in range(self.runs):
            ours.append(
                sh(
                    f"mkdir {self.work}/r-{i} && curl -sf '{self.url('bench-0')}' "
                    f"| zstd -d -q | tar -x -C {self.work}/r-{i}"
                )
            )
            clone.append(
                sh(
                    f"git clone -q http://127.0.0.1:{self.upstream_port}/{self.name}.git "
                    f"{self.work}/c-{i}"
                )
            )
            shutil.rmtree(self.work / f"r-{i}")
            shutil.rmtree(self.work / f"c-{i}")
        ours_s, clone_s = statistics.median(ours), statistics.median(clone)
        print("\nrestore: curl | zstd -d | tar -x  vs  git clone over HTTP")
        print(
            f"  gitcache {ours_s * 1e3:8.1f} ms  git clone {clone_s * 1e3:8.1f} ms"
            f"  {clone_s / ours_s:.2f}x faster"
        )

    def memory(self) -> None:
        before = rss_kb(self.pid)
        peak = before
        clients = [
            subprocess.Popen(["curl", "-sf", "-o", "/dev/null", self.url("rss")])
            for _ in range(CLIENTS)
        ]
        while any(c.poll() is None for c in clients):
            peak = max(peak, rss_kb(self.pid))
            time.sleep(0.005)
        failed = sum(1 for c in clients if c.returncode != 0)
        print(f"\nserver memory, {CLIENTS} clients streaming one miss")
        print(
            f"  RSS idle {before / 1024:6.1f} MB  peak {peak / 1024:6.1f} MB"
            f"  (failed clients: {failed})"
        )

    def slow_memory(self) -> None:
        """RSS while SLOW_CLIENTS clients with small receive buffers each read 1 KiB a
        second of one miss: what every slow follower of a spool holds in the server."""
        before = rss_kb(self.pid)
        peak = asyncio.run(self._slow_clients(self.url("slow")))
        print(f"\nserver memory, {SLOW_CLIENTS} clients reading one miss at 1 KiB/s")
        print(
            f"  RSS idle {before / 1024:6.1f} MB  peak {peak / 1024:6.1f} MB"
            f"  ({(peak - before) / SLOW_CLIENTS:.0f} KiB per client)"
        )

    async def _slow_clients(self, url: str) -> int:
        host, _, rest = url.removeprefix("http://").partition("/")
        address, port = host.split(":")
        request = f"GET /{rest} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()

        async def client() -> None:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect((address, int(port)))
            reader, writer = await asyncio.open_connection(sock=sock, limit=2048)
            writer.write(request)
            try:
                for _ in range(SLOW_SECONDS):
                    await reader.read(1024)
                    await asyncio.sleep(1)
            finally:
                writer.close()

        peak = rss_kb(self.pid)
        clients = asyncio.gather(*(client() for _ in range(SLOW_CLIENTS)))
        while not clients.done():
            peak = max(peak, rss_kb(self.pid))
            await asyncio.wait([clients], timeout=0.05)
        await clients
        return peak


def run(bare: Path, runs: int, work: Path) -> None:
    head = git("--git-dir", str(bare), "rev-parse", "HEAD").strip()
    # One branch per measured miss: the same commit, distinct snapshots, a warm mirror...
    for branch in [*(f"bench-{i}" for i in range(runs + 1)), "rss", "slow"]:
        git("--git-dir", str(bare), "branch", "-f", branch, head)
    # ... and one a commit of its own, on top of it, that adds a file.
    for i in range(runs):
        new_commit(bare, head, f"new-{i}")
    size = sum(f.stat().st_size for f in bare.rglob("*") if f.is_file())
    print(f"repository {bare.name}: {size / 1e6:.1f} MB on disk; medians of {runs} runs")

    state = work / "state"
    state.mkdir()
    with served_upstream(bare) as (upstream_url, upstream_port):
        bench = Bench(bare, work, runs, upstream_port)
        with gitcache_server(state, upstream_url) as (bench.base, bench.pid):
            curl(bench.url(f"bench-{runs}"))  # clones the mirror
            bench.miss(state / "mirrors" / HOST / bare.name)
            bench.hit(next((state / "cache").rglob("*.tar.zst")))
            bench.restore()
            bench.memory()
            bench.slow_memory()


if __name__ == "__main__":
    run_in_work_dir(__doc__ or "", run)
