"""HTTP preconditions and ranges for a complete representation (RFC 9110 §13 and §14).

Pure functions of the request headers and the representation's validators, so the same
decisions hold whichever tier serves the bytes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

from gitcache.errors import PreconditionFailed, RangeNotSatisfiable

# ASCII digits only (``\d`` would take "²" and "①", which int() then refuses), and no
# more than 18 of them: a larger offset is past any snapshot, and a header of thousands of
# digits must not reach int()'s digit limit. Anything else is ignored: the whole is sent.
_RANGE = re.compile(r"[ \t]*bytes[ \t]*=[ \t]*([0-9]{0,18})[ \t]*-[ \t]*([0-9]{0,18})[ \t]*")


@dataclass(frozen=True)
class Plan:
    """What to send: ``status`` 200, 206 or 304, and for 200/206 the byte range."""

    status: int
    start: int = 0
    length: int = 0

    def content_range(self, size: int) -> str:
        return f"bytes {self.start}-{self.start + self.length - 1}/{size}"


def _etags(value: str) -> list[str]:
    return [t.strip() for t in value.split(",") if t.strip()]


def _strong_match(value: str, etag: str) -> bool:
    tags = _etags(value)
    return "*" in tags or etag in tags


def _weak_match(value: str, etag: str) -> bool:
    tags = [t.removeprefix("W/") for t in _etags(value)]
    return "*" in tags or etag in tags


def _date(value: str) -> float | None:
    try:
        return parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError):
        return None


def plan(headers: Mapping[str, str], *, method: str, etag: str, modified: float, size: int) -> Plan:
    """Evaluate If-Match, If-Unmodified-Since, If-None-Match, If-Modified-Since, If-Range
    and Range, in the order RFC 9110 §13.2.2 gives. Raises 412 or 416."""
    modified = int(modified)  # HTTP dates have whole seconds
    if (value := headers.get("If-Match")) is not None:
        if not _strong_match(value, etag):
            raise PreconditionFailed("If-Match does not match the current snapshot")
    elif (value := headers.get("If-Unmodified-Since")) is not None:
        date = _date(value)
        if date is not None and modified > date:
            raise PreconditionFailed("the snapshot was modified since If-Unmodified-Since")
    if (value := headers.get("If-None-Match")) is not None:
        if _weak_match(value, etag):
            if method in ("GET", "HEAD"):
                return Plan(304)
            raise PreconditionFailed("If-None-Match matches the current snapshot")
    elif method in ("GET", "HEAD") and (value := headers.get("If-Modified-Since")) is not None:
        date = _date(value)
        if date is not None and modified <= date:
            return Plan(304)

    full = Plan(200, 0, size)
    range_value = headers.get("Range")
    if method != "GET" or range_value is None:
        return full
    if (if_range := headers.get("If-Range")) is not None:
        if if_range.startswith('"') or if_range.startswith("W/"):
            if if_range.strip() != etag:  # If-Range needs a strong match
                return full
        elif _date(if_range) != modified:
            return full
    match = _RANGE.fullmatch(range_value)
    if match is None:
        return full  # several ranges or another unit: the whole is a valid answer
    first, last = match.groups()
    if not first and not last:
        return full
    if not first:  # suffix: the last N bytes
        suffix = int(last)
        if suffix == 0 or size == 0:
            raise RangeNotSatisfiable(size)
        return Plan(206, max(0, size - suffix), min(suffix, size))
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    if last and int(last) < start:
        return full  # syntactically invalid: ignore the header
    if start >= size:
        raise RangeNotSatisfiable(size)
    return Plan(206, start, end - start + 1)
