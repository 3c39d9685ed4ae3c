"""Checking snapshots the way a user would: extract with zstd and tar, then ask git."""

from __future__ import annotations

import contextlib
import os
import stat
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import xxhash
from prometheus_client.parser import text_string_to_metric_families

from gitcache import keys
from gitcache.snapshot import jobs as jobs_module
from gitcache.snapshot.frames import framing
from tests.upstream import git


def wrap_build_tar(monkeypatch: Any, after_chunk: Callable[[int], Awaitable[None]]) -> None:
    """Make generations use the real tar stream, awaiting ``after_chunk(bytes so far)``
    after each chunk: to slow a generation down, or to make it fail part-way."""
    real = jobs_module.build_tar

    async def wrapped(*args: Any, **kwargs: Any) -> Any:
        sent = 0
        async with contextlib.aclosing(real(*args, **kwargs)) as chunks:
            async for chunk in chunks:
                yield chunk
                sent += len(framing(chunk)[0])  # Stored and Verbatim chunks wrap bytes
                await after_chunk(sent)

    monkeypatch.setattr(jobs_module, "build_tar", wrapped)


HOST = "example.test"


async def settled(*clients: Any) -> None:
    """Until every generation has ended, its cache commit included: the clients of an
    S3-only tier see their end before the upload lands."""
    for client in clients:
        await client.app[keys.TASKS].settle("generate:")


class Clock:
    """Injected time: tests move ``now`` by hand instead of sleeping."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def snapshot_url(repo: str, ref: str | None = None) -> str:
    url = f"/git/{HOST}/{repo}/snapshot.tar.zst"
    return url if ref is None else f"{url}?ref={ref}"


def extract(data: bytes, dest: Path) -> Path:
    """``zstd -d | tar -x`` into ``dest``, exactly as the README tells users to."""
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run("zstd -d -q -c | tar -x -C " + str(dest), shell=True, input=data, check=True)
    return dest


def stored_trees(state_dir: Path) -> list[Path]:
    """The tree store's files (``trees/<host>/<repo>/<commit>.<level>.<xxh3>.tar.zst``),
    each checked: its content has the digest its name gives, and decodes."""
    kept = sorted((state_dir / "trees").glob("*/*/*.tar.zst"))
    for path in kept:
        digest = path.name.removesuffix(".tar.zst").rsplit(".", 1)[-1]
        assert xxhash.xxh3_128(path.read_bytes()).hexdigest() == digest, path
        subprocess.run(["zstd", "-t", "-q", str(path)], check=True)
    return kept


def tree(root: Path) -> dict[str, tuple[str, object]]:
    """Every path below ``root`` except ``.git``: kind and content, exec bit, link target."""
    out: dict[str, tuple[str, object]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        if Path(dirpath) == root and ".git" in dirnames:
            dirnames.remove(".git")
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", None)
            else:
                out[rel] = ("file", (bool(st.st_mode & 0o100), path.read_bytes()))
    return out


def status(repo: Path) -> str:
    return git("status", "--porcelain", "--untracked-files=all", cwd=repo)


def processes_mentioning(text: str) -> list[str]:
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            if text.encode() in cmdline:
                found.append(cmdline.decode(errors="replace"))
    return found


def sample(exposition: str, name: str, **labels: str) -> float:
    """The sum of the samples named ``name`` whose labels include ``labels`` (0 if none),
    read with prometheus-client's own parser."""
    return sum(
        s.value
        for family in text_string_to_metric_families(exposition)
        for s in family.samples
        if s.name == name and labels.items() <= s.labels.items()
    )
