"""A snapshot as a generation's job: its tar, from the mirror (see ``assemble``)."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass
from pathlib import Path

from gitcache.config import Config
from gitcache.mirror.mirror import Mirror
from gitcache.mirror.refs import Checkout
from gitcache.repo import RefSpec
from gitcache.snapshot.assemble import build_tar
from gitcache.snapshot.frames import Stored, Verbatim
from gitcache.snapshot.trees import TreeStore


@dataclass
class SnapshotJob:
    mirror: Mirror
    spec: RefSpec
    checkout: Checkout
    config: Config
    trees: TreeStore
    kind: str = "snapshot"

    @property
    def label(self) -> str:
        return self.spec.label

    @property
    def commit(self) -> str:
        return self.checkout.commit

    @property
    def keep(self) -> int:
        return self.config.cache.keep

    def chunks(self, work: Path) -> AsyncGenerator[bytes | Stored | Verbatim, None]:
        return build_tar(
            self.mirror,
            self.checkout,
            self.spec.variant,
            work,
            trees=self.trees,
            git_timeout=self.config.mirrors.git_timeout,
            # Gathering a large history's objects may take as long as its clone did.
            objects_timeout=self.config.mirrors.clone_timeout,
        )
