"""Calibration: expected calibration error and reliability diagrams (Guo et al. 2017).

The AKD paper's main analysis claim is that distillation improves the student's
calibration, on clean and on adversarial inputs; these are the measurements behind it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from student_trainer.figures import save_figure, subplots

DEFAULT_BINS = 15


def reliability_bins(probs: torch.Tensor, y: torch.Tensor, bins: int = DEFAULT_BINS) -> list[dict]:
    """Equal-width confidence bins (lo, hi], each with its count, accuracy and mean confidence.

    Confidence is the top class probability. An empty bin has accuracy and confidence
    None, so it serialises to JSON null instead of pretending to be a measurement.
    """
    if bins < 1:
        raise ValueError(f"bins must be >= 1; got {bins}")
    if probs.ndim != 2 or y.ndim != 1 or probs.shape[0] != y.shape[0]:
        raise ValueError(f"need probs (N, K) and y (N,); got {tuple(probs.shape)} and {tuple(y.shape)}")
    # float64 so a confidence sitting exactly on an edge lands in the bin below it, as (lo, hi] says.
    confidence, prediction = probs.detach().to("cpu", torch.float64).max(dim=1)
    correct = (prediction == y.detach().cpu()).to(torch.float64)
    edges = torch.linspace(0.0, 1.0, bins + 1, dtype=torch.float64)
    index = torch.bucketize(confidence, edges[1:-1], right=False)
    table = []
    for b in range(bins):
        members = index == b
        count = int(members.sum())
        table.append(
            {
                "lo": float(edges[b]),
                "hi": float(edges[b + 1]),
                "count": count,
                "accuracy": float(correct[members].mean()) if count else None,
                "confidence": float(confidence[members].mean()) if count else None,
            }
        )
    return table


def expected_calibration_error(probs: torch.Tensor, y: torch.Tensor, bins: int = DEFAULT_BINS) -> float:
    """ECE = sum_b |B_b|/N * |acc(B_b) - conf(B_b)| over equal-width confidence bins."""
    return _ece(reliability_bins(probs, y, bins))


def _ece(table: list[dict]) -> float:
    n = sum(b["count"] for b in table)
    if n == 0:
        raise ValueError("ECE of an empty set is undefined")
    return sum(b["count"] / n * abs(b["accuracy"] - b["confidence"]) for b in table if b["count"])


def reliability_diagram(
    curves: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    path: str | Path,
    title: str = "",
    bins: int = DEFAULT_BINS,
) -> Path:
    """Write a PNG with one column per curve (e.g. "clean", "PGD"): accuracy per bin
    against the diagonal on top, the share of samples per bin underneath, ECE in the title."""
    if not curves:
        raise ValueError("reliability_diagram needs at least one curve")
    fig, axes = subplots(
        2,
        len(curves),
        figsize=(4 * len(curves), 5),
        squeeze=False,
        gridspec_kw={"height_ratios": [3, 1]},
        sharex="col",
    )
    for column, (name, (probs, y)) in enumerate(curves.items()):
        _draw_panel(axes[0, column], axes[1, column], name, reliability_bins(probs, y, bins))
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def _draw_panel(top, bottom, name: str, table: list[dict]) -> None:
    lo = [b["lo"] for b in table]
    width = table[0]["hi"] - table[0]["lo"]
    accuracy = [b["accuracy"] or 0.0 for b in table]
    gap_base = [min(b["accuracy"], b["confidence"]) if b["count"] else 0.0 for b in table]
    gap = [abs(b["accuracy"] - b["confidence"]) if b["count"] else 0.0 for b in table]
    top.bar(lo, accuracy, width=width, align="edge", edgecolor="black", label="accuracy")
    top.bar(lo, gap, bottom=gap_base, width=width, align="edge", color="red", alpha=0.3, label="gap")
    top.plot([0, 1], [0, 1], "k--", linewidth=1)
    top.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy", title=f"{name}  ECE={_ece(table):.3f}")
    top.legend(loc="upper left")
    n = sum(b["count"] for b in table)
    bottom.bar(lo, [b["count"] / n for b in table], width=width, align="edge", color="gray")
    bottom.set(xlim=(0, 1), xlabel="confidence", ylabel="share")
