"""Timing compared things fairly: same run, alternating order, warm-up first, medians."""

from __future__ import annotations

import functools
import itertools
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


# the most candidates a balanced order is searched for (8: a fifth of a second; 9 takes seconds, 10 a minute)
BALANCED_UP_TO = 8


def order(items: list, rep: int) -> list:
    """The order of repetition `rep`: every candidate once, and, over each cycle of len(items) - 1 repetitions (cycles
    repeat), every candidate right after every other exactly once, the steps from one repetition to the next included.

    What a call leaves behind lands on the next one: a process whose idle OpenMP workers spin for milliseconds after
    its forward pass (libgomp's default) takes a core from the candidate timed after it on a shared host. Running the
    candidates forward, then backward, put one of them after the in-process teacher in every other repetition and
    another never (docs/design/benchmarks.md). Two candidates, and more than BALANCED_UP_TO: forward on even
    repetitions, backward on odd ones (for two, each then follows either alike, and a drift weighs on both alike).
    """
    n = len(items)
    if n < 3 or n > BALANCED_UP_TO:
        return list(items) if rep % 2 == 0 else list(reversed(items))
    rows = _balanced_rows(n)
    return [items[i] for i in rows[rep % len(rows)]]


@functools.cache
def _balanced_rows(n: int) -> tuple[tuple[int, ...], ...]:
    """n - 1 orders of range(n) whose concatenation, read as a cycle, holds each ordered pair of distinct candidates
    once as neighbours (a depth-first search; found for every n up to BALANCED_UP_TO)."""
    permutations = list(itertools.permutations(range(n)))
    rows: list[tuple[int, ...]] = []
    used: set[tuple[int, int]] = set()

    def extend(previous: int | None) -> bool:
        if len(rows) == n - 1:
            return (previous, rows[0][0]) not in used and previous != rows[0][0]
        for candidate in permutations if rows else permutations[:1]:
            pairs = list(zip(candidate, candidate[1:]))
            if previous is not None:
                pairs.append((previous, candidate[0]))
            if any(a == b for a, b in pairs) or len(set(pairs)) < len(pairs) or used.intersection(pairs):
                continue
            rows.append(candidate)
            used.update(pairs)
            if extend(candidate[-1]):
                return True
            rows.pop()
            used.difference_update(pairs)
        return False

    if not extend(None):
        raise ValueError(f"no balanced order of {n} candidates")
    return tuple(rows)
