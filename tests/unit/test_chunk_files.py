"""teacher_service.cache.chunk_files: rows read by byte range from raw zarr chunk files, bit for bit what zarr
reads, with a bounded number of files open; anything it cannot read is left to zarr. Real zarr arrays in a real
folder."""

from __future__ import annotations

import os

import numpy as np
import zarr
from zarr.storage import MemoryStore

from teacher_service.cache.chunk_files import ChunkFiles


def arrays(folder, compressors=None, n=256, chunk=32):
    rng = np.random.default_rng(0)
    made = {}
    for name, data in (
        ("keys", rng.integers(0, 256, (n, 16), dtype=np.uint8)),
        ("logits", rng.standard_normal((n, 10)).astype(np.float32)),
        ("checks", rng.integers(0, 2**63, n, dtype=np.uint64)),
    ):
        array = zarr.create_array(
            folder / name, shape=data.shape, chunks=(chunk, *data.shape[1:]), dtype=data.dtype, compressors=compressors
        )
        array[:] = data
        made[name] = array
    return made


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_rows_and_chunks_are_what_zarr_reads(tmp_path):
    made = arrays(tmp_path)
    files = ChunkFiles.of(made, max_open=6)
    at = np.random.default_rng(1).permutation(256)[:100]
    # in the order named
    values, read = files.rows(at // 32, at % 32, ["checks", "keys", "logits"])
    assert read.all()
    for got, name in zip(values, ["checks", "keys", "logits"]):
        assert got.dtype == made[name].dtype and np.array_equal(got, made[name].oindex[at])
    whole = files.chunk(3, 32)
    assert list(whole) == list(made) and all(np.array_equal(whole[n], made[n][96:128]) for n in made)
    files.close()


def test_it_keeps_at_most_its_bound_of_files_open_and_forgets_an_evicted_chunk(tmp_path):
    made = arrays(tmp_path)
    before = open_fds()
    files = ChunkFiles.of(made, max_open=5)
    at = np.arange(8)
    # 24 files, 5 chunks at a time
    values, read = files.rows(at, np.zeros(8, np.int64), list(made))
    assert read.all() and all(np.array_equal(v, made[n].oindex[at * 32]) for v, n in zip(values, made))
    # the last opened: chunks 6-7 of logits, 5-7 of checks
    assert open_fds() - before == 5
    files.forget(7)
    assert open_fds() - before == 3
    # closed already
    files.forget(0)
    assert open_fds() - before == 3
    files.close()
    assert open_fds() == before


def test_a_file_opened_long_ago_is_not_closed_while_a_request_still_reads_it(tmp_path):
    """The bound closes the least recently used file: never one that the request being read wants (its descriptor
    would be closed, or reused by the next file opened, and the row read from another chunk)."""
    made = arrays(tmp_path, n=512)
    files = ChunkFiles.of(made, max_open=4)
    # the bound is full; chunk 0's the oldest
    files.rows(np.array([0, 1, 2, 3]), np.zeros(4, np.int64), ["logits"])
    chunks, offsets = np.array([0, 4, 5, 6]), np.array([1, 2, 3, 4])
    (logits,), read = files.rows(chunks, offsets, ["logits"])
    assert read.all() and np.array_equal(logits, made["logits"].oindex[chunks * 32 + offsets])
    rng = np.random.default_rng(3)
    for _ in range(20):
        at = rng.permutation(512)[:40]
        (logits,), read = files.rows(at // 32, at % 32, ["logits"])
        assert read.all() and np.array_equal(logits, made["logits"].oindex[at])
    files.close()


def test_what_it_cannot_read_is_left_to_zarr(tmp_path):
    made = arrays(tmp_path)
    # zarr reads a missing chunk as its fill value
    (tmp_path / "logits" / "c" / "2" / "0").unlink()
    # short
    (tmp_path / "checks" / "c" / "3").write_bytes(b"\0" * 10)
    files = ChunkFiles.of(made)
    (logits, checks), read = files.rows(np.array([1, 2, 3, 3]), np.array([0, 5, 0, 31]), ["logits", "checks"])
    # a short file still holds its first row whole
    assert read.tolist() == [True, False, True, False]
    assert np.array_equal(logits[0], made["logits"][32]) and not logits[1].any() and not checks[3].any()
    assert files.chunk(2, 32) is None and files.chunk(3, 32) is None and files.chunk(1, 32) is not None
    # past the chunk: not its row
    assert files.rows(np.array([1]), np.array([32]), ["logits"])[1].tolist() == [False]
    files.close()


def test_compressed_or_not_local_arrays_get_no_reader(tmp_path):
    assert ChunkFiles.of(arrays(tmp_path / "zstd", compressors="auto")) is None
    in_memory = zarr.create_array(MemoryStore(), shape=(8, 10), chunks=(4, 10), dtype="float32", compressors=None)
    assert ChunkFiles.of({"logits": in_memory}) is None
    assert ChunkFiles.of(arrays(tmp_path / "raw")) is not None
