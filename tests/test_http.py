"""Hits honour Range, If-Range, If-None-Match, If-Match and If-Modified-Since (RFC 9110)."""

from __future__ import annotations

from email.utils import formatdate
from typing import Any

import pytest

from gitcache.errors import PreconditionFailed, RangeNotSatisfiable
from gitcache.web.conditional import Plan, plan
from tests.helpers import snapshot_url


@pytest.fixture
async def cached(client: Any, rich: str) -> tuple[bytes, str, str]:
    body = await (await client.get(snapshot_url(rich))).read()
    head = await client.head(snapshot_url(rich))
    return body, head.headers["ETag"], head.headers["Last-Modified"]


async def test_ranges(client: Any, rich: str, cached: tuple[bytes, str, str]) -> None:
    body, etag, _ = cached
    size = len(body)
    for header, (start, end) in {
        "bytes=0-99": (0, 99),
        "bytes=100-": (100, size - 1),
        "bytes=-100": (size - 100, size - 1),
        f"bytes=10-{size + 1000}": (10, size - 1),
    }.items():
        response = await client.get(snapshot_url(rich), headers={"Range": header})
        assert response.status == 206, header
        assert response.headers["Content-Range"] == f"bytes {start}-{end}/{size}"
        assert await response.read() == body[start : end + 1]
        assert response.headers["ETag"] == etag

    response = await client.get(snapshot_url(rich), headers={"Range": f"bytes={size}-"})
    assert response.status == 416
    assert response.headers["Content-Range"] == f"bytes */{size}"
    assert (await response.json())["code"] == "range_not_satisfiable"

    multi = await client.get(snapshot_url(rich), headers={"Range": "bytes=0-1,5-6"})
    assert multi.status == 200 and await multi.read() == body


async def test_conditionals(client: Any, rich: str, cached: tuple[bytes, str, str]) -> None:
    body, etag, last_modified = cached
    url = snapshot_url(rich)

    not_modified = await client.get(url, headers={"If-None-Match": etag})
    assert not_modified.status == 304
    assert not_modified.headers["ETag"] == etag
    assert await not_modified.read() == b""
    assert (await client.get(url, headers={"If-None-Match": f"W/{etag}"})).status == 304
    assert (await client.get(url, headers={"If-None-Match": '"other"'})).status == 200
    assert (await client.get(url, headers={"If-Modified-Since": last_modified})).status == 304

    failed = await client.get(url, headers={"If-Match": '"other"'})
    assert failed.status == 412
    assert (await failed.json())["code"] == "precondition_failed"
    ok = await client.get(url, headers={"If-Match": etag, "Range": "bytes=0-9"})
    assert ok.status == 206 and await ok.read() == body[:10]

    stale = await client.get(url, headers={"If-Range": '"other"', "Range": "bytes=0-9"})
    assert stale.status == 200 and await stale.read() == body
    fresh = await client.get(url, headers={"If-Range": etag, "Range": "bytes=0-9"})
    assert fresh.status == 206 and await fresh.read() == body[:10]


ETAG = '"abc"'
MODIFIED = 1_700_000_000.0


def _plan(method: str = "GET", **headers: str) -> Plan:
    return plan(headers, method=method, etag=ETAG, modified=MODIFIED, size=1000)


def test_plan_precedence() -> None:
    assert _plan() == Plan(200, 0, 1000)
    assert _plan("HEAD", Range="bytes=0-1") == Plan(200, 0, 1000)  # Range is for GET
    # If-None-Match wins over If-Modified-Since when both are sent.
    old = formatdate(MODIFIED - 100, usegmt=True)
    assert _plan(**{"If-None-Match": ETAG, "If-Modified-Since": old}).status == 304
    assert _plan(**{"If-None-Match": '"x"', "If-Modified-Since": old}).status == 200
    later = formatdate(MODIFIED + 100, usegmt=True)
    with pytest.raises(PreconditionFailed):
        _plan(**{"If-Unmodified-Since": old})
    assert _plan(**{"If-Unmodified-Since": later}).status == 200
    assert _plan(**{"If-Match": "*"}).status == 200
    with pytest.raises(PreconditionFailed):
        _plan(**{"If-Match": f"W/{ETAG}"})  # If-Match compares strongly
    assert _plan(Range="bytes=5-1").status == 200  # invalid: ignored
    assert _plan(Range="items=0-1").status == 200
    with pytest.raises(RangeNotSatisfiable):
        _plan(Range="bytes=-0")
    assert _plan(Range="bytes=0-0") == Plan(206, 0, 1)
    assert _plan(**{"If-Range": formatdate(MODIFIED, usegmt=True), "Range": "bytes=1-2"}) == (
        Plan(206, 1, 2)
    )
    assert _plan(**{"If-Range": later, "Range": "bytes=1-2"}).status == 200


def test_range_digits_are_ascii_and_bounded() -> None:
    whole = Plan(200, 0, 1000)
    huge, long = "bytes=" + "9" * 5000 + "-", "bytes=" + "1" * 19 + "-"
    for header in (huge, "bytes=\u0660-\u0669", "bytes=1-²", long):
        assert plan({"Range": header}, method="GET", etag='"e"', modified=0, size=1000) == whole
    far = "bytes=" + "9" * 18 + "-"
    with pytest.raises(RangeNotSatisfiable):
        plan({"Range": far}, method="GET", etag='"e"', modified=0, size=1000)
