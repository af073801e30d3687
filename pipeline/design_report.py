"""A design's runs and its report: the sets run in order as `akd demo` folders, then the primary claim tested over the
finished sets' means (pipeline/verdicts.py's paired t-test), decided only when every planned set has finished (the
design's stopping rule), with the power reached, the image-sampling error beside the set-to-set error, and robust
overfitting on the test split.

The folder records the design that started it (MARKER, its sha256): a changed design is a new claim, and is refused
in a folder another one began.
"""

from __future__ import annotations

import hashlib
import json
import statistics
from pathlib import Path

import numpy as np

from pipeline import DemoError
from pipeline.design import CLAIM_KEYS, Design, set_folder
from pipeline.layout import Layout, PlanRecord, read_stage_times
from pipeline.replicates import measured_alike, set_measurement
from pipeline.report import CLAIMS, paired, test_split_overfitting_table
from pipeline.verdicts import RULE, described, paired_test, verdict
from student_trainer.markdown import markdown_table

MARKER = ".akd-design"
STAGES = ["teachers", "students", "evaluate", "report"]
# the per-image correctness an accuracy metric is counted from (student_trainer/evaluate.py's `correct`)
PER_IMAGE = {"clean_acc": "clean", "pgd_acc": "pgd", "autoattack_acc": "autoattack"}
BOOTSTRAP_DRAWS = 4000
# below this many sets, resampling them cannot show their spread (a percentile bootstrap of few clusters is too narrow)
FEW_SETS = 10


# What decides nothing: where the design was read from, and the cost estimate behind the power table's last column.
NOT_THE_DESIGN = {"source", "run_minutes"}


def fingerprint(design: Design) -> str:
    """The sha256 of what the design decides: its claim, variances, size, seeds, evaluation and stopping rule."""
    asked = design.model_dump(exclude=NOT_THE_DESIGN)
    return hashlib.sha256(json.dumps(asked, sort_keys=True).encode()).hexdigest()


def claim_design(design: Design, out: Path) -> None:
    """Record `design` as `out`'s, or refuse when another design began it."""
    out.mkdir(parents=True, exist_ok=True)
    marker, mine = out / MARKER, fingerprint(design)
    if marker.exists():
        recorded = json.loads(marker.read_text()).get("sha256")
        if recorded != mine:
            raise DemoError(
                f"{out} was begun by another design (sha256 {str(recorded)[:12]}, this one {mine[:12]}): a design "
                "does not change once its first set has started; give a new --out for a new design"
            )
        return
    marker.write_text(json.dumps({"design": design.source, "sha256": mine}))


def run_design(design: Design, out: Path, sets_now: int | None, command: str) -> str:
    """Sets 0 .. sets_now - 1 (all the design's by default), each resumed where it stopped, then the report. A finished
    set (finished_sets) is not entered again: its records stay as they were when it finished."""
    from pipeline.demo import run_demo
    from pipeline.jobs import say

    claim_design(design, out)
    last = design.sets if sets_now is None else min(design.sets, sets_now)
    done = finished_sets(design, out)
    for index in range(last):
        if set_folder(out, index).name in done:
            continue
        plan = design.set_plan(index)
        say(progress_line(design, out, index))
        record = PlanRecord(f"{design.source}, set {index}", plan.fingerprint())
        run_demo(plan, set_folder(out, index), STAGES, False, None, None, command, record)
    return write_design_report(design, out, command)


def progress_line(design: Design, out: Path, index: int) -> str:
    """What the design's run says as set `index` starts: the sets finished, the minutes a finished set took (its
    stages.json, wall time summed over its parts) and the hours the others would take at that pace."""
    line = f"== design: set {index + 1} of {design.sets} ({set_folder(out, index)})"
    done = finished_sets(design, out)
    minutes = [
        sum(stage["seconds"] for stage in read_stage_times(Layout(set_folder(out, i))).values()) / 60
        for i in range(design.sets)
        if set_folder(out, i).name in done
    ]
    if minutes:
        pace, left = statistics.fmean(minutes), design.sets - len(done)
        line += (
            f"; {len(done)} finished, {pace:.0f} min a set so far: about {left * pace / 60:.1f} h for the {left} left"
        )
    return line + " =="


def finished_sets(design: Design, out: Path) -> dict[str, dict]:
    """The sets whose results.json holds both sides of the claim, every seed measured, by folder name."""
    found = {}
    for index in range(design.sets):
        file = set_folder(out, index) / "results.json"
        if not file.exists():
            continue
        results = json.loads(file.read_text())
        runs = results.get("students", {})
        sides = [runs.get(design.claim.student, []), runs.get(design.claim.baseline, [])]
        if all(
            len(side) == design.seeds_per_set
            and all((r.get("final") or {}).get(design.claim.metric) is not None for r in side)
            for side in sides
        ):
            found[file.parent.name] = results
    return found


def set_difference(design: Design, results: dict, key: str) -> float | None:
    """A set's replicate: the mean over its seeds of the paired difference on `key`."""
    runs = results["students"]
    diffs = [d for _, d in paired(results["seeds"], runs[design.claim.student], runs[design.claim.baseline], key)]
    return statistics.fmean(diffs) if diffs else None


def per_image_differences(design: Design, sets: dict[str, dict]) -> np.ndarray | None:
    """(sets, images): each set's per-image correctness of the student minus the baseline's, averaged over its seeds;
    None where a run lacks the per-image record or the sets' image counts differ."""
    field = PER_IMAGE.get(design.claim.metric)
    rows = []
    for results in sets.values():
        runs = results["students"]
        seeds = []
        for a, b in zip(runs[design.claim.student], runs[design.claim.baseline], strict=True):
            bits = [((run.get("final") or {}).get("correct") or {}).get(field) for run in (a, b)]
            if field is None or None in bits or len(bits[0]) != len(bits[1]):
                return None
            seeds.append(_digits(bits[0]) - _digits(bits[1]))
        rows.append(np.mean(np.asarray(seeds, dtype=float), axis=0))
    if not rows or len({len(r) for r in rows}) != 1:
        return None
    return np.asarray(rows)


def _digits(bits: str) -> np.ndarray:
    """ "0110" as [0, 1, 1, 0]; anything but 0s and 1s is refused (a damaged record is not counted)."""
    values = np.frombuffer(bits.encode("ascii"), np.uint8).astype(np.int64) - ord("0")
    if values.size and (values.min() < 0 or values.max() > 1):
        raise ValueError(f"per-image correctness must be a string of 0s and 1s, got {bits[:20]!r}...")
    return values


def image_sampling_lines(differences: np.ndarray, seed: int = 0) -> list[str]:
    """The image-sampling error beside the set-to-set error: the standard error from the images alone (the sets share
    them), and a bootstrap over sets and images together (both resampled with replacement, BOOTSTRAP_DRAWS draws,
    percentile interval)."""
    sets, images = differences.shape
    per_image = differences.mean(axis=0)
    image_se = per_image.std(ddof=1) / np.sqrt(images)
    set_means = differences.mean(axis=1)
    set_se = set_means.std(ddof=1) / np.sqrt(sets) if sets > 1 else float("nan")
    rng = np.random.default_rng(seed)
    draws = np.empty(BOOTSTRAP_DRAWS)
    for k in range(BOOTSTRAP_DRAWS):
        chosen_sets = rng.integers(0, sets, sets)
        chosen_images = rng.integers(0, images, images)
        draws[k] = differences[np.ix_(chosen_sets, chosen_images)].mean()
    low, high = np.percentile(draws, [2.5, 97.5])
    between = (
        f"- from the {sets} sets' means (the t-test's): se {100 * set_se:.2f} points"
        if sets > 1
        else "- from the sets' means: none yet (one set)"
    )
    return [
        f"- from the {images} images alone (shared by every set): se {100 * image_se:.2f} points",
        between,
        f"- bootstrap over sets and images together ({BOOTSTRAP_DRAWS} draws, seed {seed}): 95% interval "
        f"[{100 * low:+.2f}, {100 * high:+.2f}] points"
        + (
            f" (with {sets} set{'s' * (sets > 1)} a bootstrap understates the set-to-set spread: the verdict is the "
            "t-test's)"
            if sets < FEW_SETS
            else ""
        ),
    ]


def power_table(design: Design) -> str:
    rows = []
    for option in design.alternatives():
        hours = option.cost(design.run_minutes.teacher, design.run_minutes.student) / 60
        chosen = " (chosen)" if option.seeds == design.seeds_per_set else ""
        rows.append(
            [
                f"{option.seeds}{chosen}",
                str(option.sets),
                f"{option.power:.3f}",
                str(option.teacher_runs),
                str(option.student_runs),
                f"{hours:.0f}",
            ]
        )
    return markdown_table(
        ["seeds per set", "sets for the power", "power", "teacher runs", "student runs", "run-hours (one core)"], rows
    )


def primary_lines(design: Design, sets: dict[str, dict], diffs: list[float], out: Path) -> list[str]:
    """The claim over the sets' differences `diffs` (as fractions, in `sets`' order): decided only at full size."""
    claim = design.claim
    label, _ = CLAIM_KEYS[claim.metric]
    test = paired_test(diffs, "higher")
    done = len(sets)
    lines = [f"{claim.student} minus {claim.baseline}, {label} at the final epoch, one replicate per teacher set:", ""]
    if done == design.sets:
        lines.append(f"**Decided** ({done} of {design.sets} sets): {described(test, None)}: **{verdict(test)}**.")
    else:
        left = ", ".join(set_folder(out, i).name for i in range(design.sets) if set_folder(out, i).name not in sets)
        lines += [
            f"**Not decided**: {done} of {design.sets} sets finished. By the stopping rule no verdict is drawn before "
            "the last set.",
            f"- running estimate (not a verdict): {described(test, None) if test else 'none yet'}",
            f"- power the finished sets have at {100 * claim.effect:+g} points: {design.power_with(done):.2f} "
            f"(planned: {design.planned_power:.2f} with {design.sets})",
            f"- the runs that would decide it: {left} (`akd design --out {out}` resumes)",
        ]
    planned_sd = design.variances.of_set_mean(design.seeds_per_set)
    if done > 1:
        # the power analysis's assumption, checked as the sets come in (it changes nothing: the size is fixed)
        lines.append(
            f"- SD of the set means so far: {100 * statistics.stdev(diffs):.2f} points over {done} sets (the power "
            f"analysis assumed {100 * planned_sd:.2f})"
        )
    return lines


def claim_picture(design: Design, diffs: list[float], out: Path) -> Path:
    """pictures/primary-claim.png: each set's difference on the claim, and the running mean with its 95% interval."""
    from student_trainer.plots import replicate_differences

    diffs = [100 * d for d in diffs]
    running = []
    for n in range(1, len(diffs) + 1):
        test = paired_test(diffs[:n], "higher")
        running.append(None if test is None or test.n < 2 else (test.mean, *test.ci))
    claim = design.claim
    title = f"{claim.student} minus {claim.baseline}, {CLAIM_KEYS[claim.metric][0]}, final epoch, per teacher set"
    return replicate_differences(diffs, running, 100 * claim.effect, title, out / "pictures" / "primary-claim.png")


def set_table(design: Design, sets: dict[str, dict]) -> str:
    rows = []
    for name, results in sets.items():
        stops = ", ".join(f"{t} {r['best_epoch']}/{r['epochs']}" for t, r in results["teachers"].items())
        cells = []
        for key, *_ in CLAIMS:
            d = set_difference(design, results, key)
            cells.append("n/a" if d is None else f"{100 * d:+.2f}")
        rows.append([name, f"{results['seeds']}", stops, *cells])
    return markdown_table(
        ["set", "student seeds", "teachers stopped at", *(f"Δ {title}" for _, title, _ in CLAIMS)], rows
    )


def by_set(design: Design, sets: dict[str, dict]) -> dict[str, list[dict]]:
    """Each student's runs with one entry per set (its seeds' mean test PGD accuracy at the best and final
    checkpoints), for the test-split robust-overfitting table."""

    def mean_pgd(runs: list[dict], which: str) -> float | None:
        values = [(r.get(which) or {}).get("pgd_acc") for r in runs]
        return None if None in values else statistics.fmean(values)

    return {
        name: [
            {which: {"pgd_acc": mean_pgd(results["students"][name], which)} for which in ("best", "final")}
            for results in sets.values()
        ]
        for name in design.students
    }


def write_design_report(design: Design, out: Path, command: str) -> str:
    """RESULTS.md and results.json in `out`, from the finished sets' results.json."""
    sets = finished_sets(design, out)
    claim = design.claim
    measured = {name: set_measurement(results, claim.student, claim.baseline) for name, results in sets.items()}
    refused = measured_alike(measured) if len(sets) > 1 else None
    lines = [
        f"# Design: {claim.student} vs {claim.baseline} over independent teacher sets",
        "",
        f"- command: `{command}`",
        f"- design: {design.source} (plan {design.plan}; students {', '.join(design.students)}; set i's teachers: "
        f"seeds {design.teacher_seed_base} + 10 i + j; {design.seeds_per_set} student seed(s) per set, its own)",
        f"- evaluation: AutoAttack {design.autoattack_version} on {design.autoattack_limit} test images, students' "
        "final epochs; per-image correctness stored",
        f"- {RULE}",
        "",
        "## The design, chosen before the runs",
        "",
        f"Primary claim: {claim.student} minus {claim.baseline} on {CLAIM_KEYS[claim.metric][0]} at the final epoch, "
        f"two-sided, powered for {100 * claim.effect:+g} points at {claim.power:.0%}. Variances: between sets "
        f"{100 * design.variance.between_sets:g} points, within a set (seed) {100 * design.variance.within_set:g} "
        f"points ({design.variance.source}). Power of the paired t-test over the sets' means (noncentral t, "
        f"pipeline/power.py); cost from {design.run_minutes.teacher:g} minutes per teacher run and "
        f"{design.run_minutes.student:g} per student run:",
        "",
        power_table(design),
        "",
        f"Chosen: {design.sets} sets of {design.seeds_per_set} seed(s), power {design.planned_power:.3f}.",
        "",
        f"Stopping rule: {design.stopping_rule}",
        "",
        "## The primary claim",
        "",
    ]
    if refused:
        lines += [f"Not pooled: {refused}.", ""]
    else:
        diffs = [set_difference(design, results, claim.metric) for results in sets.values()]
        lines += [*primary_lines(design, sets, diffs, out), ""]
        if sets:
            claim_picture(design, diffs, out)
            lines += ["![each set's difference and the running mean](pictures/primary-claim.png)", ""]
        differences = per_image_differences(design, sets) if sets else None
        if differences is not None:
            lines += ["Image-sampling error beside the set-to-set error:", "", *image_sampling_lines(differences), ""]
    lines += [
        "## Each set (paired differences in points, mean over the set's seeds)",
        "",
        set_table(design, sets) if sets else "No set has finished yet.",
        "",
        "## Robust overfitting on the test split",
        "",
        test_split_overfitting_table(by_set(design, sets), claim.baseline, unit="teacher set") if sets else "",
        "",
    ]
    text = "\n".join(lines)
    (out / "RESULTS.md").write_text(text)
    raw = {"command": command, "design": design.model_dump(), "sets": sets}
    (out / "results.json").write_text(json.dumps(raw, indent=1))
    return text
