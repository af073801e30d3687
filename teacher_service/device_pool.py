"""The devices a service computes on: each with its own copy of the teachers and its own thread, and the pool of idle
ones that every teacher's batcher takes a device from.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from teacher_service.inference import Rows, RowsResult, TeacherRunner
from teacher_service.metrics import Metrics
from teacher_service.openmp import device_thread_setup
from teacher_service.staging import Staging, staging_for


class DeviceWorker:
    """One device: its own copy of the teachers (a runner each) and its own thread for their forward passes.

    The cache has one owner whatever the number of devices: every lookup and insert runs on `cache_executor`.
    With one device that is the worker's own thread, so a batch runs start to end on it as one task; with several,
    a batch's cache steps go to the shared cache thread and only its forward passes to the device's thread.

    The teachers are loaded, and their start-up forward passes run, on that thread too: a thread that runs a parallel
    CPU op keeps an OpenMP team of its own, and a second team slows every forward pass (openmp.py).

    Its runners share one staging (staging.py: on a GPU its pinned buffers and its stream), used on its thread only and
    one batch at a time, so no two workers, and no two batches, ever share a buffer or a stream.
    """

    def __init__(
        self,
        label: str,
        device: torch.device,
        load_runners: Callable[[torch.device, Staging], dict[str, TeacherRunner]],
        cache_executor: ThreadPoolExecutor | None,
        metrics: Metrics,
    ):
        self.label, self.device = label, device
        self._batches = metrics.device_batches.labels(label)
        self.executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"akd-inference-{device}", initializer=device_thread_setup(device)
        )
        self.staging = staging_for(device)
        try:
            self.runners = self.executor.submit(load_runners, device, self.staging).result()
        except BaseException:
            self.executor.shutdown()
            raise
        self.cache_executor = cache_executor or self.executor

    async def run(self, teacher: str, batch: list[Rows]) -> list[RowsResult]:
        loop, runner = asyncio.get_running_loop(), self.runners[teacher]
        self._batches.inc()
        if self.cache_executor is self.executor:
            return await loop.run_in_executor(self.executor, runner.run, batch)
        work = await loop.run_in_executor(self.cache_executor, runner.lookup, batch)
        work = await loop.run_in_executor(self.executor, runner.compute, work)
        return await loop.run_in_executor(self.cache_executor, runner.finish, work)


class DevicePool:
    """The idle devices, shared by every teacher's batcher: a batch waits for one, then has it to itself."""

    def __init__(self, workers: list[DeviceWorker]):
        self.workers = workers
        self._idle: asyncio.Queue[DeviceWorker] | None = None

    async def acquire(self) -> DeviceWorker:
        # made on the event loop that uses it
        if self._idle is None:
            self._idle = asyncio.Queue()
            for worker in self.workers:
                self._idle.put_nowait(worker)
        return await self._idle.get()

    def release(self, worker: DeviceWorker) -> None:
        self._idle.put_nowait(worker)
