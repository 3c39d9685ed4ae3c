"""The S3 tier: ``<host>/<repo slug>/<key>.tar.zst``, its entry beside it and the
repository's ``manifest.json`` (written last, conditionally), in the shared bucket."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import random
from collections.abc import AsyncGenerator, Callable
from pathlib import Path

from gitcache.bucket.client import Bucket, Conflict, S3Error
from gitcache.bucket.upload import FileTail, MultipartUpload, Tail
from gitcache.cache.base import Cache, Entry, Upload
from gitcache.cache.manifest import MANIFEST_NAME, Manifest
from gitcache.repo import RepoRef

log = logging.getLogger(__name__)

TIER = "s3"
SNAPSHOT_SUFFIX = ".tar.zst"
ENTRY_SUFFIX = ".entry.json"  # the entry beside its object, for the listing fallback
MANIFEST_ATTEMPTS = 8


class S3Reader:
    """Streams an object with ranged GETs (no sendfile)."""

    file = None

    def __init__(self, entry: Entry, bucket: Bucket, name: str) -> None:
        self.entry = entry
        self._bucket = bucket
        self._name = name

    def chunks(self, offset: int, length: int) -> AsyncGenerator[bytes, None]:
        return self._bucket.stream(self._name, offset, length)

    async def close(self) -> None:
        return None

    async def presigned_url(self, ttl: float) -> str:
        """A short-lived URL for the object itself: the bytes bypass the proxy."""
        return await self._bucket.presigned_url(self._name, ttl)


class S3Cache:
    local = False

    def __init__(self, bucket: Bucket) -> None:
        self.bucket = bucket
        self._seen: set[RepoRef] = set()

    async def start(self) -> None:
        return None  # the bucket is opened by whoever owns it (the app)

    async def close(self) -> None:
        return None

    # --- names ------------------------------------------------------------------------

    @staticmethod
    def _name(repo: RepoRef, name: str) -> str:
        return f"{repo.host}/{repo.slug}/{name}"

    def object_name(self, repo: RepoRef, key: str) -> str:
        return self._name(repo, f"{key}{SNAPSHOT_SUFFIX}")

    def _sidecar(self, repo: RepoRef, key: str) -> str:
        return self._name(repo, f"{key}{ENTRY_SUFFIX}")

    # --- manifest ---------------------------------------------------------------------

    async def _read_manifest(self, repo: RepoRef) -> tuple[Manifest, str | None]:
        """The manifest and its ETag (None: there is none yet). A missing or unreadable
        one is rebuilt from a listing and, if that found entries, written back."""
        found = await self.bucket.read(self._name(repo, MANIFEST_NAME), "get_manifest")
        etag = found[1] if found is not None else None
        if found is not None:
            try:
                return Manifest.loads(found[0]), etag
            except ValueError:
                log.warning("manifest of %s is unreadable: rebuilding it", repo.name)
        manifest = await self._rebuild_manifest(repo)
        if manifest.entries:
            # Written back (over the unreadable one, if that is what there was), so the
            # next lookup is one read again; losing a race to another writer is fine.
            etag = await self._put_manifest(repo, manifest, etag) or etag
        return manifest, etag

    async def _put_manifest(
        self, repo: RepoRef, manifest: Manifest, etag: str | None
    ) -> str | None:
        """Write the manifest if it is still the one with ``etag`` (None: if there is
        none); its new ETag, or None if another writer came first."""
        name = self._name(repo, MANIFEST_NAME)
        try:
            new = await self.bucket.write(
                name, manifest.dumps(), "put_manifest", if_match=etag, if_absent=etag is None
            )
        except Conflict:
            self.bucket.metrics.manifest_conflicts.inc()
            return None
        self._seen.add(repo)
        return new

    async def _rebuild_manifest(self, repo: RepoRef) -> Manifest:
        """The slow fallback: list the repository's prefix and read the entry written beside
        each complete object (an object without one never finished publishing)."""
        names = await self.bucket.names(self._name(repo, ""))
        entries = []
        for name in sorted(names):
            key = name.removesuffix(SNAPSHOT_SUFFIX)
            if "/" in name or key == name or f"{key}{ENTRY_SUFFIX}" not in names:
                continue
            entry = await self._read_entry(self._sidecar(repo, key))
            if entry is not None and entry.key == key:
                entries.append(entry)
        return Manifest(tuple(entries))

    async def _read_entry(self, name: str) -> Entry | None:
        found = await self.bucket.read(name, "get_entry")
        if found is None:
            return None
        try:
            return Entry.from_json(json.loads(found[0]))
        except (ValueError, KeyError, TypeError):
            return None

    async def _update_manifest(
        self, repo: RepoRef, change: Callable[[Manifest], Manifest]
    ) -> Manifest:
        """Read, change, write back only if nobody wrote in between; else again."""
        for _ in range(MANIFEST_ATTEMPTS):
            manifest, etag = await self._read_manifest(repo)
            changed = change(manifest)
            if await self._put_manifest(repo, changed, etag) is not None:
                return changed
            await asyncio.sleep(random.uniform(0.01, 0.1))  # noqa: S311 (jitter)
        raise self.bucket.failed("put_manifest", RuntimeError("kept conflicting"))

    # --- the protocol -----------------------------------------------------------------

    def repos(self) -> list[RepoRef]:
        return sorted(self._seen, key=lambda r: r.name)

    def layers(self) -> list[tuple[str, Cache]]:
        return [(TIER, self)]

    async def entries(self, repo: RepoRef) -> tuple[Entry, ...]:
        return (await self._read_manifest(repo))[0].entries

    async def newest(self, repo: RepoRef, ref: str) -> Entry | None:
        try:
            entry = (await self._read_manifest(repo))[0].newest(ref)
        except S3Error:
            return None  # S3 down: a miss, and the snapshot is generated instead
        if entry is not None:
            self._seen.add(repo)
        return entry

    async def get(self, repo: RepoRef, key: str) -> Entry | None:
        try:
            return (await self._read_manifest(repo))[0].get(key)
        except S3Error:
            return None

    async def open(self, repo: RepoRef, entry: Entry, *, use: bool = True) -> S3Reader:
        """No request yet: the first read is the GET itself (one round trip per hit, none
        for a HEAD or a 304); an object gone by then raises ``EntryGone`` there."""
        return S3Reader(entry, self.bucket, self.object_name(repo, entry.key))

    def begin(self, repo: RepoRef, key: str, tail: Callable[[], Tail]) -> Upload:
        async def publish(entry: Entry) -> None:
            # The entry beside the object (for the listing fallback), the manifest last.
            body = json.dumps(entry.to_json()).encode()
            await self.bucket.write(self._sidecar(repo, key), body, "put_entry")
            await self._update_manifest(repo, lambda m: m.with_entry(entry))

        return MultipartUpload(self.bucket, self.object_name(repo, key), tail(), publish)

    async def commit(
        self, repo: RepoRef, spool: Path, entry: Entry, upload: Upload | None = None
    ) -> None:
        """Complete the upload begun while the spool was written, or upload the verified
        spool now (it stays where it is); the object first, the manifest last."""
        if upload is None:
            upload = self.begin(repo, entry.key, functools.partial(FileTail, spool))
        await upload.complete(entry)

    async def touch(self, repo: RepoRef, entry: Entry, fetched_at: float) -> None:
        await self._update_manifest(repo, lambda m: m.touched(entry.key, fetched_at))

    async def prune(self, repo: RepoRef, ref: str, keep: int) -> None:
        manifest, _ = await self._read_manifest(repo)
        entries = sorted((e for e in manifest.entries if e.ref == ref), key=lambda e: -e.created)
        if len(entries) > keep:
            await self.delete(repo, *(e.key for e in entries[keep:]))

    async def delete(self, repo: RepoRef, *keys: str) -> None:
        # Manifest first: once it no longer lists an entry, nothing serves it.
        await self._update_manifest(repo, lambda m: m.without(*keys))
        for key in keys:
            await self.bucket.delete(self.object_name(repo, key))
            await self.bucket.delete(self._sidecar(repo, key))
