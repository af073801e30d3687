"""The verdict rule (pipeline/verdicts.py), pinned with the audit's numbers and held to scipy.stats' own paired
t-test: what holds, what does not, what is inconclusive, and how Holm's correction changes a family."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from pipeline.verdicts import (
    ALPHA,
    MIN_REPLICATES,
    NON_INFERIORITY_MARGIN,
    RULE,
    described,
    family_verdicts,
    holm,
    paired_test,
    verdict,
)


def points(*values: float) -> list[float]:
    return [v / 100 for v in values]


def test_the_audits_autoattack_differences_are_inconclusive_at_p_0_18():
    """+3.4, +13.2, +3.2 points: 2.0 standard errors, which the old 2-se rule read as a verdict's edge; two-sided at
    df 2 it is p = 0.18."""
    test = paired_test(points(3.4, 13.2, 3.2), "higher")
    assert (test.n, test.df) == (3, 2)
    assert test.p == pytest.approx(0.18, abs=0.005)
    assert 100 * test.ci[0] == pytest.approx(-7.6, abs=0.05) and 100 * test.ci[1] == pytest.approx(20.8, abs=0.05)
    assert verdict(test) == "inconclusive"


def test_the_audits_clean_ece_differences_hold():
    test = paired_test(points(-1.65, -1.69, -1.68), "lower")
    assert test.p < 0.001 and verdict(test) == "holds"
    # the same drop, expected the other way, is refuted
    assert verdict(paired_test(points(-1.65, -1.69, -1.68), "higher")) == "does not hold"


def test_four_teacher_sets_give_the_audits_interval():
    """The four set means on AutoAttack: +3.27, 95% CI [-1.9, +8.4], p = 0.14: inconclusive, not "holds"."""
    test = paired_test(points(6.6, 3.93, 3.73, -1.2), "higher")
    assert 100 * test.mean == pytest.approx(3.27, abs=0.01) and test.p == pytest.approx(0.14, abs=0.005)
    assert (round(100 * test.ci[0], 1), round(100 * test.ci[1], 1)) == (-1.9, 8.4)
    assert verdict(test) == "inconclusive"


@pytest.mark.parametrize("seed", range(5))
def test_the_test_is_scipys_paired_t_test(seed):
    rng = np.random.default_rng(seed)
    student, baseline = rng.normal(0.6, 0.05, 6), rng.normal(0.58, 0.05, 6)
    test = paired_test(list(student - baseline), "higher")
    reference = stats.ttest_rel(student, baseline)
    assert test.t == pytest.approx(reference.statistic) and test.p == pytest.approx(reference.pvalue)
    interval = reference.confidence_interval(0.95)
    assert test.ci == pytest.approx((interval.low, interval.high))


@pytest.mark.parametrize("diffs", [points(30.0, 31.0), points(-5.0), []])
def test_fewer_than_three_replicates_give_no_verdict_whatever_their_size(diffs):
    said = verdict(paired_test(diffs, "higher"))
    n = len(diffs)
    assert said == f"inconclusive ({n} replicate{'' if n == 1 else 's'}; a verdict needs {MIN_REPLICATES})"
    # one replicate: its mean, nothing more
    if n == 1:
        assert described(paired_test(diffs, "higher"), None) == "-5.00 (one replicate)"


@pytest.mark.parametrize(
    ("diffs", "outcome"),
    [
        # the whole interval above -1 point: not lower
        (points(0.2, 0.3, 0.1, 0.25), "holds"),
        # a small drop, its interval still above -1 point
        (points(-0.3, -0.2, -0.25, -0.35), "holds"),
        # the interval reaches past -1 point: not shown either way
        (points(0.2, -1.5, 0.8), "inconclusive"),
        # the whole interval below -1 point: lower
        (points(-2.0, -2.2, -1.9, -2.1), "does not hold"),
    ],
)
def test_clean_accuracy_is_non_inferiority_with_a_one_point_margin(diffs, outcome):
    test = paired_test(diffs, "not lower")
    assert verdict(test) == outcome
    # the decision is the interval's: its lower bound above -margin exactly when it holds
    assert (outcome == "holds") == (test.ci[0] > -NON_INFERIORITY_MARGIN)


def test_holm_adjusts_step_down_and_keeps_the_order():
    assert holm([0.01, 0.04, 0.03, 0.2]) == pytest.approx([0.04, 0.09, 0.09, 0.2])
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])
    assert holm([]) == []


def test_a_claims_family_can_lose_a_verdict_one_test_alone_would_give():
    """Three students on one claim: one at p = 0.03 alone holds, but not once the family is corrected."""
    clear, borderline, none = points(5.0, 5.5, 4.5, 5.2), points(1.0, 3.0, 1.0, 3.0), points(1.0, -1.0, 0.5, -0.5)
    tests = [paired_test(d, "higher") for d in (clear, borderline, none)]
    assert ALPHA / 3 < tests[1].p < ALPHA and verdict(tests[1]) == "holds"
    (p_clear, v_clear), (p_border, v_border), (_, v_none) = family_verdicts(tests)
    assert (v_clear, v_border, v_none) == ("holds", "inconclusive", "inconclusive")
    assert p_border > tests[1].p and p_clear >= tests[0].p
    assert "Holm p" in described(tests[1], p_border)


def test_identical_differences_decide_without_a_spread():
    assert verdict(paired_test(points(3.0, 3.0, 3.0), "higher")) == "holds"
    assert verdict(paired_test(points(0.0, 0.0, 0.0), "higher")) == "inconclusive"
    assert verdict(paired_test(points(0.0, 0.0, 0.0), "not lower")) == "holds"


def test_the_rule_the_report_states_names_its_parts():
    for part in ("ttest_1samp", "Holm", "95%", "non-inferiority", f"{MIN_REPLICATES} replicates"):
        assert part in RULE


def test_an_unknown_direction_is_refused():
    with pytest.raises(ValueError, match="not lower"):
        paired_test([0.1, 0.2, 0.3], "bigger")
