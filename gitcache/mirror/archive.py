"""Mirror archives in the shared bucket: a tar.zst of a bare mirror, so that a replica
with no mirror of a repository restores one and fetches only what is new, instead of
cloning the whole repository from the upstream.

``<prefix>mirrors/<host>/<repo slug>.tar.zst``, and its entry beside it (size, sha256,
the refs digest it holds), written after the object: a replica that finds the entry finds
a complete object. An archive is made from the mirror's files pinned under its read lock
(hard links: milliseconds), so a fetch is never held up while the archive is compressed and
uploaded; it is replaced only when the mirror's refs have moved since. A restore checks the
archive's size and sha256 before it unpacks it.
"""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import tarfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import zstandard

from gitcache.cache.base import Entry
from gitcache.cache.s3 import S3Cache
from gitcache.mirror.pin import pin_objects
from gitcache.repo import RepoRef

if TYPE_CHECKING:
    from gitcache.mirror.store import Mirror

ARCHIVE_REF = "mirror"  # the ``ref`` of an archive's entry
ZSTD_LEVEL = 3  # packs are compressed already: the archive is about speed, not ratio
_SMALL_FILES = ("HEAD", "config", "packed-refs", "info/attributes")


def pin_mirror(git_dir: Path, work: Path) -> None:
    """What an archive holds: the objects, hard-linked; refs and config, copied."""
    pin_objects(git_dir, work)
    for name in _SMALL_FILES:
        if (git_dir / name).is_file():
            (work / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(git_dir / name, work / name)
    shutil.copytree(git_dir / "refs", work / "refs", ignore=shutil.ignore_patterns("*.lock"))


def write_archive(source: Path, out: Path) -> tuple[int, str]:
    """tar | zstd of the directory ``source`` into ``out``; its size and sha256, read back
    from the disk (what the upload then checks itself against)."""
    with out.open("xb") as file:
        compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL, threads=-1, write_checksum=True)
        with (
            compressor.stream_writer(file, closefd=False) as zstd,
            tarfile.open(fileobj=zstd, mode="w|", format=tarfile.PAX_FORMAT) as tar,
        ):
            for path in sorted(source.iterdir()):
                tar.add(path, arcname=path.name)
    digest = hashlib.sha256()
    with out.open("rb") as file:
        while chunk := file.read(1024 * 1024):
            digest.update(chunk)
    return out.stat().st_size, digest.hexdigest()


def extract_archive(archive: Path, dest: Path) -> None:
    """Unpack a checked archive into the new directory ``dest``; the ``data`` filter
    refuses absolute paths, ``..``, links that leave ``dest`` and device files."""
    dest.mkdir(parents=True)
    with (
        archive.open("rb") as file,
        zstandard.ZstdDecompressor().stream_reader(file) as zstd,
        tarfile.open(fileobj=zstd, mode="r|") as tar,
    ):
        tar.extractall(dest, filter="data")


class MirrorArchives:
    def __init__(self, bucket: S3Cache, tmp: Path, clock: Callable[[], float] = time.time):
        self._bucket = bucket
        self._tmp = tmp
        self._clock = clock

    def name(self, repo: RepoRef) -> str:
        return self._bucket.shared_name("mirrors", repo.host, f"{repo.slug}.tar.zst")

    async def newest(self, repo: RepoRef) -> Entry | None:
        return await self._bucket.read_entry(self.name(repo))

    async def save(self, mirror: Mirror) -> bool:
        """Archive ``mirror`` unless the bucket's archive holds its refs already; whether
        one was uploaded."""
        repo = mirror.repo
        current = await self.newest(repo)
        if mirror.refs is None or (current and current.refs_digest == mirror.refs.digest):
            return False
        work = self._tmp / f"archive-{uuid.uuid4().hex}"
        try:
            async with mirror.lock.read():
                refs_digest = mirror.refs.digest  # the refs of exactly the files pinned
                await asyncio.to_thread(pin_mirror, mirror.path, work / "mirror")
            path = work / "mirror.tar.zst"
            size, sha256 = await asyncio.to_thread(write_archive, work / "mirror", path)
            now = self._clock()
            entry = Entry(repo.slug, ARCHIVE_REF, "", refs_digest, size, sha256, now, now)
            await self._bucket.upload_file(self.name(repo), path, entry)
        finally:
            await asyncio.to_thread(shutil.rmtree, work, True)
        return True

    async def restore(self, repo: RepoRef, entry: Entry, dest: Path) -> None:
        """Unpack the archive of ``repo`` that ``entry`` describes into the new directory
        ``dest``; raises if it cannot be read or does not match ``entry``."""
        work = self._tmp / f"restore-{uuid.uuid4().hex}"
        try:
            await asyncio.to_thread(work.mkdir, parents=True)
            archive = work / "mirror.tar.zst"
            await self._bucket.download(self.name(repo), entry, archive)
            await asyncio.to_thread(extract_archive, archive, dest)
        finally:
            await asyncio.to_thread(shutil.rmtree, work, True)
