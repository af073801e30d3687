"""Concurrent trainers share forward passes, and the event loop stays responsive."""

from __future__ import annotations

import asyncio

import httpx
import torch
from conftest import (
    HANG_S,
    live_server,
    metric,
    mnist_teacher,
    random_inputs,
    reference_member_logits,
    reference_probs,
    write_config,
)

from shared import codec

CLIENTS, ROWS, ROUNDS = 8, 4, 6


async def _client(base: str, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    answers = []
    async with httpx.AsyncClient(base_url=base, timeout=HANG_S) as client:
        for round_ in range(ROUNDS):
            x = random_inputs(ROWS, seed=seed * 100 + round_)
            r = await client.post("/soft-targets", content=codec.encode_inputs(x), params={"cache": "bypass"})
            assert r.status_code == 200, r.text
            answers.append((x, codec.decode(r.content)["probs"]))
    return answers


def test_eight_concurrent_clients_are_answered_correctly_in_shared_batches(tmp_path, mnist_members):
    members = [(mnist_members["a"], 1.0), (mnist_members["c"], 3.0)]
    config = write_config(
        tmp_path / "t.toml", {"m": mnist_teacher(members)}, {"batching": {"max_wait_ms": 1000.0, "max_rows": 256}}
    )

    async def all_clients(base):
        return await asyncio.gather(*(_client(base, seed) for seed in range(CLIENTS)))

    with live_server(config) as (base, _):
        results = asyncio.run(all_clients(base))
        metrics = httpx.get(f"{base}/metrics", timeout=HANG_S).text

    paths = [p for p, _ in members]
    for answers in results:
        for x, probs in answers:
            expected = reference_probs(reference_member_logits(paths, x), [1.0, 3.0], 1.0, "probs")
            torch.testing.assert_close(probs, expected, rtol=1e-5, atol=1e-6)
    largest = metric(metrics, 'akd_batch_rows_max{teacher="m"}')
    batches = metric(metrics, 'akd_batch_rows_count{teacher="m"}')
    assert largest > ROWS, f"no batch coalesced rows from several requests (largest {largest})"
    assert batches < CLIENTS * ROUNDS
    assert metric(metrics, 'akd_rows_total{teacher="m"}') == CLIENTS * ROWS * ROUNDS


def test_a_lone_request_does_not_wait_for_company(tmp_path, mnist_members):
    """With nobody else on the way in, a batch runs at once instead of waiting out max_wait_ms."""
    config = write_config(
        tmp_path / "t.toml", {"m": mnist_teacher([(mnist_members["a"], 1.0)])}, {"batching": {"max_wait_ms": 5000.0}}
    )
    with live_server(config) as (base, _):
        for seed in range(3):
            r = httpx.post(
                f"{base}/soft-targets", content=codec.encode_inputs(random_inputs(ROWS, seed=seed)), timeout=HANG_S
            )
            assert r.status_code == 200
        metrics = httpx.get(f"{base}/metrics", timeout=HANG_S).text
    assert metric(metrics, 'akd_batch_rows_count{teacher="m"}') == 3
    waited = metric(metrics, 'akd_queue_wait_seconds_sum{teacher="m"}')
    assert waited < 3 * 5.0 / 2, f"lone requests waited {waited:.2f} s in total for a batch that could not grow"


def test_batching_off_runs_each_request_alone(tmp_path, mnist_members):
    config = write_config(
        tmp_path / "t.toml",
        {"m": mnist_teacher([(mnist_members["a"], 1.0)])},
        {"batching": {"enabled": False, "max_wait_ms": 50.0}},
    )

    async def all_clients(base):
        return await asyncio.gather(*(_client(base, seed) for seed in range(4)))

    with live_server(config) as (base, _):
        asyncio.run(all_clients(base))
        metrics = httpx.get(f"{base}/metrics", timeout=HANG_S).text
    assert metric(metrics, 'akd_batch_rows_max{teacher="m"}') == ROWS
    assert metric(metrics, 'akd_batch_rows_count{teacher="m"}') == 4 * ROUNDS


def test_event_loop_answers_health_checks_while_a_batch_computes(tmp_path):
    """A slow WideResNet batch must not block /healthz: inference runs off the event loop."""
    from conftest import save_member

    member = save_member(tmp_path / "wrn.pt", seed=0, arch="wrn34_10", shape=(3, 32, 32))
    teacher = {"num_classes": 10, "input_shape": [3, 32, 32], "members": [{"path": str(member)}]}
    config = write_config(tmp_path / "t.toml", {"wrn": teacher}, {"batching": {"max_rows": 64}})

    async def probe(base):
        async with httpx.AsyncClient(base_url=base, timeout=HANG_S) as client:
            x = torch.rand(32, 3, 32, 32)
            slow = asyncio.create_task(client.post("/soft-targets", content=codec.encode_inputs(x)))
            started = 'akd_queue_wait_seconds_count{teacher="wrn"} 1.0'
            # the batch has gone to the inference thread
            while started not in (await client.get("/metrics")).text:
                await asyncio.sleep(0.01)
            health = await client.get("/healthz")
            answered_during_batch = not slow.done()
            response = await slow
            return health.status_code, answered_during_batch, response.status_code

    with live_server(config) as (base, _):
        health, answered_during_batch, slow = asyncio.run(probe(base))
    assert (health, slow) == (200, 200)
    assert answered_during_batch, "/healthz waited for the batch: inference blocked the event loop"


def test_full_queue_answers_503_with_retry_after_and_recovers(tmp_path):
    from conftest import save_member

    member = save_member(tmp_path / "wrn.pt", seed=0, arch="wrn34_10", shape=(3, 32, 32))
    teacher = {"num_classes": 10, "input_shape": [3, 32, 32], "members": [{"path": str(member)}]}
    config = write_config(
        tmp_path / "t.toml", {"wrn": teacher}, {"batching": {"max_rows": 4}, "limits": {"queue_rows": 8}}
    )

    async def scenario(base):
        async with httpx.AsyncClient(base_url=base, timeout=HANG_S) as client:

            def send(seed):
                return asyncio.create_task(
                    client.post(
                        "/soft-targets", content=codec.encode_inputs(random_inputs(4, seed=seed, shape=(3, 32, 32)))
                    )
                )

            computing = send(0)
            while 'akd_queue_wait_seconds_count{teacher="wrn"} 1.0' not in (await client.get("/metrics")).text:
                await asyncio.sleep(0.01)
            # 8 rows: the queue's bound
            queued = [send(1), send(2)]
            while metric((await client.get("/metrics")).text, 'akd_queue_rows{teacher="wrn"}') < 8:
                await asyncio.sleep(0.01)
            refused = await client.post(
                "/soft-targets", content=codec.encode_inputs(random_inputs(4, seed=3, shape=(3, 32, 32)))
            )
            accepted = await asyncio.gather(computing, *queued)
            retried = await client.post(
                "/soft-targets", content=codec.encode_inputs(random_inputs(4, seed=3, shape=(3, 32, 32)))
            )
            return refused, accepted, retried

    with live_server(config) as (base, _):
        refused, accepted, retried = asyncio.run(scenario(base))
    assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
    assert refused.json()["error"]["code"] == "queue_full" and "8" in refused.json()["error"]["received"]
    assert [r.status_code for r in accepted] == [200, 200, 200]
    assert retried.status_code == 200
