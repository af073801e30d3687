"""The service's CPU per request, thread by thread, for the native route and for the v2 route through system shared
memory, with the same rows (float32 CIFAR-shaped, `cache=bypass`), alternated twice.

Start a service with one `linear` teacher (3x32x32, 10 classes, e.g. as `akd bench` writes its teachers) on port 8300
with `[server.batching] max_wait_ms = 0`, then, from the repository's root:

    .venv/bin/python bench/measurement-scripts/open-inference-protocol/thread_cpu.py 128 <the service's pid>

Per variant: the round trip (300 calls after 30), and each thread's user + system CPU per call from /proc (the event
loop is the thread whose id is the pid; the inference thread is the other busy one).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import httpx
import torch
from safetensors.torch import save

from shared.client.shared_memory import ClientRegion

URL = "http://127.0.0.1:8300"
CALLS = 300


def threads(pid: int) -> dict[str, float]:
    """Each thread's CPU seconds so far."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        out[tid] = (int(fields[11]) + int(fields[12])) / tick
    return out


def main() -> None:
    rows, pid = int(sys.argv[1]), int(sys.argv[2])
    client = httpx.Client(timeout=60)
    x = torch.rand(rows, 3, 32, 32)
    body = save({"inputs": x})
    region = ClientRegion(x.numel() * 4, rows * 40)
    registered = client.post(
        f"{URL}/v2/systemsharedmemory/region/{region.name}/register", content=json.dumps(region.registration())
    )
    assert registered.status_code == 200, registered.text
    request = json.dumps(region.infer_request(x.numpy(), 10, {"cache": "bypass"})).encode()

    def shared_memory() -> None:
        region.write_rows(x.numpy())
        answer = client.post(f"{URL}/v2/models/linear/infer", content=request)
        assert answer.status_code == 200, answer.text
        region.read_answer(rows, 10)

    def native() -> None:
        answer = client.post(f"{URL}/soft-targets?teacher=linear&outputs=probs&cache=bypass", content=body)
        assert answer.status_code == 200, answer.text

    try:
        for name, call in (("native", native), ("shared memory", shared_memory)) * 2:
            for _ in range(30):
                call()
            before, started = threads(pid), time.perf_counter()
            for _ in range(CALLS):
                call()
            seconds, after = (time.perf_counter() - started) / CALLS, threads(pid)
            print(f"{name}: {seconds * 1e3:.2f} ms a call")
            for tid, cpu in after.items():
                per_call = (cpu - before.get(tid, cpu)) / CALLS * 1e3
                if per_call > 0.02:
                    print(f"   thread {tid}{' (event loop)' if int(tid) == pid else ''}: {per_call:.3f} ms CPU a call")
    finally:
        region.close()


if __name__ == "__main__":
    main()
