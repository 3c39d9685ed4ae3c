"""Where a response comes from: ``X-Gitcache-Source`` and the ``source`` label."""

from __future__ import annotations

from enum import StrEnum


class Source(StrEnum):
    HIT = "hit"  # from the cache
    MISS = "miss"  # this request started the generation
    FOLLOWER = "follower"  # joined a generation already running
    STALE = "stale"  # the upstream failed: an older snapshot stands in
    MIRROR = "mirror"  # a git request answered by the mirror itself, not shared or cached
