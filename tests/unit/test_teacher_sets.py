"""scripts/teacher_sets.py: the verdict over teacher sets is taken on each set's mean paired difference."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import HANG_S, REPO


def _run(pgd: float, aa: float) -> dict:
    final = {"clean_acc": 0.95, "pgd_acc": pgd, "autoattack_acc": aa, "ece": 0.03, "ece_pgd": 0.2}
    return {"final": final, "overfitting": {"gap": 0.02}}


def _demo_folder(path, akd_gains: list[float]) -> None:
    teacher = {"best_epoch": 25, "epochs": 30, "best": {"pgd_acc": 0.71}}
    students = {
        "pgd-at": [_run(0.70, 0.60) for _ in akd_gains],
        "akd-ensemble": [_run(0.70 + g, 0.60 + g) for g in akd_gains],
    }
    path.mkdir()
    (path / "results.json").write_text(
        json.dumps({"seeds": list(range(len(akd_gains))), "teachers": {"at": teacher}, "students": students})
    )


def teacher_sets(*args) -> subprocess.CompletedProcess:
    script = REPO / "scripts" / "teacher_sets.py"
    return subprocess.run(
        [sys.executable, str(script), *map(str, args)], capture_output=True, text=True, cwd=REPO, timeout=HANG_S
    )


def test_gains_that_agree_within_sets_but_not_across_them_are_inconclusive(tmp_path):
    # +6 points, tight
    _demo_folder(tmp_path / "a", [0.05, 0.06, 0.07])
    # -2 points, tight
    _demo_folder(tmp_path / "b", [-0.03, -0.02, -0.01])
    done = teacher_sets(tmp_path / "a", tmp_path / "b")
    assert done.returncode == 0, done.stderr
    rows = {line.split(" | ")[0].strip("| "): line for line in done.stdout.splitlines() if line.startswith("| ")}
    assert "+6.00 ± 0.58" in rows["a"] and "-2.00 ± 0.58" in rows["b"] and "at 25/30 (PGD 0.710)" in rows["a"]
    assert "+2.00 ± 4.00 inconclusive" in rows["over the 2 sets (mean ± se of the set means)"]

    _demo_folder(tmp_path / "c", [0.03, 0.04, 0.05])
    agreeing = teacher_sets(tmp_path / "a", tmp_path / "c")
    assert "+5.00 ± 1.00 holds" in agreeing.stdout


def test_a_folder_without_the_student_is_named(tmp_path):
    _demo_folder(tmp_path / "a", [0.01, 0.02])
    done = teacher_sets(tmp_path / "a", "--student", "akd-single")
    assert done.returncode != 0 and "akd-single" in done.stderr and "akd-ensemble" in done.stderr
