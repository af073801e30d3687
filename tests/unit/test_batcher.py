"""The batcher on its own, without a server (the live-server tests are in test_batching.py): how it forms batches,
splits and joins large requests, bounds its queue, and survives a failing batch. No test here depends on timing:
requests are queued before the batcher looks, and a batch closes as soon as nobody else is on the way.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from teacher_service.batcher import Batcher, QueueFull
from teacher_service.device_pool import DevicePool
from teacher_service.inference import Rows, RowsResult
from teacher_service.metrics import Metrics


def rows(n: int, start: int = 0) -> Rows:
    """n one-pixel rows whose values are their ids, so every result row says which input it came from."""
    ids = torch.arange(start, start + n, dtype=torch.float32)
    return Rows(ids.view(n, 1, 1, 1), [f"k{i}".encode() for i in range(start, start + n)], cache=None)


class Recorder:
    """A stand-in forward pass (member logits = the row's id, twice): records each batch's requests."""

    def __init__(self, fail_first: bool = False):
        self.batches: list[list[int]] = []
        self.fail_first = fail_first

    def __call__(self, batch: list[Rows]) -> list[RowsResult]:
        self.batches.append([len(r.keys) for r in batch])
        if self.fail_first and len(self.batches) == 1:
            raise RuntimeError("the model broke on this batch")
        return [RowsResult(r.inputs.view(1, -1, 1).expand(1, -1, 2).clone(), cache_hits=0) for r in batch]


class RecordingDevice:
    """A stand-in device worker: the recorder on its own thread, as a DeviceWorker runs a teacher's batch."""

    def __init__(self, recorder: Recorder, executor: ThreadPoolExecutor):
        self.recorder, self.executor = recorder, executor

    async def run(self, teacher: str, batch: list[Rows]) -> list[RowsResult]:
        return await asyncio.get_running_loop().run_in_executor(self.executor, self.recorder, batch)


def one_device(recorder: Recorder, executor: ThreadPoolExecutor) -> DevicePool:
    return DevicePool([RecordingDevice(recorder, executor)])


def ids(result: RowsResult) -> list[int]:
    return result.member_logits[0, :, 0].int().tolist()


async def serve(recorder: Recorder, requests: list[Rows], **limits) -> list:
    """Queue every request, then let the batcher run until each is answered (or failed)."""
    options = {"max_batch_rows": 64, "max_wait_ms": 1000.0, "max_queue_rows": 1024, **limits}
    with ThreadPoolExecutor(1) as executor:
        batcher = Batcher("t", one_device(recorder, executor), Metrics(), **options)
        # all queued before the batcher's loop first runs
        answers = [batcher.enqueue(r) for r in requests]
        batcher.start()
        try:
            return await asyncio.gather(*answers, return_exceptions=True)
        finally:
            await batcher.close()


def test_requests_queued_together_share_one_forward_pass_and_get_their_own_rows_back():
    recorder = Recorder()
    results = asyncio.run(serve(recorder, [rows(2, 0), rows(3, 10), rows(1, 20)]))
    assert recorder.batches == [[2, 3, 1]]
    assert [ids(r) for r in results] == [[0, 1], [10, 11, 12], [20]]


def test_a_request_larger_than_a_batch_is_split_and_joined_back_in_order():
    recorder = Recorder()
    (result,) = asyncio.run(serve(recorder, [rows(10)], max_batch_rows=4))
    assert recorder.batches == [[4], [4], [2]]
    assert ids(result) == list(range(10)) and result.member_logits.shape == (1, 10, 2)


def test_a_batch_never_exceeds_its_rows_and_the_next_request_waits_first_in_line():
    recorder = Recorder()
    results = asyncio.run(serve(recorder, [rows(3, 0), rows(3, 10), rows(2, 20)], max_batch_rows=4))
    # 3 + 3 and 3 + 2 are over 4: each waits, first in line
    assert recorder.batches == [[3], [3], [2]]
    assert [ids(r) for r in results] == [[0, 1, 2], [10, 11, 12], [20, 21]]


def test_without_coalescing_each_request_is_its_own_batch():
    recorder = Recorder()
    asyncio.run(serve(recorder, [rows(2), rows(2), rows(2)], coalesce=False))
    assert recorder.batches == [[2], [2], [2]]


def test_the_queue_is_bounded_in_rows_and_what_it_holds_is_still_served():
    async def scenario():
        with ThreadPoolExecutor(1) as executor:
            batcher = Batcher("t", one_device(Recorder(), executor), Metrics(), 64, 1000.0, max_queue_rows=5)
            first = batcher.enqueue(rows(4))
            with pytest.raises(QueueFull) as refused:
                batcher.enqueue(rows(2, 100))
            batcher.start()
            try:
                return refused.value, await first
            finally:
                await batcher.close()

    refused, result = asyncio.run(scenario())
    assert (refused.queued, refused.limit) == (4, 5)
    assert ids(result) == [0, 1, 2, 3]


def test_a_failing_batch_fails_its_requests_and_the_batcher_serves_the_next():
    recorder = Recorder(fail_first=True)

    async def scenario():
        with ThreadPoolExecutor(1) as executor:
            batcher = Batcher("t", one_device(recorder, executor), Metrics(), 64, 1000.0, 1024)
            batcher.start()
            try:
                failed = await asyncio.gather(batcher.enqueue(rows(2)), return_exceptions=True)
                served = await batcher.enqueue(rows(1, 7))
                return failed[0], served
            finally:
                await batcher.close()

    failed, served = asyncio.run(scenario())
    assert isinstance(failed, RuntimeError) and "broke" in str(failed)
    assert ids(served) == [7] and recorder.batches == [[2], [1]]
