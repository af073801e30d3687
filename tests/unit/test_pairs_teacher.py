"""scripts/pairs_teacher.py: two-digit MNIST pairs, a tiny training run, and its row-format table."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from conftest import REPO

from bench import cache_scale
from student_trainer.data import load_dataset


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("pairs_teacher", REPO / "scripts" / "pairs_teacher.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pairs_are_two_digits_side_by_side_labelled_ten_left_plus_right(script):
    test = load_dataset("mnist5k").test
    pairs, idx = script.make_pairs(test, 500, np.random.default_rng(3))
    left, right = torch.from_numpy(idx[:, 0]), torch.from_numpy(idx[:, 1])
    assert pairs.x.shape == (500, 1, 28, 56) and pairs.x.dtype == torch.uint8
    assert torch.equal(pairs.x[..., :28], test.x[left]) and torch.equal(pairs.x[..., 28:], test.x[right])
    assert torch.equal(pairs.y, 10 * test.y[left] + test.y[right])
    assert int(pairs.y.min()) >= 0 and int(pairs.y.max()) < 100 and len(pairs.y.unique()) > 90
    again, _ = script.make_pairs(test, 500, np.random.default_rng(3))
    other, _ = script.make_pairs(test, 500, np.random.default_rng(4))
    assert torch.equal(again.x, pairs.x) and not torch.equal(other.y, pairs.y)


def test_a_tiny_training_run_and_its_format_table(script):
    data = load_dataset("mnist5k")
    train, _ = script.make_pairs(data.train, 256, np.random.default_rng(0))
    held_out, _ = script.make_pairs(data.test, 100, np.random.default_rng(0))
    torch.manual_seed(0)
    model = script.build_teacher(data.mean, data.std)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    attack = script.PGD(eps=0.1, step_size=0.1, steps=1)
    script.train(model, train, epochs=2, seed=0, attack=attack, adv_epochs=1, batch_size=64)
    assert not model.training and not torch.equal(before["net.0.weight"], model.state_dict()["net.0.weight"])

    logits = cache_scale.member_logits([model], held_out.x.float() / 255)
    assert logits.shape == (1, 100, 100)
    rows = script.format_rows(logits, ["float16", "top5", "top10"], [1.0, 4.0])
    assert [(r[0], r[1], r[2]) for r in rows] == [
        (name, size, t)
        for name, size in (("float32", 424), ("float16", 224), ("top5", 46), ("top10", 66))
        for t in (1.0, 4.0)
    ]
    assert all(r[3:] == (0.0, 0.0, 0.0) for r in rows if r[0] == "float32")
    for name, _, _, mean_kl, max_kl, max_abs in rows:
        if name.startswith("top"):
            assert 0 < mean_kl <= max_kl and 0 < max_abs < 1
    table = script.markdown_table(rows)
    assert table[2] == "| float32 | 424 | any | 0 | 0 | 0 |" and len(table) == 2 + 1 + 6


def test_saved_weights_measure_the_same(script, tmp_path, capsys):
    small = ["--epochs", "1", "--adv-epochs", "1", "--train-pairs", "128", "--test-pairs", "64"]
    assert script.main([*small, "--out", str(tmp_path)]) == 0
    trained = capsys.readouterr().out
    assert script.main([*small, "--weights", str(tmp_path / "teacher.pt")]) == 0
    reloaded = capsys.readouterr().out
    assert "held-out accuracy" in trained and "PGD accuracy" in trained and "| top10 | 66 | 4 |" in trained
    assert trained.split("logits in")[1] == reloaded.split("logits in")[1]
