"""Leases in the shared bucket, so that N replicas do not all do the same periodic work on
one repository (refresh and upload its snapshot, archive its mirror, scrub its entries).

``leases/<work>/<host>/<repo slug>.json`` is created with ``If-None-Match: *``, or taken
over once expired with ``If-Match`` on its ETag. Claims fail open: if S3 cannot say, the
work is done (twice at worst, never not at all).
"""

from __future__ import annotations

import json
import uuid

from gitcache.bucket.client import Bucket, Conflict, S3Error
from gitcache.repo import RepoRef


class Leases:
    def __init__(self, bucket: Bucket) -> None:
        self._bucket = bucket
        self.owner = uuid.uuid4().hex  # this replica, in lease objects

    async def claim(self, work: str, repo: RepoRef, ttl: float, now: float) -> bool:
        """Whether this replica does ``work`` on ``repo`` for the next ``ttl`` seconds."""
        name = f"leases/{work}/{repo.host}/{repo.slug}.json"
        body = json.dumps({"owner": self.owner, "expires": now + ttl}).encode()
        try:
            try:
                await self._bucket.write(name, body, "lease", if_absent=True)
                return True
            except Conflict:
                pass
            current = await self._bucket.read(name, "lease")
            if current is None:
                return False  # released meanwhile; another replica is on it
            data, etag = current
            held = json.loads(data)
            if held.get("owner") != self.owner and float(held.get("expires", 0)) > now:
                return False
            await self._bucket.write(name, body, "lease", if_match=etag)
            return True
        except Conflict:
            return False  # another replica took it over first
        except S3Error:
            return True
        except (ValueError, TypeError, AttributeError):
            return True  # an unreadable lease is nobody's
