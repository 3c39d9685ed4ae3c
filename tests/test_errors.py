"""Bad input gets a clear 4xx JSON error and touches nothing; upstream faults get 5xx."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from yarl import URL

from tests.helpers import HOST, processes_mentioning, snapshot_url
from tests.upstream import Upstream, git

BAD_PATHS = [
    ("/git/example.test/a/%2E%2E/b/snapshot.tar.zst", 400, "invalid_repo"),
    ("/git/example.test/a/../b/snapshot.tar.zst", 400, "invalid_repo"),
    ("/git/example.test/%2E%2E/snapshot.tar.zst", 400, "invalid_repo"),
    ("/git/example.test/a//b/snapshot.tar.zst", 400, "invalid_repo"),
    ("/git/example.test/-rf/snapshot.tar.zst", 400, "invalid_repo"),
    ("/git/example.test/a/--upload-pack=x/snapshot.tar.zst", 400, "invalid_repo"),
    ("/git/example.test/a%01b/snapshot.tar.zst", 400, "invalid_repo"),
    ("/git/example.test/a%0Ab/snapshot.tar.zst", 400, "invalid_repo"),
    ("/git/example.test/a%20b/snapshot.tar.zst", 400, "invalid_repo"),
    ("/git/example.test/.git/snapshot.tar.zst", 400, "invalid_repo"),
    ("/git/example.test/" + "a" * 300 + "/snapshot.tar.zst", 400, "invalid_repo"),
    ("/git/example.test/" + "/".join("a" * 20) + "/snapshot.tar.zst", 400, "invalid_repo"),
    ("/git/other.test/a/b/snapshot.tar.zst", 404, "unknown_host"),
    ("/git/127.0.0.1/a/b/snapshot.tar.zst", 404, "unknown_host"),
]
BAD_REFS = [
    "a..b",
    "-x",
    "%01",
    "a%20b",
    "",
    "a~1",
    "a^",
    "a:b",
    "a/",
    "a.lock",
    "@",
    "x@{1}",
    ".hidden",
    "a//b",
    "a" * 300,
]


def _assert_untouched(state_dir: Path) -> None:
    for sub in ("mirrors", "cache"):
        path = state_dir / sub
        assert not path.exists() or not any(path.iterdir()), f"{sub} was touched"


@pytest.mark.parametrize(("path", "status", "code"), BAD_PATHS)
async def test_bad_paths(client: Any, state_dir: Path, path: str, status: int, code: str) -> None:
    # Sent exactly as written: a client library would resolve the dot segments itself.
    url = URL(str(client.make_url("/")).rstrip("/") + path, encoded=True)
    response = await client.session.get(url)
    assert response.status == status
    assert response.content_type == "application/json"
    body = await response.json()
    assert body["code"] == code and body["error"]
    _assert_untouched(state_dir)


@pytest.mark.parametrize("ref", BAD_REFS)
async def test_bad_refs(client: Any, state_dir: Path, ref: str) -> None:
    response = await client.get(f"/git/{HOST}/group/rich/snapshot.tar.zst?ref={ref}")
    assert response.status == 400
    assert (await response.json())["code"] == "invalid_ref"
    _assert_untouched(state_dir)


async def test_unknown_route_is_json(client: Any) -> None:
    response = await client.get("/nope")
    assert response.status == 404
    assert (await response.json())["code"] == "not_found"


async def test_repo_missing_upstream(client: Any, upstream: Upstream, state_dir: Path) -> None:
    response = await client.get(snapshot_url("no/such"))
    assert response.status == 404
    assert (await response.json())["code"] == "repo_not_found"
    assert not (state_dir / "mirrors" / HOST).exists() or not any(
        (state_dir / "mirrors" / HOST).iterdir()
    )


async def test_ref_missing_upstream(client: Any, rich: str) -> None:
    for ref in ("nope", "0" * 40):
        response = await client.get(snapshot_url(rich, ref))
        assert response.status == 404
        assert (await response.json())["code"] == "ref_not_found"


async def test_empty_repository(client: Any, upstream: Upstream) -> None:
    git("init", "--bare", "-q", str(upstream.root / "empty.git"))
    response = await client.get(snapshot_url("empty"))
    assert response.status == 404
    body = await response.json()
    assert body["code"] == "empty_repository"
    assert "empty" in body["error"]


async def test_upstream_down(
    make_client: Any, upstream: Upstream, rich: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Credentials in the upstream's URL: they must reach neither the client nor the log.
    url = f"http://bob:s3cret-pass@127.0.0.1:{upstream.port}/{{repo}}.git"
    client = await make_client(upstreams={HOST: {"url": url, "allow_private": True}})
    upstream.fail = True
    response = await client.get(snapshot_url(rich))
    assert response.status == 502
    text = await response.text()
    assert json.loads(text)["code"] == "upstream_error"
    assert f"127.0.0.1:{upstream.port}" in text  # the error does name the upstream
    assert "s3cret-pass" not in text
    assert "s3cret-pass" not in caplog.text and "127.0.0.1" in caplog.text


async def test_upstream_timeout_leaves_no_half_made_mirror(
    make_client: Any, upstream: Upstream, rich: str, state_dir: Path
) -> None:
    upstream.delay = 2.0
    client = await make_client(mirrors={"clone_timeout": "0.3s"})
    response = await client.get(snapshot_url(rich))
    assert response.status == 504
    assert (await response.json())["code"] == "upstream_timeout"
    assert not (state_dir / "mirrors" / HOST).exists() or not any(
        (state_dir / "mirrors" / HOST).iterdir()
    )
    assert list((state_dir / "tmp").iterdir()) == []
    assert processes_mentioning(str(state_dir)) == []

    upstream.delay = 0
    retry = await client.get(snapshot_url(rich))
    assert retry.status == 200
    await retry.read()


@pytest.mark.parametrize("value", ["²", "①", "٣", "-1", "1.5", "1" * 13])
async def test_max_age_takes_ascii_digits_only(client: Any, state_dir: Path, value: str) -> None:
    response = await client.get(snapshot_url("group/rich"), params={"max_age": value})
    assert response.status == 400
    assert (await response.json())["code"] == "invalid_max_age"
    _assert_untouched(state_dir)


async def test_ranges_nobody_can_satisfy_or_parse_get_the_whole(client: Any, rich: str) -> None:
    whole = await (await client.get(snapshot_url(rich))).read()
    nines = "9" * 5000
    for header in (f"bytes={nines}-", f"bytes=-{nines}", "bytes=\u0660-\u0669", "bytes=²-"):
        response = await client.get(snapshot_url(rich), headers={"Range": header})
        assert response.status == 200, header
        assert await response.read() == whole


async def test_ref_head_is_the_default_branch_cached_or_not(client: Any, rich: str) -> None:
    explicit = await client.get(snapshot_url(rich, "HEAD"))  # nothing cached yet
    assert explicit.status == 200
    await explicit.read()
    implicit = await client.get(snapshot_url(rich))
    assert implicit.headers["X-Gitcache-Source"] == "hit"
    assert implicit.headers["X-Gitcache-Commit"] == explicit.headers["X-Gitcache-Commit"]
    await implicit.read()


@pytest.mark.parametrize(
    "header", [("X-Forwarded-For", "203.0.113.9"), ("Forwarded", "for=1.2.3.4"), ("X-Real-IP", "x")]
)
async def test_forwarded_requests_are_never_local_for_admin(
    client: Any, header: tuple[str, str]
) -> None:
    assert (await client.get("/admin/repos")).status == 200  # plain loopback
    response = await client.get("/admin/repos", headers=dict([header]))
    assert response.status == 403
    assert (await response.json())["code"] == "forbidden"
