"""Training curves from one or more runs' metrics.jsonl, overlaid for comparison."""

from __future__ import annotations

import json
from pathlib import Path

from student_trainer.figures import save_figure, subplots

# (panel title, [(metric key, line style)]); validation keys are null on epochs without evaluation.
_PANELS = (
    ("train loss", [("train_loss", "-")]),
    ("train accuracy (clean -, adv --)", [("train_clean_acc", "-"), ("train_adv_acc", "--")]),
    ("val accuracy (clean -, robust --)", [("val_clean_acc", "-"), ("val_robust_acc", "--")]),
    ("learning rate", [("lr", "-")]),
)


def read_metrics(path: str | Path) -> list[dict]:
    """One dict per non-blank line of a metrics.jsonl file."""
    with Path(path).open() as f:
        return [json.loads(line) for line in f if line.strip()]


def _series(records: list[dict], key: str) -> tuple[list, list]:
    """(epochs, values) for the epochs where `key` is present and not null."""
    points = [(r["epoch"], r[key]) for r in records if r.get(key) is not None]
    return [p[0] for p in points], [p[1] for p in points]


def training_curves(
    metrics_jsonl: str | Path | list[str | Path],
    out_png: str | Path,
    labels: list[str] | None = None,
) -> Path:
    """A 2x2 PNG: loss, train accuracies, validation clean/robust accuracy, lr. Several runs overlay, one colour each;
    labels default to each file's folder name (a run directory)."""
    paths = [Path(p) for p in ([metrics_jsonl] if isinstance(metrics_jsonl, (str, Path)) else metrics_jsonl)]
    labels = labels if labels is not None else [p.parent.name or p.stem for p in paths]
    if len(labels) != len(paths):
        raise ValueError(f"{len(labels)} labels for {len(paths)} metrics files")
    fig, axes = subplots(2, 2, figsize=(11, 8))
    for run, (path, label) in enumerate(zip(paths, labels)):
        records = read_metrics(path)
        color = f"C{run % 10}"
        for ax, (_, lines) in zip(axes.flat, _PANELS):
            # once per run and panel, on its first drawn line
            legend_label = label
            for key, style in lines:
                epochs, values = _series(records, key)
                if epochs:
                    marker = "." if len(epochs) < 30 else None
                    ax.plot(epochs, values, style, color=color, marker=marker, label=legend_label)
                    legend_label = None
    for ax, (title, _) in zip(axes.flat, _PANELS):
        ax.set(title=title, xlabel="epoch")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    return save_figure(fig, out_png)


def robust_overfitting_curves(
    runs: dict[str, list[list[dict]]], stops: dict[str, int], out_png: str | Path, key: str = "val_robust_acc"
) -> Path:
    """Validation robust accuracy per epoch, one line per student (mean over its seeds; the first two also show their
    range), with the epochs the teachers were early-stopped at marked: the picture of robust overfitting and of what
    distillation does to it."""
    import numpy as np

    fig, ax = subplots(figsize=(10, 6))
    # the second half of every curve: where robust overfitting shows, so the y axis is fitted to it
    late = []
    for i, (name, seeds) in enumerate(runs.items()):
        curves = [dict(zip(*_series(records, key))) for records in seeds]
        epochs = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
        if not epochs:
            continue
        values = np.array([[c[e] for e in epochs] for c in curves])
        ax.plot(
            epochs, values.mean(0), color=f"C{i % 10}", label=f"{name} ({len(curves)} seed{'s' * (len(curves) > 1)})"
        )
        late.extend(values[:, len(epochs) // 2 :].ravel())
        # the seeds' range only for the first two (the plan's baseline and main student): more would blur
        if len(curves) > 1 and i < 2:
            ax.fill_between(epochs, values.min(0), values.max(0), color=f"C{i % 10}", alpha=0.15)
    for j, (teacher, epoch) in enumerate(stops.items()):
        ax.axvline(epoch, color="grey", linestyle=":", alpha=0.8)
        ax.annotate(
            f"{teacher} stopped",
            (epoch, 0.02 + 0.12 * j),
            xycoords=("data", "axes fraction"),
            rotation=90,
            fontsize=8,
            color="grey",
            ha="right",
        )
    ax.set(
        title="validation PGD accuracy per epoch (teachers' early-stopping epochs dotted)",
        xlabel="epoch",
        ylabel="validation PGD accuracy",
    )
    if late:
        ax.set_ylim(max(0.0, min(late) - 0.1), min(1.0, max(late) + 0.05))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, out_png)


def replicate_differences(
    differences: list[float], running: list[tuple[float, float, float] | None], effect: float, title: str, out_png
) -> Path:
    """One paired difference per replicate (points) in the order they finished, with the running mean and its 95%
    interval after each (None where there is no interval yet), zero and the effect a design is powered for marked."""
    fig, ax = subplots(figsize=(8, 4.5))
    replicates = list(range(1, len(differences) + 1))
    ax.scatter(replicates, differences, color="C0", zorder=3, label="each replicate")
    shown = [(i, r) for i, r in zip(replicates, running) if r is not None]
    if shown:
        ax.plot([i for i, _ in shown], [r[0] for _, r in shown], color="C1", label="running mean")
        ax.fill_between(
            [i for i, _ in shown],
            [r[1] for _, r in shown],
            [r[2] for _, r in shown],
            color="C1",
            alpha=0.2,
            label="its 95% interval",
        )
    ax.axhline(0, color="grey", linewidth=1)
    ax.axhline(effect, color="C2", linestyle="--", linewidth=1, label=f"powered for {effect:+g}")
    ax.set(title=title, xlabel="replicates finished", ylabel="difference (points)")
    ax.set_xticks(replicates)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, out_png)
