"""Prometheus metrics, one registry per app so that several apps can live in one process."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE  # noqa: F401  (re-exported for the app)
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
_TIME_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "akd_requests", "Soft-target requests by teacher and HTTP status.", ["teacher", "status"], registry=r
        )
        self.rows = Counter("akd_rows", "Input rows answered.", ["teacher"], registry=r)
        self.device_batches = Counter(
            "akd_device_batches", "Batches run by each device worker (index:device).", ["worker"], registry=r
        )
        self.batch_rows = Histogram(
            "akd_batch_rows", "Rows per formed batch.", ["teacher"], buckets=_ROW_BUCKETS, registry=r
        )
        self.batch_rows_max = Gauge("akd_batch_rows_max", "Largest batch formed so far.", ["teacher"], registry=r)
        self.queue_wait_seconds = Histogram(
            "akd_queue_wait_seconds",
            "Time rows waited for their batch.",
            ["teacher"],
            buckets=_TIME_BUCKETS,
            registry=r,
        )
        self.compute_seconds = Histogram(
            "akd_compute_seconds",
            "Time to run one batch (cache + forward).",
            ["teacher"],
            buckets=_TIME_BUCKETS,
            registry=r,
        )
        self.queued_rows = Gauge("akd_queue_rows", "Rows waiting for a batch.", ["teacher"], registry=r)
        self.inflight_bytes = Gauge("akd_inflight_bytes", "Request body bytes held by requests in flight.", registry=r)
        self.cache_hits = Counter("akd_cache_hits", "Member rows served from the cache.", ["member"], registry=r)
        self.cache_misses = Counter("akd_cache_misses", "Member rows computed.", ["member"], registry=r)
        self.cache_rows = Gauge(
            "akd_cache_rows", "Rows held by the cache (buffered or committed).", ["member"], registry=r
        )
        self.cache_committed_rows = Gauge(
            "akd_cache_committed_rows", "Rows durable in the store.", ["member"], registry=r
        )
        self.cache_bytes = Gauge("akd_cache_bytes", "Bytes counted against cache.max_bytes.", registry=r)
        self.cache_max_bytes = Gauge("akd_cache_max_bytes", "The cache size bound.", registry=r)
        self.cache_full = Gauge("akd_cache_full", "1 once the size bound (or a full disk) stopped inserts.", registry=r)
        self.cache_write_errors = Gauge("akd_cache_write_errors", "Failed chunk writes.", ["member"], registry=r)
        self.cache_evicted_rows = Gauge(
            "akd_cache_evicted_rows", "Rows evicted this run to stay under cache.max_bytes.", ["member"], registry=r
        )
        self.cache_damaged_rows = Gauge(
            "akd_cache_damaged_rows",
            "Stored rows found damaged or unverifiable at start-up: never served, recomputed when asked for.",
            ["member"],
            registry=r,
        )
        self.cache_damaged_namespaces = Gauge(
            "akd_cache_damaged_namespaces",
            "Namespaces set aside as damaged at start-up (see the log for where).",
            ["member"],
            registry=r,
        )
        self.nonfinite_rows = Counter(
            "akd_nonfinite_rows",
            "Rows refused (500) because a member's logits, or their weighted mean (member=weighted_mean), were not "
            "finite.",
            ["teacher", "member"],
            registry=r,
        )
        self._collect_hooks: list[Callable[[], None]] = []
        self._largest_batch: dict[str, int] = {}

    def request(self, teacher: str, status: int, rows: int = 0) -> None:
        """`teacher` must be a served teacher's name or "-": a label from client input would grow without bound."""
        self.requests.labels(teacher, str(status)).inc()
        if rows:
            self.rows.labels(teacher).inc(rows)

    def batch(self, teacher: str, rows: int, seconds: float) -> None:
        self.batch_rows.labels(teacher).observe(rows)
        if rows > self._largest_batch.get(teacher, 0):
            self._largest_batch[teacher] = rows
            self.batch_rows_max.labels(teacher).set(rows)
        self.compute_seconds.labels(teacher).observe(seconds)

    def queue_wait(self, teacher: str, seconds: float) -> None:
        self.queue_wait_seconds.labels(teacher).observe(seconds)

    def queue_rows(self, teacher: str, rows: int) -> None:
        self.queued_rows.labels(teacher).set(rows)

    def cache_lookups(self, member: str, hits: int, misses: int) -> None:
        self.cache_hits.labels(member).inc(hits)
        self.cache_misses.labels(member).inc(misses)

    def nonfinite(self, teacher: str, member: str, rows: int) -> None:
        self.nonfinite_rows.labels(teacher, member).inc(rows)

    def on_collect(self, hook: Callable[[], None]) -> None:
        """Gauges refreshed at scrape time rather than on the hot path."""
        self._collect_hooks.append(hook)

    def render(self) -> bytes:
        for hook in self._collect_hooks:
            hook()
        return generate_latest(self.registry)
