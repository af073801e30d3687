"""What one cache hit of 128 CIFAR rows (benchmark 2's hit request, PreActResNet-18) costs, piece by piece, on a CPU:
the client's float-to-uint8 check, its row hashes and body, the service's cache lookup (keys first, and an uploaded
batch all of whose rows hit), and the whole hit through a real service, keys first and uploaded. Medians of 15 calls,
three rounds, on one thread's serial ops (as the service's threads run theirs).

    python bench/measurement-scripts/gpu-path/hit_parts.py

The service runs in this process (the tests' `live_server`: uvicorn in a thread), so the whole hit shares the
process with its client, as benchmark 2 does not; the pieces are what matters. The service's own pieces are called
from this thread while it is idle: a measurement, not how the service calls them.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO / "tests"))

from conftest import live_server, save_member, write_config  # noqa: E402

from shared import codec  # noqa: E402
from shared.hashing import row_keys  # noqa: E402
from shared.protocol import CacheMode  # noqa: E402
from student_trainer.teacher_client import RemoteTeacher  # noqa: E402
from teacher_service.inference import Rows  # noqa: E402
from teacher_service.openmp import serial_cpu_ops  # noqa: E402

SHAPE = (3, 32, 32)


def median_ms(call, n: int = 15) -> float:
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        call()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e3


def main() -> None:
    images = torch.randint(0, 256, (128, *SHAPE), generator=torch.Generator().manual_seed(128), dtype=torch.uint8)
    x = images.float() / 255
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        member = save_member(folder / "p.pt", seed=4, arch="preact_resnet18", shape=SHAPE)
        teacher = {"num_classes": 10, "input_shape": list(SHAPE), "members": [{"path": str(member)}]}
        config = write_config(folder / "t.toml", {"p": teacher}, {"cache": {"dir": str(folder / "cache")}})
        with live_server(config) as (base, app):
            keys_first = RemoteTeacher(base, "p", temperature=1.0, clean_cache=CacheMode.use)
            uploaded = RemoteTeacher(base, "p", temperature=1.0, clean_cache=CacheMode.use, keys_first=False)
            # stores every row
            keys_first(x), uploaded(x)
            rows = codec.to_transport(x)
            keys = row_keys(rows)
            runner = app.state.service.devices.workers[0].runners["p"]
            body = codec.encode_inputs(rows)
            hit_batch = [Rows(rows, keys, CacheMode.use)]
            parts = {
                "client: to_transport (float32 -> uint8 check)": lambda: codec.to_transport(x),
                "client: encode_keys (128 row hashes)": lambda: codec.encode_keys(rows),
                "client: encode_inputs (uint8 body)": lambda: codec.encode_inputs(rows),
                "service: runner.cached (keys first)": lambda: runner.cached(keys),
                "service: runner.run, an uploaded batch, all hits": lambda: runner.run(hit_batch),
                "service: decode, validate, hash an uploaded body": lambda: row_keys(
                    codec.validate_inputs(codec.decode(body), SHAPE)
                ),
                "whole hit, keys first": lambda: keys_first(x),
                "whole hit, uploaded": lambda: uploaded(x),
            }
            with serial_cpu_ops():
                for _ in range(3):
                    for name, call in parts.items():
                        print(f"{name:<52} {median_ms(call):7.2f} ms")
                    print()
            keys_first.close()
            uploaded.close()


if __name__ == "__main__":
    main()
