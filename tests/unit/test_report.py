"""The report's pure parts: the guideline table's pairing, the service-stats merge, the stage times (the verdict rule
itself: tests/unit/test_verdicts.py)."""

from __future__ import annotations

import json
import statistics

import pytest
from conftest import REPO

from pipeline.layout import Layout, add_stage_time, merge_service_stats, read_stage_times
from pipeline.report import data_line, time_line

SERVED = {"rows": 600.0, "hits": 40.0, "misses": 160.0, "largest_batch": 100.0}
# a re-run that reused every student
IDLE = {"rows": 0.0, "hits": 0.0, "misses": 0.0, "largest_batch": 0.0}


@pytest.mark.parametrize("cumulative", [False, True])
def test_an_invocation_that_served_nothing_keeps_the_record(cumulative):
    assert merge_service_stats(SERVED, IDLE, cumulative) == SERVED
    assert merge_service_stats(SERVED, {}, cumulative) == SERVED
    assert merge_service_stats({}, SERVED, cumulative) == SERVED
    # nothing yet: the zeros are the truth
    assert merge_service_stats({}, IDLE, cumulative) == IDLE


def test_invocations_of_a_service_the_demo_started_add_up():
    """An interrupted students stage and its resume: two services, each counting from zero."""
    resume = {"rows": 200.0, "hits": 10.0, "misses": 40.0, "largest_batch": 150.0}
    assert merge_service_stats(SERVED, resume, cumulative=False) == {
        "rows": 800.0,
        "hits": 50.0,
        "misses": 200.0,
        "largest_batch": 150.0,
    }


def test_an_external_service_count_is_cumulative_so_the_larger_one_is_later():
    """Compose's trainers save the one service's running totals, in whatever order they finish."""
    later = {"rows": 1200.0, "hits": 90.0, "misses": 310.0, "largest_batch": 100.0}
    assert merge_service_stats(SERVED, later, cumulative=True) == later
    assert merge_service_stats(later, SERVED, cumulative=True) == later


def test_stage_times_add_up_over_invocations_and_the_report_shows_them(tmp_path):
    layout = Layout(tmp_path)
    assert read_stage_times(layout) == {} and "not recorded" in time_line({})
    add_stage_time(layout, "teachers", 120.0)
    add_stage_time(layout, "students", 300.0)
    # a re-run that reused them
    add_stage_time(layout, "students", 6.0)
    times = read_stage_times(layout)
    assert times == {"teachers": {"seconds": 120.0, "runs": 1}, "students": {"seconds": 306.0, "runs": 2}}
    line = time_line(times)
    assert "teachers 2.0 min" in line and "students 5.1 min (2 invocations)" in line and "total 7.1 min" in line


def test_the_overfitting_gap_averages_five_epochs_at_each_end():
    from pipeline.report import overfitting_gap

    curve = [0.1, 0.5, 0.7, 0.80, 0.82, 0.84, 0.83, 0.81, 0.76, 0.75, 0.74, 0.95, 0.74, 0.73, 0.72, 0.72, 0.71]
    gap = overfitting_gap(curve)
    # the best 5-epoch window, not around the one lucky epoch (0.95 at epoch 12)
    assert gap["best_epochs"] == [4, 8]
    assert gap["best"] == pytest.approx(statistics.fmean(curve[3:8])) and gap["final"] == pytest.approx(
        statistics.fmean(curve[-5:])
    )
    assert gap["gap"] == pytest.approx(gap["best"] - gap["final"]) and gap["gap"] > 0.03
    # still learning at the end: no overfitting
    rising = overfitting_gap([0.1 * i for i in range(10)])
    assert rising["gap"] == 0 and rising["best_epochs"] == [6, 10]
    # fewer epochs than the window: the whole run
    assert overfitting_gap([0.5, 0.4])["best_epochs"] == [1, 2]


def test_guideline_rows_pair_each_student_with_pgd_at_by_seed():
    from pipeline.plan import Plan
    from pipeline.report import guideline_table

    def run(pgd: float, gap: float) -> dict:
        evaluation = {"clean_acc": 0.9, "pgd_acc": pgd, "autoattack_acc": None, "ece": 0.02, "ece_pgd": 0.1}
        return {"final": evaluation, "best": evaluation, "overfitting": {"gap": gap}}

    cfg = Plan.model_validate(
        {
            "seeds": [0, 1, 2],
            "common": {"method": "at"},
            "teachers": [{"name": "at-s10"}],
            "students": [{"name": "pgd-at"}, {"name": "akd", "method": "akd", "uses": "ensemble", "alpha": 0.5}],
        }
    )
    students = {
        "pgd-at": [run(0.70, 0.04), run(0.72, 0.05), run(0.68, 0.03)],
        "akd": [run(0.73, 0.01), run(0.75, 0.02), run(0.71, 0.00)],
    }
    row = next(line for line in guideline_table(cfg, students).splitlines() if line.startswith("| akd |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "akd (ensemble, alpha 0.5, tau 1)"
    # AutoAttack not measured
    assert cells[2] == "n/a"
    # PGD up by 3 points on every seed (its interval, the Holm-adjusted p, the verdict); clean level, so not lower
    assert cells[3].startswith("+3.00 [+3.00, +3.00] p ") and cells[3].endswith(" holds")
    assert cells[4].startswith("+0.00 [+0.00, +0.00] p ") and cells[4].endswith(" holds")
    # the gap shrinks by 3 points on every seed
    assert cells[7].startswith("-3.00 [-3.00, -3.00] p ") and cells[7].endswith(" holds")


def test_results_md_test_split_table_recomputes_from_the_committed_results():
    """RESULTS.md's robust overfitting on the test split is the report's own table of results/overfit/results.json,
    every student against early-stopped and final PGD-AT, so the page cannot drift from the data it cites."""
    from pipeline.report import test_split_overfitting_table

    students = json.loads((REPO / "results" / "overfit" / "results.json").read_text())["students"]
    table = test_split_overfitting_table(students, "pgd-at")
    assert table in (REPO / "RESULTS.md").read_text()
    assert "| pgd-at | +5.53 [+2.54, +8.53], t(2) = 7.95, p = 0.015 |" in table
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines()}
    assert len([name for name in students if name != "pgd-at" and rows[name].count("[") == 3]) == 10


def test_the_header_counts_autoattacks_images_from_the_evaluations_that_ran_it():
    """A design's teachers run no AutoAttack: the count comes from the students' final epochs, not the first run's."""
    teacher = {"best": {"n": 1000, "autoattack_n": None}, "final": {"n": 1000, "autoattack_n": None}}
    student = {"best": {"n": 1000, "autoattack_n": None}, "final": {"n": 1000, "autoattack_n": 1000}}
    line = data_line("mnist5k", [4], {"at-s1040": teacher, "akd-ensemble-s4": student})
    assert "1000 images for clean/PGD/ECE, the first 1000 for AutoAttack" in line and "None" not in line
    assert "no AutoAttack" in data_line("mnist5k", [0], {"at-s1040": teacher})
