"""The cache protocol every tier implements, and the value it stores.

A tier stores complete, verified snapshot files and a per-repository manifest describing
them. It never sees a partial file: a generation hands it a spool only after the size and
sha256 were checked, and the tier makes it visible atomically.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from gitcache.repo import RepoRef


@dataclass(frozen=True)
class Entry:
    """One cached snapshot: ``key`` is unique within the repository; ``ref`` is the label
    the client asked for (``HEAD``, a branch or tag name, a sha); ``fetched_at`` is when
    the upstream was last seen to still match it."""

    key: str
    ref: str
    commit: str
    refs_digest: str
    size: int
    sha256: str
    created: float
    fetched_at: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Entry:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__})

    @property
    def etag(self) -> str:
        return f'"{self.sha256}"'


class Reader(Protocol):
    """An open cached snapshot. ``file`` is set when the bytes can be sent with sendfile;
    otherwise they are streamed with :meth:`chunks`."""

    @property
    def entry(self) -> Entry: ...

    @property
    def file(self) -> BinaryIO | None: ...

    def chunks(self, offset: int, length: int) -> AsyncIterator[bytes]: ...

    async def close(self) -> None: ...


class Cache(Protocol):
    async def start(self) -> None:
        """Open what the tier needs; clean up what a previous process left half-done."""

    def repos(self) -> list[RepoRef]:
        """Repositories this tier is known to hold (for the admin API)."""

    async def entries(self, repo: RepoRef) -> tuple[Entry, ...]: ...

    async def newest(self, repo: RepoRef, ref: str) -> Entry | None:
        """The most recently created entry for ``ref``: one manifest read."""

    async def get(self, repo: RepoRef, key: str) -> Entry | None: ...

    async def open(self, repo: RepoRef, entry: Entry) -> Reader | None:
        """Open an entry for reading (a use, for eviction); None if it is gone."""

    async def commit(self, repo: RepoRef, spool: Path, entry: Entry) -> None:
        """Make a verified spool file visible as ``entry``; the spool is consumed."""

    async def touch(self, repo: RepoRef, entry: Entry, fetched_at: float) -> None:
        """Record that the upstream still matched ``entry`` at ``fetched_at``."""

    async def prune(self, repo: RepoRef, ref: str, keep: int) -> None:
        """Delete all but the ``keep`` newest entries for ``ref``."""

    async def delete(self, repo: RepoRef, *keys: str) -> None:
        """Remove entries: from the manifest first, so nothing serves them meanwhile."""

    async def close(self) -> None: ...
