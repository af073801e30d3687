"""What libgomp's idle spin (GOMP_SPINCOUNT, shared/openmp_spin.py) costs and saves, one fresh process per setting.

Run from the repository's root, on a quiet machine:

    .venv/bin/python bench/measurement-scripts/openmp-spin/spin_counts.py --rounds 3 --counts 300000 10000 0

- `steps`: a trainer's hot loop in-process, a PGD-10 attack and an SGD step on 128 MNIST rows (small_cnn,
  tiny_cnn), median of 8 steps after 2;
- `service`: `akd serve` (random-weight teachers, as the benchmarks write them) under each setting: one client's round
  trip of 16 and 128 float32 CIFAR rows to the `linear` teacher (`cache=bypass`, median of 200 calls) and the server
  process's CPU per call; then 8 concurrent clients of 16 rows each for 8 s, rows/s and server CPU per row, for
  small_cnn and preact_resnet18.

300000 is libgomp's own default (what trainers run with), set explicitly; 0 is what `akd serve` sets.
Settings alternate within each round; medians over rounds are printed last.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

STEP = r"""
import json, time, torch
from shared.models import build_model
torch.manual_seed(0)
out = {}
for arch in ("small_cnn", "tiny_cnn"):
    model = build_model(arch, 10, (1, 28, 28))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.rand(128, 1, 28, 28), torch.randint(0, 10, (128,))
    def step():
        d = torch.zeros_like(x, requires_grad=True)
        for _ in range(10):
            (g,) = torch.autograd.grad(torch.nn.functional.cross_entropy(model(x + d), y), d)
            d = (d + 0.01 * g.sign()).clamp(-0.1, 0.1).detach().requires_grad_(True)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x + d.detach()), y).backward()
        opt.step()
    times = []
    for i in range(10):
        start = time.perf_counter(); step(); times.append(time.perf_counter() - start)
    out[f"step {arch} ms"] = sorted(times[2:])[4] * 1e3
print(json.dumps(out))
"""


def env_with(count: str) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "GOMP_SPINCOUNT": count}


def steps(count: str) -> dict:
    run = subprocess.run([sys.executable, "-c", STEP], env=env_with(count), capture_output=True, text=True, check=True)
    return json.loads(run.stdout)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def service(count: str, config: Path, port: int) -> dict:
    import httpx
    import torch
    from safetensors.torch import save

    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "teacher_service", "--config", str(config), "--port", str(port)],
        env=env_with(count),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(240):
            try:
                if httpx.get(f"{base}/readyz").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        out = {}
        with httpx.Client(timeout=60) as client:
            for rows in (16, 128):
                body = save({"inputs": torch.rand(rows, 3, 32, 32)})
                url = f"{base}/soft-targets?teacher=linear&outputs=probs&cache=bypass"
                for _ in range(20):
                    client.post(url, content=body)
                before, times = cpu_seconds(server.pid), []
                for _ in range(200):
                    start = time.perf_counter()
                    client.post(url, content=body).raise_for_status()
                    times.append(time.perf_counter() - start)
                out[f"round trip {rows} ms"] = statistics.median(times) * 1e3
                out[f"server CPU {rows} ms/call"] = (cpu_seconds(server.pid) - before) / 200 * 1e3
        for teacher, shape in (("small_cnn", (1, 28, 28)), ("preact_resnet18", (3, 32, 32))):
            before = cpu_seconds(server.pid)
            rate = throughput(f"{base}/soft-targets?teacher={teacher}&outputs=probs&cache=bypass", shape)
            out[f"{teacher} rows/s"] = rate
            out[f"{teacher} server CPU ms/row"] = (cpu_seconds(server.pid) - before) / (rate * 8) * 1e3
        return out
    finally:
        server.terminate()
        server.wait()


def throughput(url: str, shape: tuple, seconds: float = 8, clients: int = 8, rows: int = 16) -> float:
    import httpx
    import torch
    from safetensors.torch import save

    body, done, stop = save({"inputs": torch.rand(rows, *shape)}), [0], time.time() + seconds

    def client_loop() -> None:
        with httpx.Client(timeout=60) as client:
            while time.time() < stop:
                client.post(url, content=body).raise_for_status()
                done[0] += rows

    threads = [threading.Thread(target=client_loop) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return done[0] / seconds


def teachers_config(folder: Path, port: int) -> Path:
    from bench.config import load_bench_config
    from bench.servers import write_teachers

    config = write_teachers(folder, load_bench_config("quick"), max_wait_ms=0.0)
    config.write_text(config.read_text().replace("[server]\n", f"[server]\nport = {port}\n", 1))
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--counts", nargs="+", default=["300000", "10000", "0"])
    parser.add_argument("--port", type=int, default=8390)
    args = parser.parse_args()
    results: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        config = teachers_config(Path(tmp), args.port)
        for round_ in range(args.rounds):
            for count in args.counts:
                out = {**steps(count), **service(count, config, args.port)}
                shown = ", ".join(f"{k} {v:.2f}" for k, v in out.items())
                print(f"round {round_ + 1} GOMP_SPINCOUNT={count}: {shown}", flush=True)
                for key, value in out.items():
                    results.setdefault((count, key), []).append(value)
    print("medians:")
    for count in args.counts:
        line = ", ".join(f"{k} {statistics.median(v):.2f}" for (c, k), v in results.items() if c == count)
        print(f"GOMP_SPINCOUNT={count}: {line}")


if __name__ == "__main__":
    main()
