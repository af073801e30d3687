"""scripts/teacher_sets.py: the teacher set is the replicate (each set's mean paired difference), the verdict over the
sets is the report's t-test rule, and sets measured differently are not pooled, the field that differs named."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

from conftest import HANG_S, REPO

THREAT = {"norm": "linf", "eps": 0.3, "autoattack": {"version": "apgd", "package": "pyautoattack 0.2.0", "n": 500}}
MACHINE = "x86_64, 2 cores, CPU only, torch 2.13.0+cpu, Python 3.11.7"


def _run(pgd: float, aa: float, threat: dict) -> dict:
    final = {"clean_acc": 0.95, "pgd_acc": pgd, "autoattack_acc": aa, "ece": 0.03, "ece_pgd": 0.2}
    return {"final": {**final, "threat_model": threat}, "overfitting": {"gap": 0.02}}


def _demo_folder(
    path, akd_gains: list[float], threat: dict = THREAT, machine: str = MACHINE, baseline: float | None = None
) -> None:
    """A set whose PGD-AT runs are its own (a figure from its name, unless `baseline` gives them)."""
    teacher = {"best_epoch": 25, "epochs": 30, "best": {"pgd_acc": 0.71}}
    base = baseline if baseline is not None else 0.60 + (sum(map(ord, path.name)) % 50) / 1000
    students = {
        "pgd-at": [_run(base + 0.1, base, threat) for _ in akd_gains],
        "akd-ensemble": [_run(base + 0.1 + g, base + g, threat) for g in akd_gains],
    }
    path.mkdir()
    results = {"seeds": list(range(len(akd_gains))), "teachers": {"at": teacher}, "students": students}
    (path / "results.json").write_text(json.dumps({**results, "machine": machine}))


SCRIPT = REPO / "scripts" / "teacher_sets.py"


def teacher_sets(*args) -> subprocess.CompletedProcess:
    """The script as a user runs it."""
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, cwd=REPO, timeout=HANG_S
    )


def rows(folders) -> dict[str, str]:
    """The table's rows by their first cell, from the script's `table` called in this process (a subprocess each
    would import torch again)."""
    spec = importlib.util.spec_from_file_location("teacher_sets", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    lines = script.table(list(folders), "akd-ensemble", "pgd-at").splitlines()
    return {line.split(" | ")[0].strip("| "): line for line in lines if line.startswith("| ")}


POOLED = "over the {} sets (each set's mean a replicate)"


def test_sets_are_the_replicates_of_the_verdict(tmp_path):
    # +6, -2, +4 and +5 points, each tight within its set
    for name, gains in {"a": [5, 6, 7], "b": [-3, -2, -1], "c": [3, 4, 5], "d": [4, 5, 6]}.items():
        _demo_folder(tmp_path / name, [g / 100 for g in gains])
    # within a set: its own test (df 2)
    within = rows((tmp_path / "a", tmp_path / "c", tmp_path / "d"))
    assert (
        "+6.00 [+3.52, +8.48], t(2) = 10.39, p = 0.0091: holds" in within["a"] and "at 25/30 (PGD 0.710)" in within["a"]
    )
    # over the sets: their means 6, 4, 5, df 2
    assert "+5.00 [+2.52, +7.48], t(2) = 8.66, p = 0.013: holds" in within[POOLED.format(3)]
    disagreeing = rows((tmp_path / "a", tmp_path / "b", tmp_path / "c"))
    assert ": inconclusive" in disagreeing[POOLED.format(3)].split(" | ")[2]
    # two sets are two replicates: no verdict, however much they agree
    assert "a verdict needs 3" in rows((tmp_path / "a", tmp_path / "d"))[POOLED.format(2)]


def test_sets_measured_differently_are_not_pooled_and_the_field_is_named(tmp_path):
    _demo_folder(tmp_path / "a", [0.05, 0.06, 0.07])
    _demo_folder(tmp_path / "b", [0.04, 0.05, 0.06])
    other_package = {**THREAT, "autoattack": {**THREAT["autoattack"], "package": "pyautoattack (not installed)"}}
    _demo_folder(tmp_path / "h100", [0.01, 0.02, 0.00], threat=other_package)
    refused = rows((tmp_path / "a", tmp_path / "b", tmp_path / "h100"))[POOLED.format(3)]
    assert "not pooled: threat model differs" in refused and '"pyautoattack (not installed)"' in refused
    _demo_folder(tmp_path / "gpu", [0.04, 0.05, 0.06], machine="x86_64, 16 cores, NVIDIA H100, torch 2.11.0+cu130")
    refused = rows((tmp_path / "a", tmp_path / "b", tmp_path / "gpu"))[POOLED.format(3)]
    assert "not pooled: machine and software differs" in refused and "torch 2.11.0+cu130" in refused


def test_sets_that_share_their_baselines_runs_are_not_pooled(tmp_path):
    """PGD-AT runs copied from one set to another make their set means correlated: not independent replicates."""
    for name, gains in {"a": [5, 6, 7], "b": [3, 4, 5], "c": [4, 5, 6]}.items():
        _demo_folder(tmp_path / name, [g / 100 for g in gains], baseline=0.6 if name != "c" else None)
    refused = rows((tmp_path / "a", tmp_path / "b", tmp_path / "c"))[POOLED.format(3)]
    assert "not pooled: a and b share their baseline's runs" in refused


def test_a_folder_without_the_student_is_named(tmp_path):
    _demo_folder(tmp_path / "a", [0.01, 0.02])
    done = teacher_sets(tmp_path / "a", "--student", "akd-single")
    assert done.returncode != 0 and "akd-single" in done.stderr and "akd-ensemble" in done.stderr
