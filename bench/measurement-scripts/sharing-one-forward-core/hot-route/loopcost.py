"""Kept with its output (bench/records/2026-11-27-sharing-one-forward-core/hot-route/):
the event loop's CPU per request in a real service, one
client in this process sending cached 16-row requests one after another. Run from the checkout to measure:

    cd CHECKOUT && python bench/measurement-scripts/sharing-one-forward-core/hot-route/loopcost.py OUTDIR LOOP N

LOOP: uvicorn's event loop, `asyncio` or `uvloop`. Prints the CPU of the service's main thread (its event loop), of
the whole service and of the client, per request.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.getcwd())

import httpx  # noqa: E402
import torch  # noqa: E402

from bench.config import load_bench_config  # noqa: E402
from bench.servers import write_teachers  # noqa: E402
from shared import codec, protocol  # noqa: E402
from shared.health import free_port, wait_healthy  # noqa: E402

SERVE = """
import uvicorn
from shared.allocator import keep_freed_memory_at_start
from teacher_service.app import create_app
from teacher_service.config import load_config
from teacher_service.server import uvicorn_options
keep_freed_memory_at_start("loopcost")
config = load_config({config!r})
uvicorn.run(create_app(config), host="127.0.0.1", port={port}, loop={loop!r}, **uvicorn_options(config.server))
"""


def cpu_seconds(stat: Path) -> float:
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    work, loop, n = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    work.mkdir(parents=True, exist_ok=True)
    config, port = write_teachers(work, load_bench_config("tiny"), 2.0), free_port()
    env = {**os.environ, "AKD_CACHE_DIR": str(work / f"cache-{port}")}
    server = subprocess.Popen([sys.executable, "-c", SERVE.format(config=str(config), port=port, loop=loop)], env=env)
    main_thread, process = Path(f"/proc/{server.pid}/task/{server.pid}/stat"), Path(f"/proc/{server.pid}/stat")
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, lambda: server.poll() is None, 120)
        body = codec.encode_inputs((torch.rand(16, 1, 28, 28) * 255).round() / 255)
        params = {"teacher": "small_cnn", "cache": "use"}
        with httpx.Client(base_url=url) as client:
            for _ in range(100):  # stored, and warm
                assert client.post(protocol.SOFT_TARGETS_PATH, content=body, params=params).status_code == 200
            before = cpu_seconds(main_thread), cpu_seconds(process), time.process_time()
            for _ in range(n):
                client.post(protocol.SOFT_TARGETS_PATH, content=body, params=params)
            after = cpu_seconds(main_thread), cpu_seconds(process), time.process_time()
        loop_ms, service_ms, client_ms = (1e3 * (a - b) / n for a, b in zip(after, before))
        print(
            f"{os.getcwd()} loop={loop}: event loop {loop_ms:.3f} ms a request, "
            f"service {service_ms:.3f}, client {client_ms:.3f}"
        )
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(30)


if __name__ == "__main__":
    main()
