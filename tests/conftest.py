from __future__ import annotations

import os
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from gitcache.app import create_app
from gitcache.config import Config
from gitcache.settings import config_from_dict
from tests.helpers import Clock
from tests.servers import free_port, start_s3_server
from tests.upstream import Upstream, make_big_repo, make_rich_repo

# Tests must not depend on the developer's git config; commits need an identity.
_GIT_HOME = tempfile.mkdtemp(prefix="gitcache-tests-")
Path(_GIT_HOME, "gitconfig").write_text(
    "[user]\n\tname = Test\n\temail = test@example.invalid\n"
    '[init]\n\tdefaultBranch = main\n[protocol "file"]\n\tallow = always\n'
)
os.environ["GIT_CONFIG_GLOBAL"] = str(Path(_GIT_HOME, "gitconfig"))
os.environ["GIT_CONFIG_NOSYSTEM"] = "1"
# The S3 test server accepts any credentials; the code finds them the standard way.
os.environ.update(
    AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1"
)
for _proxy in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
    os.environ.pop(_proxy, None)

HOST = "example.test"


def make_config(state_dir: Path, upstream: Upstream, **sections: dict[str, Any]) -> Config:
    data: dict[str, Any] = {
        "server": {"state_dir": str(state_dir)},
        "upstreams": {
            HOST: {"url": f"http://127.0.0.1:{upstream.port}/{{repo}}.git", "allow_private": True}
        },
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return config_from_dict(data)


@pytest.fixture
async def upstream(tmp_path: Path, aiohttp_server: Any) -> Upstream:
    up = Upstream(tmp_path / "upstream")
    up.root.mkdir()
    server = await aiohttp_server(up.app())
    up.port = server.port
    return up


@pytest.fixture(scope="session")
def rich_work(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    work = tmp_path_factory.mktemp("rich") / "work"
    return work, make_rich_repo(work)


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    port = free_port()
    proc = start_s3_server(port)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def s3_bucket(s3_endpoint: str) -> str:
    name = f"gitcache-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def big_work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 MB of incompressible files: a snapshot stream that lasts long enough to be
    interrupted, slowed down or shut down in the middle."""
    work = tmp_path_factory.mktemp("big") / "work"
    make_big_repo(work, megabytes=24)
    return work


@pytest.fixture
def rich(upstream: Upstream, rich_work: tuple[Path, dict[str, str]]) -> str:
    """The rich repository, served upstream as ``group/rich``."""
    upstream.create("group/rich", rich_work[0])
    return "group/rich"


@pytest.fixture
def clock() -> Clock:
    """Injected time: tests move ``clock.now`` by hand instead of sleeping."""
    return Clock()


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
async def make_client(
    aiohttp_client: Any, state_dir: Path, upstream: Upstream
) -> Callable[..., Any]:
    """Start gitcache against the test upstream; keyword arguments are config sections."""

    async def start(
        clock: Callable[[], float] = time.time,
        background: bool = True,
        state: Path | None = None,
        **sections: dict[str, Any],
    ) -> TestClient[web.Request, web.Application]:
        """``state``: another state directory (a second replica)."""
        config = make_config(state or state_dir, upstream, **sections)
        app = create_app(config, clock=clock, background=background)
        return await aiohttp_client(app)  # type: ignore[no-any-return]

    return start


@pytest.fixture
async def client(make_client: Callable[..., Any]) -> TestClient[web.Request, web.Application]:
    return await make_client()  # type: ignore[no-any-return]


@pytest.fixture
def scratch(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "scratch"
    path.mkdir()
    yield path
