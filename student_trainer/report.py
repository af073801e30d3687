"""The demo's report: RESULTS.md and results.json from the runs' own files, plus the pictures.

Numbers come only from what the runs wrote (eval.json, metrics.jsonl, the service's
stats, stages.json's stage times); nothing is recomputed here, so the report can be rebuilt at any time.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
from datetime import datetime, timezone
from pathlib import Path

import torch

from student_trainer.demo import read_stage_times
from student_trainer.plots import read_metrics, training_curves

COLUMNS = [("clean_acc", "clean acc"), ("pgd_acc", "PGD acc"), ("autoattack_acc", "AutoAttack acc"), ("ece", "ECE"),
           ("train_time_min", "train time (min)"), ("teacher_rows", "teacher rows served"), ("cache_hit_rate", "cache hit rate")]


def run_summary(run_dir: Path) -> dict:
    evaluation = json.loads((run_dir / "eval.json").read_text())
    metrics = read_metrics(run_dir / "metrics.jsonl")
    rows = sum(m.get("teacher_rows", 0) for m in metrics)
    hits = sum(m.get("teacher_cache_hits", 0) for m in metrics)
    best = max((m for m in metrics if m.get("val_robust_acc") is not None), key=lambda m: m["val_robust_acc"])
    return {
        **{k: evaluation.get(k) for k in ("clean_acc", "pgd_acc", "autoattack_acc", "ece", "ece_pgd", "n", "autoattack_n")},
        "train_time_min": sum(m["epoch_time_s"] for m in metrics) / 60,
        "teacher_rows": rows,
        "cache_hit_rate": hits / rows if rows else None,
        "best_epoch": best["epoch"],
        "epochs": len(metrics),
        "val_robust_acc": best["val_robust_acc"],
        "threat_model": evaluation.get("attack"),  # what its robust accuracies were measured under
    }


def threat_model_line(runs: dict[str, dict]) -> str:
    """The header's threat model, read from every run's eval.json.

    Numbers measured under different threat models do not compare, so the report
    never mixes them silently: it names which run used which, loudly. Whether a run
    used the standard attack or the same one spelled out by hand does not matter.
    """
    from student_trainer.evaluate import describe_threat_model

    groups: dict[str, list[str]] = {}
    for name, run in runs.items():
        entry = {k: v for k, v in (run.get("threat_model") or {}).items() if k != "standard"}
        groups.setdefault(json.dumps(entry, sort_keys=True), []).append(name)
    def described(key: str) -> str:
        entry = json.loads(key)
        return describe_threat_model(entry) if "step_size" in entry else "not recorded (an eval.json from an older akd eval)"
    if len(groups) == 1:
        return f"- threat model (every teacher and student): {described(next(iter(groups)))}"
    parts = "; ".join(f"{', '.join(names)}: {described(key)}" for key, names in groups.items())
    return f"- threat model: **WARNING: the models were NOT evaluated under one threat model; their numbers do not compare**: {parts}"


def mean_spread(values: list[float | None]) -> tuple[float, float] | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _cell(key: str, stat: tuple[float, float] | None, seeds: int) -> str:
    if stat is None:
        return "n/a"
    mean, spread = stat
    if key == "teacher_rows":
        return f"{mean:,.0f}"
    digits = 2 if key == "train_time_min" else 4
    return f"{mean:.{digits}f} ± {spread:.{digits}f}" if seeds > 1 else f"{mean:.{digits}f}"


def student_table(students: dict[str, list[dict]], seeds: int) -> str:
    lines = ["| method | " + " | ".join(title for _, title in COLUMNS) + " |", "| --- |" + " ---: |" * len(COLUMNS)]
    for name, runs in students.items():
        cells = [_cell(key, mean_spread([r[key] for r in runs]), seeds) for key, _ in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def teacher_table(teachers: dict[str, dict]) -> str:
    lines = ["| teacher | early-stopped epoch | clean acc | PGD acc | AutoAttack acc | ECE |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, t in teachers.items():
        aa = "n/a" if t["autoattack_acc"] is None else f"{t['autoattack_acc']:.4f}"
        lines.append(f"| {name} | {t['best_epoch']}/{t['epochs']} | {t['clean_acc']:.4f} | {t['pgd_acc']:.4f} | {aa} | {t['ece']:.4f} |")
    return "\n".join(lines)


MARGIN_SE = 2  # how many standard errors of the mean paired difference make a verdict
VERDICT_RULE = (f"Verdicts use the per-seed paired differences d (AKD minus PGD-AT, same seed): with mean d̄ and standard error "
                f"se = sd/√n, a claim holds when d̄ is more than {MARGIN_SE}·se in the expected direction, does not hold when it is "
                f"more than {MARGIN_SE}·se the other way, and is inconclusive in between or with one seed; \"not lower\" (clean "
                f"accuracy) is a no-clear-drop claim, so it holds unless d̄ < -{MARGIN_SE}·se.")


def paired_mean_se(diffs: list[float]) -> tuple[float, float]:
    """Mean paired difference and its standard error (needs two or more seeds)."""
    return statistics.fmean(diffs), statistics.stdev(diffs) / len(diffs) ** 0.5


def verdict(diffs: list[float], expected: str) -> str:
    """Holds / does not hold / inconclusive from paired per-seed differences, not from the sign of the mean.

    The sign alone flips with seed noise (-0.0004 ± 0.0063 read "holds"); comparing the mean paired difference with MARGIN_SE
    of its standard errors only calls a claim when the seeds agree. "not lower" asks for no clear drop, so only a drop beyond
    MARGIN_SE·se refutes it and there is no middle ground, except that one seed has no spread and settles nothing.
    """
    if expected not in ("higher", "lower", "not lower"):
        raise ValueError(f"expected must be higher, lower or not lower, got {expected!r}")
    if len(diffs) < 2:
        return "inconclusive (one seed)" if diffs else "inconclusive (no paired seeds)"
    mean, se = paired_mean_se(diffs)
    margin = MARGIN_SE * se
    if expected == "not lower":
        return "does not hold" if mean < -margin else "holds"
    toward = mean if expected == "higher" else -mean
    return "holds" if toward > margin else "does not hold" if toward < -margin else "inconclusive"


def claim_lines(demo, students: dict[str, list[dict]]) -> list[str]:
    """The paper's claim, checked on this run's numbers: AKD with the ensemble vs the PGD-AT baseline, paired by seed."""
    baseline = next((s["name"] for s in demo.cfg.students if s.get("method") == "at"), None)
    akd = next((s["name"] for s in demo.cfg.students if s.get("method") == "akd" and s.get("uses") == "ensemble"), None)
    if baseline is None or akd is None:
        return ["The plan has no PGD-AT baseline or no AKD-with-ensemble student: the claim is not checked."]
    lines = [VERDICT_RULE, ""]
    for key, title, better in (("autoattack_acc", "AutoAttack accuracy", "higher"), ("clean_acc", "clean accuracy", "not lower"),
                               ("ece", "ECE", "lower")):
        a, b = mean_spread([r[key] for r in students[akd]]), mean_spread([r[key] for r in students[baseline]])
        if a is None or b is None:
            lines.append(f"- {title}: not measured.")
            continue
        # students[name] lists the runs in the plan's seed order, so zip pairs the same seed
        paired = [(seed, x[key] - y[key]) for seed, x, y in zip(demo.cfg.seeds, students[akd], students[baseline])
                  if x[key] is not None and y[key] is not None]
        diffs = [d for _, d in paired]
        per_seed = ", ".join(f"seed {seed} {d:+.4f}" for seed, d in paired)
        if len(diffs) > 1:
            per_seed += " (mean {:+.4f}, se {:.4f})".format(*paired_mean_se(diffs))
        lines.append(f"- {title} ({better} expected): {akd} {a[0]:.4f} ± {a[1]:.4f} vs {baseline} {b[0]:.4f} ± {b[1]:.4f}: "
                     f"paired differences {per_seed}: **{verdict(diffs, better)}**")
    return lines


def machine() -> str:
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU only"
    return f"{platform.machine()}, {os.cpu_count()} cores, {device}, torch {torch.__version__}, Python {platform.python_version()}"


def time_line(stage_times: dict[str, dict]) -> str:
    """Per-stage minutes and their total, from stages.json (see demo.add_stage_time): whichever invocations ran them."""
    if not stage_times:
        return "- time: not recorded (no stage has run in this folder since time recording began)"
    parts = [f"{stage} {t['seconds'] / 60:.1f} min" + (f" ({t['runs']} invocations)" if t["runs"] > 1 else "") for stage, t in stage_times.items()]
    total = sum(t["seconds"] for t in stage_times.values())
    return f"- time: {', '.join(parts)}; total {total / 60:.1f} min (wall time per stage, summed over the invocations on this folder)"


def service_line(service: dict) -> str:
    if not service.get("rows"):
        return "No rows served yet: the students stage has not run against the teacher service for this folder."
    hits, misses = service.get("hits", 0), service.get("misses", 0)
    return (f"{service['rows']:,.0f} rows served to the students, largest batch {service.get('largest_batch', 0):.0f} rows"
            + (f", member cache hit rate {hits / (hits + misses):.1%}" if hits + misses else "") + ".")


def write_report(demo) -> str:
    layout, cfg = demo.layout, demo.cfg
    students = {s["name"]: [run_summary(layout.student(s["name"], seed)) for seed in cfg.seeds] for s in cfg.students}
    teachers = {t["name"]: run_summary(layout.teacher(t["name"])) for t in cfg.teachers}
    service = json.loads(layout.service_stats.read_text()) if layout.service_stats.exists() else {}
    stage_times = read_stage_times(layout)
    pictures = layout.root / "pictures"
    pictures.mkdir(exist_ok=True)
    first_seed = cfg.seeds[0]
    for s in cfg.students:
        shutil.copyfile(layout.student(s["name"], first_seed) / "eval.reliability.png", pictures / f"{s['name']}.reliability.png")
    training_curves([layout.student(s["name"], first_seed) / "metrics.jsonl" for s in cfg.students],
                    pictures / "students-curves.png", labels=[s["name"] for s in cfg.students])
    training_curves([layout.teacher(t["name"]) / "metrics.jsonl" for t in cfg.teachers],
                    pictures / "teachers-curves.png", labels=[t["name"] for t in cfg.teachers])
    dynamics = _dynamics_table(layout, cfg, first_seed)
    aa_n = next(iter(teachers.values())).get("autoattack_n")
    n = next(iter(teachers.values())).get("n")
    text = "\n".join([
        "# akd demo: results",
        "",
        f"- command: `{demo.command}`",
        f"- machine: {machine()}",
        f"- finished: {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}",
        time_line(stage_times),
        f"- data: {cfg.common.get('dataset', 'mnist5k')} test split, {n} images for clean/PGD/ECE, the first {aa_n} for AutoAttack; "
        f"students: mean ± standard deviation over seeds {cfg.seeds}",
        threat_model_line({**teachers, **{f"{name}-s{seed}": run for name, runs in students.items() for seed, run in zip(cfg.seeds, runs)}}),
        "",
        "## Students",
        "",
        student_table(students, len(cfg.seeds)),
        "",
        "## The claim (AKD with the early-stopped ensemble vs PGD-AT)",
        "",
        *claim_lines(demo, students),
        "",
        "## Teachers",
        "",
        teacher_table(teachers),
        "",
        "## The teacher service",
        "",
        service_line(service),
        "",
        "## Training dynamics (first seed, adversarial correctness on the training set)",
        "",
        dynamics,
        "## Pictures",
        "",
        "![students](pictures/students-curves.png)",
        "![teachers](pictures/teachers-curves.png)",
        *[f"![{s['name']}](pictures/{s['name']}.reliability.png)" for s in cfg.students],
        "",
    ])
    (layout.root / "RESULTS.md").write_text(text)
    raw = {"command": demo.command, "machine": machine(), "students": students, "teachers": teachers, "service": service,
           "seeds": cfg.seeds, "stages": stage_times, "elapsed_s": sum(t["seconds"] for t in stage_times.values()) if stage_times else None}
    (layout.root / "results.json").write_text(json.dumps(raw, indent=2))
    return text


def _dynamics_table(layout, cfg, seed: int) -> str:
    from student_trainer.dynamics import CorrectnessLog, compare_runs, summary_table

    logs = {}
    for s in cfg.students:
        path = layout.student(s["name"], seed) / "dynamics.npz"
        if path.exists():
            logs[s["name"]] = CorrectnessLog.load(path)
    return summary_table(compare_runs(logs, "adv")) if len(logs) > 1 else "Not tracked.\n"
