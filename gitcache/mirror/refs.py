"""The refs of a mirror as one immutable value, read in-process with dulwich.

A mirror's refs are packed (``git pack-refs --all``, with peeled tags) after every clone
and fetch, so reading them is one parse of ``packed-refs`` and resolving a request's ref is
a dictionary lookup. The digest over all refs identifies a snapshot's contents together
with the commit checked out.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from dulwich.refs import read_packed_refs_with_peeled

from gitcache.errors import NotFound
from gitcache.repo import RefSpec

# Bump when the layout of a snapshot changes, so old cache entries stop matching.
SNAPSHOT_FORMAT = "gitcache-snapshot-1"


@dataclass(frozen=True)
class Checkout:
    """What a snapshot checks out: ``commit``, on local ``branch`` or detached (None)."""

    commit: str
    branch: str | None


@dataclass(frozen=True)
class RefState:
    """Branches and tags of a mirror (``refs/heads/*``, ``refs/tags/*``), the peeled commit
    of every annotated tag, and where ``HEAD`` points upstream."""

    head: str | None
    refs: Mapping[str, str]
    peeled: Mapping[str, str]

    @cached_property
    def digest(self) -> str:
        h = hashlib.sha256(SNAPSHOT_FORMAT.encode())
        h.update(f"\nHEAD {self.head}\n".encode())
        for name in sorted(self.refs):
            h.update(f"{self.refs[name]} {name} {self.peeled.get(name, '')}\n".encode())
        return h.hexdigest()

    def commit_of(self, name: str) -> str:
        return self.peeled.get(name, self.refs[name])

    def resolve(self, spec: RefSpec) -> Checkout:
        """What ``git clone [--branch NAME]`` (then ``checkout SHA``) would check out.

        A full sha is returned as asked; whether the mirror has it is checked when the
        snapshot is built."""
        if spec.sha is not None:
            return Checkout(commit=spec.sha, branch=None)
        if spec.name is None:
            if not self.refs:
                raise NotFound(
                    "the repository is empty: there is nothing to check out",
                    code="empty_repository",
                )
            if self.head is None or self.head not in self.refs:
                raise NotFound("the upstream's HEAD names no existing branch", code="ref_not_found")
            return Checkout(self.refs[self.head], self.head.removeprefix("refs/heads/"))
        for candidate in spec.candidates():
            if candidate in self.refs:
                branch = candidate.removeprefix("refs/heads/")
                if branch == candidate:  # a tag: detached, like git clone --branch TAG
                    return Checkout(self.commit_of(candidate), None)
                return Checkout(self.refs[candidate], branch)
        raise NotFound(f"ref {spec.name!r} not found upstream", code="ref_not_found")


def read_ref_state(git_dir: Path) -> RefState:
    """Read a mirror whose refs were packed with ``git pack-refs --all``. Loose refs left
    behind by a crash are read too (without peeling), so nothing is silently missed."""
    refs: dict[str, str] = {}
    peeled: dict[str, str] = {}
    packed = git_dir / "packed-refs"
    if packed.exists():
        with packed.open("rb") as f:
            for sha, name, peel in read_packed_refs_with_peeled(f):
                refs[name.decode()] = sha.decode()
                if peel is not None:
                    peeled[name.decode()] = peel.decode()
    for kind in ("heads", "tags"):
        base = git_dir / "refs" / kind
        for path in base.rglob("*") if base.is_dir() else ():
            if path.is_file():
                loose = path.relative_to(git_dir).as_posix()
                refs[loose] = path.read_text("ascii").strip()
                peeled.pop(loose, None)
    refs = {k: v for k, v in refs.items() if k.startswith(("refs/heads/", "refs/tags/"))}
    head_text = (git_dir / "HEAD").read_text("utf-8").strip()
    head = head_text.removeprefix("ref: ") if head_text.startswith("ref: ") else None
    return RefState(head=head, refs=refs, peeled={k: v for k, v in peeled.items() if k in refs})
