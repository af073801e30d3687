"""What the cache's row index costs: teacher_service.cache.key_index.KeyIndex against a dict of keys, for N random keys.

python scripts/key_index_cost.py            # 1,000,000 keys: bytes a row, build time, a 512-key lookup

The dict's bytes are this process's memory. KeyIndex's are a file-backed table (its pages live in the kernel's page
cache): "bytes a row" is the table's size, and the lookup is timed as the cache does it with its default bound (the
table stays mapped and resident) and with a 1 MiB bound (past it, each lookup reads its keys' slots with pread,
mapping nothing).
"""

from __future__ import annotations

import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from teacher_service.cache.key_index import KeyIndex  # noqa: E402


def measured(build):
    """(the built object, seconds, bytes it holds)."""
    tracemalloc.start()
    started = time.perf_counter()
    built = build()
    seconds = time.perf_counter() - started
    held = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return built, seconds, held


def per_lookup(fn, repeat: int = 200) -> float:
    started = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - started) / repeat


def main(n: int = 1_000_000) -> int:
    rng = np.random.default_rng(0)
    keys = rng.integers(0, 256, (n, 16), dtype=np.uint8)
    table, dict_s, dict_bytes = measured(lambda: {k.tobytes(): i for i, k in enumerate(keys)})
    index, index_s, _ = measured(lambda: _built(keys))
    index_bytes = index.nbytes
    # a 1 MiB bound: lookups read slots, mapping nothing
    handed_back = _built(keys, resident_bytes=1 << 20)
    asked = [keys[i].tobytes() for i in rng.integers(0, n, 512)]

    def by_dict():
        return np.fromiter((table.get(k, -1) for k in asked), dtype=np.int64, count=len(asked))

    def by_index():
        return index.find(np.frombuffer(b"".join(asked), dtype=np.uint8).reshape(len(asked), 16))

    def by_index_settled():
        return handed_back.find(np.frombuffer(b"".join(asked), dtype=np.uint8).reshape(len(asked), 16))

    print(f"{n:,} keys:")
    for name, held, seconds, lookup in (
        ("dict of keys", dict_bytes, dict_s, by_dict),
        ("KeyIndex", index_bytes, index_s, by_index),
        ("  1 MiB bound", index_bytes, index_s, by_index_settled),
    ):
        print(
            f"  {name:<13} {held / n:.0f} bytes a row, built in {seconds:.2f} s, "
            f"512 lookups {per_lookup(lookup) * 1e6:.0f} us"
        )
    return 0


def _built(keys: np.ndarray, resident_bytes: int | None = None) -> KeyIndex:
    index = KeyIndex() if resident_bytes is None else KeyIndex(resident_bytes=resident_bytes)
    index.add(keys, np.arange(len(keys)))
    return index


if __name__ == "__main__":
    sys.exit(main())
