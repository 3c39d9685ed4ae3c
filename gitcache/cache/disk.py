"""The local disk tier: ``<root>/<host>/<repo slug>/<key>.tar.zst`` plus ``manifest.json``.

A size budget is kept by evicting the least recently used entries (opening an entry for a
response counts as a use; the order survives restarts through the files' mtimes). Files
are replaced and removed by rename and unlink only, so a response that already has an
entry open keeps reading it even if it is evicted meanwhile.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
from collections.abc import AsyncGenerator, Callable
from pathlib import Path
from typing import BinaryIO

from gitcache.bucket.upload import Tail
from gitcache.cache.base import Cache, Entry, Upload
from gitcache.cache.manifest import MANIFEST_NAME, Manifest
from gitcache.files import CHUNK
from gitcache.metrics import Metrics
from gitcache.repo import RepoRef

log = logging.getLogger(__name__)

SUFFIX = ".tar.zst"


class DiskReader:
    def __init__(self, entry: Entry, file: BinaryIO) -> None:
        self.entry = entry
        self.file: BinaryIO | None = file
        self._file = file

    async def chunks(self, offset: int, length: int) -> AsyncGenerator[bytes, None]:
        while length > 0:
            chunk = await asyncio.to_thread(
                os.pread, self._file.fileno(), min(CHUNK, length), offset
            )
            if not chunk:
                raise OSError(f"cache entry {self.entry.key} is shorter than recorded")
            offset += len(chunk)
            length -= len(chunk)
            yield chunk

    async def close(self) -> None:
        self._file.close()


def _write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` whole, or (on failure: a full disk) not at all."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with tmp.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


TIER = "disk"


class DiskCache:
    local = True

    def __init__(self, root: Path, max_size: int, metrics: Metrics) -> None:
        self.root = root
        self.max_size = max_size
        self._metrics = metrics
        metrics.cache_bytes.labels(TIER).set_function(lambda: self.size)
        metrics.cache_entries.labels(TIER).set_function(lambda: self.count)
        metrics.cache_max_bytes.labels(TIER).set(max_size)
        metrics.cache_evictions.labels(TIER)  # at 0 from the start
        self._manifests: dict[RepoRef, Manifest] = {}
        self._lru: collections.OrderedDict[tuple[RepoRef, str], int] = collections.OrderedDict()
        self._locks: collections.defaultdict[RepoRef, asyncio.Lock] = collections.defaultdict(
            asyncio.Lock
        )

    @property
    def size(self) -> int:
        return sum(self._lru.values())

    @property
    def count(self) -> int:
        return len(self._lru)

    def _dir(self, repo: RepoRef) -> Path:
        return self.root / repo.host / repo.slug

    def _path(self, repo: RepoRef, key: str) -> Path:
        return self._dir(repo) / f"{key}{SUFFIX}"

    # --- start-up --------------------------------------------------------------------

    async def start(self) -> None:
        """Reuse every complete entry on disk; remove whatever no manifest vouches for."""
        found = await asyncio.to_thread(self._recover)
        for repo, manifest, used in found:
            self._manifests[repo] = manifest
            for entry, _mtime in sorted(
                zip(manifest.entries, used, strict=True), key=lambda p: p[1]
            ):
                self._lru[(repo, entry.key)] = entry.size
        log.info("disk cache: %d entries, %d bytes", self.count, self.size)
        await self._evict()

    def _recover(self) -> list[tuple[RepoRef, Manifest, list[float]]]:
        found = []
        self.root.mkdir(parents=True, exist_ok=True)
        for host_dir in sorted(p for p in self.root.iterdir() if p.is_dir()):
            for repo_dir in sorted(p for p in host_dir.iterdir() if p.is_dir()):
                repo = RepoRef.from_slug(host_dir.name, repo_dir.name)
                manifest = Manifest()
                with contextlib.suppress(OSError, ValueError):
                    manifest = Manifest.loads((repo_dir / MANIFEST_NAME).read_bytes())
                kept, used = [], []
                for entry in manifest.entries:
                    path = repo_dir / f"{entry.key}{SUFFIX}"
                    with contextlib.suppress(OSError):
                        st = path.stat()
                        if st.st_size == entry.size:
                            kept.append(entry)
                            used.append(st.st_mtime)
                wanted = {f"{e.key}{SUFFIX}" for e in kept} | {MANIFEST_NAME}
                for path in repo_dir.iterdir():
                    if path.name not in wanted and path.is_file():
                        log.warning("disk cache: removing unverified %s", path)
                        path.unlink()
                if len(kept) != len(manifest.entries):
                    manifest = Manifest(tuple(kept))
                    _write_atomic(repo_dir / MANIFEST_NAME, manifest.dumps())
                if kept:
                    found.append((repo, manifest, used))
        return found

    # --- the protocol ----------------------------------------------------------------

    async def _manifest(self, repo: RepoRef) -> Manifest:
        manifest = self._manifests.get(repo)
        return manifest if manifest is not None else Manifest()

    def repos(self) -> list[RepoRef]:
        return [repo for repo, manifest in self._manifests.items() if manifest.entries]

    async def entries(self, repo: RepoRef) -> tuple[Entry, ...]:
        return (await self._manifest(repo)).entries

    async def newest(self, repo: RepoRef, ref: str) -> Entry | None:
        return (await self._manifest(repo)).newest(ref)

    async def get(self, repo: RepoRef, key: str) -> Entry | None:
        return (await self._manifest(repo)).get(key)

    def layers(self) -> list[tuple[str, Cache]]:
        return [(TIER, self)]

    async def open(self, repo: RepoRef, entry: Entry, *, use: bool = True) -> DiskReader | None:
        path = self._path(repo, entry.key)
        try:
            file = await asyncio.to_thread(path.open, "rb")
        except FileNotFoundError:
            return None
        if use and (repo, entry.key) in self._lru:
            self._lru.move_to_end((repo, entry.key))
            with contextlib.suppress(OSError):
                os.utime(file.fileno())
        return DiskReader(entry, file)

    def begin(self, repo: RepoRef, key: str, tail: Callable[[], Tail]) -> None:
        """Nothing to copy: the verified spool itself becomes the entry's file."""
        return None

    async def commit(
        self, repo: RepoRef, spool: Path, entry: Entry, upload: Upload | None = None
    ) -> None:
        async with self._locks[repo]:
            manifest = (await self._manifest(repo)).with_entry(entry)
            await asyncio.to_thread(self._commit_files, repo, spool, entry, manifest)
            self._manifests[repo] = manifest
            self._lru[(repo, entry.key)] = entry.size
            self._lru.move_to_end((repo, entry.key))
        await self._evict()

    def _commit_files(self, repo: RepoRef, spool: Path, entry: Entry, manifest: Manifest) -> None:
        """The file into place, then the manifest that lists it; if the manifest cannot be
        written, the directory is left as it was before (the file a key had, if any,
        put back), so nothing unlisted stays behind."""
        self._dir(repo).mkdir(parents=True, exist_ok=True)
        path = self._path(repo, entry.key)
        previous = path.with_name(f".{path.name}.previous")
        had = path.exists()
        if had:
            os.replace(path, previous)
        try:
            os.replace(spool, path)
            _write_atomic(self._dir(repo) / MANIFEST_NAME, manifest.dumps())
        except BaseException:
            if had:
                os.replace(previous, path)
            else:
                path.unlink(missing_ok=True)
            raise
        if had:
            previous.unlink()

    async def touch(self, repo: RepoRef, entry: Entry, fetched_at: float) -> None:
        async with self._locks[repo]:
            manifest = (await self._manifest(repo)).touched(entry.key, fetched_at)
            await asyncio.to_thread(
                _write_atomic, self._dir(repo) / MANIFEST_NAME, manifest.dumps()
            )
            self._manifests[repo] = manifest

    async def delete(self, repo: RepoRef, *keys: str) -> None:
        async with self._locks[repo]:
            manifest = (await self._manifest(repo)).without(*keys)
            # Manifest first: once it no longer lists an entry, nothing will serve it.
            await asyncio.to_thread(
                _write_atomic, self._dir(repo) / MANIFEST_NAME, manifest.dumps()
            )
            self._manifests[repo] = manifest
            for key in keys:
                self._lru.pop((repo, key), None)
                with contextlib.suppress(FileNotFoundError):
                    await asyncio.to_thread(self._path(repo, key).unlink)

    async def prune(self, repo: RepoRef, ref: str, keep: int) -> None:
        entries = [e for e in (await self._manifest(repo)).entries if e.ref == ref]
        entries.sort(key=lambda e: e.created, reverse=True)
        if len(entries) > keep:
            await self.delete(repo, *(e.key for e in entries[keep:]))

    async def _evict(self) -> None:
        # The newest entry always stays, even alone over budget: it was just asked for.
        while self.size > self.max_size and len(self._lru) > 1:
            (repo, key), _ = next(iter(self._lru.items()))
            log.info("disk cache: evicting %s %s", repo.name, key)
            await self.delete(repo, key)
            self._metrics.cache_evictions.labels(TIER).inc()

    async def close(self) -> None:
        return None
