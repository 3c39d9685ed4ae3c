"""Every Prometheus metric gitcache exports, in one place.

One :class:`Metrics` per application, on its own registry, so that tests (and anything
else that builds several apps in one process) never collide. Names are ``gitcache_*`` in
base units; labels take a handful of fixed values each, so cardinality stays bounded.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)

from gitcache.snapshot.source import Source

# ``*_created`` series double the exposition and no dashboard or alert uses them.
disable_created_metrics()  # type: ignore[no-untyped-call]

RESULTS = ("ok", "failed")  # the one vocabulary of every ``result`` label
GENERATION_KINDS = ("snapshot", "pack")  # what a generation makes
TREE_OUTCOMES = ("built", "reused", "damaged")  # of a snapshot's working tree (see trees)
GIT_LABELS = (
    ("info-refs", "mirror"),
    *(("upload-pack", source) for source in ("hit", "miss", "follower", "mirror")),
    ("receive-pack", "refused"),
)
SOURCES = tuple(Source)
TIERS = ("disk", "s3", "tiered", "spool")
MIRROR_OPERATIONS = ("clone", "restore", "fetch", "rebuild", "archive", "repack", "fsck")
LIMITS = (
    "max_generations",
    "max_clients_per_generation",
    "max_connections",
    "max_git_requests",
)
# Seconds: from a sendfile hit on loopback to a clone of a large repository.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900)


def _version() -> str:
    try:
        return version("gitcache")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)  # process_cpu_seconds_total, process_resident_memory…
        PlatformCollector(registry=r)  # python_info
        Gauge(
            "gitcache_build_info",
            "The running gitcache's version (always 1).",
            ["version"],
            registry=r,
        ).labels(_version()).set(1)
        self._requests(r)
        self._generations(r)
        self._mirrors(r)
        self._caches(r)
        self._s3(r)
        self._refresh(r)
        self._git(r)
        self._zero_label_sets()

    def _requests(self, r: CollectorRegistry) -> None:
        self.requests = Counter(
            "gitcache_http_requests_total",
            "HTTP requests by route and status.",
            ["route", "method", "status"],
            registry=r,
        )
        self.request_duration = Histogram(
            "gitcache_http_request_duration_seconds",
            "HTTP request duration by route.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.snapshot_responses = Counter(
            "gitcache_snapshot_responses_total",
            "Snapshot responses by source and tier.",
            ["source", "tier"],
            registry=r,
        )
        self.bytes_served = Counter(
            "gitcache_snapshot_bytes_served_total",
            "Snapshot bytes sent to clients.",
            ["source"],
            registry=r,
        )
        self.ttfb = Histogram(
            "gitcache_snapshot_first_byte_seconds",
            "Time from request to first body byte.",
            ["source"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )

    def _generations(self, r: CollectorRegistry) -> None:
        self.generations_started = Counter(
            "gitcache_generations_started_total",
            "Generations started: snapshots, and upload-pack responses for the pack cache.",
            ["kind"],
            registry=r,
        )
        self.generations = Counter(
            "gitcache_generations_total",
            "Generations by kind and result.",
            ["kind", "result"],
            registry=r,
        )
        self.generation_duration = Histogram(
            "gitcache_generation_duration_seconds",
            "Duration of generations.",
            ["kind"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.generation_bytes = Counter(
            "gitcache_generation_bytes_total",
            "Bytes written by generations (compressed, for snapshots).",
            ["kind"],
            registry=r,
        )
        self.trees = Counter(
            "gitcache_trees_total",
            "Working trees of snapshots: built (git archive | zstd), reused from the tree "
            "store, or found damaged there (removed, built again).",
            ["outcome"],
            registry=r,
        )
        self.generations_in_flight = Gauge(
            "gitcache_generations_in_flight", "Generations running now.", registry=r
        )
        self.generation_readers = Gauge(
            "gitcache_generation_readers",
            "Clients reading a running generation now.",
            registry=r,
        )

    def _mirrors(self, r: CollectorRegistry) -> None:
        self.mirror_operations = Counter(
            "gitcache_mirror_operations_total",
            "Mirror operations by kind and result.",
            ["operation", "result"],
            registry=r,
        )
        self.mirror_duration = Histogram(
            "gitcache_mirror_operation_duration_seconds",
            "Duration of mirror operations.",
            ["operation"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_wait = Histogram(
            "gitcache_upstream_wait_seconds",
            "Time requests spent waiting on the upstream (clone, fetch, ls-remote).",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_bytes = Counter(
            "gitcache_upstream_fetched_bytes_total",
            "Growth of mirrors on disk from clones and fetches: what upstreams sent.",
            registry=r,
        )

    def _caches(self, r: CollectorRegistry) -> None:
        self.cache_bytes = Gauge(
            "gitcache_cache_bytes", "Bytes held by a cache tier.", ["tier"], registry=r
        )
        self.cache_max_bytes = Gauge(
            "gitcache_cache_max_bytes", "Size budget of a cache tier.", ["tier"], registry=r
        )
        self.cache_entries = Gauge(
            "gitcache_cache_entries", "Snapshots held by a cache tier.", ["tier"], registry=r
        )
        self.cache_evictions = Counter(
            "gitcache_cache_evictions_total", "Entries evicted for space.", ["tier"], registry=r
        )
        self.scrub_checks = Counter(
            "gitcache_scrub_checks_total",
            "Cached snapshots read back and hashed by the scrub, by tier and result (ok, "
            "corrupt: evicted, failed: could not be read).",
            ["tier", "result"],
            registry=r,
        )
        self.scrub_bytes = Counter(
            "gitcache_scrub_bytes_total", "Bytes read back by the scrub.", registry=r
        )

    def _s3(self, r: CollectorRegistry) -> None:
        self.s3_errors = Counter(
            "gitcache_s3_errors_total",
            "S3 requests that failed, by operation.",
            ["operation"],
            registry=r,
        )
        self.s3_uploads = Counter(
            "gitcache_s3_uploads_total",
            "Snapshot and mirror-archive uploads to S3, by result (ok, failed, aborted).",
            ["result"],
            registry=r,
        )
        self.s3_upload_bytes = Counter(
            "gitcache_s3_upload_bytes_total", "Bytes of completed S3 uploads.", registry=r
        )
        self.s3_upload_lag = Histogram(
            "gitcache_s3_upload_lag_seconds",
            "From a verified spool to its object listed in S3: how far the bucket (and so "
            "other replicas) lags the clients of a generation.",
            buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
            registry=r,
        )
        self.manifest_conflicts = Counter(
            "gitcache_manifest_conflicts_total",
            "Manifest writes that lost a race with another writer and were retried.",
            registry=r,
        )

    def _refresh(self, r: CollectorRegistry) -> None:
        self.disk_low_space = Gauge(
            "gitcache_disk_low_space",
            "1 while free space is below cache.disk.min_free: the disk tier is not filled.",
            registry=r,
        )
        self.overloaded = Counter(
            "gitcache_overloaded_total", "Requests shed with 503.", ["limit"], registry=r
        )
        self.refresh_jobs = Counter(
            "gitcache_refresh_jobs_total", "Refresh jobs by result.", ["result"], registry=r
        )
        self.refresh_queue = Gauge(
            "gitcache_refresh_queue_depth", "Refresh jobs due and not yet finished.", registry=r
        )
        self.refresh_last_success = Gauge(
            "gitcache_refresh_last_success_timestamp_seconds",
            "When a refresh job last succeeded.",
            registry=r,
        )
        self.pinned_snapshot_age = Gauge(
            "gitcache_pinned_snapshot_age_seconds",
            "Age of the upstream fetch behind each pinned repository's newest snapshot.",
            ["repo"],
            registry=r,
        )

    def _git(self, r: CollectorRegistry) -> None:
        self.git_responses = Counter(
            "gitcache_git_responses_total",
            "Git smart-HTTP responses by service (info-refs, upload-pack, receive-pack) and "
            "source (hit, miss, follower: a cached or shared pack; mirror: answered by the "
            "mirror alone; refused: a push).",
            ["service", "source"],
            registry=r,
        )
        self.git_bytes = Counter(
            "gitcache_git_bytes_total",
            "Bytes of git smart-HTTP responses sent, by service and source.",
            ["service", "source"],
            registry=r,
        )

    def _zero_label_sets(self) -> None:
        """Label sets that alerts and dashboards use, present at 0 from the start: a rate()
        over them says 0 on a quiet server, not "no data"."""
        for source in SOURCES:
            self.bytes_served.labels(source)
            self.ttfb.labels(source)
            for tier in TIERS:
                self.snapshot_responses.labels(source, tier)
        for kind in GENERATION_KINDS:
            self.generations_started.labels(kind)
            self.generation_bytes.labels(kind)
            self.generation_duration.labels(kind)
            for result in RESULTS:
                self.generations.labels(kind, result)
        for outcome in TREE_OUTCOMES:
            self.trees.labels(outcome)
        for result in RESULTS:
            self.refresh_jobs.labels(result)
            for operation in MIRROR_OPERATIONS:
                self.mirror_operations.labels(operation, result)
        for result in (*RESULTS, "aborted"):
            self.s3_uploads.labels(result)
        for limit in LIMITS:
            self.overloaded.labels(limit)
        for service, origin in GIT_LABELS:
            self.git_responses.labels(service, origin)
            self.git_bytes.labels(service, origin)

    def value(self, name: str, **labels: str) -> float:
        """A sample's current value (0 if never set): counts are kept here only."""
        return self.registry.get_sample_value(name, labels) or 0.0
