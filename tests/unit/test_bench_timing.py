"""The benchmarks' alternation: what one call leaves behind (a process's spinning OpenMP workers, a warm cache) must
not land on one candidate more than on another."""

from __future__ import annotations

from collections import Counter

import pytest

from bench.timing import BALANCED_UP_TO, order


@pytest.mark.parametrize("n", range(3, BALANCED_UP_TO + 1))
def test_every_candidate_follows_every_other_once_a_cycle(n):
    candidates = [f"c{i}" for i in range(n)]
    cycle = n - 1
    rounds = [order(candidates, rep) for rep in range(2 * cycle)]
    assert all(sorted(r) == candidates for r in rounds)
    calls = [c for r in rounds for c in r]
    # one cycle's steps, the step into the next cycle included
    steps = Counter(zip(calls[: n * cycle], calls[1 : n * cycle + 1]))
    assert steps == {(a, b): 1 for a in candidates for b in candidates if a != b}


def test_the_in_process_candidate_is_followed_by_each_server_alike():
    """The order benchmark 1 times its candidates in: the service, through shared memory, in-process, Triton."""
    candidates = ["service", "shared memory", "in-process", "Triton"]
    # three cycles of 3 repetitions, and the first call after them
    calls = [c for rep in range(10) for c in order(candidates, rep)][: 3 * 3 * 4 + 1]
    after_in_process = Counter(b for a, b in zip(calls, calls[1:]) if a == "in-process")
    assert after_in_process == {"service": 3, "shared memory": 3, "Triton": 3}


@pytest.mark.parametrize("n", [2, BALANCED_UP_TO + 1])
def test_two_candidates_and_more_than_the_balanced_sizes_go_forward_then_backward(n):
    candidates = list(range(n))
    assert order(candidates, 0) == candidates and order(candidates, 1) == candidates[::-1]
