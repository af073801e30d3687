"""Calibration (ECE by hand), the PNG writers, and evaluate() on a tiny random model."""

from __future__ import annotations

import json

import matplotlib.image
import pytest
import torch

from shared.models import build_model
from student_trainer.calibration import expected_calibration_error, reliability_bins, reliability_diagram
from student_trainer.plots import training_curves

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path, min_side=100):
    assert path.read_bytes()[:8] == PNG_MAGIC
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] >= min_side and image.shape[1] >= min_side


# --- ECE ---------------------------------------------------------------------------------


def test_ece_zero_when_every_bin_is_calibrated():
    # 10 samples at confidence 0.8 with 8 right; 4 at 0.5 (ties go to class 0) with 2 right.
    probs = torch.tensor([[0.8, 0.2]] * 10 + [[0.5, 0.5]] * 4)
    y = torch.tensor([0] * 8 + [1] * 2 + [0, 0, 1, 1])
    assert expected_calibration_error(probs, y) == pytest.approx(0.0, abs=1e-6)


def test_ece_two_bins_by_hand():
    probs = torch.tensor(
        [
            # bin (0, 0.5]: right
            [0.4, 0.3, 0.3],
            # bin (0, 0.5] (0.5 is its upper edge): wrong
            [0.5, 0.25, 0.25],
            # bin (0.5, 1]: right
            [0.9, 0.05, 0.05],
            # bin (0.5, 1]: wrong
            [0.8, 0.1, 0.1],
            # bin (0.5, 1]: right
            [0.6, 0.2, 0.2],
        ]
    )
    y = torch.tensor([0, 1, 0, 1, 0])
    # bin 0: 2 samples, acc 1/2, conf 0.45 -> gap 0.05; bin 1: 3 samples, acc 2/3, conf 2.3/3 -> gap 0.1
    assert expected_calibration_error(probs, y, bins=2) == pytest.approx(2 / 5 * 0.05 + 3 / 5 * 0.1)
    table = reliability_bins(probs, y, bins=2)
    assert [b["count"] for b in table] == [2, 3]
    assert table[1]["accuracy"] == pytest.approx(2 / 3)
    assert table[1]["confidence"] == pytest.approx(2.3 / 3)


def test_ece_all_confident_all_wrong_is_one():
    probs = torch.full((20, 10), 1e-7)
    probs[:, 3] = 1 - 9e-7
    y = torch.zeros(20, dtype=torch.long)
    assert expected_calibration_error(probs, y) == pytest.approx(1.0, abs=1e-5)


def test_reliability_bins_default_is_15_equal_width_bins():
    probs = torch.softmax(torch.randn(200, 10, generator=torch.Generator().manual_seed(0)) * 3, dim=1)
    y = torch.randint(0, 10, (200,), generator=torch.Generator().manual_seed(1))
    table = reliability_bins(probs, y)
    assert len(table) == 15 and len(reliability_bins(probs, y, bins=7)) == 7
    assert table[0]["lo"] == 0.0 and table[-1]["hi"] == 1.0
    assert all(b["hi"] - b["lo"] == pytest.approx(1 / 15) for b in table)
    assert sum(b["count"] for b in table) == 200
    assert all((b["accuracy"] is None) == (b["count"] == 0) for b in table)
    # JSON-ready
    json.dumps(table)


# --- PNGs --------------------------------------------------------------------------------


def test_reliability_diagram_writes_png(tmp_path):
    gen = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(100, 10, generator=gen) * 2, dim=1)
    y = torch.randint(0, 10, (100,), generator=gen)
    out = reliability_diagram({"clean": (probs, y), "PGD": (probs.flip(0), y)}, tmp_path / "sub" / "rel.png", "test")
    assert out == tmp_path / "sub" / "rel.png"
    assert_png(out)


def _write_metrics(path, epochs, shift):
    path.parent.mkdir(parents=True)
    with path.open("w") as f:
        for e in range(1, epochs + 1):
            evaluated = e % 2 == 0
            record = {
                "epoch": e,
                "lr": 0.1 / e,
                "train_loss": 2.0 / e + shift,
                "train_clean_acc": 0.5 + 0.04 * e,
                "train_adv_acc": 0.3 + 0.03 * e - shift,
                "val_clean_acc": 0.5 + 0.03 * e if evaluated else None,
            }
            if evaluated:
                record["val_robust_acc"] = 0.2 + 0.02 * e
            f.write(json.dumps(record) + "\n")


def test_training_curves_overlays_runs(tmp_path):
    a, b = tmp_path / "run-a" / "metrics.jsonl", tmp_path / "run-b" / "metrics.jsonl"
    _write_metrics(a, 6, 0.0)
    _write_metrics(b, 4, 0.1)
    assert_png(training_curves([a, b], tmp_path / "curves.png"))
    assert_png(training_curves(a, tmp_path / "one.png", labels=["only"]))
    with pytest.raises(ValueError):
        training_curves([a, b], tmp_path / "bad.png", labels=["one"])


# --- evaluate ----------------------------------------------------------------------------

N = 32


@pytest.fixture(scope="module")
def setup():
    """A random small CNN and inputs labelled by its own argmax, so clean accuracy is 1."""
    torch.manual_seed(0)
    model = build_model("small_cnn", 10, (1, 28, 28))
    x = torch.rand(N, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(x).argmax(dim=1)
    return model, x, y


def strong_pgd():
    from student_trainer.attacks import PGD

    return PGD(norm="linf", eps=0.3, step_size=0.05, steps=10)


@pytest.fixture(scope="module")
def full_run(setup, tmp_path_factory):
    from student_trainer.evaluate import evaluate

    model, x, y = setup
    # evaluate must switch to eval and back
    model.train()
    messages = []
    diagram = tmp_path_factory.mktemp("eval") / "reliability.png"
    result = evaluate(
        model,
        x,
        y,
        attacks=("clean", "pgd", "autoattack"),
        attack=strong_pgd(),
        batch_size=16,
        diagram=diagram,
        progress=messages.append,
    )
    return result, model, messages, diagram


def test_evaluate_accuracies(full_run):
    result, *_ = full_run
    assert result.n == N
    assert result.clean_acc == 1.0
    assert result.pgd_acc < result.clean_acc
    assert result.autoattack_acc <= result.pgd_acc + 1 / N
    assert 0.0 <= result.ece <= 1.0 and 0.0 <= result.ece_pgd <= 1.0


def test_evaluate_restores_mode_reports_progress_and_draws(full_run):
    _, model, messages, diagram = full_run
    assert model.training
    assert messages == [
        "clean",
        "pgd 1/2 batches",
        "pgd 2/2 batches",
        "autoattack standard on 32 images (apgd-ce, apgd-t, fab-t, square)",
    ]
    assert_png(diagram)


def test_eval_result_json(full_run):
    from student_trainer.evaluate import EvalResult

    result, *_ = full_run
    payload = json.loads(json.dumps(result.to_json()))
    assert set(payload) == {"clean_acc", "pgd_acc", "autoattack_acc", "ece", "ece_pgd", "n", "correct"}
    # each image's correctness under each attack, and its mean is the accuracy
    for attack, accuracy in (("clean", "clean_acc"), ("pgd", "pgd_acc"), ("autoattack", "autoattack_acc")):
        digits = payload["correct"][attack]
        assert len(digits) == payload["n"] and set(digits) <= {"0", "1"}
        assert digits.count("1") / len(digits) == pytest.approx(payload[accuracy])
    clean_only = EvalResult(clean_acc=1.0, pgd_acc=None, autoattack_acc=None, ece=0.1, ece_pgd=None, n=3)
    assert json.loads(json.dumps(clean_only.to_json()))["pgd_acc"] is None


def test_evaluate_clean_only_leaves_attacks_null(setup):
    from student_trainer.evaluate import evaluate

    model, x, y = setup
    result = evaluate(model, x, y, attacks=("clean",))
    assert result.clean_acc == 1.0
    assert result.pgd_acc is None and result.ece_pgd is None and result.autoattack_acc is None


def test_evaluate_rejects_unknown_attack_and_missing_pgd(setup):
    from student_trainer.evaluate import evaluate

    model, x, y = setup
    with pytest.raises(ValueError, match="clean, pgd, autoattack"):
        evaluate(model, x, y, attacks=("clean", "fgsm"), attack=strong_pgd())
    with pytest.raises(ValueError, match="attack"):
        evaluate(model, x, y, attacks=("pgd",))


def test_pgd_examples_seeded_and_in_ball(setup):
    from student_trainer.evaluate import pgd_examples

    model, x, y = setup
    attack = strong_pgd()
    first = pgd_examples(model, x[:8], y[:8], attack, batch_size=4, seed=3)
    again = pgd_examples(model, x[:8], y[:8], attack, batch_size=4, seed=3)
    assert torch.equal(first, again)
    assert (first - x[:8]).abs().max() <= 0.3 + 1e-6
    assert first.min() >= 0 and first.max() <= 1
