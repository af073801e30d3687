"""Keys-first hits asked back to back: a store past its chunk bound against the mirror of the same rows.

python scripts/hit_latency.py            # 1,310,720 rows (10x an 8 MiB chunk bound), 512 random keys a request
python scripts/hit_latency.py --in-process   # the same store's `MemberCache.get` in this process, and its parts

Benchmark 8 judges hits from the store against the mirror alternated with a third service (a small hot set). This
asks the two services alone, back to back, with nothing else between their requests: a store filled as benchmark 8
fills it (`bench.cache_scale.fill_store`), served by `python -m teacher_service` with 8 MiB chunk and index bounds,
and a copy of it served with bounds that hold all of it; each first asked for every row once in stored order (as
the benchmark does), then timed over alternating random requests, every answer checked bit for bit.
`--in-process` times the cache's own read instead, no service and no HTTP: `get` under the same two pairs of bounds,
and, for the store, its three parts (the index's lookup, the logits read alone, the checksums).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tomli_w
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import servers  # noqa: E402
from bench.cache_scale import KeysClient, fill_store, stored_rows, sweep_positions  # noqa: E402
from shared.checkpoint import Checkpoint, save_checkpoint  # noqa: E402
from shared.hashing import file_version  # noqa: E402
from shared.models import build_model  # noqa: E402
from teacher_service.cache.reads import ROW_READ_ARRAYS  # noqa: E402
from teacher_service.cache.rows import row_checks  # noqa: E402
from teacher_service.cache.settings import CacheSettings  # noqa: E402
from teacher_service.cache.store import LogitCache  # noqa: E402

SHAPE, CLASSES, BOUND = (1, 28, 28), 10, 8 << 20


def service(name: str, home: Path, member: Path, store: Path, memory_bytes: int, index_bytes: int | None):
    cache = {"memory_bytes": memory_bytes, "max_bytes": 1 << 40}
    if index_bytes is not None:
        cache["index_memory_bytes"] = index_bytes
    server = {"cache": cache, "limits": {"queue_rows": 16384}}
    teacher = {"num_classes": CLASSES, "input_shape": list(SHAPE), "members": [{"path": str(member)}]}
    config = home / f"{name}.toml"
    config.write_text(tomli_w.dumps({"server": server, "teachers": {"t": teacher}}))
    return servers.teacher_service(name, config, home / "logs", "cpu", True, store, start_timeout_s=300)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10 * BOUND // 64)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--in-process", action="store_true", help="time the cache's get in this process instead")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=".") as folder:
        home = Path(folder).resolve()
        member = home / "member.pt"
        save_checkpoint(
            member, Checkpoint("small_cnn", CLASSES, SHAPE, build_model("small_cnn", CLASSES, SHAPE).state_dict(), {})
        )
        print(f"filling {args.rows:,} rows ...", flush=True)
        fill_store(home / "store", file_version(member), CLASSES, args.rows, 1024, seed=1)
        if args.in_process:
            return in_process(home / "store", file_version(member), args)
        shutil.copytree(home / "store", home / "mirror")
        bounded = service("bounded", home, member, home / "store", BOUND, BOUND)
        mirror = service("mirror", home, member, home / "mirror", 2 * args.rows * 65, None)
        clients = {
            "from the store": KeysClient(bounded.url, "t", CLASSES, 1),
            "the mirror": KeysClient(mirror.url, "t", CLASSES, 1),
        }
        try:
            for client in clients.values():
                for positions in sweep_positions(args.rows, 4096, None):
                    client.ask(*client.body(positions))
            rng = np.random.default_rng(0)
            times: dict[str, list[float]] = {name: [] for name in clients}
            for _ in range(args.requests):
                for name, client in clients.items():
                    body = client.body(rng.integers(0, args.rows, args.batch))
                    started = time.perf_counter()
                    client.ask(*body)
                    times[name].append(time.perf_counter() - started)
        finally:
            for client in clients.values():
                client.close()
            bounded.stop()
            mirror.stop()
    medians = {name: float(np.median(t[5:])) for name, t in times.items()}
    for name, seconds in medians.items():
        print(f"  {name:<15} {seconds * 1e3:6.2f} ms a request, {args.batch / seconds:>9,.0f} rows/s")
    print(f"  from the store / the mirror: {medians['the mirror'] / medians['from the store']:.3f}")
    return 0


def in_process(store: Path, version: str, args: argparse.Namespace) -> int:
    """`MemberCache.get` of random rows past both 8 MiB bounds, and its parts; then with bounds that hold it all."""
    rng = np.random.default_rng(0)
    batches = [stored_rows(rng.integers(0, args.rows, args.batch), CLASSES, 1) for _ in range(args.requests)]
    parts: dict[str, list[float]] = {"get": [], "the index's lookup": [], "the logits read alone": [], "checksums": []}
    cache = LogitCache(str(store), CacheSettings(max_bytes=1 << 40, memory_bytes=BOUND, index_memory_bytes=BOUND))
    ns = cache.namespace(version, CLASSES)
    # a fresh batch each time: `get` and its parts, in turn
    for i, (keys, expected) in enumerate(batches):
        asked = [k.tobytes() for k in keys]
        if i % 2:
            started = time.perf_counter()
            found, got = ns.get(asked)
            parts["get"].append(time.perf_counter() - started)
            assert found.all() and np.array_equal(got, expected)
            continue
        started = time.perf_counter()
        rows, checks = ns._index.locate(keys)
        located = time.perf_counter()
        (logits,), read = ns._reader.files.rows(rows // ns.chunk_rows, rows % ns.chunk_rows, ROW_READ_ARRAYS)
        read_at = time.perf_counter()
        sound = row_checks(ns.version, keys, logits) == checks
        checked = time.perf_counter()
        for name, seconds in zip(list(parts)[1:], (located - started, read_at - located, checked - read_at)):
            parts[name].append(seconds)
        assert (rows >= 0).all() and read.all() and sound.all() and np.array_equal(logits, expected)
    cache.close()
    mirror = LogitCache(
        str(store), CacheSettings(max_bytes=1 << 40, memory_bytes=2 * args.rows * 65, index_memory_bytes=1 << 30)
    )
    ns = mirror.namespace(version, CLASSES)
    for positions in sweep_positions(args.rows, 4096, None):
        ns.get([k.tobytes() for k in stored_rows(positions, CLASSES, 1)[0]])
    mirrored = []
    for keys, expected in batches:
        asked = [k.tobytes() for k in keys]
        started = time.perf_counter()
        found, got = ns.get(asked)
        mirrored.append(time.perf_counter() - started)
        assert found.all() and np.array_equal(got, expected)
    mirror.close()
    print(f"in process, {args.batch} random rows a call; from the store, medians of {args.requests // 2} calls each:")
    for name, seconds in parts.items():
        print(f"  from the store, {name:<24} {np.median(seconds[3:]) * 1e3:6.3f} ms")
    print(f"  the mirror, get (median of {args.requests}){'':<9} {np.median(mirrored[5:]) * 1e3:6.3f} ms")
    return 0


if __name__ == "__main__":
    torch.manual_seed(0)
    sys.exit(main())
