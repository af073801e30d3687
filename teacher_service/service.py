"""The running service's state: its teachers and their runners, the cache, the metrics, the inference thread, and the
bound on request bytes held at once. Built once per app (`build_service`), shared by every request.
"""

from __future__ import annotations

import asyncio
import contextlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from fastapi import Request

from shared.devices import resolve_device
from teacher_service.batcher import Batcher
from teacher_service.cache import LogitCache
from teacher_service.config import ServiceConfig
from teacher_service.errors import ServiceError
from teacher_service.inference import TeacherRunner
from teacher_service.metrics import Metrics
from teacher_service.registry import Teacher, load_teachers


class InflightBytes:
    """The request body bytes held by all requests in flight together, bounded by `max_inflight_bytes`.

    `max_body_bytes` and `max_queue_rows` bound one request; without a bound on their sum, a few large
    requests at once hold several times that, and enough of them exhaust memory. Bytes count as they
    arrive (a client that declares a size but sends nothing holds nothing) and stay counted until the
    request is answered, since its decoded tensor lives as long. All on the event loop: no lock.
    """

    def __init__(self, limit: int, metrics: Metrics):
        self.limit, self.used, self._metrics = limit, 0, metrics

    def check(self, n: int) -> None:
        """Refuse now if `n` more bytes would not fit (503 with Retry-After, like a full queue)."""
        if self.used + n > self.limit:
            raise ServiceError(
                503,
                "inflight_full",
                "the service holds as many request bytes as it may; retry shortly",
                f"at most {self.limit} bytes held by requests in flight",
                f"{self.used} bytes in flight and {n} more",
                headers={"Retry-After": "1"},
            )

    @contextlib.contextmanager
    def hold(self):
        """The bytes one request holds, released when it is answered, however it ends."""
        held = Held(self)
        try:
            yield held
        finally:
            self.used -= held.bytes
            self._metrics.inflight_bytes.set(self.used)


class Held:
    def __init__(self, budget: InflightBytes):
        self.budget, self.bytes = budget, 0

    def add(self, n: int) -> None:
        self.budget.check(n)
        self.budget.used += n
        self.bytes += n
        self.budget._metrics.inflight_bytes.set(self.budget.used)


@dataclass
class Service:
    config: ServiceConfig
    teachers: dict[str, Teacher]
    runners: dict[str, TeacherRunner]
    cache: LogitCache | None
    metrics: Metrics
    executor: ThreadPoolExecutor
    device: str
    inflight: InflightBytes
    batchers: dict[str, Batcher] | None = None

    def teacher(self, name: str | None) -> Teacher:
        if name is None:
            if len(self.teachers) == 1:
                return next(iter(self.teachers.values()))
            raise ServiceError(
                400,
                "teacher_required",
                "several teachers are served: name one with ?teacher=",
                f"one of {sorted(self.teachers)}",
                "no teacher",
            )
        if name not in self.teachers:
            raise ServiceError(
                404, "unknown_teacher", f"no teacher named {name!r}", f"one of {sorted(self.teachers)}", repr(name)
            )
        return self.teachers[name]

    def label(self, request: Request) -> str:
        """The `teacher` label of a request's metrics: a served name, else "-".

        Never the raw query parameter: anyone, without a token, could make a new series per request.
        """
        name = request.query_params.get("teacher")
        return name if name in self.teachers else "-"


def build_service(config: ServiceConfig) -> Service:
    device = resolve_device(config.server.device, "server.device")
    teachers = load_teachers(config, device)
    server = config.server
    cache = (
        LogitCache(server.cache_dir, server.cache_max_bytes, server.cache_chunk_rows, server.cache_durable)
        if server.cache_dir
        else None
    )
    metrics = Metrics()
    runners = {
        name: TeacherRunner(t, cache, device, metrics, server.autocast, server.channels_last)
        for name, t in teachers.items()
    }
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="akd-inference")
    service = Service(
        config,
        teachers,
        runners,
        cache,
        metrics,
        executor,
        str(device),
        InflightBytes(server.max_inflight_bytes, metrics),
    )
    metrics.on_collect(lambda: _refresh_cache_gauges(service))
    return service


def _refresh_cache_gauges(service: Service) -> None:
    if service.cache is None:
        return
    m, cache = service.metrics, service.cache
    for ns in cache.namespaces:
        m.cache_rows.labels(ns.version).set(ns.rows)
        m.cache_committed_rows.labels(ns.version).set(ns.committed)
        m.cache_write_errors.labels(ns.version).set(ns.write_errors)
    for version, (rows, namespaces) in cache.damage_counts().items():
        m.cache_damaged_rows.labels(version).set(rows)
        m.cache_damaged_namespaces.labels(version).set(namespaces)
    m.cache_bytes.set(cache.budget.used_bytes)
    m.cache_max_bytes.set(cache.budget.max_bytes)
    m.cache_full.set(int(cache.budget.full))


async def flush_periodically(service: Service, every_s: float) -> None:
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(every_s)
        # submitted from the inference thread, which owns the cache's in-memory state
        await loop.run_in_executor(service.executor, lambda: [ns.flush() for ns in service.cache.namespaces])
