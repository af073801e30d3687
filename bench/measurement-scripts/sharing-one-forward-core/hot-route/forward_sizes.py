"""Kept with its output (bench/records/2026-11-27-sharing-one-forward-core/hot-route/):
the small CNN's forward pass alone, in this process, at each
batch size, with freed memory kept as the service keeps it; 5 rounds, the sizes interleaved.

    python bench/measurement-scripts/sharing-one-forward-core/hot-route/forward_sizes.py 16,32,64,112,128,256
"""

import sys
import time

import torch

from shared.allocator import keep_freed_memory_at_start
from shared.models import build_model


def main() -> None:
    keep_freed_memory_at_start("forward_sizes")
    model = build_model("small_cnn", 10, (1, 28, 28)).eval()
    sizes = [int(s) for s in sys.argv[1].split(",")]
    inputs = {b: torch.rand(b, 1, 28, 28) for b in sizes}
    times: dict[int, list[float]] = {b: [] for b in sizes}
    with torch.inference_mode():
        for b in sizes:
            for _ in range(10):
                model(inputs[b])
        for _ in range(5):
            for b in sizes:
                calls = max(10, 2000 // b)
                started = time.perf_counter()
                for _ in range(calls):
                    model(inputs[b])
                times[b].append(1e3 * (time.perf_counter() - started) / calls)
    for b in sizes:
        ms = sorted(times[b])
        print(b, " ".join(f"{t:.2f}" for t in ms), f"| median per 128 rows {ms[2] / b * 128:.1f} ms")


if __name__ == "__main__":
    main()
