"""What a random row read back from the store costs, each way the cache could read it (cache.chunk_files).

python scripts/chunk_read_cost.py            # 1,310,720 rows of 10 float32 logits, 512 random rows a read

One array of a namespace (the logits), written by zarr into a local folder, then 512 random rows read from it:
through zarr with chunks of 1,024 rows compressed (zarr's default, zstd) and raw, through zarr's sharding (shards of
1,024 rows, inner chunks of 16, read by byte range by zarr itself), and by `ChunkFiles.rows` over the raw chunks
(one pread a row). The files are in the page cache throughout: this is the cost of reading, not of a disk.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from teacher_service.cache.chunk_files import ChunkFiles  # noqa: E402

CHUNK = 1024
LAYOUTS = {
    "zarr, chunks of 1,024, zstd": {"chunks": (CHUNK, 10)},
    "zarr, chunks of 1,024, raw": {"chunks": (CHUNK, 10), "compressors": None},
    "zarr sharding, inner chunks of 16, raw": {"shards": (CHUNK, 10), "chunks": (16, 10), "compressors": None},
}


def median_seconds(read, batches: list[np.ndarray]) -> float:
    read(batches[0])
    times = []
    for at in batches[1:]:
        started = time.perf_counter()
        read(at)
        times.append(time.perf_counter() - started)
    return float(np.median(times))


def report(name: str, seconds: float, batch: int) -> None:
    print(f"  {name:<48} {seconds * 1e3:7.2f} ms  {batch / seconds:>10,.0f} rows/s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_310_720)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    data = rng.standard_normal((args.rows, 10)).astype(np.float32)
    batches = [np.sort(rng.choice(args.rows, args.batch, replace=False)) for _ in range(args.repeat + 1)]
    print(f"{args.rows:,} rows of 10 float32 logits; {args.batch} random rows a read, median of {args.repeat}:")
    with tempfile.TemporaryDirectory() as folder:
        for name, layout in LAYOUTS.items():
            array = zarr.create_array(f"{folder}/{len(name)}", shape=data.shape, dtype="float32", **layout)
            array[:] = data
            seconds = median_seconds(lambda at, array=array: array.oindex[at], batches)
            report(name, seconds, args.batch)
            if "raw" in name and "sharding" not in name:
                files = ChunkFiles.of({"logits": array})

                def by_range(at, files=files):
                    (rows,), read = files.rows(at // CHUNK, at % CHUNK, ["logits"])
                    assert read.all() and np.array_equal(rows, data[at])
                    return rows

                seconds = median_seconds(by_range, batches)
                report("the same raw chunks, a pread a row (ChunkFiles)", seconds, args.batch)
                files.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
