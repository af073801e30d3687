"""How long a client waits between rounds of retries: exponential backoff with decorrelated jitter.

Without jitter, every client that lost a replica at the same moment (a service restart under many trainers) retries
at the same moments, and the service comes back to a burst; drawn at random, their retries spread out.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Protocol


class Uniform(Protocol):
    """A source of random numbers: `random.Random` is one (seeded, for waits a test can predict)."""

    def uniform(self, a: float, b: float) -> float: ...


class Backoff:
    """Decorrelated jitter: each call's first wait is drawn uniformly from [base_s, 3 base_s], each later one from
    [base_s, 3 times the wait before it], every one capped at cap_s.

    So the n-th wait of a call (n = 1, 2, ...) lies in [min(base_s, cap_s), min(cap_s, base_s 3^n)], and grows about
    1.5x a round on average. `rng` draws the waits (a `random.Random(seed)` repeats them); by default each Backoff
    has a generator of its own, seeded by the system, so two clients' waits differ. A Retry-After is a floor the
    client adds these waits to (`ClientCore`): clients told the same time still spread out.
    """

    def __init__(self, base_s: float = 0.1, cap_s: float = 5.0, rng: Uniform | None = None):
        if not (base_s > 0 and cap_s > 0):
            raise ValueError(f"backoff waits must be positive: base_s = {base_s}, cap_s = {cap_s}")
        self.base_s, self.cap_s = base_s, cap_s
        self._rng = rng if rng is not None else random.Random()

    def waits(self) -> Iterator[float]:
        """One call's waits, round after round (never ending)."""
        last = self.base_s
        while True:
            last = min(self.cap_s, self._rng.uniform(self.base_s, 3 * last))
            yield last
