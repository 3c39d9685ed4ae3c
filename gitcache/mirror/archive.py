"""Mirror archives in the shared bucket (``mirrors/<host>/<repo slug>.tar.zst`` and its
:class:`ArchiveRecord`), so a replica without a mirror restores one and fetches only what
is new instead of cloning."""

from __future__ import annotations

import asyncio
import json
import shutil
import tarfile
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import zstandard

from gitcache.bucket.checked import CheckedFile
from gitcache.bucket.client import Bucket
from gitcache.bucket.upload import FileTail, MultipartUpload
from gitcache.errors import GenerationFailed
from gitcache.files import sha256_of
from gitcache.mirror.mirror import Mirror
from gitcache.mirror.pin import pin_objects
from gitcache.repo import RepoRef
from gitcache.tasks import run_blocking

ZSTD_LEVEL = 3  # packs are compressed already: the archive is about speed, not ratio
RECORD_SUFFIX = ".entry.json"
_SMALL_FILES = ("HEAD", "config", "packed-refs", "info/attributes")


@dataclass(frozen=True)
class ArchiveRecord:
    """What the bucket says of a mirror archive, beside it: the refs it holds, its size
    and sha256 (checked before it is unpacked), and when it was made."""

    refs_digest: str
    size: int
    sha256: str
    created: float

    def dumps(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def loads(cls, data: bytes) -> ArchiveRecord:
        """Raises ValueError if ``data`` is not a record."""
        try:
            raw: dict[str, Any] = json.loads(data)
            return cls(
                refs_digest=str(raw["refs_digest"]),
                size=int(raw["size"]),
                sha256=str(raw["sha256"]),
                created=float(raw["created"]),
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"not an archive record: {exc}") from exc


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
    return sha256_of(out)


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
    def __init__(self, bucket: Bucket, tmp: Path, clock: Callable[[], float] = time.time):
        self._bucket = bucket
        self._tmp = tmp
        self._clock = clock

    @staticmethod
    def name(repo: RepoRef) -> str:
        return f"mirrors/{repo.host}/{repo.slug}.tar.zst"

    async def newest(self, repo: RepoRef) -> ArchiveRecord | None:
        """The record of the bucket's archive of ``repo``; None if there is none (or it
        cannot be read: then a new one is made)."""
        found = await self._bucket.read(self.name(repo) + RECORD_SUFFIX, "get_entry")
        if found is None:
            return None
        try:
            return ArchiveRecord.loads(found[0])
        except ValueError:
            return None

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
            record = ArchiveRecord(refs_digest, size, sha256, self._clock())
            await self.upload(repo, path, record)
        finally:
            await asyncio.to_thread(shutil.rmtree, work, True)
        return True

    async def upload(self, repo: RepoRef, path: Path, record: ArchiveRecord) -> None:
        """The archive, then its record beside it: a reader that finds the record finds
        the whole archive."""
        name = self.name(repo)

        async def publish(done: ArchiveRecord) -> None:
            await self._bucket.write(name + RECORD_SUFFIX, done.dumps(), "put_entry")

        await MultipartUpload(self._bucket, name, FileTail(path), publish).complete(record)

    async def restore(self, repo: RepoRef, record: ArchiveRecord, dest: Path) -> None:
        """Unpack the archive of ``repo`` that ``record`` describes into the new directory
        ``dest``; raises if it cannot be read or does not match ``record``."""
        work = self._tmp / f"restore-{uuid.uuid4().hex}"
        try:
            await asyncio.to_thread(work.mkdir, parents=True)
            archive = work / "mirror.tar.zst"
            await self._download(self.name(repo), record, archive)
            await asyncio.to_thread(extract_archive, archive, dest)
        finally:
            await asyncio.to_thread(shutil.rmtree, work, True)

    async def _download(self, name: str, record: ArchiveRecord, dest: Path) -> None:
        out = CheckedFile(dest)
        try:
            async for chunk in self._bucket.stream(name, 0, record.size):
                await out.write(chunk)
            await out.close()
            if not out.matches(record):
                raise GenerationFailed(f"{name} does not match its record")
        except BaseException:
            await out.close()
            await run_blocking(dest.unlink, missing_ok=True)
            raise
