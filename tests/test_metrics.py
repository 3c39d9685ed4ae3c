"""``/metrics`` as Prometheus reads it, parsed with prometheus-client's own parser."""

from __future__ import annotations

import gzip
import re
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "config" / "prometheus" / "alerts.yml"


def families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


async def test_metrics_on_a_fresh_server(
    make_client: Any, s3_endpoint: str, s3_bucket: str
) -> None:
    # Tiered: every tier's series exist.
    cache = {"backend": "tiered", "s3": {"bucket": s3_bucket, "endpoint_url": s3_endpoint}}
    client = await make_client(cache=cache, mirrors={"archive_interval": 0})
    response = await client.get("/metrics")
    assert response.status == 200
    text = await response.text()
    found = families(text)
    samples = [s for f in found.values() for s in f.samples]
    assert not [s.name for s in samples if s.name.endswith("_created")]
    (build,) = found["gitcache_build_info"].samples
    assert build.value == 1 and build.labels["version"]
    assert "process_resident_memory_bytes" in found and "python_info" in found
    # Every series an alert uses is there at 0 before anything happened, so rate() says 0.
    per_repository = {"gitcache_pinned_snapshot_age_seconds"}  # none without a pinned repo
    used = set(re.findall(r"\bgitcache_[a-z0-9_]+", ALERTS.read_text())) - per_repository
    for name in sorted(used):
        family = found.get(name.removesuffix("_total"))
        assert family is not None and family.samples, f"{name} has no series on a fresh server"
    ours = [s for s in samples if s.name.startswith("gitcache_")]
    results = {s.labels["result"] for s in ours if "result" in s.labels}
    assert results <= {"ok", "failed", "aborted", "corrupt"}


async def test_metrics_negotiate_openmetrics_and_gzip(client: Any) -> None:
    plain = await client.get("/metrics")
    assert plain.headers["Content-Type"].startswith("text/plain")
    open_metrics = await client.get(
        "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
    )
    assert open_metrics.headers["Content-Type"].startswith("application/openmetrics-text")
    assert (await open_metrics.text()).rstrip().endswith("# EOF")
    zipped = await client.get(
        "/metrics", headers={"Accept-Encoding": "gzip"}, auto_decompress=False
    )
    assert zipped.headers["Content-Encoding"] == "gzip"
    assert b"gitcache_build_info" in gzip.decompress(await zipped.read())
