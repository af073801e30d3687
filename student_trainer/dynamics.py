"""Training dynamics: forgetting events and the epoch a sample is learned for good
(Toneva et al. 2019, "An empirical study of example forgetting").

The AKD paper claims distillation changes how a student learns the hard or memorised
samples; comparing runs on the *same* hard set (the union of each run's hardest
samples) is what makes that claim checkable.

A correctness matrix is int8 (epochs x samples): 1 correct, 0 wrong, -1 not seen that
epoch (a subset, a dropped last batch, or adversarial correctness not recorded).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from shared.atomic import replaced_atomically
from student_trainer.markdown import markdown_table

KINDS = ("clean", "adv")
UNSEEN = -1


class CorrectnessLog:
    """Per-sample correctness on the training set, each epoch, clean and adversarial."""

    def __init__(self, n_samples: int) -> None:
        if n_samples < 1:
            raise ValueError(f"n_samples must be >= 1; got {n_samples}")
        self.n_samples = n_samples
        self._rows: dict[int, dict[str, np.ndarray]] = {}

    def record(
        self,
        epoch: int,
        indices: torch.Tensor,
        correct_clean: torch.Tensor | None,
        correct_adv: torch.Tensor | None,
    ) -> None:
        """Record one batch: dataset `indices` and whether each was classified correctly.
        Called once per batch; a later record for the same sample and epoch wins."""
        row = self._rows.setdefault(epoch, {k: np.full(self.n_samples, UNSEEN, np.int8) for k in KINDS})
        idx = _numpy(indices).astype(np.int64)
        for kind, correct in zip(KINDS, (correct_clean, correct_adv)):
            if correct is not None:
                row[kind][idx] = _numpy(correct).astype(np.int8)

    @property
    def epochs(self) -> np.ndarray:
        """The recorded epoch numbers, in the order of the matrix rows."""
        return np.array(sorted(self._rows), dtype=np.int64)

    def matrix(self, kind: str = "adv") -> np.ndarray:
        """The (epochs x samples) int8 correctness matrix for `kind` ("clean" or "adv")."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}; got {kind!r}")
        if not self._rows:
            return np.full((0, self.n_samples), UNSEEN, np.int8)
        return np.stack([self._rows[e][kind] for e in self.epochs])

    def save(self, path: str | Path) -> None:
        """A compressed .npz: epochs, n_samples and one int8 matrix per kind."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # a file object: numpy appends no ".npz"
        with replaced_atomically(path) as tmp, tmp.open("wb") as f:
            np.savez_compressed(f, epochs=self.epochs, n_samples=self.n_samples, **{k: self.matrix(k) for k in KINDS})

    @classmethod
    def load(cls, path: str | Path) -> CorrectnessLog:
        with np.load(Path(path)) as data:
            log = cls(int(data["n_samples"]))
            for i, epoch in enumerate(data["epochs"].tolist()):
                log._rows[epoch] = {k: data[k][i].copy() for k in KINDS}
        return log


def _numpy(t: torch.Tensor | np.ndarray) -> np.ndarray:
    return t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)


def forgetting_events(matrix: np.ndarray) -> np.ndarray:
    """Per sample, the number of correct -> wrong transitions between consecutive seen epochs."""
    matrix = np.asarray(matrix)
    previous = np.full(matrix.shape[1], UNSEEN, np.int8)
    events = np.zeros(matrix.shape[1], np.int64)
    for row in matrix:
        seen = row != UNSEEN
        events += seen & (previous == 1) & (row == 0)
        previous = np.where(seen, row, previous)
    return events


def first_learned_epoch(matrix: np.ndarray) -> np.ndarray:
    """Per sample, the first row from which it is correct at every seen epoch on
    ("learned for good"); -1 if its last seen epoch is wrong or it was never seen.
    Rows are matrix rows; map them through CorrectnessLog.epochs for epoch numbers."""
    matrix = np.asarray(matrix)
    first = np.full(matrix.shape[1], -1, np.int64)
    # every seen epoch after this row is correct
    correct_since = np.ones(matrix.shape[1], bool)
    for t in range(matrix.shape[0] - 1, -1, -1):
        correct_since &= matrix[t] != 0
        first[correct_since & (matrix[t] == 1)] = t
    return first


def _seen(matrix: np.ndarray) -> np.ndarray:
    return (np.asarray(matrix) != UNSEEN).any(axis=0)


def hardest_samples(matrix: np.ndarray, fraction: float = 0.1) -> np.ndarray:
    """Indices of the ceil(fraction * seen) hardest seen samples, hardest first: never
    learned, then most forgetting events, then learned latest. Never-seen samples are
    left out: nothing is known about them."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1]; got {fraction}")
    seen = np.flatnonzero(_seen(matrix))
    first = first_learned_epoch(matrix)[seen]
    events = forgetting_events(matrix)[seen]
    # last key is the primary one
    order = np.lexsort((-first, -events, first != -1))
    return seen[order[: math.ceil(fraction * len(seen))]]


def compare_runs(logs: Mapping[str, CorrectnessLog], kind: str = "adv", fraction: float = 0.1) -> dict:
    """Compare runs on one hard set, the union of every run's hardest samples.

    Returns {"kind", "fraction", "hard_set_size", "runs": {name: {"mean_forgetting",
    "never_learned", "hard_final_acc"}}}; the means are over samples seen at least once,
    the final accuracy over hard samples seen in each run's last recorded epoch.
    """
    if not logs:
        raise ValueError("compare_runs needs at least one log")
    sizes = {log.n_samples for log in logs.values()}
    if len(sizes) > 1:
        raise ValueError(f"runs must log the same training set; got sample counts {sorted(sizes)}")
    matrices = {name: log.matrix(kind) for name, log in logs.items()}
    empty = [name for name, m in matrices.items() if not _seen(m).any()]
    if empty:
        raise ValueError(f"no {kind} correctness recorded for run(s) {', '.join(empty)}")
    hard = np.unique(np.concatenate([hardest_samples(m, fraction) for m in matrices.values()]))
    return {
        "kind": kind,
        "fraction": fraction,
        "hard_set_size": int(len(hard)),
        "runs": {name: _run_stats(m, hard) for name, m in matrices.items()},
    }


def _run_stats(matrix: np.ndarray, hard: np.ndarray) -> dict:
    seen = _seen(matrix)
    final = matrix[-1, hard]
    final = final[final != UNSEEN]
    return {
        "mean_forgetting": float(forgetting_events(matrix)[seen].mean()),
        "never_learned": float((first_learned_epoch(matrix)[seen] == -1).mean()),
        "hard_final_acc": float(final.mean()) if len(final) else None,
    }


def summary_table(comparison: dict) -> str:
    """A markdown table of compare_runs' result, one row per run."""
    lines = [
        f"{comparison['kind']} correctness; hard set: {comparison['hard_set_size']} samples "
        f"(union of each run's hardest {comparison['fraction']:.0%})",
        "",
    ]
    rows = [
        [
            name,
            f"{s['mean_forgetting']:.3f}",
            f"{s['never_learned']:.1%}",
            "n/a" if s["hard_final_acc"] is None else f"{s['hard_final_acc']:.1%}",
        ]
        for name, s in comparison["runs"].items()
    ]
    lines.append(markdown_table(["run", "mean forgetting events", "never learned", "final acc on hard set"], rows))
    return "\n".join(lines) + "\n"
