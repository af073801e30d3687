"""Prometheus metrics, one registry per app so that several apps can live in one process.

Prometheus's conventions hold: a count that only grows is a counter, exposed as `<name>_total` with `# TYPE ...
counter` (it restarts from 0 with the process, which Prometheus's rate() expects); a level that goes up and down is
a gauge; a unit is in the name (`_seconds`, `_bytes`). Besides the service's own series: the process's (resident
memory, CPU seconds, open files, start time; prometheus_client's ProcessCollector, from /proc, where there is one) and
`akd_build_info`, 1 labelled with what runs (the project's, Python's and torch's versions).
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterator

import torch
from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE  # noqa: F401  (re-exported for the app)
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily

from shared.version import VERSION

_ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
_TIME_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# Counts the cache keeps in its own state, per member version: exposed as counters, read when scraped.
CACHE_COUNTERS = {
    "akd_cache_write_errors": "Failed chunk writes.",
    "akd_cache_evicted_rows": "Rows evicted since start-up to stay under cache.max_bytes.",
    "akd_cache_damaged_rows": "Stored rows found damaged or unverifiable (at start-up, or when read back): never "
    "served, recomputed when asked for.",
    "akd_cache_damaged_namespaces": "Namespaces set aside as damaged at start-up (see the log for where).",
}
# {counter name: {member version: count}}
CacheCounts = dict[str, dict[str, int]]


class StateCounters:
    """Counters whose counts live in another object's state, read at scrape time (a prometheus_client collector).

    prometheus_client's Counter can only be incremented; the cache counts its write errors, evictions and damage
    itself, on its own thread, and a second record of each count on that path would be two numbers to keep equal.
    Each count read must never decrease while the process runs: the cache's only grow.
    """

    def __init__(self, helps: dict[str, str]):
        self._helps = helps
        self._read: Callable[[], CacheCounts] = dict

    def read_from(self, read: Callable[[], CacheCounts]) -> None:
        self._read = read

    def describe(self) -> Iterator[CounterMetricFamily]:
        for name, text in self._helps.items():
            yield CounterMetricFamily(name, text, labels=["member"])

    def collect(self) -> Iterator[CounterMetricFamily]:
        counts = self._read()
        for name, text in self._helps.items():
            family = CounterMetricFamily(name, text, labels=["member"])
            for member, value in sorted(counts.get(name, {}).items()):
                family.add_metric([member], value)
            yield family


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
        self.shm_regions = Gauge(
            "akd_shm_regions", "System shared-memory regions registered (Open Inference Protocol).", registry=r
        )
        self.shm_bytes = Gauge("akd_shm_bytes", "Bytes of the registered shared-memory regions.", registry=r)
        self.cache_counts = StateCounters(CACHE_COUNTERS)
        r.register(self.cache_counts)
        self.nonfinite_rows = Counter(
            "akd_nonfinite_rows",
            "Rows refused (500) because a member's logits, or their weighted mean (member=weighted_mean), were not "
            "finite.",
            ["teacher", "member"],
            registry=r,
        )
        ProcessCollector(registry=r)
        self.build_info = Gauge(
            "akd_build_info", "1, labelled with the versions that run.", ["version", "python", "torch"], registry=r
        )
        self.build_info.labels(VERSION, platform.python_version(), torch.__version__).set(1)
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
