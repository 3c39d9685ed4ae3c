"""What lives where in the state directory: one object names every path, so no module
spells a directory's name itself."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class StatePaths:
    root: Path

    @property
    def mirrors(self) -> Path:
        """``<host>/<repo slug>.git``: the bare mirrors."""
        return self.root / "mirrors"

    @property
    def trees(self) -> Path:
        """``<host>/<repo slug>/``: compressed working trees of recent commits, which the
        snapshots of one commit share (see snapshot/trees.py)."""
        return self.root / "trees"

    @property
    def cache(self) -> Path:
        """``<host>/<repo slug>/``: the disk tier's snapshots and manifests."""
        return self.root / "cache"

    @property
    def spool(self) -> Path:
        """Snapshots being generated, and S3 hits filling the disk tier."""
        return self.root / "spool"

    @property
    def tmp(self) -> Path:
        """Clones, restores, generations' work directories: removed at start-up."""
        return self.root / "tmp"

    @property
    def uploads(self) -> Path:
        """This replica's multipart uploads in flight (the journal)."""
        return self.root / "uploads"

    @property
    def refresh_state(self) -> Path:
        """The refresh scheduler's persisted run times."""
        return self.root / "refresh.json"
