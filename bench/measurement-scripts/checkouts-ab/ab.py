"""One request on two checkouts of the service, A/B: each runs its own checkout's code (`python -m teacher_service`,
PYTHONPATH set to it) with the same `linear` teacher, and one httpx client alternates their requests. Run from the
repository's root, on a quiet machine:

    .venv/bin/python bench/measurement-scripts/checkouts-ab/ab.py OLD_CHECKOUT NEW_CHECKOUT --rows 128 [--calls 200]
    .venv/bin/python bench/measurement-scripts/checkouts-ab/ab.py OLD_CHECKOUT NEW_CHECKOUT --keys 512

--rows N: POST /soft-targets of N CIFAR-shaped rows (`--dtype`, float32 by default; `--cache`, bypass by default: with
`use`, each service has a cache, and every timed call hits it). --keys N: N uint8 rows stored first, then POST
/soft-targets/keys for them (each service with a cache of its own). The two answers are checked equal (within 1e-5)
before the timing. Prints each side's median and 10th percentile, and new / old.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))


def main(args: argparse.Namespace) -> None:
    import httpx
    import torch

    from shared import codec, protocol

    generator = torch.Generator().manual_seed(7)
    if args.keys:
        rows = torch.randint(0, 256, (args.keys, 3, 32, 32), dtype=torch.uint8, generator=generator)
        path, body = protocol.SOFT_TARGET_KEYS_PATH, codec.encode_keys(rows)
    else:
        if args.dtype == "uint8":
            rows = torch.randint(0, 256, (args.rows, 3, 32, 32), dtype=torch.uint8, generator=generator)
        else:
            rows = torch.rand(args.rows, 3, 32, 32, generator=generator).to(getattr(torch, args.dtype))
        path, body = f"{protocol.SOFT_TARGETS_PATH}?cache={args.cache}", codec.encode_inputs(rows)
    cached = bool(args.keys) or args.cache != "bypass"
    processes, urls = start_services(args.old, args.new, cached=cached)
    try:
        with httpx.Client(timeout=60) as client:
            answers = {}
            for side, url in urls.items():
                if args.keys:
                    client.post(url + protocol.SOFT_TARGETS_PATH, content=codec.encode_inputs(rows)).raise_for_status()
                answer = client.post(url + path, content=body)
                answer.raise_for_status()
                answers[side] = codec.decode(answer.content)
            assert torch.allclose(answers["old"]["probs"], answers["new"]["probs"], atol=1e-5), "the answers differ"
            times = alternated(client, {side: url + path for side, url in urls.items()}, body, args.calls)
        for side, values in times.items():
            tenth = sorted(values)[len(values) // 10]
            print(f"{side}: median {statistics.median(values) * 1e3:.3f} ms, p10 {tenth * 1e3:.3f} ms")
        print(f"new / old: {statistics.median(times['new']) / statistics.median(times['old']):.3f}")
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait()


def start_services(old: str, new: str, cached: bool) -> tuple[list[subprocess.Popen], dict[str, str]]:
    """Each checkout's service on a loopback port, serving one `linear` teacher (random weights), once healthy."""
    import tomli_w
    import torch

    from pipeline.health import free_port, wait_healthy
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
        if cached:
            server["cache"] = {"dir": str(work / f"cache-{side}")}
        config = work / f"{side}.toml"
        config.write_text(tomli_w.dumps({"server": server, "teachers": {"linear": teacher}}))
        env = {**os.environ, "PYTHONPATH": checkout}
        command = [sys.executable, "-m", "teacher_service", "--config", str(config)]
        processes.append(subprocess.Popen(command, cwd=checkout, env=env))
        urls[side] = f"http://127.0.0.1:{port}"
    for url, process in zip(urls.values(), processes):
        wait_healthy(url, lambda process=process: process.poll() is None, 120)
    return processes, urls


def alternated(client, urls: dict[str, str], body: bytes, calls: int) -> dict[str, list[float]]:
    """Seconds of each side's calls, the sides alternated (ABBA)."""
    times: dict[str, list[float]] = {side: [] for side in urls}
    for i in range(calls):
        for side in ("old", "new") if i % 2 else ("new", "old"):
            start = time.perf_counter()
            client.post(urls[side], content=body).raise_for_status()
            times[side].append(time.perf_counter() - start)
    return times


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("old")
    parser.add_argument("new")
    request = parser.add_mutually_exclusive_group(required=True)
    request.add_argument("--rows", type=int, help="float32 rows through POST /soft-targets, cache=bypass")
    request.add_argument("--keys", type=int, help="cached rows asked for by key")
    parser.add_argument("--dtype", choices=["float32", "float16", "uint8"], default="float32", help="the rows' dtype")
    parser.add_argument("--cache", choices=["bypass", "use"], default="bypass", help="the rows' cache mode (--rows)")
    parser.add_argument("--calls", type=int, default=200)
    main(parser.parse_args())
