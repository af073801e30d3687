"""Kept with its output (bench/records/2026-11-27-sharing-one-forward-core/hot-route/):
benchmark 3's 8 x 16 and 1 x 128 loads on the small CNN, with
the service's CPU per thread (/proc) and its batches (/metrics) over each load. Run from the checkout to measure:

    cd CHECKOUT && python bench/measurement-scripts/sharing-one-forward-core/hot-route/threads.py OUTDIR
"""

import os
import re
import sys
from pathlib import Path

sys.path.insert(0, os.getcwd())

import httpx  # noqa: E402

from bench.config import load_bench_config  # noqa: E402
from bench.load import Request, closed_loop  # noqa: E402
from bench.servers import teacher_service, write_teachers  # noqa: E402
from bench.sharing import Load, input_files  # noqa: E402
from shared import protocol  # noqa: E402

CONFIG = "bench/records/2026-11-27-sharing-one-forward-core/config.toml"
SERIES = re.compile(r"(akd_(?:compute_seconds|batch_rows|queue_wait_seconds)_(?:sum|count))\{[^}]*\} (\S+)")


def threads_cpu(pid: int) -> dict[str, float]:
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[task.name] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


def batch_metrics(url: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in httpx.get(url + protocol.METRICS_PATH).text.splitlines():
        if m := SERIES.match(line):
            out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(2))
    return out


def measure(server, load: Load) -> None:
    params = {"teacher": "small_cnn", "outputs": "probs", "cache": "bypass"}
    requests = [Request(protocol.SOFT_TARGETS_PATH, b, load.rows, params) for b in input_files((1, 28, 28), load)]
    cpu_before, metrics_before = threads_cpu(server.process.pid), batch_metrics(server.url)
    r = closed_loop(server.url, requests, max(1, 4096 // (load.clients * load.rows)), server.cpu_seconds)
    cpu_after, metrics_after = threads_cpu(server.process.pid), batch_metrics(server.url)
    d = {k: metrics_after[k] - metrics_before.get(k, 0.0) for k in metrics_after}
    batches = max(1.0, d["akd_compute_seconds_count"])
    cores = {t: round((cpu_after[t] - cpu_before.get(t, 0.0)) / r.seconds, 3) for t in cpu_after}
    print(
        f"{load}: {r.rows_per_s:.0f} rows/s, server {r.server_cpu_s / r.seconds:.2f} cores, clients "
        f"{r.client_cpu_s / r.seconds:.2f}; device busy {d['akd_compute_seconds_sum'] / r.seconds:.2f}, "
        f"mean batch {d['akd_batch_rows_sum'] / batches:.1f} rows in {1e3 * d['akd_compute_seconds_sum'] / batches:.1f}"
        f" ms; cores by thread: { {t: c for t, c in cores.items() if c > 0.01} }",
        flush=True,
    )


def main() -> None:
    work = Path(sys.argv[1])
    work.mkdir(parents=True, exist_ok=True)
    server = teacher_service(
        "service", write_teachers(work, load_bench_config(CONFIG), 2.0), work / "logs", "cpu", True, None
    )
    try:
        for _ in range(2):
            for load in (Load(8, 16), Load(1, 128)):
                measure(server, load)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
