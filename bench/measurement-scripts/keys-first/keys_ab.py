"""Keys first on two checkouts of the service, A/B: POST /soft-targets/keys for 512 cached rows (uint8 CIFAR-shaped,
a `linear` teacher, a cache of its own each), the two services' requests alternated from one httpx client. Run from
the repository's root, on a quiet machine:

    .venv/bin/python bench/measurement-scripts/keys-first/keys_ab.py OLD_CHECKOUT NEW_CHECKOUT [CALLS]

Each service runs its own checkout's code (`python -m teacher_service`, PYTHONPATH set to it); their answers are
checked equal byte for byte before the timing. Prints each side's median and 10th percentile, and new / old.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))
ROWS = 512


def main(old: str, new: str, calls: int) -> None:
    import httpx
    import tomli_w
    import torch

    from pipeline.health import free_port, wait_healthy
    from shared import codec, protocol
    from shared.checkpoint import Checkpoint, save_checkpoint
    from shared.models import build_model

    work = Path(tempfile.mkdtemp())
    torch.manual_seed(0)
    model = build_model("linear", 10, (3, 32, 32))
    save_checkpoint(work / "linear.pt", Checkpoint("linear", 10, (3, 32, 32), model.state_dict(), {}))
    teacher = {"num_classes": 10, "input_shape": [3, 32, 32], "members": [{"path": str(work / "linear.pt")}]}
    processes, urls = [], {}
    for side, checkout in (("old", old), ("new", new)):
        port = free_port()
        server = {"host": "127.0.0.1", "port": port, "device": "cpu", "log_level": "warning"}
        config = work / f"{side}.toml"
        server["cache"] = {"dir": str(work / f"cache-{side}")}
        config.write_text(tomli_w.dumps({"server": server, "teachers": {"linear": teacher}}))
        env = {**os.environ, "PYTHONPATH": checkout}
        command = [sys.executable, "-m", "teacher_service", "--config", str(config)]
        processes.append(subprocess.Popen(command, cwd=checkout, env=env))
        urls[side] = f"http://127.0.0.1:{port}"
    try:
        for url, process in zip(urls.values(), processes):
            wait_healthy(url, lambda process=process: process.poll() is None, 120)
        rows = torch.randint(0, 256, (ROWS, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(7))
        keys = codec.encode_keys(rows)
        times: dict[str, list[float]] = {side: [] for side in urls}
        with httpx.Client(timeout=60) as client:
            answers = {}
            for side, url in urls.items():
                client.post(url + protocol.SOFT_TARGETS_PATH, content=codec.encode_inputs(rows)).raise_for_status()
                answers[side] = client.post(url + protocol.SOFT_TARGET_KEYS_PATH, content=keys).content
                assert codec.decode(answers[side])[protocol.FOUND_KEY].all(), f"{side}: not every row cached"
            assert answers["old"] == answers["new"], "the two checkouts answer differently"
            for i in range(calls):
                for side in ("old", "new") if i % 2 else ("new", "old"):
                    start = time.perf_counter()
                    client.post(urls[side] + protocol.SOFT_TARGET_KEYS_PATH, content=keys).raise_for_status()
                    times[side].append(time.perf_counter() - start)
        for side, values in times.items():
            tenth = sorted(values)[len(values) // 10]
            print(f"{side}: median {statistics.median(values) * 1e3:.3f} ms, p10 {tenth * 1e3:.3f} ms")
        print(f"new / old: {statistics.median(times['new']) / statistics.median(times['old']):.3f}")
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 300)
