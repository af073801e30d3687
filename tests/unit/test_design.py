"""`akd design`: the power analysis (checked against simulated experiments), a design that cannot claim more power
than it plans, sets that share nothing, and a report that decides the claim only at the planned size."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats

from pipeline import DemoError
from pipeline.design import load_design, set_folder
from pipeline.design_report import (
    claim_design,
    image_sampling_lines,
    progress_line,
    run_design,
    write_design_report,
)
from pipeline.power import Variance, designs, power, sets_needed
from shared.configfile import ConfigError

AUDIT = Variance(between_sets=0.026, within_set=0.034)
SOFTWARE = {"torch": "2.13.0+cpu", "numpy": "2.4.6", "scipy": "1.17.1", "pyautoattack": "0.2.0"}
THREAT = {"norm": "linf", "eps": 0.3, "autoattack": {"version": "standard", "package": "pyautoattack 0.2.0", "n": 8}}


def test_the_power_is_what_simulated_experiments_find():
    """The noncentral t's power against the rejection rate of scipy's own t-test on simulated designs: set means drawn
    with the between-set SD, each seed's difference around it with the within-set SD."""
    rng = np.random.default_rng(0)
    for sets, seeds in ((6, 1), (5, 3)):
        trials = 4000
        set_means = rng.normal(0.03, AUDIT.between_sets, (trials, sets))
        seed_diffs = set_means[..., None] + rng.normal(0, AUDIT.within_set, (trials, sets, seeds))
        replicates = seed_diffs.mean(axis=2)
        rejected = stats.ttest_1samp(replicates, 0.0, axis=1).pvalue < 0.05
        found = power(sets, seeds, 0.03, AUDIT)
        # 4000 trials: the simulated rate's se is about 0.008
        assert abs(rejected.mean() - found) < 0.03, (sets, seeds, rejected.mean(), found)


def test_the_audits_variances_need_18_sets_of_one_seed():
    assert sets_needed(1, 0.03, AUDIT, 0.80) == 18
    assert power(18, 1, 0.03, AUDIT) >= 0.80 > power(17, 1, 0.03, AUDIT)
    # more seeds per set need fewer sets, never fewer than the between-set variance allows
    found = {d.seeds: d.sets for d in designs(0.03, AUDIT, 0.80, teachers_per_set=3)}
    assert found == {1: 18, 2: 13, 3: 12, 4: 11}
    one = designs(0.03, AUDIT, 0.80, teachers_per_set=3)[0]
    assert (one.teacher_runs, one.student_runs) == (54, 36)


def _design_file(path, **changes) -> str:
    fields = {
        "plan": '"overfit"',
        "students": '["pgd-at", "akd-ensemble"]',
        "sets": "3",
        "seeds_per_set": "1",
        "teacher_seed_base": "1000",
        "autoattack_limit": "8",
        "run_minutes": "{ teacher = 1, student = 2 }",
        "stopping_rule": '"all three sets, then the test"',
        "claim": '{ student = "akd-ensemble", baseline = "pgd-at", metric = "autoattack_acc", '
        "effect = 0.5, power = 0.8 }",
        "variance": '{ between_sets = 0.05, within_set = 0.05, source = "a test" }',
    }
    fields.update({k: str(v) for k, v in changes.items()})
    text = "\n".join(f"{k} = {v}" for k, v in fields.items())
    path.write_text(text)
    return str(path)


def test_a_design_below_its_power_is_refused_naming_the_sets_it_needs(tmp_path):
    with pytest.raises(ConfigError, match="needs 3 sets"):
        load_design(_design_file(tmp_path / "d.toml", sets=2))
    with pytest.raises(ConfigError, match="must include the claim's"):
        load_design(_design_file(tmp_path / "d.toml", students='["pgd-at", "akd-single"]'))
    with pytest.raises(ConfigError, match="cannot both be 0"):
        load_design(_design_file(tmp_path / "d.toml", variance="{ between_sets = 0, within_set = 0, source = 'x' }"))
    with pytest.raises(ConfigError, match="autoattack_version"):
        load_design(_design_file(tmp_path / "d.toml", autoattack_version='"all"'))
    primary = load_design(None, "primary")
    assert (primary.sets, primary.seeds_per_set) == (18, 1) and primary.planned_power >= 0.80


def test_each_set_has_its_own_teachers_baseline_and_seeds():
    primary = load_design(None, "primary")
    plans = [primary.set_plan(i) for i in range(3)]
    teacher_seeds = [[p.raw_run(t)["seed"] for t in p.teachers] for p in plans]
    assert teacher_seeds == [[1000, 1001, 1002], [1010, 1011, 1012], [1020, 1021, 1022]]
    assert plans[1].teacher_names == ["at-s1010", "at-s1011", "weak-s1012"]
    # the weakly trained teacher keeps its half radius
    assert plans[1].raw_run(plans[1].teachers[2])["attack"]["eps"] == 0.15
    assert [p.seeds for p in plans] == [[0], [1], [2]]
    assert all([s.name for s in p.students] == ["pgd-at", "akd-ensemble"] for p in plans)
    assert all(not p.autoattack_teachers and p.autoattack_version == "standard" for p in plans)
    # the sets are different plans: each folder records its own
    assert len({p.fingerprint() for p in plans}) == 3


def _run(aa: float, bits: str, pgd_best: float = 0.7, pgd_final: float = 0.65) -> dict:
    final = {
        "clean_acc": 0.95,
        "pgd_acc": pgd_final,
        "autoattack_acc": aa,
        "ece": 0.03,
        "ece_pgd": 0.2,
        "threat_model": THREAT,
        "correct": {"autoattack": bits},
    }
    return {"final": final, "best": {"pgd_acc": pgd_best}, "overfitting": {"gap": 0.02}}


def _set(out, index: int, student_bits: str, baseline_bits: str, software: dict = SOFTWARE) -> None:
    folder = set_folder(out, index)
    folder.mkdir(parents=True)
    acc = lambda bits: bits.count("1") / len(bits)  # noqa: E731
    results = {
        "seeds": [index],
        "machine": "x86_64, 2 cores, CPU only, torch 2.13.0+cpu, Python 3.11.7",
        "software": software,
        "dataset": "mnist5k",
        "teachers": {"at-s1000": {"best_epoch": 20, "epochs": 30}},
        "students": {
            "pgd-at": [_run(acc(baseline_bits), baseline_bits, pgd_final=0.60 + index / 100)],
            "akd-ensemble": [_run(acc(student_bits), student_bits)],
        },
    }
    (folder / "results.json").write_text(json.dumps(results))


def test_the_claim_is_decided_only_when_every_planned_set_has_finished(tmp_path):
    design = load_design(_design_file(tmp_path / "d.toml"))
    out = tmp_path / "out"
    # +2, +4 and +3 of 8 images
    _set(out, 0, "11110000", "00110000")
    _set(out, 1, "11111100", "00110000")
    interim = write_design_report(design, out, "akd design")
    assert "SD of the set means so far: 17.68 points over 2 sets (the power analysis assumed 7.07)" in interim
    assert "**Not decided**: 2 of 3 sets finished" in interim and "set-02" in interim and "**holds**" not in interim
    _set(out, 2, "11111000", "00110000")
    decided = write_design_report(design, out, "akd design")
    # set means +25, +50, +37.5 points: t(2) = 5.20, p = 0.035
    assert "**Decided** (3 of 3 sets): +37.50 [+6.45, +68.55], t(2) = 5.20, p = 0.035: **holds**" in decided
    # the per-image differences averaged over the sets: 1, 1, 0, 0, 2/3, 1/3, 0, 0 (sd 0.452, over sqrt 8)
    assert "- from the 8 images alone (shared by every set): se 15.98 points" in decided
    assert "- from the 3 sets' means (the t-test's): se 7.22 points" in decided
    assert "![each set's difference and the running mean](pictures/primary-claim.png)" in decided
    assert (out / "pictures" / "primary-claim.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    recorded = json.loads((out / "results.json").read_text())
    assert sorted(recorded["sets"]) == ["set-00", "set-01", "set-02"] and recorded["design"]["sets"] == 3
    # robust overfitting on the test split, by set: PGD-AT's final epoch is 10, 9, 8 points below its best
    assert "+9.00 [+6.52, +11.48], t(2) = 15.59" in decided


def test_each_set_starts_saying_the_pace_of_the_finished_sets_and_the_hours_left(tmp_path):
    design = load_design(_design_file(tmp_path / "d.toml"))
    out = tmp_path / "out"
    assert progress_line(design, out, 0) == f"== design: set 1 of 3 ({set_folder(out, 0)}) =="
    _set(out, 0, "11110000", "00110000")
    _set(out, 1, "11111100", "00110000")
    # 40 minutes, then 50 (its stages run in two parts)
    seconds = [
        {"teachers": 600, "students": 600, "evaluate": 1200},
        {"teachers": 900, "students": 600, "evaluate": 1500},
    ]
    for index, stages in enumerate(seconds):
        times = {stage: {"seconds": s, "runs": 1 + index} for stage, s in stages.items()}
        (set_folder(out, index) / "stages.json").write_text(json.dumps(times))
    # a set begun but not finished counts as left
    set_folder(out, 2).mkdir()
    assert progress_line(design, out, 2) == (
        f"== design: set 3 of 3 ({set_folder(out, 2)}); 2 finished, 45 min a set so far: about 0.8 h for the 1 left =="
    )


def test_a_resumed_design_goes_on_from_its_first_unfinished_set_leaving_finished_ones_as_they_are(
    tmp_path, monkeypatch
):
    import pipeline.demo

    design = load_design(_design_file(tmp_path / "d.toml"))
    out = tmp_path / "out"
    _set(out, 0, "11110000", "00110000")
    finished = (set_folder(out, 0) / "results.json").read_bytes()
    entered = []
    monkeypatch.setattr(pipeline.demo, "run_demo", lambda plan, folder, *rest: entered.append(folder.name))
    run_design(design, out, 2, "akd design")
    assert entered == ["set-01"] and (set_folder(out, 0) / "results.json").read_bytes() == finished


def test_sets_measured_with_other_packages_are_not_pooled(tmp_path):
    design = load_design(_design_file(tmp_path / "d.toml"))
    out = tmp_path / "out"
    _set(out, 0, "11110000", "00110000")
    _set(out, 1, "11111100", "00110000", software={**SOFTWARE, "pyautoattack": "0.3.0"})
    report = write_design_report(design, out, "akd design")
    assert "Not pooled: package versions differs" in report and '"0.3.0"' in report


def test_image_sampling_error_is_shown_beside_the_sets_error():
    # two sets, the student right on 600 more of 1000 images than the baseline in both
    differences = np.zeros((2, 1000))
    differences[:, :600] = 1.0
    lines = image_sampling_lines(differences)
    # the images alone: sd of a 0/1 variable at 0.6 over sqrt(1000)
    assert "se 1.55 points" in lines[0] and "se 0.00 points" in lines[1]
    low, high = (float(x) for x in lines[2].split("[")[1].split("]")[0].split(","))
    assert low < 60 < high and high - low == pytest.approx(2 * 1.96 * 1.55, abs=1.0)
    assert "with 2 sets a bootstrap understates the set-to-set spread" in lines[2]


def test_a_folder_begun_by_another_design_is_refused(tmp_path):
    out = tmp_path / "out"
    claim_design(load_design(_design_file(tmp_path / "a.toml")), out)
    claim_design(load_design(_design_file(tmp_path / "a.toml")), out)
    with pytest.raises(DemoError, match="begun by another design"):
        claim_design(load_design(_design_file(tmp_path / "b.toml", sets=4)), out)
    # a corrected cost estimate decides nothing: the same design
    claim_design(load_design(_design_file(tmp_path / "c.toml", run_minutes="{ teacher = 9, student = 30 }")), out)


def test_akd_design_reports_from_the_command_line(tmp_path, capsys):
    """The command as a user runs it (its entry point, in this process): --report writes the design's power table and
    its progress; an unknown design is one clear line."""
    from akd.cli import main

    assert main(["design", "--out", str(tmp_path / "out"), "--report"]) == 0
    said = capsys.readouterr().out
    assert "| 1 (chosen) | 18 | 0.800 | 54 | 36 |" in said and "0 of 18 sets finished" in said
    assert main(["design", "--out", str(tmp_path / "out"), "--design", "nope", "--report"]) == 2
    assert "unknown design 'nope'; built-in designs: primary" in capsys.readouterr().err


def test_a_damaged_per_image_record_is_refused_not_counted(tmp_path):
    design = load_design(_design_file(tmp_path / "d.toml"))
    out = tmp_path / "out"
    _set(out, 0, "11110000", "00110000")
    _set(out, 1, "1111x100", "00110000")
    with pytest.raises(ValueError, match="a string of 0s and 1s, got '1111x100'"):
        write_design_report(design, out, "akd design")
