"""Where a request's time goes, stage by stage: `akd serve` with a timer around each stage of the request path.

Run from the repository's root, on a quiet machine:

    .venv/bin/python bench/measurement-scripts/round-trip/stages.py --rows 16 128 512 --calls 400

For each row count it starts the service (a `linear` teacher, whose forward costs microseconds) in a child process
whose request-path functions are wrapped in timers (wall time and the calling thread's CPU time), sends `--calls`
requests of float32 CIFAR-shaped rows (`cache=bypass`) from one httpx client, stops the service, and prints per
request the time and CPU of each stage, the stages nested as they run. The timers cost about a microsecond each.
"""

from __future__ import annotations

import argparse
import atexit
import collections
import functools
import inspect
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

STAGES = [
    ("framework.DirectRoute", "__call__", "the whole request, after its head (route, body, answer sent)"),
    ("framework.DirectRoute", "arguments", "token, query"),
    ("routes", "read_body", "the body read, chunk by chunk, and assembled"),
    ("routes", "prepare_rows", "decode (views) and checks"),
    ("routes", "_encode_result", "the answer: softmax and safetensors"),
    ("batcher.Batcher", "_run", "the batch, from the loop: hand-off to the device thread and back"),
    ("inference.TeacherRunner", "run", "the batch on the device thread"),
    ("inference.TeacherRunner", "lookup", "cache reads"),
    ("inference.TeacherRunner", "compute", "inputs gathered, forward passes"),
    ("inference.TeacherRunner", "logits", "the forward passes (each member's)"),
    ("inference.TeacherRunner", "finish", "checks of the logits, cache writes, each request's rows"),
]


def serve(config: str, port: int) -> None:
    """The service, with timers around STAGES; the per-request table printed to stderr at exit."""
    import importlib

    from shared.allocator import keep_freed_memory
    from shared.openmp_spin import idle_openmp_workers_sleep

    # as `akd serve` starts
    idle_openmp_workers_sleep()
    keep_freed_memory()

    totals: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0, 0.0])
    lock = threading.Lock()

    def timed(label, fn):
        def record(wall, cpu):
            with lock:
                entry = totals[label]
                entry[0] += 1
                entry[1] += wall
                entry[2] += cpu

        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def wrapper(*args, **kwargs):
                wall, cpu = time.perf_counter(), time.thread_time()
                try:
                    return await fn(*args, **kwargs)
                finally:
                    record(time.perf_counter() - wall, time.thread_time() - cpu)

        else:

            @functools.wraps(fn)
            def wrapper(*args, **kwargs):
                wall, cpu = time.perf_counter(), time.thread_time()
                try:
                    return fn(*args, **kwargs)
                finally:
                    record(time.perf_counter() - wall, time.thread_time() - cpu)

        return wrapper

    for where, name, _ in STAGES:
        module, _, cls = where.partition(".")
        owner = importlib.import_module(f"teacher_service.{module}")
        owner = getattr(owner, cls) if cls else owner
        setattr(owner, name, timed(f"{where}.{name}", getattr(owner, name)))

    def report() -> None:
        requests = totals["framework.DirectRoute.__call__"][0] or 1
        print(f"{'stage':34s} {'calls':>6s} {'ms':>7s} {'CPU ms':>7s}  what", file=sys.stderr)
        for where, name, what in STAGES:
            calls, wall, cpu = totals[f"{where}.{name}"]
            row = f"{where.rsplit('.', 1)[-1] + '.' + name:34s} {calls / requests:6.2f}"
            print(f"{row} {wall / requests * 1e3:7.3f} {cpu / requests * 1e3:7.3f}  {what}", file=sys.stderr)

    atexit.register(report)
    from teacher_service import cli

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    sys.exit(cli.run(parser.parse_args(["--config", config, "--port", str(port)])))


def write_teacher(folder: Path) -> Path:
    import tomli_w
    import torch

    from shared.checkpoint import Checkpoint, save_checkpoint
    from shared.models import build_model

    torch.manual_seed(0)
    shape = (3, 32, 32)
    save_checkpoint(
        folder / "linear.pt", Checkpoint("linear", 10, shape, build_model("linear", 10, shape).state_dict())
    )
    config = folder / "teachers.toml"
    server = {"device": "cpu", "log_level": "warning"}
    teacher = {"num_classes": 10, "input_shape": list(shape), "members": [{"path": "linear.pt"}]}
    config.write_text(tomli_w.dumps({"server": server, "teachers": {"linear": teacher}}))
    return config


def measure(config: Path, rows: int, calls: int) -> None:
    import httpx
    import torch

    from pipeline.health import free_port, wait_healthy
    from shared import codec

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(config), "--port", str(port)], env={**os.environ}, cwd=ROOT
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, lambda: server.poll() is None, 120)
        x = torch.rand(rows, 3, 32, 32)
        client = httpx.Client(timeout=60)
        encode, post, decode = [], [], []
        for i in range(calls + 20):
            started = time.perf_counter()
            body = codec.encode_inputs(x)
            sent = time.perf_counter()
            response = client.post(url + "/soft-targets?teacher=linear&cache=bypass", content=body)
            answered = time.perf_counter()
            codec.decode(response.content)["probs"]
            if i >= 20:
                encode.append(sent - started)
                post.append(answered - sent)
                decode.append(time.perf_counter() - answered)
        print(
            f"\n{rows} rows, {len(body):,} bytes, {calls} calls (medians): client encode "
            f"{statistics.median(encode) * 1e3:.3f} ms, POST {statistics.median(post) * 1e3:.3f} ms, "
            f"decode {statistics.median(decode) * 1e3:.3f} ms; per request, means:",
            flush=True,
        )
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, nargs="+", default=[16, 128, 512])
    parser.add_argument("--calls", type=int, default=400)
    parser.add_argument("--serve")
    parser.add_argument("--port", type=int)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.port)
        return
    with tempfile.TemporaryDirectory() as folder:
        config = write_teacher(Path(folder))
        for rows in args.rows:
            measure(config, rows, args.calls)


if __name__ == "__main__":
    main()
