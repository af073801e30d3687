"""Keys-first hits asked back to back: a store past its chunk bound against the mirror of the same rows.

python scripts/hit_latency.py            # 1,310,720 rows (10x an 8 MiB chunk bound), 512 random keys a request

Benchmark 8 judges hits from the store against the mirror with each request right after another process's forward
pass (cold CPU caches, five samples). This asks the same two services back to back on a quiet machine instead: a
store filled as benchmark 8 fills it (`bench.cache_scale.fill_store`), served by `python -m teacher_service` with
8 MiB chunk and index bounds, and a copy of it served with bounds that hold all of it; each first asked for every
row once in stored order (as the benchmark does), then timed over alternating random requests, every answer
checked bit for bit.
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
from bench.cache_scale import KeysClient, fill_store, sweep_positions  # noqa: E402
from shared.checkpoint import Checkpoint, save_checkpoint  # noqa: E402
from shared.hashing import file_version  # noqa: E402
from shared.models import build_model  # noqa: E402

SHAPE, CLASSES, BOUND = (1, 28, 28), 10, 8 << 20


def service(name: str, home: Path, member: Path, store: Path, memory_bytes: int, index_bytes: int | None):
    server = {"cache_memory_bytes": memory_bytes, "cache_max_bytes": 1 << 40, "max_queue_rows": 16384}
    if index_bytes is not None:
        server["cache_index_memory_bytes"] = index_bytes
    teacher = {"num_classes": CLASSES, "input_shape": list(SHAPE), "members": [{"path": str(member)}]}
    config = home / f"{name}.toml"
    config.write_text(tomli_w.dumps({"server": server, "teachers": {"t": teacher}}))
    return servers.teacher_service(name, config, home / "logs", "cpu", True, store, start_timeout_s=300)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10 * BOUND // 64)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--requests", type=int, default=50)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=".") as folder:
        home = Path(folder).resolve()
        member = home / "member.pt"
        save_checkpoint(
            member, Checkpoint("small_cnn", CLASSES, SHAPE, build_model("small_cnn", CLASSES, SHAPE).state_dict(), {})
        )
        print(f"filling {args.rows:,} rows ...", flush=True)
        fill_store(home / "store", file_version(member), CLASSES, args.rows, 1024, seed=1)
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


if __name__ == "__main__":
    torch.manual_seed(0)
    sys.exit(main())
