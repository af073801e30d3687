"""How many replicates a paired comparison needs: the power of the two-sided one-sample t-test that
pipeline/verdicts.py draws its verdicts with, from the noncentral t distribution (scipy.stats.nct).

The replicate is a teacher set; its value is the mean, over its student seeds, of the paired difference (student minus
baseline, one seed each). That mean varies with the set (between_sets, the SD of the sets' true means) and with the
seeds (within_set, the SD of one seed's difference around its set's mean), so with `seeds` seeds per set its SD is
sqrt(between_sets^2 + within_set^2 / seeds). Each set also trains its own teachers, so a design's cost is counted in
runs: the set's teachers once, and two student runs (student and baseline) per seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from scipy import stats

from pipeline.verdicts import ALPHA


@dataclass(frozen=True)
class Variance:
    """The SDs of the paired difference, in the metric's own units (fractions for accuracies)."""

    between_sets: float
    within_set: float

    def of_set_mean(self, seeds: int) -> float:
        return math.sqrt(self.between_sets**2 + self.within_set**2 / seeds)


def power(sets: int, seeds: int, effect: float, variance: Variance, alpha: float = ALPHA) -> float:
    """The chance that the two-sided paired t-test over `sets` set means (df = sets - 1) rejects a zero mean at
    `alpha` when the true mean difference is `effect`. Below 2 sets there is no test: 0."""
    if sets < 2:
        return 0.0
    df = sets - 1
    noncentrality = effect / variance.of_set_mean(seeds) * math.sqrt(sets)
    critical = stats.t.ppf(1 - alpha / 2, df)
    upper = float(stats.nct.sf(critical, df, noncentrality))
    lower = float(stats.nct.cdf(-critical, df, noncentrality))
    # scipy's nct gives NaN far in a tail (a large noncentrality): there the tail is nil
    found = (0.0 if math.isnan(upper) else upper) + (0.0 if math.isnan(lower) else lower)
    return found


def sets_needed(seeds: int, effect: float, variance: Variance, target: float, alpha: float = ALPHA) -> int:
    """The fewest sets at `seeds` seeds per set whose power reaches `target`."""
    sets = 2
    while power(sets, seeds, effect, variance, alpha) < target:
        sets += 1
        if sets > 10_000:
            raise ValueError(f"no design of up to 10,000 sets reaches power {target} for an effect of {effect}")
    return sets


@dataclass(frozen=True)
class Design:
    """One way to reach the target power: `sets` sets of `seeds` seeds, and what it costs in runs."""

    seeds: int
    sets: int
    power: float
    teacher_runs: int
    student_runs: int

    def cost(self, teacher_minutes: float, student_minutes: float) -> float:
        """Its length in run-minutes, from what one teacher run and one student run (evaluation included) take."""
        return self.teacher_runs * teacher_minutes + self.student_runs * student_minutes


def designs(
    effect: float,
    variance: Variance,
    target: float,
    teachers_per_set: int,
    max_seeds: int = 4,
    alpha: float = ALPHA,
) -> list[Design]:
    """For 1 to `max_seeds` seeds per set, the fewest sets reaching `target` power, and its runs."""
    found = []
    for seeds in range(1, max_seeds + 1):
        sets = sets_needed(seeds, effect, variance, target, alpha)
        found.append(
            Design(
                seeds,
                sets,
                power(sets, seeds, effect, variance, alpha),
                teacher_runs=sets * teachers_per_set,
                student_runs=2 * sets * seeds,
            )
        )
    return found
