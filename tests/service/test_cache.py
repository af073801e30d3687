"""The zarr cache: identical bytes on hits, survives restarts and kill -9, never serves stale versions."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import zarr
from conftest import (
    HANG_S,
    ServerProcess,
    gauge,
    live_server,
    mnist_teacher,
    post,
    random_inputs,
    reference_member_logits,
    save_member,
    write_config,
)

from shared import codec
from shared.hashing import file_version, row_keys
from teacher_service.cache.layout import COMMITTED
from teacher_service.cache.rows import row_bytes
from teacher_service.cache.settings import CacheSettings
from teacher_service.cache.store import LogitCache


@pytest.fixture
def cached_config(tmp_path, mnist_members):
    members = [(mnist_members["a"], 1.0), (mnist_members["b"], 1.0), (mnist_members["c"], 2.0)]
    return write_config(
        tmp_path / "teachers.toml",
        {"ens": mnist_teacher(members), "single": mnist_teacher(members[:1])},
        {"cache": {"dir": "cache", "chunk_rows": 8}},
    )


def test_second_request_is_served_from_cache_with_identical_bytes(cached_config):
    x = random_inputs(12, dtype=torch.uint8)
    with live_server(cached_config) as (base, _):
        first = post(base, x, teacher="ens", outputs="probs,member_logits")
        second = post(base, x, teacher="ens", outputs="probs,member_logits")
        partly = post(base, torch.cat([x[:5], random_inputs(3, dtype=torch.uint8, seed=7)]), teacher="ens")
    assert first.headers["X-Cache-Hits"] == "0"
    assert second.headers["X-Cache-Hits"] == "12"
    assert second.content == first.content
    assert partly.headers["X-Cache-Hits"] == "5"


def test_ensemble_runs_only_the_members_that_miss(cached_config, mnist_members):
    x = random_inputs(6)
    version_a = file_version(mnist_members["a"])
    with live_server(cached_config) as (base, _):
        # caches member a only
        post(base, x, teacher="single")
        before = httpx.get(f"{base}/metrics", timeout=HANG_S).text
        r = post(base, x, teacher="ens", outputs="member_logits")
        after = httpx.get(f"{base}/metrics", timeout=HANG_S).text
    # b and c had to run
    assert r.headers["X-Cache-Hits"] == "0"
    misses = f'akd_cache_misses_total{{member="{version_a}"}}'
    hits = f'akd_cache_hits_total{{member="{version_a}"}}'
    assert gauge(after, misses) == gauge(before, misses) == 6
    assert gauge(after, hits) == gauge(before, hits) + 6


def test_cache_survives_a_restart(cached_config):
    x = random_inputs(20, seed=11)
    with live_server(cached_config) as (base, _):
        first = post(base, x, teacher="ens", outputs="probs,logits,member_logits")
    # 20 rows: two whole chunks of 8 + a partial one flushed at shutdown
    with live_server(cached_config) as (base, _):
        again = post(base, x, teacher="ens", outputs="probs,logits,member_logits")
        metrics = httpx.get(f"{base}/metrics", timeout=HANG_S).text
    assert again.headers["X-Cache-Hits"] == "20"
    assert again.content == first.content
    assert "akd_cache_committed_rows" in metrics and "akd_cache_full 0.0" in metrics


def test_changed_checkpoint_gets_no_stale_rows(cached_config, mnist_members):
    x = random_inputs(5, seed=4)
    with live_server(cached_config) as (base, _):
        old = post(base, x, teacher="single", outputs="member_logits")
    # same path, new weights
    save_member(mnist_members["a"], seed=42)
    with live_server(cached_config) as (base, _):
        new = post(base, x, teacher="single", outputs="member_logits")
    assert new.headers["X-Teacher-Versions"] != old.headers["X-Teacher-Versions"]
    assert new.headers["X-Cache-Hits"] == "0"
    fresh = reference_member_logits([mnist_members["a"]], x)
    torch.testing.assert_close(codec.decode(new.content)["member_logits"], fresh, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(codec.decode(old.content)["member_logits"], fresh)


def test_bypass_and_refresh(cached_config):
    x = random_inputs(4, seed=21)
    with live_server(cached_config) as (base, app):
        assert post(base, x, teacher="single", cache="bypass").headers["X-Cache-Hits"] == "0"
        # bypass stored nothing
        assert post(base, x, teacher="single", cache="bypass").headers["X-Cache-Hits"] == "0"
        cache = app.state.service.cache
        assert sum(ns.rows for ns in cache.namespaces) == 0
        first = post(base, x, teacher="single", cache="refresh")
        assert first.headers["X-Cache-Hits"] == "0"
        # recomputes, appends; newest row wins
        again = post(base, x, teacher="single", cache="refresh")
        assert again.headers["X-Cache-Hits"] == "0" and again.content == first.content
        assert post(base, x, teacher="single").headers["X-Cache-Hits"] == "4"
        assert sum(ns.rows for ns in cache.namespaces) == 8


def test_size_bound_stops_inserts_and_says_so(tmp_path, mnist_members, caplog):
    limit = row_bytes(10) * 10
    config = write_config(
        tmp_path / "t.toml",
        {"m": mnist_teacher([(mnist_members["a"], 1.0)])},
        {"cache": {"dir": "cache", "max_bytes": limit, "chunk_rows": 4, "when_full": "stop"}},
    )
    x = random_inputs(16, seed=8)
    with caplog.at_level("WARNING", logger="akd.cache"), live_server(config) as (base, _):
        post(base, x)
        again = post(base, x, outputs="member_logits")
        metrics = httpx.get(f"{base}/metrics", timeout=HANG_S).text
    assert gauge(metrics, "akd_cache_full") == 1
    assert gauge(metrics, "akd_cache_bytes") <= limit
    # the first 10 rows fit; the rest are still served
    assert again.headers["X-Cache-Hits"] == "10"
    torch.testing.assert_close(
        codec.decode(again.content)["member_logits"],
        reference_member_logits([mnist_members["a"]], x),
        rtol=1e-5,
        atol=1e-5,
    )
    assert any("cache is full" in r.message for r in caplog.records)
    # the bound counts what is already stored
    with live_server(config) as (base, _):
        post(base, random_inputs(4, seed=9))
        assert gauge(httpx.get(f"{base}/metrics", timeout=HANG_S).text, "akd_cache_full") == 1


def read_visible_rows(store) -> dict[bytes, dict[str, np.ndarray]]:
    """What a reader of the store sees: rows below committed_rows, per member version."""
    root = zarr.open_group(store, mode="r")
    visible = {}
    for version, group in root.groups():
        n = int(group.attrs[COMMITTED])
        keys, logits = group["keys"][:n], group["logits"][:n]
        visible[version] = {k.tobytes(): row for k, row in zip(keys, logits)}
    return visible


def wait_for_committed_rows(base: str, version: str, rows: int) -> None:
    """Until the service's cache has made `rows` rows of member `version` durable (or HANG_S passes)."""
    deadline = time.monotonic() + HANG_S
    while time.monotonic() < deadline:
        text = httpx.get(f"{base}/metrics", timeout=HANG_S).text
        if gauge(text, f'akd_cache_committed_rows{{member="{version}"}}') >= rows:
            return
        time.sleep(0.02)


def test_kill_9_while_writing_under_load_leaves_a_correct_cache(tmp_path, mnist_members):
    paths = [mnist_members["a"], mnist_members["c"]]
    config = write_config(
        tmp_path / "t.toml",
        {"m": mnist_teacher([(p, 1.0) for p in paths])},
        {"cache": {"dir": "cache", "chunk_rows": 8, "flush_s": 0.05}},
    )
    sent: dict[bytes, torch.Tensor] = {}
    # member logits as first served, per row key
    served: dict[bytes, torch.Tensor] = {}
    stop = threading.Event()

    def load(worker: int, base: str) -> None:
        with httpx.Client(base_url=base, timeout=HANG_S) as client:
            for i in range(10_000):
                if stop.is_set():
                    return
                x = random_inputs(3, seed=worker * 100_000 + i)
                try:
                    r = client.post(
                        "/soft-targets", content=codec.encode_inputs(x), params={"outputs": "member_logits"}
                    )
                except httpx.HTTPError:
                    # the server died under us: that is the point
                    return
                for key, row, logits in zip(row_keys(x), x, codec.decode(r.content)["member_logits"].unbind(1)):
                    sent[key], served[key] = row, logits

    server = ServerProcess(config, tmp_path / "server.log")
    try:
        with ThreadPoolExecutor(4) as pool:
            jobs = [pool.submit(load, w, server.base) for w in range(4)]
            # several durable chunks of each member, under load (flushed one after the other)
            for path in paths:
                wait_for_committed_rows(server.base, file_version(path), 48)
            server.kill9()
            stop.set()
            for job in jobs:
                job.result()
    finally:
        if server.proc.poll() is None:
            server.kill9()

    visible = read_visible_rows(tmp_path / "cache")
    versions = [file_version(p) for p in paths]
    assert set(visible) == set(versions)
    for m, (version, path) in enumerate(zip(versions, paths)):
        rows = visible[version]
        assert len(rows) >= 48, f"only {len(rows)} rows were durable for {version}"
        assert set(rows) <= set(sent), "a visible row has a key that no client sent"
        keys = list(rows)
        fresh = reference_member_logits([path], torch.stack([sent[k] for k in keys]))[0]
        stored = torch.from_numpy(np.stack([rows[k] for k in keys]))
        torch.testing.assert_close(stored, fresh, rtol=1e-5, atol=1e-5)
        assert all(torch.equal(torch.from_numpy(rows[k]), served[k][m]) for k in keys), (
            "stored bytes differ from served"
        )

    # a readable cache; visible rows are hits
    restarted = ServerProcess(config, tmp_path / "server.log")
    try:
        keys = [k for k in visible[versions[0]] if k in visible[versions[1]]][:64]
        r = post(restarted.base, torch.stack([sent[k] for k in keys]), outputs="member_logits")
        assert r.headers["X-Cache-Hits"] == str(len(keys))
        assert torch.equal(codec.decode(r.content)["member_logits"], torch.stack([served[k] for k in keys], dim=1))
    finally:
        assert restarted.stop()


class TestLogitCacheDirectly:
    """The commit protocol on the store itself, without a server."""

    def test_rows_become_visible_only_when_their_chunk_is_committed(self, tmp_path):
        cache = LogitCache(str(tmp_path / "store"), CacheSettings(max_bytes=1 << 20, chunk_rows=4))
        ns = cache.namespace("v1", num_classes=3)
        keys = [bytes([i]) * 16 for i in range(1, 7)]
        logits = np.arange(18, dtype=np.float32).reshape(6, 3)
        ns.insert(keys[:3], logits[:3])
        cache.drain()
        # 3 buffered rows: nothing committed yet
        assert read_visible_rows(tmp_path / "store")["v1"] == {}
        ns.insert(keys[3:], logits[3:])
        cache.drain()
        # one whole chunk
        assert len(read_visible_rows(tmp_path / "store")["v1"]) == 4
        cache.close()
        visible = read_visible_rows(tmp_path / "store")["v1"]
        assert len(visible) == 6 and np.array_equal(visible[keys[5]], logits[5])

    def test_partial_chunk_is_rewritten_whole_and_newest_row_wins(self, tmp_path):
        store = str(tmp_path / "store")
        cache = LogitCache(store, CacheSettings(max_bytes=1 << 20, chunk_rows=4))
        cache.namespace("v1", 2).insert([b"a" * 16, b"b" * 16], np.array([[1, 2], [3, 4]], np.float32))
        # partial chunk of 2 rows flushed
        cache.close()
        cache = LogitCache(store, CacheSettings(max_bytes=1 << 20, chunk_rows=4))
        ns = cache.namespace("v1", 2)
        assert ns.rows == 2
        ns.insert([b"c" * 16, b"a" * 16, b"d" * 16], np.array([[5, 6], [7, 8], [9, 10]], np.float32))
        cache.close()
        reopened = LogitCache(store, CacheSettings(max_bytes=1 << 20, chunk_rows=4)).namespace("v1", 2)
        assert reopened.rows == 5
        found, got = reopened.get([b"a" * 16, b"b" * 16, b"d" * 16])
        assert found.all() and np.array_equal(got, np.array([[7, 8], [3, 4], [9, 10]], np.float32))

    def test_namespace_with_other_class_count_is_refused(self, tmp_path):
        cache = LogitCache(str(tmp_path / "store"), CacheSettings(max_bytes=1 << 20))
        cache.namespace("v1", 10)
        cache.close()
        with pytest.raises(ValueError, match="holds 10 classes, expected 100"):
            LogitCache(str(tmp_path / "store"), CacheSettings(max_bytes=1 << 20)).namespace("v1", 100)


class TestStores:
    def test_a_second_writer_on_one_folder_is_refused(self, tmp_path):
        from teacher_service.cache.folder_lock import StoreLocked

        first = LogitCache(str(tmp_path / "store"), CacheSettings(max_bytes=1 << 20))
        with pytest.raises(StoreLocked, match="in use by another teacher service"):
            LogitCache(str(tmp_path / "store"), CacheSettings(max_bytes=1 << 20))
        first.close()
        # free again once closed
        LogitCache(str(tmp_path / "store"), CacheSettings(max_bytes=1 << 20)).close()

    def test_akd_serve_on_a_locked_cache_exits_with_a_clear_error(self, tmp_path, cached_config):
        import subprocess
        import sys

        from conftest import REPO, free_port

        # the config's cache.dir
        held = LogitCache(str(tmp_path / "cache"), CacheSettings(max_bytes=1 << 20))
        try:
            done = subprocess.run(
                [sys.executable, "-m", "teacher_service", "--config", str(cached_config), "--port", str(free_port())],
                capture_output=True,
                text=True,
                timeout=HANG_S,
                cwd=REPO,
            )
        finally:
            held.close()
        assert done.returncode == 2
        assert "in use by another teacher service" in done.stderr and "Traceback" not in done.stderr

    def test_torn_write_leftovers_are_cleared_and_rows_kept(self, tmp_path):
        store = tmp_path / "store"
        cache = LogitCache(str(store), CacheSettings(max_bytes=1 << 20, chunk_rows=2))
        cache.namespace("v1", 2).insert([b"a" * 16, b"b" * 16], np.ones((2, 2), np.float32))
        cache.close()
        torn = store / "v1" / "logits" / "c" / "0" / "0.3f2a.partial"
        torn.write_bytes(b"half a chunk")
        reopened = LogitCache(str(store), CacheSettings(max_bytes=1 << 20, chunk_rows=2))
        assert not torn.exists() and reopened.namespace("v1", 2).rows == 2

    def test_any_zarr_store_works(self):
        from zarr.storage import MemoryStore

        store = MemoryStore()
        cache = LogitCache(store, CacheSettings(max_bytes=1 << 20, chunk_rows=4))
        cache.namespace("v1", 3).insert([b"k" * 16], np.array([[1, 2, 3]], np.float32))
        cache.close()
        ns = LogitCache(store, CacheSettings(max_bytes=1 << 20)).namespace("v1", 3)
        found, got = ns.get([b"k" * 16, b"x" * 16])
        assert found.tolist() == [True, False] and np.array_equal(got, np.array([[1, 2, 3]], np.float32))


class TestKeyIndex:
    """The index of a namespace's rows: a file-backed open-addressing table instead of a dict of keys, the same
    answers."""

    # Lookups go through the table's mapping while it is resident, and by pread past its bound (resident_bytes 0).
    @pytest.mark.parametrize("resident_bytes", [1 << 30, 0], ids=["mapped", "read"])
    def test_it_answers_as_a_dict_would_through_growth_repeats_drops_and_misses(self, resident_bytes):
        from teacher_service.cache.key_index import KeyIndex

        rng = np.random.default_rng(0)
        keys = rng.integers(0, 256, (30000, 16), dtype=np.uint8)
        index, reference, start = KeyIndex(resident_bytes=resident_bytes), {}, 0
        # grows from 1,024 slots several times
        for n in (1, 7, 1000, 3, 20000, 8989):
            index.add(keys[start : start + n], np.arange(start, start + n), np.arange(start, start + n) * 3 + 5)
            reference.update({k.tobytes(): start + i for i, k in enumerate(keys[start : start + n])})
            start += n
        # checksums kept as it grew
        assert index.locate(keys)[1].tolist() == (np.arange(30000) * 3 + 5).tolist()
        # cache=refresh appends keys again: the newest row wins
        again = np.concatenate([keys[:500], keys[7:8]])
        rows = np.arange(40000, 40000 + len(again))
        index.add(again, rows)
        reference.update({k.tobytes(): int(r) for k, r in zip(again, rows)})
        assert index.find(keys).tolist() == [reference[k.tobytes()] for k in keys]
        assert (index.find(rng.integers(0, 256, (1000, 16), dtype=np.uint8)) == -1).all()
        # with their checksums
        index.add(keys[:3], np.array([60000, 60001, 60002]), np.array([11, 12, 13]))
        rows, checks = index.locate(np.concatenate([keys[:4], keys[-1:]]))
        assert rows.tolist()[:3] == [60000, 60001, 60002] and checks.tolist() == [11, 12, 13, 0, 29999 * 3 + 5]
        reference.update({k.tobytes(): 60000 + i for i, k in enumerate(keys[:3])})
        # at most half full, at least a quarter
        assert index.count == 30000 and index.capacity <= 4 * index.count
        # rows that failed their checks: missed until stored again
        index.drop(keys[:10])
        assert (index.find(keys[:10]) == -1).all() and index.find(keys[10:11])[0] == reference[keys[10].tobytes()]
        index.add(keys[:1], np.array([50000]))
        assert index.find(keys[:2]).tolist() == [50000, -1]
        index.close()

    def test_lookups_by_read_follow_long_probes_and_the_wrap_at_the_tables_end(self):
        """Keys that all want the table's last slots: their probes run past the slots one read brings in and wrap
        to the start. Read past the resident bound, they still find their rows, and map no page of the table."""
        from teacher_service.cache.key_index import KeyIndex

        index = KeyIndex(capacity=1024, resident_bytes=0)
        keys = np.random.default_rng(3).integers(0, 256, (40, 16), dtype=np.uint8)
        # slot 1020 of 1024
        keys[:, :8] = np.frombuffer(np.full(40, 1020, "<u8").tobytes(), np.uint8).reshape(40, 8)
        index.add(keys[:30], np.arange(30))
        index.settle()
        index._file.release()
        assert index.find(keys).tolist() == list(range(30)) + [-1] * 10
        index.drop(keys[:5])
        assert index.find(keys[:6]).tolist() == [-1] * 5 + [5]
        big = KeyIndex(capacity=1 << 16, resident_bytes=0)
        spread = np.random.default_rng(4).integers(0, 256, (20000, 16), dtype=np.uint8)
        big.add(spread, np.arange(20000))
        big._file.release()
        assert big.find(spread[::3]).tolist() == list(range(0, 20000, 3))
        assert resident_pages(big) == 0, "a lookup by read mapped pages of the table"
        index.close()
        big.close()

    def test_dropped_keys_do_not_make_it_grow(self):
        from teacher_service.cache.key_index import KeyIndex

        rng = np.random.default_rng(2)
        index, previous = KeyIndex(), np.zeros((0, 16), np.uint8)
        # eviction's churn: 2,000 rows in, the previous round's out
        for round_ in range(20):
            keys = rng.integers(0, 256, (2000, 16), dtype=np.uint8)
            index.add(keys, np.arange(2000) + 2000 * round_)
            index.drop(previous)
            previous = keys
        assert index.capacity <= 8192 and (index.find(previous) >= 0).all()
        index.close()

    def test_its_pages_go_back_to_the_page_cache_past_the_resident_bound(self):
        from teacher_service.cache.key_index import KeyIndex

        keys = np.random.default_rng(1).integers(0, 256, (100_000, 16), dtype=np.uint8)
        # 100,000 keys: a 6 MiB table
        index = KeyIndex(resident_bytes=1 << 20)
        index.add(keys, np.arange(len(keys)))
        index.settle()
        assert index.nbytes > 4 << 20 and resident_pages(index) * 4096 < 1 << 20
        # the rows are all still there
        assert index.find(keys[::7]).tolist() == list(range(0, len(keys), 7))
        index.close()

    def test_two_keys_sharing_their_first_half_are_both_held(self, tmp_path):
        cache = LogitCache(tmp_path / "c", CacheSettings(max_bytes=1 << 20, chunk_rows=8))
        ns = cache.namespace("v", 10)
        first = bytes(range(16))
        # the same first 8 bytes (the slot), another key
        clash = first[:8] + bytes(8)
        ns.insert([first], np.ones((1, 10), np.float32))
        ns.insert([clash], np.full((1, 10), 2, np.float32))
        assert ns.lookup([clash, first]).tolist() == [1, 0]
        found, logits = ns.get([clash, first])
        assert found.all() and logits[:, 0].tolist() == [2, 1]
        cache.close()


def resident_pages(index) -> int:
    """Pages of the index's table this process holds (its mapping's Rss in /proc/self/smaps; the page cache may
    hold more)."""
    address = index._file.array.__array_interface__["data"][0]
    lines = Path("/proc/self/smaps").read_text().splitlines()
    for i, line in enumerate(lines):
        span = line.split()[0]
        if "-" in span and int(span.split("-")[0], 16) <= address < int(span.split("-")[1], 16):
            rss = next(x for x in lines[i + 1 :] if x.startswith("Rss:"))
            return int(rss.split()[1]) * 1024 // 4096
    raise AssertionError("the index's mapping is not in /proc/self/smaps")
