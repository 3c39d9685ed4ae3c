"""The protocol every cache tier implements, and :class:`Entry`, what it stores: complete,
verified snapshot files made visible atomically, listed in a per-repository manifest."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from gitcache.bucket.upload import Tail
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

    def chunks(self, offset: int, length: int) -> AsyncGenerator[bytes, None]: ...

    async def close(self) -> None: ...


class Upload(Protocol):
    """A copy of a generation's spool made while the spool is written."""

    def complete(self, entry: Entry) -> Awaitable[None]:
        """Hand over the verified ``entry`` (from now on :meth:`abort` is a no-op) and
        return what ends once the copy is visible; it raises, leaving nothing visible, if
        the bytes copied do not match."""

    async def abort(self) -> None:
        """Give the copy up, leaving nothing behind; a no-op once ``complete`` was called."""


class Cache(Protocol):
    # Whether a commit makes the entry servable from this machine's disk (quickly): then
    # a generation's clients see their end only after it. An S3-only tier's commit is an
    # upload finishing; its clients see their end as soon as the spool is verified.
    local: bool

    async def start(self) -> None:
        """Open what the tier needs; clean up what a previous process left half-done."""

    def repos(self) -> list[RepoRef]:
        """Repositories this tier is known to hold (for the admin API)."""

    def layers(self) -> list[tuple[str, Cache]]:
        """The tiers that hold bytes of their own, by name (``disk``, ``s3``): itself, or
        the tiers a composite is made of. Each is checked on its own (the scrub)."""

    async def entries(self, repo: RepoRef) -> tuple[Entry, ...]: ...

    async def newest(self, repo: RepoRef, ref: str) -> Entry | None:
        """The most recently created entry for ``ref``: one manifest read."""

    async def get(self, repo: RepoRef, key: str) -> Entry | None: ...

    async def open(self, repo: RepoRef, entry: Entry, *, use: bool = True) -> Reader | None:
        """Open an entry for reading (with ``use``, a use for eviction); None if it is
        gone. A tier that learns that only from its first read (S3) raises ``EntryGone``
        there."""

    def begin(self, repo: RepoRef, key: str, tail: Callable[[], Tail]) -> Upload | None:
        """Start copying a generation's spool while it is written, through a reader that
        ``tail`` opens; None if the tier needs nothing but the verified spool (disk)."""

    async def commit(
        self, repo: RepoRef, spool: Path, entry: Entry, upload: Upload | None = None
    ) -> None:
        """Make a verified spool file visible as ``entry`` (completing ``upload``, which
        :meth:`begin` returned for it); the spool may be consumed."""

    async def touch(self, repo: RepoRef, entry: Entry, fetched_at: float) -> None:
        """Record that the upstream still matched ``entry`` at ``fetched_at``."""

    async def prune(self, repo: RepoRef, ref: str, keep: int) -> None:
        """Delete all but the ``keep`` newest entries for ``ref``."""

    async def delete(self, repo: RepoRef, *keys: str) -> None:
        """Remove entries: from the manifest first, so nothing serves them meanwhile."""

    async def close(self) -> None: ...
