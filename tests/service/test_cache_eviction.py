"""Past `[server.cache] max_bytes` the cache evicts (`when_full = "evict"`, the default): the least recently used chunks
of the served member versions go, their files are deleted, the rows used since stay, and a restart reads the store
as it was left, evicted chunks counted as gone, not as damage. A real zarr store; a real service for the end-to-end
part."""

from __future__ import annotations

import httpx
import numpy as np
import torch
from conftest import (
    HANG_S,
    gauge,
    live_server,
    mnist_teacher,
    post,
    random_inputs,
    reference_member_logits,
    write_config,
)

from shared import codec
from shared.hashing import KEY_BYTES
from teacher_service.cache.layout import EVICTED
from teacher_service.cache.rows import row_bytes
from teacher_service.cache.settings import CacheSettings
from teacher_service.cache.store import LogitCache

CHUNK, CLASSES = 4, 10


def rows(n: int, seed: int) -> tuple[list[bytes], np.ndarray]:
    rng = np.random.default_rng(seed)
    keys = rng.integers(0, 256, (n, KEY_BYTES), dtype=np.uint8)
    return [k.tobytes() for k in keys], rng.standard_normal((n, CLASSES)).astype(np.float32)


def chunk_files(store, version: str = "v1") -> set[int]:
    return {int(p.parent.name) for p in (store / version / "logits" / "c").glob("*/0")}


def test_the_least_recently_used_chunks_go_and_the_rows_used_since_stay(tmp_path):
    store = tmp_path / "store"
    # room for 4 chunks
    limit = 4 * CHUNK * row_bytes(CLASSES)
    cache = LogitCache(str(store), CacheSettings(max_bytes=limit, chunk_rows=CHUNK, when_full="evict"))
    ns = cache.namespace("v1", CLASSES)
    keys, logits = rows(40, seed=0)
    for start in range(0, 40, CHUNK):
        ns.insert(keys[start : start + CHUNK], logits[start : start + CHUNK])
        cache.drain()
        # chunk 0 is used again and again: it stays
        found, _ = ns.get(keys[:CHUNK])
        assert found.all()
    assert cache.budget.used_bytes <= limit and not cache.budget.full
    found, got = ns.get(keys)
    # the one in use, and the three newest
    kept = [0, 7, 8, 9]
    assert found.tolist() == [i // CHUNK in kept for i in range(40)]
    assert np.array_equal(got, logits[found])
    assert ns.evicted_rows == 6 * CHUNK and ns.live_rows == 4 * CHUNK
    cache.close()
    assert chunk_files(store) == set(kept), "an evicted chunk's files are still there, or a kept one's are gone"

    reopened = LogitCache(str(store), CacheSettings(max_bytes=limit, chunk_rows=CHUNK, when_full="evict"))
    ns = reopened.namespace("v1", CLASSES)
    found, got = ns.get(keys)
    assert found.tolist() == [i // CHUNK in kept for i in range(40)] and np.array_equal(got, logits[found])
    assert reopened.damage_counts()["v1"] == (0, 0), "evicted chunks were taken for damage"
    assert reopened.budget.used_bytes == len(kept) * CHUNK * row_bytes(CLASSES)
    new_keys, new_logits = rows(CHUNK, seed=1)
    # full again: the oldest of the restored chunks goes (start-up counts order)
    ns.insert(new_keys, new_logits)
    reopened.drain()
    assert ns.get(new_keys)[0].all() and not ns.get(keys[:CHUNK])[0].any()
    reopened.close()


def test_a_row_stored_again_is_not_lost_with_its_old_chunk(tmp_path):
    cache = LogitCache(
        str(tmp_path / "store"),
        CacheSettings(max_bytes=3 * CHUNK * row_bytes(CLASSES), chunk_rows=CHUNK, when_full="evict"),
    )
    ns = cache.namespace("v1", CLASSES)
    keys, logits = rows(12, seed=2)
    # chunk 0
    ns.insert(keys[:CHUNK], logits[:CHUNK])
    # chunk 1 holds key 0 again (cache=refresh)
    ns.insert(keys[:1] + keys[CHUNK : 2 * CHUNK - 1], logits[:CHUNK])
    # chunk 2; then chunk 0 is the oldest
    ns.insert(keys[2 * CHUNK :], logits[2 * CHUNK :])
    # evicts chunk 0
    ns.insert(*rows(CHUNK, seed=3))
    found, got = ns.get(keys[:2])
    assert found.tolist() == [True, False] and np.array_equal(got[0], logits[0])
    cache.close()


def test_with_stop_nothing_is_evicted(tmp_path):
    cache = LogitCache(
        str(tmp_path / "store"), CacheSettings(max_bytes=2 * CHUNK * row_bytes(CLASSES), chunk_rows=CHUNK)
    )
    ns = cache.namespace("v1", CLASSES)
    keys, logits = rows(16, seed=4)
    ns.insert(keys, logits)
    assert ns.get(keys)[0].tolist() == [True] * 8 + [False] * 8 and cache.budget.full and ns.evicted_rows == 0
    cache.close()


def test_an_evicted_chunk_record_that_is_not_whole_chunks_is_damage(tmp_path):
    import zarr

    store = tmp_path / "store"
    cache = LogitCache(str(store), CacheSettings(max_bytes=1 << 20, chunk_rows=CHUNK))
    cache.namespace("v1", CLASSES).insert(*rows(8, seed=5))
    cache.close()
    # past the 2 chunks
    zarr.open_group(str(store / "v1"), mode="a").update_attributes({EVICTED: [[1, 9]]})
    reopened = LogitCache(str(store), CacheSettings(max_bytes=1 << 20, chunk_rows=CHUNK))
    # set aside, rebuilt empty when served
    assert reopened.damage["v1"].namespaces == 1
    reopened.close()


def test_a_service_past_its_bound_keeps_storing_and_serving(tmp_path, mnist_members):
    # two chunks of 4
    limit = row_bytes(10) * 8
    config = write_config(
        tmp_path / "t.toml",
        {"m": mnist_teacher([(mnist_members["a"], 1.0)])},
        {"cache": {"dir": "cache", "max_bytes": limit, "chunk_rows": 4}},
    )
    old, new = random_inputs(8, seed=1), random_inputs(8, seed=2)
    with live_server(config) as (base, _):
        post(base, old)
        # the bound is reached: old's chunks go, new's rows are stored
        post(base, new)
        again = post(base, new, outputs="member_logits")
        metrics = httpx.get(f"{base}/metrics", timeout=HANG_S).text
        first = post(base, old, outputs="member_logits")
    assert again.headers["X-Cache-Hits"] == "8" and first.headers["X-Cache-Hits"] == "0"
    assert gauge(metrics, "akd_cache_full") == 0 and gauge(metrics, "akd_cache_bytes") <= limit
    assert sum(_series(metrics, "akd_cache_evicted_rows_total").values()) == 8
    # served from the store or recomputed: the same logits
    for inputs, answer in ((new, again), (old, first)):
        torch.testing.assert_close(
            codec.decode(answer.content)["member_logits"],
            reference_member_logits([mnist_members["a"]], inputs),
            rtol=1e-5,
            atol=1e-5,
        )


def _series(text: str, name: str) -> dict[str, float]:
    return {
        line.split()[0]: float(line.split()[1])
        for line in text.splitlines()
        if line.startswith(name + "{") and not line.startswith("#")
    }
