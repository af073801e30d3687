"""The running service's state: its teachers and their runners on each device, the cache and the one thread that owns
it, the metrics, and the bound on request bytes held at once. Built once per app (`build_service`), shared by every
request.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from fastapi import Request

from shared import protocol
from shared.devices import resolve_device
from teacher_service.batcher import Batcher
from teacher_service.cache.slots import claim_slot
from teacher_service.cache.store import LogitCache
from teacher_service.config import CacheSection, ServiceConfig
from teacher_service.device_pool import DevicePool, DeviceWorker
from teacher_service.errors import ServiceError
from teacher_service.inference import TeacherRunner
from teacher_service.metrics import CacheCounts, Metrics
from teacher_service.openmp import serial_cpu_ops
from teacher_service.registry import Teacher, load_teachers
from teacher_service.shared_memory import SharedMemoryRegions
from teacher_service.staging import Staging

# Threads that decode large bodies and encode large answers: CPU work that holds the GIL for much of it, so more
# threads than a few only queue; enough that one large request never waits behind another.
CODING_THREADS = 4


class InflightBytes:
    """The request body bytes held by all requests in flight together, bounded by `[server.limits] inflight_bytes`.

    `body_bytes` and `queue_rows` bound one request; without a bound on their sum, a few large requests at once hold
    several times that, and enough of them exhaust memory. Bytes count as they arrive (a client that declares a size
    but sends nothing holds nothing) and stay counted until the request is answered, since its decoded tensor lives as
    long. All on the event loop: no lock.
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
    cache: LogitCache | None
    metrics: Metrics
    devices: DevicePool
    # the one thread that touches the cache's state
    cache_executor: ThreadPoolExecutor
    # large request bodies decoded and answers encoded, off the event loop
    coding_executor: ThreadPoolExecutor
    device: str
    inflight: InflightBytes
    # the Open Inference Protocol's system shared-memory regions; None where [server.shared_memory] is off
    regions: SharedMemoryRegions | None = None
    batchers: dict[str, Batcher] | None = None
    # set once the service is told to stop (a signal, or the app's shutdown): it is then no longer ready
    draining: bool = False

    def shutdown(self) -> None:
        for worker in self.devices.workers:
            worker.executor.shutdown(wait=True)
        self.cache_executor.shutdown(wait=True)
        self.coding_executor.shutdown(wait=True)
        if self.regions is not None:
            self.regions.close()

    def stop(self) -> None:
        """Told to stop: no longer ready from now on (it may still serve a while: server.py's drain)."""
        self.draining = True

    def not_ready(self, teacher: str | None = None) -> list[str]:
        """What keeps the service from taking queries, one phrase each; empty when it is ready (GET /readyz). With
        `teacher`, what keeps it from taking that teacher's queries (GET /v2/models/{teacher}/ready).

        Ready: the app's start-up ran (its batchers run), every teacher has every member of its config loaded on every
        device, each member's cache namespace is loaded (its rows verified: a runner is made only after that), and the
        service is not draining. The teachers load and the cache verifies before the server listens (app.py), so the
        start-up states show only where an app is served before its start-up ends; draining shows for the
        `[server.timeouts] drain_s` after a stop signal (server.py).
        """
        reasons = ["the service is shutting down"] if self.draining else []
        if self.batchers is None:
            reasons.append("the batchers have not started")
        for name in self.config.teachers if teacher is None else [teacher]:
            reasons += [f"teacher {name}: {why}" for why in self._teacher_not_ready(name)]
        return reasons

    def _teacher_not_ready(self, name: str) -> list[str]:
        wanted = len(self.config.teachers[name].members)
        reasons = []
        for worker in self.devices.workers:
            runner = worker.runners.get(name)
            if runner is None or len(runner.teacher.members) != wanted:
                reasons.append(f"its {wanted} members are not loaded on device {worker.label}")
            elif self.cache is not None and any(cache is None for cache in runner.caches):
                reasons.append(f"its cache namespaces are not verified on device {worker.label}")
        return reasons

    async def cached(self, name: str, keys: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        """Keys first: what the cache holds for these rows (teacher `name`), read on the cache's one thread."""
        # every device's runner reads the same cache
        runner = self.devices.workers[0].runners[name]
        return await asyncio.get_running_loop().run_in_executor(self.cache_executor, runner.cached, keys)

    @property
    def features(self) -> list[str]:
        offered = [protocol.KEYS_FIRST] if self.cache is not None else []
        return offered + ([protocol.SHARED_MEMORY] if self.regions is not None else [])

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
    server = config.server
    names = server.devices or [server.device]
    setting = "server.devices" if server.devices else "server.device"
    devices = [resolve_device(name, setting) for name in names]
    cache = _open_cache(server.cache)
    metrics = Metrics()
    shared_cache_thread = (
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="akd-cache", initializer=serial_cpu_ops)
        if len(devices) > 1
        else None
    )
    workers = [
        DeviceWorker(
            f"{i}:{device}", device, functools.partial(_runners, config, cache, metrics), shared_cache_thread, metrics
        )
        for i, device in enumerate(devices)
    ]
    service = Service(
        config,
        {name: runner.teacher for name, runner in workers[0].runners.items()},
        cache,
        metrics,
        DevicePool(workers),
        workers[0].cache_executor,
        ThreadPoolExecutor(CODING_THREADS, thread_name_prefix="akd-coding", initializer=serial_cpu_ops),
        ", ".join(str(d) for d in devices),
        InflightBytes(server.limits.inflight_bytes, metrics),
    )
    shm = server.shared_memory
    if shm.enabled:
        service.regions = SharedMemoryRegions(shm.max_regions, shm.max_bytes)
    metrics.on_collect(lambda: _refresh_gauges(service))
    if cache is not None:
        metrics.cache_counts.read_from(lambda: _cache_counts(cache))
    return service


def _open_cache(cache: CacheSection) -> LogitCache | None:
    if cache.dir is None:
        return None
    if cache.slots is not None:
        return claim_slot(Path(cache.dir), cache.slots, cache.settings)
    return LogitCache(cache.dir, cache.settings)


def _runners(config: ServiceConfig, cache: LogitCache | None, metrics: Metrics, device: torch.device, staging: Staging):
    """The teachers loaded onto `device`, each with its runner, all sharing the device worker's `staging` (on the
    device's thread)."""
    server = config.server
    return {
        name: TeacherRunner(teacher, cache, device, metrics, server.autocast, server.channels_last, staging)
        for name, teacher in load_teachers(config, device).items()
    }


def _refresh_gauges(service: Service) -> None:
    if service.regions is not None:
        service.metrics.shm_regions.set(service.regions.count)
        service.metrics.shm_bytes.set(service.regions.registered_bytes)
    if service.cache is None:
        return
    m, cache = service.metrics, service.cache
    for ns in cache.namespaces:
        m.cache_rows.labels(ns.version).set(ns.live_rows)
        m.cache_committed_rows.labels(ns.version).set(ns.committed)
    m.cache_bytes.set(cache.budget.used_bytes)
    m.cache_max_bytes.set(cache.budget.max_bytes)
    m.cache_full.set(int(cache.budget.full))


def _cache_counts(cache: LogitCache) -> CacheCounts:
    """The cache's own counts, as metrics.CACHE_COUNTERS names them (each only grows while the service runs)."""
    damage = cache.damage_counts()
    return {
        "akd_cache_write_errors": {ns.version: ns.write_errors for ns in cache.namespaces},
        "akd_cache_evicted_rows": {ns.version: ns.evicted_rows for ns in cache.namespaces},
        "akd_cache_damaged_rows": {version: rows for version, (rows, _) in damage.items()},
        "akd_cache_damaged_namespaces": {version: namespaces for version, (_, namespaces) in damage.items()},
    }


async def sweep_regions_periodically(service: Service, every_s: float) -> None:
    """Drops the shared-memory regions whose client is gone (SharedMemoryRegions.sweep), every `every_s`."""
    while True:
        await asyncio.sleep(every_s)
        # it reads every process's memory map: off the event loop
        await asyncio.to_thread(service.regions.sweep)


async def flush_periodically(service: Service, every_s: float) -> None:
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(every_s)
        # submitted from the cache's thread, which owns its in-memory state
        await loop.run_in_executor(service.cache_executor, lambda: [ns.flush() for ns in service.cache.namespaces])
