"""Verdicts on paired comparisons, drawn as a statistician would sign them: a paired t-test at n - 1 degrees of freedom
(scipy.stats), its p and 95% confidence interval beside every verdict, Holm's correction within each claim's family,
and clean accuracy as non-inferiority with a declared margin.

A replicate is whatever the caller pairs: a student seed against the baseline's same seed within one teacher set, or
one teacher set's mean paired difference (scripts/teacher_sets.py). Fewer than MIN_REPLICATES replicates give no
verdict: with two, a t-test has one degree of freedom and its interval spans almost anything.

- "higher" / "lower": two-sided test of a zero mean difference at ALPHA; the claim holds when the (Holm-adjusted) p is
  below ALPHA and the mean lies the expected way, does not hold when it is below ALPHA the other way, and is
  inconclusive otherwise.
- "not lower": non-inferiority with margin NON_INFERIORITY_MARGIN (one accuracy point): a one-sided test that the mean
  difference exceeds -margin, at ALPHA / 2, the same decision as the 95% interval's lower bound lying above -margin.
  It holds when that (Holm-adjusted) p is below ALPHA / 2, does not hold when the whole interval lies below -margin,
  and is inconclusive otherwise. A no-margin "not lower" would make "holds" the default.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from scipy import stats

ALPHA = 0.05
MIN_REPLICATES = 3
# one accuracy point, as the fractions the results hold: a clean-accuracy drop smaller than this is not a loss worth
# the robustness a distilled student gains (the paper's own differences are points, not tenths)
NON_INFERIORITY_MARGIN = 0.01
EXPECTATIONS = ("higher", "lower", "not lower")

RULE = (
    f"Verdicts: a paired t-test on the replicates' differences d (student minus PGD-AT), df = n - 1 "
    f"(scipy.stats.ttest_1samp), with its two-sided p and 95% confidence interval; Holm's correction over each claim's "
    f'family (every student against PGD-AT on that claim). "higher"/"lower" holds when the adjusted p < {ALPHA:g} '
    f"and d̄ lies the expected way, does not hold when p < {ALPHA:g} the other way, and is inconclusive otherwise. "
    f'"not lower" (clean accuracy) is non-inferiority with a margin of {100 * NON_INFERIORITY_MARGIN:g} point: it '
    f"holds when the one-sided p of d̄ > -{100 * NON_INFERIORITY_MARGIN:g} point, Holm-adjusted, is < {ALPHA / 2:g} "
    f"(the 95% interval above -{100 * NON_INFERIORITY_MARGIN:g}), does not hold when the whole interval lies below "
    f"it, and is inconclusive otherwise. Fewer than {MIN_REPLICATES} replicates give no verdict."
)


@dataclass(frozen=True)
class PairedTest:
    """A paired t-test of one claim: `p` is the two-sided p of a zero mean ("higher", "lower") or the one-sided p of
    non-inferiority ("not lower"); `ci` the two-sided 95% interval of the mean difference."""

    n: int
    mean: float
    se: float
    t: float
    p: float
    ci: tuple[float, float]
    expected: str

    @property
    def df(self) -> int:
        return self.n - 1


def paired_test(diffs: list[float], expected: str) -> PairedTest | None:
    """The t-test of `diffs` for a claim `expected` to be higher, lower or not lower; None without replicates. One
    replicate has no spread: its test holds its mean, and NaN for the rest."""
    if expected not in EXPECTATIONS:
        raise ValueError(f"expected must be one of {', '.join(EXPECTATIONS)}, got {expected!r}")
    n = len(diffs)
    if n == 0:
        return None
    if n == 1:
        return PairedTest(1, diffs[0], math.nan, math.nan, math.nan, (math.nan, math.nan), expected)
    mean, sd = statistics.fmean(diffs), statistics.stdev(diffs)
    se = sd / math.sqrt(n)
    null = -NON_INFERIORITY_MARGIN if expected == "not lower" else 0.0
    alternative = "greater" if expected == "not lower" else "two-sided"
    if se <= 1e-12 * max(1.0, abs(mean)):
        # no spread (but float rounding of equal differences): scipy's t is undefined, or its rounding's; the data say
        # all they can, at once
        p = 1.0 if mean == null else (0.0 if alternative == "two-sided" or mean > null else 1.0)
        return PairedTest(
            n, mean, 0.0, math.copysign(math.inf, mean - null) if mean != null else 0.0, p, (mean, mean), expected
        )
    result = stats.ttest_1samp(diffs, null, alternative=alternative)
    two_sided = stats.ttest_1samp(diffs, null)
    ci = two_sided.confidence_interval(1 - ALPHA)
    return PairedTest(
        n, mean, se, float(result.statistic), float(result.pvalue), (float(ci.low), float(ci.high)), expected
    )


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the given order: each is compared with ALPHA as it is."""
    order = sorted(range(len(pvalues)), key=pvalues.__getitem__)
    adjusted, running = [1.0] * len(pvalues), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(pvalues) - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def verdict(test: PairedTest | None, p: float | None = None) -> str:
    """Holds / does not hold / inconclusive for `test`, at its p or the family-adjusted `p` given."""
    if test is None or test.n < MIN_REPLICATES:
        n = 0 if test is None else test.n
        return f"inconclusive ({n} replicate{'s' if n != 1 else ''}; a verdict needs {MIN_REPLICATES})"
    p = test.p if p is None else p
    if test.expected == "not lower":
        if p < ALPHA / 2:
            return "holds"
        return "does not hold" if test.ci[1] < -NON_INFERIORITY_MARGIN else "inconclusive"
    if p >= ALPHA:
        return "inconclusive"
    toward = test.mean if test.expected == "higher" else -test.mean
    return "holds" if toward > 0 else "does not hold"


def family_verdicts(tests: list[PairedTest | None]) -> list[tuple[float | None, str]]:
    """One claim's family: (Holm-adjusted p, verdict) for each test, the correction over those with a verdict's
    replicates (MIN_REPLICATES or more); the others keep their own p and are inconclusive."""
    counted = [i for i, t in enumerate(tests) if t is not None and t.n >= MIN_REPLICATES]
    adjusted = dict(zip(counted, holm([tests[i].p for i in counted]), strict=True))
    return [(adjusted.get(i, None if t is None else t.p), verdict(t, adjusted.get(i))) for i, t in enumerate(tests)]


def described(test: PairedTest | None, p_adjusted: float | None, scale: float = 100.0) -> str:
    """ "+6.60 [-7.60, +20.80], t(2) = 2.00, p = 0.18, Holm p = 1.00": the mean and 95% interval in points (`scale`
    times the fractions), the test, and the family-adjusted p where it differs."""
    if test is None:
        return "n/a"
    if test.n == 1:
        return f"{scale * test.mean:+.2f} (one replicate)"
    low, high = (scale * x for x in test.ci)
    text = f"{scale * test.mean:+.2f} [{low:+.2f}, {high:+.2f}], t({test.df}) = {test.t:.2f}"
    if test.expected == "not lower":
        # the non-inferiority test's: against -margin, one-sided
        text += f" against {-scale * NON_INFERIORITY_MARGIN:+g}, one-sided"
    text += f", p {_p(test.p)}"
    if p_adjusted is not None and p_adjusted != test.p:
        text += f", Holm p {_p(p_adjusted)}"
    return text


def _p(p: float) -> str:
    return f"= {p:.2g}" if p >= 0.001 else "< 0.001"
