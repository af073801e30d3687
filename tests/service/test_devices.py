"""Several devices in one service (`[server] devices`): each holds the teachers and runs its own batches, the cache
keeps one writer, and the soft targets are the one-device service's. Tested with two CPU workers (`["cpu", "cpu"]`),
the same code path as several GPUs; a real uvicorn server and concurrent httpx clients."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from conftest import (
    HANG_S,
    live_server,
    metric,
    mnist_teacher,
    post,
    random_inputs,
    reference_member_logits,
    write_config,
)

from shared import codec
from shared.configfile import ConfigError
from teacher_service.batcher import Batcher
from teacher_service.config import load_config
from teacher_service.device_pool import DevicePool
from teacher_service.inference import Rows, RowsResult
from teacher_service.metrics import Metrics
from teacher_service.service import build_service


def two_devices(tmp_path, mnist_members, **server) -> tuple:
    members = [mnist_members["a"], mnist_members["c"]]
    config = write_config(
        tmp_path / "t.toml",
        {"ens": mnist_teacher([(m, 1.0) for m in members])},
        {"devices": ["cpu", "cpu"], "cache": {"dir": "cache"}, "batching": {"max_rows": 8}, **server},
    )
    return config, members


def concurrently(base: str, inputs: list[torch.Tensor]) -> list[httpx.Response]:
    """One request per input, all at once, from their own threads."""
    with ThreadPoolExecutor(len(inputs)) as pool:
        return list(pool.map(lambda x: post(base, x, teacher="ens", outputs="member_logits"), inputs))


def test_two_devices_answer_what_the_teachers_compute_and_share_the_work(tmp_path, mnist_members):
    config, members = two_devices(tmp_path, mnist_members)
    inputs = [random_inputs(6, seed=s, dtype=torch.uint8) for s in range(8)]
    with live_server(config) as (base, app):
        assert app.state.service.device == "cpu, cpu"
        workers = app.state.service.devices.workers
        # each worker's runners share its staging (its buffers, on a GPU its stream), and no worker shares another's
        assert workers[0].staging is not workers[1].staging
        assert all(runner.staging is w.staging for w in workers for runner in w.runners.values())
        answers = concurrently(base, inputs)
        text = httpx.get(base + "/metrics", timeout=HANG_S).text
    for x, answer in zip(inputs, answers):
        got = codec.decode(answer.content)["member_logits"]
        torch.testing.assert_close(got, reference_member_logits(members, x), rtol=1e-5, atol=1e-5)
    per_worker = [metric(text, f'akd_device_batches_total{{worker="{i}:cpu"}}', 0.0) for i in (0, 1)]
    # idle devices take batches in turn: the second batch went to worker 1
    assert min(per_worker) >= 1, per_worker


def test_the_same_rows_from_many_clients_are_stored_once_and_then_hit(tmp_path, mnist_members):
    """Batches computing the same keys on two devices at once store one row per key: the cache has one writer."""
    config, _ = two_devices(tmp_path, mnist_members)
    x = random_inputs(5, seed=3, dtype=torch.uint8)
    with live_server(config) as (base, app):
        first = concurrently(base, [x] * 8)
        cache = app.state.service.cache
        assert sorted(ns.rows for ns in cache.namespaces) == [5, 5]
        again = post(base, x, teacher="ens", outputs="member_logits")
    assert again.headers["X-Cache-Hits"] == "5"
    for answer in first:
        torch.testing.assert_close(
            codec.decode(answer.content)["member_logits"], codec.decode(again.content)["member_logits"]
        )


def test_devices_that_are_not_here_are_refused_by_name(tmp_path, mnist_members):
    for devices, message in ((["cpu", "cuda:7"], "cuda:7"), (["tpu"], "tpu"), ([], "at least 1")):
        config, _ = two_devices(tmp_path, mnist_members, devices=devices)
        with pytest.raises(ConfigError, match=message):
            build_service(load_config(config, environ={}))


class Blocking:
    """A stand-in device whose batch waits until `parties` batches run at once: a pool that ran batches one at a
    time would never get there (the barrier's timeout is a hang guard, not a measurement)."""

    def __init__(self, barrier: threading.Barrier, executor: ThreadPoolExecutor):
        self.barrier, self.executor, self.batches = barrier, executor, 0

    async def run(self, teacher: str, batch: list[Rows]) -> list[RowsResult]:
        self.batches += 1
        await asyncio.get_running_loop().run_in_executor(self.executor, self.barrier.wait)
        return [RowsResult(r.inputs.view(1, -1, 1).float(), cache_hits=0) for r in batch]


def test_a_batcher_keeps_every_idle_device_busy():
    async def serve() -> list:
        barrier = threading.Barrier(2, timeout=HANG_S)
        with ThreadPoolExecutor(1) as a, ThreadPoolExecutor(1) as b:
            devices = [Blocking(barrier, a), Blocking(barrier, b)]
            batcher = Batcher("t", DevicePool(devices), Metrics(), max_batch_rows=2, max_wait_ms=0.0, max_queue_rows=64)
            requests = [Rows(torch.full((2, 1, 1, 1), float(i)), [b"%d" % i, b"%d'" % i], cache=None) for i in range(4)]
            answers = [batcher.enqueue(r) for r in requests]
            batcher.start()
            try:
                return [await a for a in answers], [d.batches for d in devices]
            finally:
                await batcher.close()

    results, batches = asyncio.run(serve())
    assert [r.member_logits[0, :, 0].tolist() for r in results] == [[i, i] for i in range(4)]
    assert batches == [2, 2]


def test_devices_from_the_environment_are_a_comma_list(tmp_path, mnist_members):
    config, _ = two_devices(tmp_path, mnist_members)
    assert load_config(config, environ={"AKD_DEVICES": "cpu, cpu, cpu"}).server.devices == ["cpu", "cpu", "cpu"]
