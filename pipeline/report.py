"""The demo's report: RESULTS.md and results.json from the runs' own files, plus the pictures.

Numbers come only from what the runs wrote (eval.json, metrics.jsonl, the service's stats, stages.json's stage
times); nothing is recomputed here, so the report can be rebuilt at any time.
"""

from __future__ import annotations

import json
import shutil
import statistics
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from pipeline import DemoError
from pipeline.layout import Layout, read_stage_times
from pipeline.machine import machine, machine_line, software
from pipeline.plan import ENSEMBLE, Plan
from pipeline.verdicts import RULE, described, family_verdicts, paired_test
from student_trainer.markdown import markdown_table
from student_trainer.plots import read_metrics, robust_overfitting_curves, training_curves

COLUMNS = [
    ("clean_acc", "clean acc"),
    ("pgd_acc", "PGD acc"),
    ("autoattack_acc", "AutoAttack acc"),
    ("ece", "ECE"),
    ("ece_pgd", "ECE on PGD"),
]
RUN_COLUMNS = [
    ("train_time_min", "train time (min)"),
    ("teacher_rows", "teacher rows served"),
    ("cache_hit_rate", "cache hit rate"),
]
EVAL_KEYS = ("clean_acc", "pgd_acc", "autoattack_acc", "ece", "ece_pgd", "n", "autoattack_n", "correct")
# epochs averaged at each end of the best-vs-final gap
OVERFITTING_WINDOW = 5
# the gap (PGD-AT's, mean over seeds) from which a regime counts as robust overfitting
OVERFITTING_POINTS = 0.03


@dataclass(frozen=True)
class ReportInputs:
    """All the report reads besides the runs' files: the plan, where its runs live, and the command it was run with
    (the demo builds it; the report depends on nothing else of the demo)."""

    plan: Plan
    layout: Layout
    command: str


def overfitting_gap(values: list[float], window: int = OVERFITTING_WINDOW) -> dict:
    """Best-vs-final validation robust accuracy, each averaged over `window` epochs so one lucky epoch does not count:
    the best window anywhere in training against the last one. Robust overfitting is a positive gap."""
    if len(values) < window:
        window = len(values)
    means = [statistics.fmean(values[i : i + window]) for i in range(len(values) - window + 1)]
    top = max(range(len(means)), key=means.__getitem__)
    return {
        "best": means[top],
        "best_epochs": [top + 1, top + window],
        "final": means[-1],
        "gap": means[top] - means[-1],
    }


def _evaluation(path: Path) -> dict | None:
    if not path.exists():
        return None
    evaluation = json.loads(path.read_text())
    return {**{k: evaluation.get(k) for k in EVAL_KEYS}, "threat_model": evaluation.get("attack")}


def run_summary(run_dir: Path) -> dict:
    """One run as the report needs it: its best-validation and final evaluations, its curve, its gap, its cost."""
    metrics = read_metrics(run_dir / "metrics.jsonl")
    rows = sum(m.get("teacher_rows", 0) for m in metrics)
    hits = sum(m.get("teacher_cache_hits", 0) for m in metrics)
    validated = [m for m in metrics if m.get("val_robust_acc") is not None]
    best = max(validated, key=lambda m: m["val_robust_acc"])
    return {
        # the best-validation checkpoint (best.pt)
        "best": _evaluation(run_dir / "eval.json"),
        # the last epoch (last.pt)
        "final": _evaluation(run_dir / "eval-final.json"),
        "train_time_min": sum(m["epoch_time_s"] for m in metrics) / 60,
        "teacher_rows": rows,
        "cache_hit_rate": hits / rows if rows else None,
        "best_epoch": best["epoch"],
        "epochs": len(metrics),
        "val_robust_acc": best["val_robust_acc"],
        "overfitting": overfitting_gap([m["val_robust_acc"] for m in validated]),
    }


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


def _value(run: dict, key: str, which: str) -> float | None:
    """An evaluation figure of the `which` ("best"/"final") checkpoint, or one of the run's own figures."""
    return (run[which] or {}).get(key) if key in EVAL_KEYS else run[key]


def student_table(students: dict[str, list[dict]], seeds: int, which: str) -> str:
    """Every student's evaluation at `which` epoch ("final" or "best"), mean ± std over seeds; its cost with the final
    one."""
    # AutoAttack ran on a student's final epoch only (demo.AUTOATTACKED); the run's cost goes with the final table
    columns = COLUMNS + RUN_COLUMNS if which == "final" else [c for c in COLUMNS if c[0] != "autoattack_acc"]
    rows = []
    for name, runs in students.items():
        cells = [_cell(key, mean_spread([_value(r, key, which) for r in runs]), seeds) for key, _ in columns]
        if which == "best":
            cells.insert(0, ", ".join(str(r["best_epoch"]) for r in runs))
        rows.append([name, *cells])
    header = ["student", *(["best epoch per seed"] if which == "best" else []), *(title for _, title in columns)]
    return markdown_table(header, rows)


def overfitting_table(students: dict[str, list[dict]]) -> str:
    rows = []
    for name, runs in students.items():
        gaps = [r["overfitting"] for r in runs]
        best, final, gap = (mean_spread([g[k] for g in gaps]) for k in ("best", "final", "gap"))
        windows = ", ".join(f"{g['best_epochs'][0]}-{g['best_epochs'][1]}" for g in gaps)
        rows.append(
            [
                name,
                f"{best[0]:.4f} ± {best[1]:.4f}",
                windows,
                f"{final[0]:.4f} ± {final[1]:.4f}",
                f"{100 * gap[0]:+.2f} ± {100 * gap[1]:.2f}",
            ]
        )
    return markdown_table(
        [
            "student",
            f"best {OVERFITTING_WINDOW}-epoch val PGD acc",
            "its epochs per seed",
            f"last {OVERFITTING_WINDOW} epochs",
            "gap (points)",
        ],
        rows,
    )


def threat_model_line(runs: dict[str, dict]) -> str:
    """The header's threat model, read from every evaluation's eval.json: PGD's from all, AutoAttack's from those that
    ran it.

    Numbers measured under different threat models do not compare, so the report never mixes them silently: it names
    which run used which, loudly. Whether a run used the standard attack or the same one spelled out does not matter.
    """
    from student_trainer.evaluate import describe_threat_model

    pgd: dict[str, list[str]] = {}
    autoattack: dict[str, list[str]] = {}
    for name, run in runs.items():
        for which in ("best", "final"):
            if run.get(which) is None:
                continue
            label = name if which == "best" else f"{name} (final epoch)"
            entry = {
                k: v for k, v in (run[which].get("threat_model") or {}).items() if k not in ("standard", "autoattack")
            }
            pgd.setdefault(json.dumps(entry, sort_keys=True), []).append(label)
            if (run[which].get("threat_model") or {}).get("autoattack"):
                autoattack.setdefault(json.dumps(run[which]["threat_model"]["autoattack"], sort_keys=True), []).append(
                    label
                )

    def described(key: str, aa: str | None = None) -> str:
        entry = {**json.loads(key), "autoattack": json.loads(aa) if aa else None}
        return (
            describe_threat_model(entry)
            if "step_size" in entry
            else "not recorded (an eval.json from an older akd eval)"
        )

    if len(pgd) == 1 and len(autoattack) <= 1:
        return f"- threat model (every teacher and student): {described(next(iter(pgd)), next(iter(autoattack), None))}"
    parts = [f"{', '.join(names)}: {described(key)}" for key, names in pgd.items()]
    parts += [
        f"{', '.join(names)}: AutoAttack {json.loads(key)['version']} on {json.loads(key)['n']} images"
        for key, names in autoattack.items()
    ]
    return (
        "- threat model: **WARNING: the models were NOT evaluated under one threat model; their numbers do not "
        f"compare**: {'; '.join(parts)}"
    )


def teacher_table(teachers: dict[str, dict]) -> str:
    """Each teacher as served (its early-stopped checkpoint), and its last epoch, served as `<name>-last`."""
    rows = []
    for name, t in teachers.items():
        for which, label in (
            ("best", f"{t['best_epoch']}/{t['epochs']} (early-stopped)"),
            ("final", f"{t['epochs']}/{t['epochs']} (last)"),
        ):
            if t[which] is not None:
                rows.append([name, label, *(_cell(key, mean_spread([t[which].get(key)]), 1) for key, _ in COLUMNS)])
    return markdown_table(["teacher", "epoch", *(title for _, title in COLUMNS)], rows)


# The claims, each on the final epoch (the paper's point): (what is compared, its title, the direction the paper
# expects).
CLAIMS = (
    ("autoattack_acc", "robust accuracy (AutoAttack)", "higher"),
    ("pgd_acc", "robust accuracy (PGD)", "higher"),
    ("clean_acc", "clean accuracy", "not lower"),
    ("ece", "calibration (ECE, clean)", "lower"),
    ("ece_pgd", "calibration (ECE on PGD inputs)", "lower"),
    ("gap", "robust overfitting (best-vs-final validation gap)", "lower"),
)


def claim_value(run: dict, key: str) -> float | None:
    """A claim's figure for one run: its final-epoch evaluation, or its robust-overfitting gap."""
    return run["overfitting"]["gap"] if key == "gap" else _value(run, key, "final")


def paired(seeds: list[int], student: list[dict], baseline: list[dict], key: str) -> list[tuple[int, float]]:
    """(seed, student minus baseline) for the seeds both measured; the runs are listed in the plan's seed order."""
    pairs = [(seed, claim_value(a, key), claim_value(b, key)) for seed, a, b in zip(seeds, student, baseline)]
    return [(seed, a - b) for seed, a, b in pairs if a is not None and b is not None]


def baseline_and_akd(plan: Plan) -> tuple[str | None, str | None]:
    """The plan's PGD-AT student and its AKD-from-the-early-stopped-ensemble student, the claims' two sides."""
    methods = {s.name: plan.train_config(s).method for s in plan.students}
    baseline = next((s.name for s in plan.students if methods[s.name] == "at"), None)
    akd = next((s.name for s in plan.students if methods[s.name] == "akd" and s.uses == ENSEMBLE), None)
    return baseline, akd


def described_method(plan: Plan, name: str) -> str:
    """ "akd (ensemble, alpha 0.5, tau 1)": a student's method and teacher as it trained, [common] included."""
    student = next(s for s in plan.students if s.name == name)
    run = plan.train_config(student)
    return (
        f"{run.method} ({student.uses}, alpha {run.alpha:g}, tau {run.temperature:g})" if student.uses else run.method
    )


def claim_family(plan: Plan, students: dict[str, list[dict]], baseline: str, key: str, expected: str) -> dict:
    """One claim's family, every student against `baseline` paired by seed: each student's paired differences, test,
    Holm-adjusted p and verdict (pipeline/verdicts.py)."""
    names = [name for name in students if name != baseline]
    pairs = {name: paired(plan.seeds, students[name], students[baseline], key) for name in names}
    tests = [paired_test([d for _, d in pairs[name]], expected) for name in names]
    judged = family_verdicts(tests)
    return {
        name: {"pairs": pairs[name], "test": test, "p": p, "verdict": said}
        for name, test, (p, said) in zip(names, tests, judged, strict=True)
    }


def claim_lines(plan: Plan, students: dict[str, list[dict]]) -> list[str]:
    """The paper's claims, checked on this run's numbers: AKD with the early-stopped ensemble vs PGD-AT, paired by
    seed, each verdict corrected over its claim's family (every student against PGD-AT)."""
    baseline, akd = baseline_and_akd(plan)
    if baseline is None or akd is None:
        return ["The plan has no PGD-AT baseline or no AKD-with-ensemble student: the claims are not checked."]
    lines = [RULE, ""]
    for key, title, better in CLAIMS:
        a, b = (mean_spread([claim_value(r, key) for r in students[name]]) for name in (akd, baseline))
        if a is None or b is None:
            lines.append(f"- {title}: not measured.")
            continue
        mine = claim_family(plan, students, baseline, key, better)[akd]
        per_seed = ", ".join(f"seed {seed} {100 * d:+.2f}" for seed, d in mine["pairs"])
        lines.append(
            f"- {title} ({better} expected): {akd} {a[0]:.4f} ± {a[1]:.4f} vs {baseline} {b[0]:.4f} ± {b[1]:.4f}: "
            f"paired differences {per_seed} (points): {described(mine['test'], mine['p'])}: **{mine['verdict']}**"
        )
    return lines


def guideline_table(plan: Plan, students: dict[str, list[dict]]) -> str:
    """Every student against PGD-AT on each claim: the mean paired difference and its 95% interval in points, the
    family-adjusted p, and the verdict."""
    baseline, _ = baseline_and_akd(plan)
    if baseline is None:
        return "The plan has no PGD-AT baseline."
    families = {key: claim_family(plan, students, baseline, key, better) for key, _, better in CLAIMS}
    rows = []
    for name in students:
        if name == baseline:
            continue
        cells = [_guideline_cell(families[key][name]) for key, *_ in CLAIMS]
        rows.append([name, described_method(plan, name), *cells])
    return markdown_table(["student", "method (teacher, alpha, tau)", *(f"Δ {title}" for _, title, _ in CLAIMS)], rows)


def _guideline_cell(judged: dict) -> str:
    """ "+6.60 [-7.60, +20.80] p 1.00 inconclusive": mean, 95% interval, Holm-adjusted p, verdict."""
    test = judged["test"]
    if test is None:
        return "n/a"
    if test.n == 1:
        return f"{100 * test.mean:+.2f} (one seed)"
    low, high = (100 * x for x in test.ci)
    return f"{100 * test.mean:+.2f} [{low:+.2f}, {high:+.2f}] p {judged['p']:.2g} {judged['verdict'].split(' (')[0]}"


def time_line(stage_times: dict[str, dict]) -> str:
    """Per-stage minutes and their total, from stages.json (see layout.add_stage_time): whichever invocations ran
    them."""
    if not stage_times:
        return "- time: not recorded (no stage has run in this folder since time recording began)"
    parts = [
        f"{stage} {t['seconds'] / 60:.1f} min" + (f" ({t['runs']} invocations)" if t["runs"] > 1 else "")
        for stage, t in stage_times.items()
    ]
    total = sum(t["seconds"] for t in stage_times.values())
    return (
        f"- time: {', '.join(parts)}; total {total / 60:.1f} min (wall time per stage, summed over the invocations "
        "on this folder)"
    )


def service_line(service: dict) -> str:
    if not service.get("rows"):
        return "No rows served yet: the students stage has not run against the teacher service for this folder."
    hits, misses = service.get("hits", 0), service.get("misses", 0)
    return (
        f"{service['rows']:,.0f} rows served to the students, largest batch {service.get('largest_batch', 0):.0f} rows"
        + (f", member cache hit rate {hits / (hits + misses):.1%}" if hits + misses else "")
        + "."
    )


def write_report(inputs: ReportInputs) -> str:
    """RESULTS.md and results.json from the runs' files; the robust-overfitting picture leads."""
    layout, plan = inputs.layout, inputs.plan
    finished = [s for s in plan.students if all(evaluated(layout.student(s.name, seed)) for seed in plan.seeds)]
    if not finished or not all(evaluated(layout.teacher(name)) for name in plan.teacher_names):
        raise DemoError(
            "nothing to report yet: the teachers and at least one student (every seed) must be trained and evaluated"
        )
    unfinished = [s.name for s in plan.students if s not in finished]
    # a plan run in parts reports what is done and names the rest
    plan = plan.model_copy(update={"students": finished})
    students = {s.name: [run_summary(layout.student(s.name, seed)) for seed in plan.seeds] for s in plan.students}
    teachers = {name: run_summary(layout.teacher(name)) for name in plan.teacher_names}
    service = json.loads(layout.service_stats.read_text()) if layout.service_stats.exists() else {}
    stage_times = read_stage_times(layout)
    _pictures(layout, plan, teachers)
    every_run = {
        **teachers,
        **{f"{name}-s{seed}": run for name, runs in students.items() for seed, run in zip(plan.seeds, runs)},
    }
    header = [*_header(inputs, stage_times, every_run), threat_model_line(every_run)]
    if unfinished:
        header.append(
            "- **not finished yet** (not trained or not evaluated for every seed; run the same command again to go "
            "on): "
            f"{', '.join(unfinished)}"
        )
    text = "\n".join(["# akd demo: results", "", *header, "", *_sections(layout, plan, students, teachers, service)])
    (layout.root / "RESULTS.md").write_text(text)
    raw = {
        "command": inputs.command,
        "machine": machine_line(machine()),
        "software": software(),
        "dataset": plan.dataset,
        "students": students,
        "teachers": teachers,
        "service": service,
        "seeds": plan.seeds,
        "stages": stage_times,
        "elapsed_s": sum(t["seconds"] for t in stage_times.values()) if stage_times else None,
    }
    (layout.root / "results.json").write_text(json.dumps(raw, indent=2))
    return text


def _sections(
    layout: Layout, plan: Plan, students: dict[str, list[dict]], teachers: dict[str, dict], service: dict
) -> list[str]:
    """The report's body after its header, the robust-overfitting picture first."""
    seeds = len(plan.seeds)
    return [
        *_overfitting_section(plan, students, teachers),
        "## Students at the final epoch (the paper's point)",
        "",
        student_table(students, seeds, "final"),
        "",
        "## Students at their best-validation epoch (early stopping)",
        "",
        student_table(students, seeds, "best"),
        "",
        "## The claims (AKD with the early-stopped ensemble vs PGD-AT, final epoch)",
        "",
        *claim_lines(plan, students),
        "",
        "## The guidelines one at a time (each student vs PGD-AT, final epoch; Δ in points, mean ± se of the paired "
        "differences)",
        "",
        guideline_table(plan, students),
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
        _dynamics_table(layout, plan, plan.seeds[0]),
        "## More pictures",
        "",
        "![students](pictures/students-curves.png)",
        "![teachers](pictures/teachers-curves.png)",
        *[f"![{s.name}](pictures/{s.name}.reliability.png)" for s in plan.students],
        "",
    ]


def evaluated(run_dir: Path) -> bool:
    """Whether a run has everything the report reads: its metrics and both evaluations."""
    return all((run_dir / name).exists() for name in ("metrics.jsonl", "eval.json", "eval-final.json"))


def test_split_overfitting_table(students: dict[str, list[dict]], baseline: str | None, unit: str = "seed") -> str:
    """Robust overfitting where it shows, on the test split's PGD accuracy: each student's best-validation epoch minus
    its final epoch (the drop training to the end costs it), and each student's final epoch against the baseline's
    early-stopped (best-validation) epoch as well as the baseline's final one, paired by `unit` (the runs are listed
    in the same order), each with its 95% interval and two-sided p (pipeline/verdicts.py, no family correction: these
    describe, they are not the paper's claims)."""

    def pgd(run: dict, which: str) -> float | None:
        return (run.get(which) or {}).get("pgd_acc")

    def cell(diffs: list[float]) -> str:
        test = paired_test(diffs, "higher")
        return "n/a" if test is None else described(test, None)

    rows = []
    for name, runs in students.items():
        drop = [
            pgd(r, "best") - pgd(r, "final") for r in runs if pgd(r, "best") is not None and pgd(r, "final") is not None
        ]
        row = [name, cell(drop)]
        if baseline is not None and name != baseline:
            for which in ("best", "final"):
                pairs = [(pgd(a, "final"), pgd(b, which)) for a, b in zip(runs, students[baseline])]
                row.append(cell([a - b for a, b in pairs if a is not None and b is not None]))
        else:
            row += ["", ""]
        rows.append(row)
    return (
        markdown_table(
            [
                "student",
                "best-validation epoch minus final epoch (test PGD, points)",
                f"final minus {baseline} early-stopped",
                f"final minus {baseline} final",
            ],
            rows,
        )
        + f"\n\nPaired by {unit}: mean [95% CI], t(df), two-sided p of a zero difference."
    )


def _header(inputs: ReportInputs, stage_times: dict, runs: dict[str, dict]) -> list[str]:
    return [
        f"- command: `{inputs.command}`",
        f"- machine: {machine_line(machine())}",
        f"- finished: {datetime.now(UTC):%Y-%m-%d %H:%M UTC}",
        time_line(stage_times),
        data_line(inputs.plan.dataset, inputs.plan.seeds, runs),
    ]


def data_line(dataset: str, seeds: list[int], runs: dict[str, dict]) -> str:
    """The header's images: those every evaluation ran on, and AutoAttack's count from the evaluations that ran it
    (a design's teachers run none)."""
    evaluations = [run[which] for run in runs.values() for which in ("best", "final") if run.get(which)]
    attacked = sorted({e["autoattack_n"] for e in evaluations if e.get("autoattack_n")})
    autoattack = f"the first {' or '.join(map(str, attacked))} for AutoAttack" if attacked else "no AutoAttack"
    images = evaluations[0].get("n") if evaluations else None
    return (
        f"- data: {dataset} test split, {images} images for clean/PGD/ECE, {autoattack}; students: mean ± standard "
        f"deviation over seeds {seeds}"
    )


def _overfitting_section(plan: Plan, students: dict[str, list[dict]], teachers: dict[str, dict]) -> list[str]:
    baseline, _ = baseline_and_akd(plan)
    regime = ""
    if baseline is not None:
        gap = statistics.fmean(r["overfitting"]["gap"] for r in students[baseline])
        overfits = "robust-overfits" if gap >= OVERFITTING_POINTS else "does **not** robust-overfit"
        regime = (
            f"PGD-AT's best-vs-final validation gap is {100 * gap:.2f} points (mean over seeds): this regime "
            f"{overfits} "
            f"(the threshold is {100 * OVERFITTING_POINTS:.0f} points, {OVERFITTING_WINDOW}-epoch averages at each "
            "end)."
        )
    stops = ", ".join(f"{name} at epoch {t['best_epoch']}/{t['epochs']}" for name, t in teachers.items())
    return [
        "## Robust overfitting",
        "",
        "![validation PGD accuracy per epoch](pictures/robust-overfitting.png)",
        "",
        f"Teachers early-stopped (best validation PGD accuracy): {stops}. {regime}",
        "",
        overfitting_table(students),
        "",
        "On the test split (PGD accuracy of the best-validation and the final checkpoints), where the best-of-many-"
        "windows bias of the validation gap does not enter:",
        "",
        test_split_overfitting_table(students, baseline),
        "",
    ]


def _pictures(layout: Layout, plan: Plan, teachers: dict[str, dict]) -> None:
    pictures = layout.root / "pictures"
    pictures.mkdir(exist_ok=True)
    first_seed = plan.seeds[0]
    names = [s.name for s in plan.students]
    for name in names:
        shutil.copyfile(
            layout.student(name, first_seed) / "eval-final.reliability.png", pictures / f"{name}.reliability.png"
        )
    robust_overfitting_curves(
        {name: [read_metrics(layout.student(name, seed) / "metrics.jsonl") for seed in plan.seeds] for name in names},
        {name: t["best_epoch"] for name, t in teachers.items()},
        pictures / "robust-overfitting.png",
    )
    training_curves(
        [layout.student(name, first_seed) / "metrics.jsonl" for name in names],
        pictures / "students-curves.png",
        labels=names,
    )
    training_curves(
        [layout.teacher(name) / "metrics.jsonl" for name in plan.teacher_names],
        pictures / "teachers-curves.png",
        labels=plan.teacher_names,
    )


def _dynamics_table(layout: Layout, plan: Plan, seed: int) -> str:
    from student_trainer.dynamics import CorrectnessLog, compare_runs, summary_table

    logs = {}
    for student in plan.students:
        path = layout.student(student.name, seed) / "dynamics.npz"
        if path.exists():
            logs[student.name] = CorrectnessLog.load(path)
    return summary_table(compare_runs(logs, "adv")) if len(logs) > 1 else "Not tracked.\n"
