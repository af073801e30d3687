"""Timing compared things fairly: same run, alternating order, warm-up first, medians."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import numpy as np
import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds for one call, with the device's queued work finished on both ends."""
    synchronize(device)
    started = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - started


def alternate(candidates: dict[str, Callable[[], object]], repetitions: int, warmup: int, device: torch.device) -> dict[str, list[float]]:
    """Time each candidate `repetitions` times, interleaved (ABBA...), after `warmup` untimed calls each.

    Interleaving spreads slow drifts (thermal, caches, other load) over every
    candidate instead of letting one absorb them.
    """
    for _ in range(warmup):
        for fn in candidates.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    names = list(candidates)
    for rep in range(repetitions):
        for name in names if rep % 2 == 0 else reversed(names):
            times[name].append(timed(candidates[name], device))
    return times


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def order(items: list, rep: int) -> list:
    """Forward on even repetitions, backward on odd ones."""
    return list(items) if rep % 2 == 0 else list(reversed(items))
