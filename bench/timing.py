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


def alternate(
    candidates: dict[str, Callable[[], object]],
    repetitions: int,
    warmup: int,
    device: torch.device,
    min_seconds: float = 0.0,
) -> dict[str, list[float]]:
    """Time each candidate at least `repetitions` times, interleaved (ABBA...), after `warmup` untimed calls each.

    Interleaving spreads slow drifts (thermal, caches, other load) over every
    candidate instead of letting one absorb them. Fast candidates repeat until
    about `min_seconds` have been spent on them, so their medians rest on many
    samples (capped at MAX_REPETITIONS).
    """
    for _ in range(warmup):
        for fn in candidates.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    names = list(candidates)
    rep = 0
    while rep < max(repetitions, _repetitions_for(times, min_seconds)):
        for name in order(names, rep):
            times[name].append(timed(candidates[name], device))
        rep += 1
    return times


MAX_REPETITIONS = 200


def _repetitions_for(times: dict[str, list[float]], min_seconds: float) -> int:
    """Repetitions that spend about `min_seconds` on one round of every candidate, judged from those so far."""
    done = min(len(v) for v in times.values())
    if not done or min_seconds <= 0:
        return 0
    per_round = sum(sum(v) / len(v) for v in times.values())
    return min(MAX_REPETITIONS, int(min_seconds / max(per_round, 1e-9)))


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def order(items: list, rep: int) -> list:
    """Forward on even repetitions, backward on odd ones."""
    return list(items) if rep % 2 == 0 else list(reversed(items))
