"""Metrics, dashboard and alerts, readiness and SIGTERM, logs, and the admin API."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gitcache.errors import GitError
from gitcache.log import JsonFormatter, setup_logging
from tests.helpers import HOST, processes_mentioning, sample, snapshot_url, wrap_build_tar
from tests.processes import start_gitcache
from tests.upstream import Upstream
from tests.waiting import until

ROOT = Path(__file__).parent.parent
DASHBOARD = ROOT / "config" / "grafana" / "gitcache.json"
ALERTS = ROOT / "config" / "prometheus" / "alerts.yml"


def metric_names(text: str) -> set[str]:
    return set(re.findall(r"\bgitcache_[a-z0-9_]+", text))


def exported(name: str, exposition: str) -> bool:
    base = re.sub(r"_(bucket|sum|count|total)$", "", name)
    return bool(re.search(rf"^# TYPE ({re.escape(name)}|{re.escape(base)}) ", exposition, re.M))


async def test_dashboard_and_alerts_use_only_exported_metrics(client: Any, rich: str) -> None:
    await (await client.get(snapshot_url(rich))).read()
    exposition = await (await client.get("/metrics")).text()
    exprs = [t["expr"] for p in json.loads(DASHBOARD.read_text())["panels"] for t in p["targets"]]
    used = metric_names("\n".join(exprs)) | metric_names(ALERTS.read_text())
    assert len(used) > 15
    missing = sorted(name for name in used if not exported(name, exposition))
    assert missing == []


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_alert_rules_pass_promtool() -> None:
    result = subprocess.run(["promtool", "check", "rules", str(ALERTS)], capture_output=True)
    assert result.returncode == 0, result.stdout + result.stderr


async def _scrape(client: Any) -> str:
    return str(await (await client.get("/metrics")).text())


async def _miss_follower_hit(client: Any, rich: str) -> int:
    """Two concurrent requests (a miss and a follower, or a hit) then a hit; the size."""
    first, second = await asyncio.gather(
        client.get(snapshot_url(rich)), client.get(snapshot_url(rich))
    )
    size = len(await first.read())
    await second.read()
    await (await client.get(snapshot_url(rich))).read()
    return size


async def test_metrics_count_responses_by_source(client: Any, rich: str) -> None:
    await _miss_follower_hit(client, rich)
    m = await _scrape(client)
    assert sample(m, "gitcache_snapshot_responses_total", source="miss", tier="spool") == 1
    assert (
        sample(m, "gitcache_snapshot_responses_total", source="hit", tier="disk")
        + sample(m, "gitcache_snapshot_responses_total", source="follower", tier="spool")
        == 2
    )
    assert sample(m, "gitcache_http_requests_total", method="GET", status="200") >= 3


async def test_metrics_count_the_bytes_served_and_generated(client: Any, rich: str) -> None:
    size = await _miss_follower_hit(client, rich)
    m = await _scrape(client)
    assert sample(m, "gitcache_snapshot_bytes_served_total") == 3 * size
    assert sample(m, "gitcache_generation_bytes_total") == size
    assert sample(m, "gitcache_upstream_fetched_bytes_total") > 0


async def test_metrics_count_one_generation_one_clone_one_entry(client: Any, rich: str) -> None:
    await _miss_follower_hit(client, rich)
    m = await _scrape(client)
    assert sample(m, "gitcache_generations_started_total") == 1
    assert sample(m, "gitcache_generations_total", result="ok") == 1
    assert sample(m, "gitcache_generations_in_flight") == 0
    assert sample(m, "gitcache_mirror_operations_total", operation="clone", result="ok") == 1
    assert sample(m, "gitcache_cache_entries", tier="disk") == 1


async def test_metrics_count_a_failed_generation(
    client: Any, rich: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def fail(sent: int) -> None:
        raise GitError("simulated")

    wrap_build_tar(monkeypatch, fail)
    broken = await client.get(snapshot_url(rich, "feature"))
    with pytest.raises(aiohttp.ClientPayloadError):
        await broken.read()

    async def counted() -> bool:
        m = await _scrape(client)
        return sample(m, "gitcache_generations_total", result="failed") == 1

    await until(counted, "the failed generation to be counted")
    assert sample(await _scrape(client), "gitcache_generations_total", result="ok") == 0


async def test_stale_is_counted(make_client: Any, upstream: Upstream, rich: str) -> None:
    client = await make_client(mirrors={"fetch_interval": "0s"})
    await (await client.get(snapshot_url(rich))).read()
    upstream.fail = True
    stale = await client.get(snapshot_url(rich))
    await stale.read()
    assert stale.headers["X-Gitcache-Source"] == "stale"
    m = await (await client.get("/metrics")).text()
    assert sample(m, "gitcache_snapshot_responses_total", source="stale", tier="disk") == 1
    assert sample(m, "gitcache_mirror_operations_total", operation="fetch", result="failed") >= 1


async def test_one_log_line_per_request_and_json_format(
    client: Any, rich: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gitcache.access")
    await (await client.get(snapshot_url(rich))).read()
    lines = [r.getMessage() for r in caplog.records if r.name == "gitcache.access"]
    assert len(lines) == 1
    assert re.match(
        rf"GET /git/{HOST}/{rich}/snapshot.tar.zst 200 source=miss bytes=\d+ duration=[\d.]+ "
        r"commit=[0-9a-f]{40}$",
        lines[0],
    )

    stream = io.StringIO()
    setup_logging("INFO", "json")
    handler = logging.getLogger().handlers[0]
    handler.setStream(stream)  # type: ignore[attr-defined]
    try:
        logging.getLogger("gitcache.test").warning(
            "fetch https://bob:hunter2@example.test/x failed"
        )
    finally:
        logging.getLogger().handlers.clear()
    record = json.loads(stream.getvalue())
    assert record["level"] == "WARNING" and record["logger"] == "gitcache.test"
    assert "hunter2" not in record["message"] and "https://***@example.test/x" in record["message"]

    # The access log's fields are keys of their own, not only words of the message.
    (access,) = [r for r in caplog.records if r.name == "gitcache.access"]
    formatted = json.loads(JsonFormatter().format(access))
    assert formatted["method"] == "GET" and formatted["status"] == "200"
    assert formatted["source"] == "miss" and formatted["bytes"] > 0
    assert re.fullmatch(r"[0-9a-f]{40}", formatted["commit"])
    assert formatted["path"] == f"/git/{HOST}/{rich}/snapshot.tar.zst"


async def test_admin_api(client: Any, rich: str, state_dir: Path) -> None:
    await (await client.get(snapshot_url(rich))).read()
    listing = await (await client.get("/admin/repos")).json()
    [repo] = listing["repos"]
    assert repo["repo"] == f"{HOST}/{rich}"
    assert repo["mirror"]["present"] and repo["mirror"]["bytes"] > 0
    assert repo["refresh"]["refs"] == ["HEAD"]
    [snap] = repo["snapshots"]
    assert snap["tiers"] == ["disk"] and len(snap["commit"]) == 40 and snap["bytes"] > 0

    one = await client.get(f"/admin/repos/{HOST}/{rich}")
    assert (await one.json())["repo"] == f"{HOST}/{rich}"
    assert (await client.get(f"/admin/repos/{HOST}/nothing/here")).status == 404

    deleted = await client.delete(f"/admin/repos/{HOST}/{rich}")
    assert deleted.status == 200
    assert not (state_dir / "mirrors" / HOST / "group%2Frich.git").exists()
    assert not list((state_dir / "cache").rglob("*.tar.zst"))
    assert (await (await client.get("/admin/repos")).json())["repos"] == []
    again = await client.get(snapshot_url(rich))
    assert again.headers["X-Gitcache-Source"] == "miss"
    await again.read()


async def test_readiness(client: Any) -> None:
    response = await client.get("/readyz")
    assert response.status == 200
    assert await response.json() == {"status": "ready"}


async def test_sigterm_during_a_stream_and_a_generation(
    upstream: Upstream, big_work: Path, tmp_path: Path
) -> None:
    upstream.create("big", big_work)
    process = await start_gitcache(
        tmp_path,
        "state",
        upstream,
        server={"shutdown_timeout": "1s", "drain_delay": "1s"},
        snapshot={"zstd_level": 19},  # slow on purpose: the generation is still running
    )
    proc, base, state_dir = process.proc, process.base, process.state_dir
    async with aiohttp.ClientSession() as session:
        stream = await session.get(base + snapshot_url("big"))
        assert stream.status == 200
        await stream.content.read(100)
        assert list((state_dir / "spool").iterdir())  # the generation is running

        proc.send_signal(signal.SIGTERM)

        async def draining() -> bool:  # a new connection, during the drain
            async with aiohttp.ClientSession() as fresh, fresh.get(f"{base}/readyz") as ready:
                return ready.status == 503

        await until(draining, "readiness to say 503 while connections are accepted", 1.0)
        with pytest.raises(aiohttp.ClientPayloadError):
            await stream.read()  # cut after shutdown_timeout: no truncated "success"
    assert await asyncio.wait_for(proc.wait(), 30) == 0
    assert processes_mentioning(str(state_dir)) == []
    assert list((state_dir / "spool").iterdir()) == []
    assert list((state_dir / "cache").rglob("*.tar.zst")) == []
