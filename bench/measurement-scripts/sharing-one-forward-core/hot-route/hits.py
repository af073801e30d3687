"""Kept with its output (bench/records/2026-11-27-sharing-one-forward-core/hot-route/):
cached rows only, every row a hit and no forward pass, so what
is measured is the service's per-request path. Run from the checkout to measure (its packages come first):

    cd CHECKOUT && python bench/measurement-scripts/sharing-one-forward-core/hot-route/hits.py OUTDIR

Prints requests/s and the server's CPU ms per request at 8 x 16 and 1 x 16, 3 rounds each (hits.txt).
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, os.getcwd())

import torch  # noqa: E402

from bench.config import load_bench_config  # noqa: E402
from bench.load import Request, closed_loop  # noqa: E402
from bench.servers import teacher_service, write_teachers  # noqa: E402
from shared import codec, protocol  # noqa: E402

CONFIG = "bench/records/2026-11-27-sharing-one-forward-core/config.toml"


def uint8_rows(seed: int) -> bytes:
    x = torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(seed))
    return codec.encode_inputs((x * 255).round() / 255)


def main() -> None:
    work = Path(sys.argv[1])
    work.mkdir(parents=True, exist_ok=True)
    config = write_teachers(work, load_bench_config(CONFIG), 2.0)
    server = teacher_service("service", config, work / "logs", "cpu", True, work / "cache")
    params = {"teacher": "small_cnn", "outputs": "probs", "cache": "use"}
    try:
        for clients in (8, 1):
            requests = [Request(protocol.SOFT_TARGETS_PATH, uint8_rows(c), 16, params) for c in range(clients)]
            closed_loop(server.url, requests, 5)  # stored: every later row hits
            runs = [closed_loop(server.url, requests, 3000 // clients, server.cpu_seconds) for _ in range(3)]
            figures = [(round(r.rows_per_s / 16), round(1e3 * r.server_cpu_s / (r.rows / 16), 3)) for r in runs]
            print(f"{os.getcwd()} {clients} x 16, all hits: requests/s, server CPU ms a request, 3 rounds:", figures)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
