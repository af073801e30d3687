"""Dynamic batching: rows from concurrent requests for one teacher share a forward pass.

A batch closes when it holds `max_batch_rows`, when `max_wait_ms` has passed since its first rows arrived, or as soon
as no other request is on its way in (being received or decoded): waiting for requests nobody is sending only adds
latency, while requests that arrive during a forward pass queue up and fill the next batch anyway. A batch forms only
once a device is idle (the `DevicePool`, shared by every teacher's batcher), so with one device batches run one after
the other, and with several each idle device takes the next batch. Requests larger than a batch are split into
slices. The forward pass runs on the device's worker thread, so the event loop keeps accepting requests (and filling
the next batch) while a batch computes. The queue is bounded in rows: past the bound, `QueueFull` (the app answers
503).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field

import torch

from teacher_service.device_pool import DevicePool, DeviceWorker
from teacher_service.inference import Rows, RowsResult
from teacher_service.metrics import Metrics


class QueueFull(Exception):
    def __init__(self, queued: int, limit: int):
        super().__init__(f"the queue holds {queued} rows, its limit is {limit}")
        self.queued, self.limit = queued, limit


@dataclass
class _Pending:
    rows: Rows
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


class Batcher:
    def __init__(
        self,
        name: str,
        devices: DevicePool,
        metrics: Metrics,
        max_batch_rows: int,
        max_wait_ms: float,
        max_queue_rows: int,
        coalesce: bool = True,
    ):
        self.name = name
        self._devices, self._metrics = devices, metrics
        self.max_batch_rows, self.max_wait_s, self.max_queue_rows = max_batch_rows, max_wait_ms / 1000, max_queue_rows
        self.coalesce = coalesce
        self._queue: deque[_Pending] = deque()
        self._queued_rows = 0
        # requests being received or decoded, not yet submitted
        self._arriving = 0
        self._arrived = asyncio.Event()
        self._task: asyncio.Task | None = None
        # batches on their devices
        self._running: set[asyncio.Task] = set()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"batcher-{self.name}")

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        # let running batches end on their devices
        await asyncio.gather(*self._running, return_exceptions=True)
        for pending in self._queue:
            pending.future.cancel()

    @contextlib.asynccontextmanager
    async def arrival(self) -> AsyncIterator[None]:
        """Count a request as on its way in, so a forming batch waits for it, until it is enqueued or fails."""
        self._arriving += 1
        try:
            yield
        finally:
            self._arriving -= 1
            self._arrived.set()

    def enqueue(self, rows: Rows) -> Awaitable[RowsResult]:
        """Queue the rows (sliced to batch size) now; await the result to get them back whole."""
        n = len(rows)
        if self._queued_rows + n > self.max_queue_rows:
            raise QueueFull(self._queued_rows, self.max_queue_rows)
        loop = asyncio.get_running_loop()
        slices = [_slice(rows, s, s + self.max_batch_rows) for s in range(0, n, self.max_batch_rows)]
        pending = [_Pending(r, loop.create_future()) for r in slices]
        self._queue.extend(pending)
        self._queued_rows += n
        self._metrics.queue_rows(self.name, self._queued_rows)
        self._arrived.set()
        if len(pending) == 1:
            # most requests: one slice, nothing to join
            return pending[0].future
        return _joined(asyncio.gather(*(p.future for p in pending)))

    async def _loop(self) -> None:
        while True:
            while not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
            # rows first, then a device: no device is held while the queue is empty
            worker = await self._devices.acquire()
            try:
                batch = await self._form_batch()
            except BaseException:
                self._devices.release(worker)
                raise
            task = asyncio.get_running_loop().create_task(self._run(batch, worker))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _form_batch(self) -> list[_Pending]:
        batch = [self._queue.popleft()]
        rows = len(batch[0].rows)
        deadline = time.perf_counter() + self.max_wait_s
        while self.coalesce and rows < self.max_batch_rows:
            if not self._queue:
                remaining = deadline - time.perf_counter()
                if remaining <= 0 or self._arriving == 0:
                    break
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), remaining)
                except TimeoutError:
                    break
                continue
            if rows + len(self._queue[0].rows) > self.max_batch_rows:
                # the next request does not fit: it stays first in line for the next batch
                break
            nxt = self._queue.popleft()
            batch.append(nxt)
            rows += len(nxt.rows)
        self._queued_rows -= rows
        self._metrics.queue_rows(self.name, self._queued_rows)
        return batch

    async def _run(self, batch: list[_Pending], worker: DeviceWorker) -> None:
        try:
            await self._run_on(batch, worker)
        finally:
            self._devices.release(worker)

    async def _run_on(self, batch: list[_Pending], worker: DeviceWorker) -> None:
        started = time.perf_counter()
        # a client that went away has cancelled its future: its rows are not computed
        live = [p for p in batch if not p.future.done()]
        if not live:
            return
        for p in live:
            self._metrics.queue_wait(self.name, started - p.enqueued)
        try:
            results = await worker.run(self.name, [p.rows for p in live])
        except Exception as exc:
            # a failing batch fails its requests, never the loop
            for p in live:
                if not p.future.done():
                    p.future.set_exception(exc)
            return
        finally:
            self._metrics.batch(self.name, sum(len(p.rows) for p in live), time.perf_counter() - started)
        for p, result in zip(live, results):
            if not p.future.done():
                p.future.set_result(result)


async def _joined(slices: Awaitable[list[RowsResult]]) -> RowsResult:
    """One request's result from the results of its slices."""
    results = await slices
    if len(results) == 1:
        return results[0]
    return RowsResult(torch.cat([r.member_logits for r in results], dim=1), sum(r.cache_hits for r in results))


def _slice(rows: Rows, start: int, stop: int) -> Rows:
    keys = None if rows.keys is None else rows.keys[start:stop]
    return Rows(rows.inputs[start:stop], keys, rows.cache)
