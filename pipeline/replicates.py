"""Teacher sets as replicates: one student against its baseline over several `akd demo` folders, a set each, each with
its own teachers (and its own baseline runs).

A student's seeds share one set of teachers, so their spread leaves out how much the teachers themselves vary from one
training run to the next. So the teacher set is the replicate: each set contributes the mean of its per-seed paired
differences, and the verdict over the sets is a paired t-test on those means (pipeline/verdicts.py); each set's own
within-set test is shown beside it. Sets are pooled only where each is a replicate of its own (no two share their
baseline's runs: copied PGD-AT runs would correlate the set means) and all were measured alike: the same threat model
(AutoAttack's version and package included), machine and software stack, and dataset where recorded; otherwise the
pooled line is refused, naming what differs.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from pipeline.report import CLAIMS, paired
from pipeline.verdicts import described, paired_test, verdict


def set_differences(folder: Path, student: str, baseline: str) -> tuple[str, dict[str, list[float]], dict]:
    """The teachers' early-stopping epochs (and test PGD accuracy there), each claim's per-seed paired differences (as
    fractions), and how the set was measured (`measured_alike`'s fields)."""
    results = json.loads((folder / "results.json").read_text())
    teachers = ", ".join(
        f"{name} {t['best_epoch']}/{t['epochs']} (PGD {t['best']['pgd_acc']:.3f})"
        for name, t in results["teachers"].items()
    )
    runs = results["students"]
    if student not in runs or baseline not in runs:
        raise SystemExit(f"{folder}: results.json has no {student!r} or {baseline!r} (students: {sorted(runs)})")
    diffs = {key: [d for _, d in paired(results["seeds"], runs[student], runs[baseline], key)] for key, *_ in CLAIMS}
    return teachers, diffs, set_measurement(results, student, baseline)


def set_measurement(results: dict, student: str, baseline: str) -> dict:
    """How one set's comparison was measured (`measurement`), and its baseline's own results, seed by seed: two sets
    with the same ones share (copied) runs."""
    runs = results["students"]
    measured = measurement(results, [*runs[student], *runs[baseline]])
    measured["baseline runs"] = json.dumps([run.get("final") for run in runs[baseline]], sort_keys=True)
    return measured


def measurement(results: dict, runs: list[dict]) -> dict:
    """What pooled sets must share: each run's threat model, the machine and its software, the dataset (where the
    results record it). A field on which the set's own runs differ already is kept as the list of its values."""
    models = [json.dumps(run["final"].get("threat_model"), sort_keys=True) for run in runs if run.get("final")]
    return {
        "threat model": json.loads(models[0]) if len(set(models)) == 1 else sorted(set(models)),
        "machine and software": results.get("machine"),
        "package versions": results.get("software"),
        "dataset": results.get("dataset"),
    }


def measured_alike(sets: dict[str, dict]) -> str | None:
    """None where every set was measured alike and is a replicate of its own; else what differs (naming the field and
    the sets' values), or which sets share their baseline's runs."""
    names = list(sets)
    shared = [
        (a, b)
        for i, a in enumerate(names)
        for b in names[i + 1 :]
        if sets[a]["baseline runs"] == sets[b]["baseline runs"]
    ]
    if shared:
        pairs = ", ".join(f"{a} and {b}" for a, b in shared)
        return f"{pairs} share their baseline's runs (the same results, seed by seed): a replicate needs its own"
    for field in [f for f in sets[names[0]] if f != "baseline runs"]:
        values = {name: sets[name][field] for name in names}
        if len({json.dumps(v, sort_keys=True) for v in values.values()}) > 1:
            return f"{field} differs: " + "; ".join(f"{name}: {_differing(values, name)}" for name in names)
    return None


def _differing(values: dict[str, object], name: str) -> str:
    """A set's value of a field, shown by the keys where it differs from the others when it is a dict."""
    mine = values[name]
    if not isinstance(mine, dict) or not all(isinstance(v, dict) for v in values.values()):
        return json.dumps(mine)
    flat = {name: _flat(v) for name, v in values.items()}
    keys = sorted({k for v in flat.values() for k in v if len({json.dumps(f.get(k)) for f in flat.values()}) > 1})
    return ", ".join(f"{k} = {json.dumps(flat[name].get(k))}" for k in keys)


def _flat(value: dict, prefix: str = "") -> dict:
    out = {}
    for key, v in value.items():
        out.update(_flat(v, f"{prefix}{key}.") if isinstance(v, dict) else {f"{prefix}{key}": v})
    return out


def table(folders: list[Path], student: str, baseline: str) -> str:
    header = ["teacher set", "teachers stopped at (test PGD acc)", *(label for _, label, _ in CLAIMS)]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(["---"] * 2 + ["---:"] * len(CLAIMS)) + " |"]
    set_means: dict[str, list[float]] = {key: [] for key, *_ in CLAIMS}
    measured = {}
    for folder in folders:
        teachers, diffs, measured[folder.name] = set_differences(folder, student, baseline)
        cells = []
        for key, _, expected in CLAIMS:
            test = paired_test(diffs[key], expected)
            cells.append(f"{described(test, None)}: {verdict(test)}" if test else "n/a")
            if diffs[key]:
                set_means[key].append(statistics.fmean(diffs[key]))
        lines.append(f"| {folder.name} | {teachers} | " + " | ".join(cells) + " |")
    refused = measured_alike(measured)
    label = f"over the {len(folders)} sets (each set's mean a replicate)"
    if refused:
        lines.append(f"| {label} | not pooled: {refused} |" + " |" * (len(CLAIMS) - 1))
    else:
        pooled = [paired_test(set_means[key], expected) for key, _, expected in CLAIMS]
        lines.append(f"| {label} | | " + " | ".join(f"{described(t, None)}: {verdict(t)}" for t in pooled) + " |")
    return "\n".join(lines)
