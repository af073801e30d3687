"""Forgetting events, first-learned epochs, hard samples and run comparison, on hand-written logs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from student_trainer.dynamics import (
    CorrectnessLog,
    compare_runs,
    first_learned_epoch,
    forgetting_events,
    hardest_samples,
    summary_table,
)

# not seen that epoch
U = -1

# rows are epochs, columns samples
MATRIX = np.array(
    [
        # s0 s1 s2 s3 s4 s5 s6 s7
        [1, 0, 1, 1, U, 1, 1, U],
        [0, U, U, 1, U, 0, 1, 1],
        [1, 1, 0, 1, U, 1, 1, U],
        [1, U, 1, 0, U, 0, 1, 1],
    ],
    dtype=np.int8,
)


def test_forgetting_events_skip_unseen_epochs():
    # s2: right, unseen, wrong counts as one forgetting event across the gap.
    assert forgetting_events(MATRIX).tolist() == [1, 0, 1, 1, 0, 2, 0, 0]


def test_first_learned_epoch_is_learned_for_good():
    # s1: right at 2, unseen after; s3/s5: wrong at the last epoch; s4: never seen.
    assert first_learned_epoch(MATRIX).tolist() == [2, 2, 3, -1, -1, -1, 0, 1]


def test_hardest_samples_order():
    # never learned (most forgotten first), then most forgotten, then learned latest; s4 unseen, left out.
    assert hardest_samples(MATRIX, fraction=1.0).tolist() == [5, 3, 2, 0, 1, 7, 6]
    # ceil(0.3 * 7 seen)
    assert hardest_samples(MATRIX, fraction=0.3).tolist() == [5, 3, 2]
    with pytest.raises(ValueError):
        hardest_samples(MATRIX, fraction=0.0)


def log_from(adv: list[list[int]], clean: list[list[int]] | None = None) -> CorrectnessLog:
    """A log built the way a trainer fills it: per epoch, two shuffled batches of seen samples."""
    adv = np.array(adv)
    log = CorrectnessLog(adv.shape[1])
    rng = np.random.default_rng(0)
    for epoch, row in enumerate(adv, start=1):
        seen = rng.permutation(np.flatnonzero(row != U))
        for batch in np.array_split(seen, 2):
            idx = torch.from_numpy(batch)
            correct_clean = None if clean is None else torch.tensor(np.array(clean)[epoch - 1, batch] == 1)
            log.record(epoch, idx, correct_clean, torch.from_numpy(row[batch] == 1))
    return log


def test_record_save_load_round_trip(tmp_path):
    log = log_from(MATRIX.tolist(), clean=np.ones_like(MATRIX).tolist())
    assert log.epochs.tolist() == [1, 2, 3, 4]
    assert np.array_equal(log.matrix("adv"), MATRIX)
    expected_clean = np.where(MATRIX == U, U, 1)
    assert np.array_equal(log.matrix("clean"), expected_clean)

    path = tmp_path / "runs" / "dynamics.npz"
    log.save(path)
    loaded = CorrectnessLog.load(path)
    assert loaded.n_samples == 8
    assert loaded.epochs.tolist() == [1, 2, 3, 4]
    assert np.array_equal(loaded.matrix("adv"), MATRIX)
    assert np.array_equal(loaded.matrix("clean"), expected_clean)
    assert loaded.matrix("adv").dtype == np.int8


def test_unrecorded_kind_stays_unseen():
    log = CorrectnessLog(3)
    log.record(0, torch.tensor([0, 2]), None, torch.tensor([True, False]))
    assert log.matrix("clean").tolist() == [[U, U, U]]
    assert log.matrix("adv").tolist() == [[1, U, 0]]
    with pytest.raises(ValueError):
        log.matrix("robust")


# Two runs over 5 samples, 3 epochs; s4 is never seen.
# events [0, 0, 1, 0]; s1 never learned -> hardest
RUN_A = [
    [1, 0, 1, 0, U],
    [1, 0, 0, 1, U],
    [1, 0, 1, 1, U],
]
# events [1, 0, 0, 1]; s0 and s1 never learned, s0 forgotten more -> hardest
RUN_B = [
    [1, 0, 1, 1, U],
    [0, 0, 1, 0, U],
    [0, 0, 1, 1, U],
]


def test_compare_runs_on_the_union_of_hard_sets():
    comparison = compare_runs({"akd": log_from(RUN_A), "pgd-at": log_from(RUN_B)}, kind="adv", fraction=0.25)
    # {s1} from akd, {s0} from pgd-at
    assert comparison["hard_set_size"] == 2
    assert comparison["runs"]["akd"] == pytest.approx(
        {"mean_forgetting": 1 / 4, "never_learned": 1 / 4, "hard_final_acc": 1 / 2}
    )
    assert comparison["runs"]["pgd-at"] == pytest.approx(
        {"mean_forgetting": 2 / 4, "never_learned": 2 / 4, "hard_final_acc": 0.0}
    )
    table = summary_table(comparison)
    assert "| akd |" in table and "| pgd-at |" in table
    assert "50.0%" in table


def test_compare_runs_rejects_mismatched_or_empty_logs():
    with pytest.raises(ValueError, match="same training set"):
        compare_runs({"a": log_from(RUN_A), "b": CorrectnessLog(7)})
    with pytest.raises(ValueError, match="no clean correctness"):
        compare_runs({"a": log_from(RUN_A)}, kind="clean")
