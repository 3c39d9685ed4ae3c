"""Security: credentials that never leak, inbound auth, pass-through, no open proxy,
load shedding, and a parser that nothing gets past."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import socket
import string
import subprocess
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gitcache.config import ConfigError
from gitcache.errors import BadRequest, NotFound
from gitcache.mirror import addresses
from gitcache.mirror.addresses import is_public, lookup
from gitcache.repo import _SEGMENT, parse_ref, parse_repo
from gitcache.settings import config_from_dict
from tests.helpers import (
    HOST,
    Clock,
    processes_mentioning,
    snapshot_url,
    stored_trees,
    wrap_build_tar,
)
from tests.upstream import Upstream

TOKEN = "ghp_" + "S3cr3tT0k3n" * 3  # gitcache's own credential for the upstream


def with_own_token(upstream: Upstream, token_file: Path, **extra: Any) -> dict[str, Any]:
    """An upstream section for which gitcache has its own credential."""
    own = {
        "url": upstream.url("{repo}"),
        "allow_private": True,
        "username": "gitcache",
        "token_file": str(token_file),
    }
    return {HOST: {**own, **extra}}


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "upstream-token"
    path.write_text(TOKEN + "\n")
    return path


async def test_upstream_credentials_never_leak(
    make_client: Any,
    upstream: Upstream,
    rich: str,
    token_file: Path,
    state_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    upstream.users = {"gitcache": TOKEN}
    upstream.delay = 0.3  # keep git running long enough to be looked at
    client = await make_client(upstreams=with_own_token(upstream, token_file))
    request = asyncio.ensure_future(client.get(snapshot_url(rich)))
    cmdlines: list[str] = []
    while not request.done():
        cmdlines += [c for c in processes_mentioning(str(state_dir)) if "git" in c]
        await asyncio.sleep(0.02)
    response = await request
    body = await response.read()
    assert response.status == 200
    assert cmdlines, "no git child was seen"
    assert not any(TOKEN in c for c in cmdlines)

    tar = subprocess.run(["zstd", "-d", "-c"], input=body, capture_output=True, check=True)
    assert TOKEN.encode() not in tar.stdout
    for path in (state_dir / "mirrors").rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path
    error = await client.get(snapshot_url("no/such"))
    assert TOKEN not in await error.text()
    assert TOKEN not in await (await client.get("/metrics")).text()
    assert all(TOKEN not in record.getMessage() for record in caplog.records)

    # Without the credential the upstream refuses: the token really was used.
    upstream.users = {"gitcache": "something else"}
    refused = await client.get(snapshot_url(rich) + "?max_age=0")
    assert refused.status == 404  # a refusal is not an outage: no stale stand-in
    assert TOKEN not in await refused.text()


def _tokens_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens.toml"
    lines = []
    for name, token, repos, admin in (
        ("reader", "read-token", [f"{HOST}/group/*"], False),
        ("admin", "admin-token", [f"{HOST}/*"], True),
    ):
        digest = hashlib.sha256(token.encode()).hexdigest()
        lines.append(
            f'[[tokens]]\nname = "{name}"\nsha256 = "{digest}"\nrepos = {repos!r}\n'
            f"admin = {str(admin).lower()}\n"
        )
    path.write_text("\n".join(lines).replace("'", '"'))
    return path


async def test_auth_matrix(
    make_client: Any,
    upstream: Upstream,
    rich: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    client = await make_client(auth={"tokens_file": str(_tokens_file(tmp_path))})
    url = snapshot_url(rich)
    bearer = {"reader": "Bearer read-token", "admin": "Bearer admin-token"}

    missing = await client.get(url)
    assert missing.status == 401
    assert missing.headers["WWW-Authenticate"].startswith("Bearer")
    assert (await client.get(url, headers={"Authorization": "Bearer wrong"})).status == 401
    assert (await client.get(url, headers={"Authorization": "Basic Zm9vOmJhcg=="})).status == 401
    allowed = await client.get(url, headers={"Authorization": bearer["reader"]})
    assert allowed.status == 200
    await allowed.read()
    upstream.create("other/repo", Path(upstream.root / "group/rich.git"))
    hidden = await client.get(
        snapshot_url("other/repo"), headers={"Authorization": bearer["reader"]}
    )
    assert hidden.status == 404  # not 403: whether it exists is none of this token's business
    assert (await hidden.json())["code"] == "repo_not_found"

    admin_url = f"/admin/repos/{HOST}/{rich}/refresh"
    assert (await client.post(admin_url)).status == 401
    reader_admin = await client.post(admin_url, headers={"Authorization": bearer["reader"]})
    assert reader_admin.status == 403
    assert (await client.post(admin_url, headers={"Authorization": bearer["admin"]})).status == 202
    assert (await client.get("/healthz")).status == 200
    assert all("read-token" not in r.getMessage() for r in caplog.records)


async def test_passthrough(
    make_client: Any, upstream: Upstream, rich: str, token_file: Path
) -> None:
    clock = Clock()
    upstream.users = {"gitcache": TOKEN, "alice": "alice-pw"}
    client = await make_client(
        clock=clock,
        background=False,
        upstreams=with_own_token(upstream, token_file, auth="passthrough", auth_ttl="60s"),
    )
    url = snapshot_url(rich)
    alice = {"Authorization": basic("alice", "alice-pw")}

    missing = await client.get(url)
    assert missing.status == 401
    assert missing.headers["WWW-Authenticate"].startswith("Basic")
    first = await client.get(url, headers=alice)
    assert first.status == 200
    await first.read()
    wrong = await client.get(url, headers={"Authorization": basic("alice", "guess")})
    assert wrong.status == 404  # refused though the snapshot is cached
    bearer = await client.get(url, headers={"Authorization": "Bearer " + TOKEN})
    assert bearer.status == 200  # a token as the password of the configured username
    await bearer.read()

    del upstream.users["alice"]  # revoked upstream
    clock.now += 30
    within_ttl = await client.get(url, headers=alice)
    assert within_ttl.status == 200
    await within_ttl.read()
    clock.now += 31
    assert (await client.get(url, headers=alice)).status == 404


@pytest.mark.parametrize(
    ("host", "url"),
    [
        ("127.0.0.1", "https://127.0.0.1/{repo}"),
        ("git.example.com", "https://10.0.0.7/{repo}.git"),
        ("git.example.com", "http://[::1]:8080/{repo}"),
        ("git.example.com", "https://169.254.169.254/{repo}"),
        ("localhost", "https://localhost/{repo}"),
        ("git.example.com", "http://svc.localhost/{repo}"),
        ("git.example.com", "file:///srv/git/{repo}"),
    ],
)
def test_no_open_proxy(host: str, url: str) -> None:
    with pytest.raises(ConfigError, match="allow_private"):
        config_from_dict({"upstreams": {host: {"url": url}}})
    allowed = {"upstreams": {host: {"url": url, "allow_private": True}}}
    assert config_from_dict(allowed).upstreams[host].allow_private


async def test_overload_sheds_with_retry_after_and_recovers(
    make_client: Any, rich: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = asyncio.Event()

    async def held(sent: int) -> None:
        await release.wait()

    wrap_build_tar(monkeypatch, held)
    client = await make_client(server={"max_generations": 1, "max_clients_per_generation": 1})
    first = await client.get(snapshot_url(rich, "main"))  # headers out, generation held
    busy = await client.get(snapshot_url(rich, "feature"))
    assert busy.status == 503
    assert busy.headers["Retry-After"] == "5"
    assert (await busy.json())["code"] == "overloaded"
    crowd = await client.get(snapshot_url(rich, "main"))
    assert crowd.status == 503  # one reader per generation at most
    release.set()
    await first.read()
    later = await client.get(snapshot_url(rich, "feature"))
    assert later.status == 200
    await later.read()
    metrics = await (await client.get("/metrics")).text()
    assert 'gitcache_overloaded_total{limit="max_generations"} 1.0' in metrics


async def test_low_disk_space_still_streams_but_does_not_cache(
    make_client: Any, rich: str, state_dir: Path
) -> None:
    client = await make_client(cache={"disk": {"min_free": "1000000TiB"}})
    for _ in range(2):
        response = await client.get(snapshot_url(rich))
        assert response.status == 200 and response.headers["X-Gitcache-Source"] == "miss"
        await response.read()
    metrics = await (await client.get("/metrics")).text()
    assert "gitcache_disk_low_space 1.0" in metrics
    assert stored_trees(state_dir) == []  # nor keeps working trees


# --- the parser: nothing gets past it ---------------------------------------------------

UPSTREAMS = config_from_dict(
    {"upstreams": {HOST: {"url": "https://x/{repo}", "allow_private": True}}}
).upstreams


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=300))
def test_repo_parser_never_lets_anything_unsafe_through(path: str) -> None:
    try:
        repo = parse_repo(HOST, path, UPSTREAMS)
    except (BadRequest, NotFound):
        return
    segments = repo.path.split("/")
    assert all(_SEGMENT.fullmatch(s) and s not in {".", ".."} for s in segments)
    state = Path("/state")
    resolved = (state / "mirrors" / repo.host / f"{repo.slug}.git").resolve()
    assert resolved.is_relative_to(state / "mirrors" / HOST)
    assert "/" not in repo.slug and not repo.slug.startswith("-")


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.text(max_size=300), st.text(alphabet=string.printable, max_size=40)))
def test_ref_parser_never_lets_an_option_through(ref: str) -> None:
    try:
        spec = parse_ref(ref)
    except BadRequest:
        return
    for name in (spec.name, spec.sha):
        if name is not None:
            assert not name.startswith("-") and ".." not in name
            assert all(ord(c) > 32 and c != "\x7f" for c in name)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.text(alphabet=st.characters(codec="utf-8", exclude_characters="?#"), min_size=1, max_size=80)
)
async def test_arbitrary_paths_never_give_a_5xx(client: Any, state_dir: Path, path: str) -> None:
    from urllib.parse import quote

    response = await client.get(f"/git/{HOST}/{quote(path, safe='/')}/snapshot.tar.zst")
    assert response.status < 500
    await response.read()
    mirrors = state_dir / "mirrors"
    if mirrors.exists():
        assert all(p.resolve().is_relative_to(mirrors) for p in mirrors.rglob("*"))


def upstream_named(name: str, upstream: Upstream) -> dict[str, Any]:
    """The test upstream under another host name, with private addresses not allowed."""
    return {HOST: {"url": f"http://{name}:{upstream.port}/{{repo}}.git"}}


async def test_a_host_name_resolving_to_a_private_address_is_refused(
    make_client: Any, upstream: Upstream, rich: str, state_dir: Path
) -> None:
    """A name, not a literal, so config load lets it through; it resolves to this machine
    (a loopback or private address), so no git call is made for it."""
    name = socket.gethostname()
    if all(is_public(a) for a in await lookup(name, upstream.port)):
        pytest.skip("this machine's name resolves to a public address")
    client = await make_client(upstreams=upstream_named(name, upstream))
    response = await client.get(snapshot_url(rich))
    assert response.status == 502
    body = await response.json()
    assert body["code"] == "upstream_error" and "non-public" in body["error"]
    assert upstream.requests == []  # the upstream never heard of it
    assert not (state_dir / "mirrors" / HOST).exists()


async def test_git_connects_to_the_address_that_was_checked(
    make_client: Any, upstream: Upstream, rich: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The name cannot resolve at all (``.invalid``): git can reach the upstream only at
    the address gitcache looked up, checked and pinned (here: loopback, let through)."""
    looked_up = []

    async def fake_lookup(host: str, port: int) -> list[str]:
        looked_up.append(host)
        return ["127.0.0.1"]

    monkeypatch.setattr(addresses, "lookup", fake_lookup)
    monkeypatch.setattr(addresses, "is_public", lambda address: True)
    client = await make_client(upstreams=upstream_named("upstream.gitcache.invalid", upstream))
    response = await client.get(snapshot_url(rich))
    assert response.status == 200
    await response.read()
    assert looked_up and set(looked_up) == {"upstream.gitcache.invalid"}
    assert upstream.requests  # reached through the pinned address
