"""One student against PGD-AT over several teacher sets: a demo folder per set, each with its own teachers and the
same student seeds (RESULTS.md, "How much the teacher set matters").

A student's seeds share one set of teachers, so their spread leaves out how much the teachers themselves vary from one
training run to the next. Here each teacher set contributes the mean of its per-seed paired differences, and the
verdict is taken over the sets with the report's own rule (pipeline.report.verdict).

    python scripts/teacher_sets.py runs/overfit100 runs/overfit-teachers-b runs/overfit-teachers-c
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from pipeline.report import CLAIMS, paired, paired_mean_se, verdict


def set_differences(folder: Path, student: str, baseline: str) -> tuple[str, dict[str, list[float]]]:
    """The teachers' early-stopping epochs (and test PGD accuracy there), and each claim's per-seed paired
    differences, in points."""
    results = json.loads((folder / "results.json").read_text())
    teachers = ", ".join(
        f"{name} {t['best_epoch']}/{t['epochs']} (PGD {t['best']['pgd_acc']:.3f})"
        for name, t in results["teachers"].items()
    )
    runs = results["students"]
    if student not in runs or baseline not in runs:
        raise SystemExit(f"{folder}: results.json has no {student!r} or {baseline!r} (students: {sorted(runs)})")
    diffs = {
        key: [100 * d for _, d in paired(results["seeds"], runs[student], runs[baseline], key)] for key, *_ in CLAIMS
    }
    return teachers, diffs


def _cell(diffs: list[float]) -> str:
    if len(diffs) < 2:
        return f"{diffs[0]:+.2f}" if diffs else "n/a"
    mean, se = paired_mean_se(diffs)
    return f"{mean:+.2f} ± {se:.2f}"


def table(folders: list[Path], student: str, baseline: str) -> str:
    header = ["teacher set", "teachers stopped at (test PGD acc)", *(label for _, label, _ in CLAIMS)]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(["---"] * 2 + ["---:"] * len(CLAIMS)) + " |"]
    set_means: dict[str, list[float]] = {key: [] for key, *_ in CLAIMS}
    for folder in folders:
        teachers, diffs = set_differences(folder, student, baseline)
        lines.append(f"| {folder.name} | {teachers} | " + " | ".join(_cell(diffs[key]) for key, *_ in CLAIMS) + " |")
        for key, *_ in CLAIMS:
            if diffs[key]:
                set_means[key].append(statistics.fmean(diffs[key]))
    over_sets = [f"{_cell(set_means[key])} {verdict(set_means[key], expected)}" for key, _, expected in CLAIMS]
    lines.append(f"| over the {len(folders)} sets (mean ± se of the set means) | | " + " | ".join(over_sets) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path, help="akd demo folders, one per teacher set")
    parser.add_argument("--student", default="akd-ensemble")
    parser.add_argument("--baseline", default="pgd-at")
    args = parser.parse_args()
    print(f"{args.student} minus {args.baseline} at the final epoch, in points (per set: mean ± se over its seeds)\n")
    print(table(args.folders, args.student, args.baseline))


if __name__ == "__main__":
    main()
