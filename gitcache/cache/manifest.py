"""``manifest.json``: the list of a repository's snapshots in one small document, so that a
lookup is one read and never a listing."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

from gitcache.cache.base import Entry

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1


@dataclass(frozen=True)
class Manifest:
    entries: tuple[Entry, ...] = ()

    def newest(self, ref: str) -> Entry | None:
        matching = [e for e in self.entries if e.ref == ref]
        return max(matching, key=lambda e: e.created, default=None)

    def get(self, key: str) -> Entry | None:
        return next((e for e in self.entries if e.key == key), None)

    def with_entry(self, entry: Entry) -> Manifest:
        return Manifest((*self.without(entry.key).entries, entry))

    def without(self, *keys: str) -> Manifest:
        return Manifest(tuple(e for e in self.entries if e.key not in keys))

    def touched(self, key: str, fetched_at: float) -> Manifest:
        return Manifest(
            tuple(replace(e, fetched_at=fetched_at) if e.key == key else e for e in self.entries)
        )

    def dumps(self) -> bytes:
        doc = {"version": MANIFEST_VERSION, "entries": [e.to_json() for e in self.entries]}
        return json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n"

    @classmethod
    def loads(cls, data: bytes) -> Manifest:
        """Parse a manifest; raise ValueError if it is not one this version understands."""
        try:
            doc = json.loads(data)
            if doc.get("version") != MANIFEST_VERSION:
                raise ValueError(f"unsupported manifest version {doc.get('version')!r}")
            return cls(tuple(Entry.from_json(e) for e in doc["entries"]))
        except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as exc:
            raise ValueError(f"malformed manifest: {exc}") from exc
