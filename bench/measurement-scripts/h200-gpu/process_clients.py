"""Kept with bench/records/2026-11-27-h200-gpu (one H200): the sharing load with every client its own process, as
trainers are; the service's CPU per thread and per request, from /proc; and a py-spy profile of the service under
8 x 16.

    python bench/measurement-scripts/h200-gpu/process_clients.py --config TEACHERS.toml --teacher small_cnn \
        --device cuda --seconds 8 --out DIR [--pyspy PATH-TO-PY-SPY]

TEACHERS.toml: what `bench.servers.write_teachers` writes for a benchmark config (gpu.sh shows how).
"""

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import time
from pathlib import Path

import numpy as np


def client(url, teacher, rows, shape, start, stop_at, out_q):
    import httpx
    import torch

    from shared import codec

    torch.manual_seed(os.getpid())
    body = codec.encode_inputs(torch.rand(rows, *shape))  # float32, as adversarial rows travel
    n, lat = 0, []
    with httpx.Client(base_url=url, timeout=120) as c:
        c.post("/soft-targets", content=body, params={"teacher": teacher, "cache": "bypass"})
        start.wait()
        deadline = stop_at.value
        while (t0 := time.perf_counter()) < deadline:
            r = c.post("/soft-targets", content=body, params={"teacher": teacher, "cache": "bypass"})
            assert r.status_code == 200, r.text[:200]
            lat.append(time.perf_counter() - t0)
            n += rows
    out_q.put((n, lat))


def threads_cpu(pid):
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            comm = (task / "comm").read_text().strip()
            f = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[f"{comm}/{task.name}"] = (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
    return out


def load(url, teacher, n, rows, shape, seconds, service_pid, pyspy=None):
    ctx = mp.get_context("spawn")
    start, q = ctx.Event(), ctx.Queue()
    stop_at = ctx.Value("d", 0.0)
    procs = [ctx.Process(target=client, args=(url, teacher, rows, shape, start, stop_at, q)) for _ in range(n)]
    for p in procs:
        p.start()
    time.sleep(3 + 0.3 * n)  # imports and the warm-up request
    spy = None
    if pyspy:
        spy = subprocess.Popen(
            [
                pyspy[0],
                "record",
                "--pid",
                str(service_pid),
                "--rate",
                "250",
                "--threads",
                "--duration",
                str(int(seconds)),
                "--format",
                "raw",
                "--output",
                pyspy[1],
                "--nonblocking",
            ]
        )
    before = threads_cpu(service_pid)
    stop_at.value = time.perf_counter() + seconds
    start.set()
    results = [q.get() for _ in procs]

    after = threads_cpu(service_pid)
    for p in procs:
        p.join()
    if spy:
        spy.wait(timeout=60)
    total = sum(r[0] for r in results)
    lat = np.array([x for r in results for x in r[1]])
    cpu = {k: round(after[k] - before.get(k, 0.0), 3) for k in after if after[k] - before.get(k, 0.0) > 0.02}
    reqs = len(lat)
    return {
        "clients": n,
        "rows": rows,
        "rows_per_s": total / seconds,
        "requests": reqs,
        "p50_ms": float(np.median(lat) * 1e3),
        "p99_ms": float(np.percentile(lat, 99) * 1e3),
        "service_cpu_s_by_thread": cpu,
        "service_cpu_ms_per_request": 1e3 * sum(cpu.values()) / max(reqs, 1),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--seconds", type=float, default=8)
    ap.add_argument("--out", required=True)
    ap.add_argument("--pyspy", default=None)
    ap.add_argument("--loads", default="1x128,8x16,16x16,32x16")
    a = ap.parse_args()
    from bench.servers import teacher_service
    from teacher_service.config import load_config

    shape = tuple(load_config(a.config, environ={}).teachers[a.teacher].input_shape)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    server = teacher_service("service", Path(a.config), out / "logs", a.device, True, None)
    results = []
    try:
        for spec in a.loads.split(","):
            n, rows = map(int, spec.split("x"))
            spy = (a.pyspy, str(out / f"pyspy-{a.teacher}-{spec}.txt")) if a.pyspy and spec == "8x16" else None
            r = load(server.url, a.teacher, n, rows, shape, a.seconds, server.process.pid, spy)
            results.append(r)
            print(json.dumps({k: v for k, v in r.items() if k != "service_cpu_s_by_thread"}), flush=True)
            print("   by thread:", r["service_cpu_s_by_thread"], flush=True)
    finally:
        server.stop()
    ref = next((r["rows_per_s"] for r in results if r["clients"] == 1 and r["rows"] == 128), None)
    for r in results:
        r["vs_1x128"] = r["rows_per_s"] / ref if ref else None
        print(
            f"{a.teacher} {r['clients']}x{r['rows']}: {r['rows_per_s']:.0f} rows/s, vs 1x128 {r['vs_1x128']:.3f}, "
            f"service {r['service_cpu_ms_per_request']:.2f} CPU-ms/request",
            flush=True,
        )
    (out / f"process-clients-{a.teacher}.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
