"""What kind of snapshot a request asks for: a full clone (the default), a shallow one
(``?depth=N``), a partial one (``?filter=blob:none``), or the working tree alone
(``source.tar.zst``). Each is its own cache key, and its own label in the manifest."""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from gitcache.errors import BadRequest

MAX_DEPTH = 1_000_000  # deeper than any history: a full snapshot is what is wanted then
_DEPTH = re.compile(r"[1-9][0-9]{0,6}")  # ASCII digits, no sign, no leading zero
FILTERS = ("blob:none",)


class Kind(StrEnum):
    FULL = "full"
    SHALLOW = "shallow"  # the ref's last ``depth`` commits, as ``git clone --depth``
    BLOBLESS = "blobless"  # every commit and tree, blobs of the checkout only
    SOURCE = "source"  # the working tree, no .git


@dataclass(frozen=True)
class Variant:
    kind: Kind = Kind.FULL
    depth: int = 0  # for SHALLOW

    @property
    def query(self) -> str:
        """The variant as its request spells it: part of the cache label."""
        if self.kind is Kind.SHALLOW:
            return f"depth={self.depth}"
        if self.kind is Kind.BLOBLESS:
            return "filter=blob:none"
        return self.kind.value if self.kind is Kind.SOURCE else ""


FULL = Variant()
SOURCE = Variant(Kind.SOURCE)


def parse_variant(*, source: bool, depth: str | None, filter_: str | None) -> Variant:
    """The variant a request names: ``source`` for ``source.tar.zst``, and the ``depth`` and
    ``filter`` query parameters of ``snapshot.tar.zst``."""
    if source:
        if depth is not None or filter_ is not None:
            raise BadRequest(
                "source.tar.zst has no history to cut: depth and filter do not apply",
                code="invalid_variant",
            )
        return SOURCE
    if depth is not None and filter_ is not None:
        raise BadRequest(
            "depth and filter cannot be combined: ask for one of them", code="invalid_variant"
        )
    if depth is not None:
        if not _DEPTH.fullmatch(depth) or int(depth) > MAX_DEPTH:
            raise BadRequest(
                f"depth must be a whole number from 1 to {MAX_DEPTH}", code="invalid_depth"
            )
        return Variant(Kind.SHALLOW, int(depth))
    if filter_ is not None:
        if filter_ not in FILTERS:
            raise BadRequest(
                f"filter {filter_[:40]!r} is not supported: use {', '.join(FILTERS)}",
                code="invalid_filter",
            )
        return Variant(Kind.BLOBLESS)
    return FULL


def from_query(query: str) -> Variant:
    """The variant of a cache label's query part (see :attr:`Variant.query`)."""
    if not query:
        return FULL
    if query == Kind.SOURCE.value:
        return SOURCE
    name, _, value = query.partition("=")
    if name not in ("depth", "filter"):
        raise BadRequest(f"{query[:40]!r} is not a snapshot variant", code="invalid_variant")
    return parse_variant(
        source=False,
        depth=value if name == "depth" else None,
        filter_=value if name == "filter" else None,
    )
