"""The cache's memory is bounded whatever it stores: hits come back from the store through a bounded chunk cache,
bit for bit what was stored, and a chunk damaged while the service runs is never served. A real zarr store; the
memory test runs a real `python -m teacher_service` and reads its resident set from /proc."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from conftest import HANG_S, ServerProcess, mnist_teacher, write_config

from shared import codec, protocol
from shared.hashing import KEY_BYTES, file_version
from teacher_service.cache.settings import CacheSettings
from teacher_service.cache.store import LogitCache

CHUNK = 8
CLASSES = 10


def stored_rows(n: int, seed: int = 0) -> tuple[list[bytes], np.ndarray]:
    rng = np.random.default_rng(seed)
    keys = rng.integers(0, 256, (n, KEY_BYTES), dtype=np.uint8)
    return [k.tobytes() for k in keys], rng.standard_normal((n, CLASSES)).astype(np.float32)


def filled_store(folder, n: int, version: str = "v1", chunk_rows: int = CHUNK, seed: int = 0):
    keys, logits = stored_rows(n, seed)
    cache = LogitCache(str(folder), CacheSettings(max_bytes=1 << 40, chunk_rows=chunk_rows))
    ns = cache.namespace(version, CLASSES)
    for start in range(0, n, 4096):
        ns.insert(keys[start : start + 4096], logits[start : start + 4096])
    cache.close()
    return keys, logits


def test_hits_beyond_the_memory_bound_are_read_back_bit_for_bit(tmp_path):
    keys, logits = filled_store(tmp_path / "store", 100)
    chunk_bytes = CHUNK * (KEY_BYTES + CLASSES * 4 + 8 + 1)
    cache = LogitCache(
        str(tmp_path / "store"), CacheSettings(max_bytes=1 << 20, chunk_rows=CHUNK, memory_bytes=2 * chunk_bytes)
    )
    ns = cache.namespace("v1", CLASSES)
    # room for two chunks of the 13
    assert ns._reader.lines.lines == 2
    order = np.random.default_rng(1).permutation(100)
    for start in range(0, 100, 10):
        at = order[start : start + 10]
        found, got = ns.get([keys[i] for i in at])
        # bit for bit
        assert found.all() and np.array_equal(got, logits[at])
    assert ns.chunk_reads > 100 // CHUNK + 1, "every chunk was read once only: the bound kept them all"
    # the tail (96..99 + this) is held, never read back
    ns.insert([b"n" * 16], np.ones((1, CLASSES), np.float32))
    found, got = ns.get([b"n" * 16, keys[99]])
    assert found.all() and np.array_equal(got[1], logits[99])
    cache.close()


def copy_chunk(ns, source: int, target: int, arrays=("logits",)) -> None:
    for name in arrays:
        suffix = "/0" if name != "checks" else ""
        shutil.copyfile(ns / name / "c" / f"{source}{suffix}", ns / name / "c" / f"{target}{suffix}")


DAMAGE_AFTER_START = {
    # a chunk's logits replaced by another chunk's: the rows fail their checksums
    "logits chunk overwritten": lambda ns: copy_chunk(ns, 0, 1),
    # every array of a chunk replaced by another chunk's: the rows verify, but hold other keys
    "whole chunk moved": lambda ns: copy_chunk(ns, 0, 1, ("keys", "logits", "checks")),
    # the chunk no longer decodes
    "logits chunk truncated": lambda ns: (ns / "logits/c/1/0").write_bytes(b"\x28\xb5"),
}


def ask_by_key(ns, keys: list[bytes], one_by_one: bool) -> tuple[np.ndarray, np.ndarray]:
    if not one_by_one:
        return ns.get(keys)
    answers = [ns.get([k]) for k in keys]
    return np.concatenate([a[0] for a in answers]), np.concatenate([a[1] for a in answers])


# How rows come back from the store: whole chunks (8 rows, every row of a chunk asked at once), or rows read alone
# from their chunk files (64-row chunks, one row asked at a time, the one chunk line already taken by chunk 0).
READS = {"whole chunks": (CHUNK, False), "rows alone": (64, True)}


@pytest.mark.parametrize("reads", list(READS))
@pytest.mark.parametrize("case", list(DAMAGE_AFTER_START))
def test_a_chunk_damaged_while_serving_is_never_served(case, reads, tmp_path, caplog):
    chunk_rows, one_by_one = READS[reads]
    n = 2 * chunk_rows + 4
    keys, logits = filled_store(tmp_path / "store", n, chunk_rows=chunk_rows)
    cache = LogitCache(str(tmp_path / "store"), CacheSettings(max_bytes=1 << 20, chunk_rows=chunk_rows, memory_bytes=0))
    # loaded and verified: the damage comes after
    ns = cache.namespace("v1", CLASSES)
    # chunk 0 takes the one line
    found, _ = ns.get(keys[:1])
    DAMAGE_AFTER_START[case](tmp_path / "store" / "v1")
    with caplog.at_level(logging.WARNING, logger="akd.cache"):
        found, got = ask_by_key(ns, keys, one_by_one)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    # said once, when the chunk failed to decode: not again for each of its rows or requests
    if "truncated" in case:
        assert len(warnings) == 1 and "chunk 1 " in warnings[0] and "unreadable" in warnings[0], warnings
    else:
        assert warnings and all("fail their checks (chunks 1)" in w for w in warnings), warnings
    damaged = range(chunk_rows, 2 * chunk_rows)
    assert found.tolist() == [i not in damaged for i in range(n)]
    assert np.array_equal(got, np.concatenate([logits[:chunk_rows], logits[2 * chunk_rows :]]))
    assert cache.damage_counts()["v1"] == (chunk_rows, 0)
    # a short file is left to zarr
    read_alone = chunk_rows if one_by_one and "truncated" not in case else 0
    assert ns.row_reads == read_alone, "the rows were not read the way this case means to test"
    # recomputed and stored again: served from them
    ns.insert(keys[chunk_rows : 2 * chunk_rows], logits[damaged])
    found, got = ns.get(keys[chunk_rows : 2 * chunk_rows])
    assert found.all() and np.array_equal(got, logits[damaged])
    cache.close()


def test_random_hits_past_the_bound_are_read_row_by_row_from_the_chunk_files(tmp_path):
    """A store 32x its one chunk line, asked for random rows three at a time (fewer than a 16th of a chunk's): after
    the first request fills the line, each row is one read of its chunk files (chunk_files), bit for bit what was
    stored, and no chunk is read whole."""
    keys, logits = filled_store(tmp_path / "store", 32 * 64, chunk_rows=64)
    cache = LogitCache(str(tmp_path / "store"), CacheSettings(max_bytes=1 << 30, chunk_rows=64, memory_bytes=0))
    ns = cache.namespace("v1", CLASSES)
    order = np.random.default_rng(2).permutation(len(keys))
    for start in range(0, len(keys), 3):
        at = order[start : start + 3]
        found, got = ns.get([keys[i] for i in at])
        # bit for bit
        assert found.all() and np.array_equal(got, logits[at])
    assert ns.chunk_reads == len(np.unique(order[:3] // 64)), "chunks were read whole for scattered rows"
    # the last chunk the first request read whole keeps the line
    held = (order[:3] // 64).max()
    assert ns.row_reads == len(keys) - 3 - int((order[3:] // 64 == held).sum())
    cache.close()


def test_a_namespace_with_compressed_chunks_is_still_read_through_zarr(tmp_path):
    """Stores written before chunks were kept raw hold zstd chunks: no byte ranges there, zarr reads them whole."""
    import zarr

    keys, logits = filled_store(tmp_path / "store", 100)
    ns_folder = tmp_path / "store" / "v1"
    for name in ("keys", "logits", "checks"):
        old = zarr.open_array(ns_folder / name)
        data = old[:]
        # zarr's default: zstd
        zarr.create_array(ns_folder / name, data=data, chunks=old.chunks, overwrite=True)
        assert zarr.open_array(ns_folder / name).compressors, "not compressed: the case is not tested"
    cache = LogitCache(str(tmp_path / "store"), CacheSettings(max_bytes=1 << 20, chunk_rows=CHUNK, memory_bytes=0))
    ns = cache.namespace("v1", CLASSES)
    assert ns._reader.files is None
    found, got = ns.get(keys[:96])
    assert found.all() and np.array_equal(got, logits[:96])
    cache.close()


def rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1])


def keys_body(keys: np.ndarray) -> bytes:
    return codec.encode({protocol.KEYS_KEY: torch.from_numpy(np.ascontiguousarray(keys))})


def test_a_service_holding_ten_times_its_memory_bound_stays_under_it(tmp_path, mnist_members):
    """80 MiB of rows (1,310,720) behind an 8 MiB bound (and a 2 MiB one on its index's resident pages, whose table
    is 96 MiB): every row served by key, in order, then a random sample again. A service that mirrored its rows in
    memory would grow by 80 MiB; this one may grow by less than the bound once started (its chunk cache fills in the
    first requests; the allocator settles within a few hundred)."""
    # 64 bytes a 10-class row: 10x the bound
    budget, rows = 8 << 20, 1_310_720
    member = mnist_members["a"]
    keys, logits = filled_store(tmp_path / "cache", rows, version=file_version(member), chunk_rows=1024)
    config = write_config(
        tmp_path / "t.toml",
        {"t": mnist_teacher([(member, 1.0)])},
        {"cache": {"dir": "cache", "memory_bytes": budget, "index_memory_bytes": budget // 4}},
    )
    server = ServerProcess(config, tmp_path / "server.log")
    wanted = np.frombuffer(b"".join(keys), np.uint8).reshape(rows, KEY_BYTES)
    try:
        with httpx.Client(base_url=server.base, timeout=HANG_S) as client:

            def ask(at: np.ndarray) -> None:
                r = client.post(
                    protocol.SOFT_TARGET_KEYS_PATH,
                    content=keys_body(wanted[at]),
                    params={"teacher": "t", "outputs": "member_logits"},
                )
                assert r.status_code == 200, r.text
                answer = codec.decode(r.content)
                assert answer[protocol.FOUND_KEY].all(), "a stored row was not found"
                assert np.array_equal(answer["member_logits"][0].numpy(), logits[at]), "a hit differs from its row"

            # settle the allocator, fill the chunk cache
            for start in range(0, 48 * 4096, 4096):
                ask(np.arange(start, start + 4096))
            time.sleep(0.5)
            baseline = rss_kib(server.proc.pid)
            peak = baseline
            for start in range(0, rows, 4096):
                ask(np.arange(start, start + 4096))
                peak = max(peak, rss_kib(server.proc.pid))
            for at in np.array_split(np.random.default_rng(0).permutation(rows)[:8192], 4):
                ask(np.sort(at))
                peak = max(peak, rss_kib(server.proc.pid))
    finally:
        assert server.stop()
    grown = (peak - baseline) * 1024
    print(f"baseline {baseline / 1024:.0f} MiB, peak {peak / 1024:.0f} MiB: grew {grown / 2**20:.1f} MiB")
    assert grown < budget, f"the service grew by {grown / 2**20:.1f} MiB serving its rows, past its {budget >> 20} MiB"
