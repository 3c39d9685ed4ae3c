"""This process's multipart uploads in flight, one small file each in a directory: what a
crash leaves there is what the next start aborts. Other replicas' uploads in flight in the
same bucket are never in it, so they are never aborted by this one."""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path


class UploadJournal:
    def __init__(self, directory: Path) -> None:
        self._dir = directory

    def _path(self, upload_id: str) -> Path:
        return self._dir / f"{hashlib.sha256(upload_id.encode()).hexdigest()[:32]}.json"

    def record(self, key: str, upload_id: str) -> None:
        self._dir.mkdir(parents=True, exist_ok=True)
        self._path(upload_id).write_text(json.dumps({"key": key, "upload_id": upload_id}))

    def done(self, upload_id: str) -> None:
        self._path(upload_id).unlink(missing_ok=True)

    def leftovers(self) -> list[tuple[str, str]]:
        """(object key, upload id) of every upload recorded and never done."""
        found = []
        for path in sorted(self._dir.glob("*.json")) if self._dir.is_dir() else ():
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                data = json.loads(path.read_text())
                found.append((str(data["key"]), str(data["upload_id"])))
        return found
