"""A repository's bare mirror, as the rest of gitcache holds it: where it is, where its
upstream is, its lock, and the refs it had when last read."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from gitcache.mirror.credentials import ConfigEntries
from gitcache.mirror.lock import RWLock
from gitcache.mirror.refs import RefState
from gitcache.repo import RepoRef


@dataclass
class Mirror:
    repo: RepoRef
    path: Path
    url: str
    # For git calls that reach the upstream (see upstream_env): the credential helper's
    # config, its secrets, and whether the upstream may resolve to private addresses.
    config: ConfigEntries
    secrets: dict[str, str] = field(repr=False)
    allow_private: bool
    trees: Path  # its commits' compressed working trees (see snapshot/trees.py)
    lock: RWLock = field(default_factory=RWLock)
    refs: RefState | None = None
    fetched_at: float = 0.0
