"""The built-in demo plans: each loads as valid data, and the CIFAR-10 plan (written for GPUs) runs end to end here on
tiny synthetic files in CIFAR-10's own format, with the plan's own models, shrunk only in size with `--set`."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import HANG_S, REPO

from pipeline import plans
from pipeline.plan import load_plan, merge
from student_trainer.config import TrainConfig


def akd(*args: str, timeout: float = HANG_S) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "akd", *args], capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


@pytest.mark.parametrize("plan", plans.NAMES)
def test_every_built_in_plan_is_valid(plan):
    cfg = load_plan(None, plan)
    assert cfg.seeds and cfg.teachers and cfg.students


def test_the_overfit_plan_is_the_regime_its_header_describes():
    cfg = load_plan(None, "overfit")
    student = TrainConfig.model_validate(merge(cfg.common, {"method": "at"}))
    assert (student.arch, student.limit_train, student.epochs, student.eps_warmup_epochs) == ("tiny_cnn", 500, 100, 10)
    assert student.train_attack.eps == student.val_attack.eps == 0.3 and student.train_attack.steps == 10
    teachers = {t.name: cfg.train_config(t) for t in cfg.teachers}
    # more capacity; one yardstick
    assert all(t.arch == "small_cnn" and t.val_attack.eps == 0.3 for t in teachers.values())
    assert teachers["weak-s12"].train_attack.eps == 0.15
    assert len(cfg.seeds) >= 3 and cfg.autoattack_limit >= 500 and cfg.autoattack_version == "apgd"


def write_synthetic_cifar10(root, per_batch: int = 8, test: int = 16) -> None:
    """CIFAR-10's python release, tiny: five training batches and a test batch of pickled dicts of numpy arrays."""
    rng = np.random.default_rng(0)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name, n in [*((f"data_batch_{i}", per_batch) for i in range(1, 6)), ("test_batch", test)]:
        batch = {
            b"batch_label": name.encode(),
            b"labels": [int(v) for v in rng.integers(0, 10, n)],
            b"data": rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8),
        }
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))


# the plan's sizes, not its models, methods or threat model: one epoch of one batch, no AutoAttack
SHRUNK = [
    "seeds=[0]",
    "common.device=cpu",
    "common.epochs=1",
    "common.limit_train=16",
    "common.batch_size=16",
    "common.val_size=8",
    "common.attack.steps=1",
    "common.eval.attack.steps=1",
    "eval_attack.steps=1",
    "eval_limit=8",
    "autoattack_limit=0",
    "threads_per_job=1",
    "jobs=2",
]


def test_the_cifar10_plan_runs_end_to_end_on_synthetic_files(tmp_path):
    write_synthetic_cifar10(tmp_path / "data")
    out = tmp_path / "out"
    sets = [arg for s in [f"common.data_dir={tmp_path / 'data'}", *SHRUNK] for arg in ("--set", s)]
    done = akd("demo", "--plan", "cifar10", "--out", str(out), *sets, timeout=4 * HANG_S)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    cfg = load_plan(None, "cifar10")
    results = json.loads((out / "results.json").read_text())
    assert set(results["students"]) == {s.name for s in cfg.students} and set(results["teachers"]) == set(
        cfg.teacher_names
    )
    trained = {name: json.loads((out / "teachers" / name / "config.json").read_text()) for name in cfg.teacher_names}
    assert trained["at-wrn34-s11"]["arch"] == "wrn34_10" and trained["at-prn18-s10"]["arch"] == "preact_resnet18"
    assert all(t["dataset"] == "cifar10" and t["amp"] == "bf16" for t in trained.values())
    evaluation = json.loads((out / "students" / "akd-ensemble-s0" / "eval-final.json").read_text())
    assert evaluation["dataset"] == "cifar10" and evaluation["attack"]["eps"] == pytest.approx(8 / 255)
    # PGD-1 here: 2.5 eps / steps
    assert evaluation["attack"]["step_size"] == pytest.approx(2.5 * 8 / 255 / 1)
    service = (out / "service" / "teachers.toml").read_text()
    assert 'autocast = "bf16"' in service and "[teachers.ensemble-last]" in service
    assert "robust-overfitting.png" in (out / "RESULTS.md").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU: the refusal cannot happen here")
def test_a_gpu_plan_on_a_machine_without_one_says_so_in_one_line(tmp_path):
    write_synthetic_cifar10(tmp_path / "data")
    done = akd(
        "train",
        "--set",
        "dataset=cifar10",
        "--set",
        f"data_dir={tmp_path / 'data'}",
        "--set",
        "device=cuda",
        "--set",
        f"out_dir={tmp_path / 'run'}",
    )
    assert done.returncode == 2 and "sees no CUDA GPU here" in done.stderr and "Traceback" not in done.stderr, (
        done.stderr
    )


def test_the_whole_demo_eta_counts_the_stages_still_to_come():
    from pipeline.demo import Demo
    from pipeline.jobs import Work, eta_text

    # no progress yet: no guess
    assert eta_text(0, 10.0, 100, 100) == ""
    # one cheap evaluation out of many ended: too little to go on
    assert eta_text(4, 10.0, 96, 100) == ""
    # 50 units a minute: 100 here, 300 in all
    assert eta_text(50, 60.0, 100, 200) == ", ETA 2.0 min (whole demo ~6 min)"
    assert eta_text(50, 60.0, 100, 0) == ", ETA 2.0 min"
    cfg = load_plan(None, "overfit")
    student = TrainConfig.model_validate(merge(cfg.common, {"method": "at"}))
    # 500 training images x (PGD-10 + update), 500 validated by PGD-10
    assert Work(cfg).epoch(student) == 500 * 11 + 500 * 11
    # PGD-10 and two clean passes on 1,000; APGD on 500
    assert Work(cfg).evaluation("mnist5k") == 1000 * 12 + 500 * 1000
    # nothing done yet: everything is left
    demo = Demo(cfg, REPO / "build" / "no-such-demo", "test")
    assert demo.students_left() == len(cfg.students) * len(cfg.seeds) * student.epochs * Work(cfg).epoch(student)
    # each evaluated twice, once with AutoAttack
    runs = len(cfg.teachers) + len(cfg.students) * len(cfg.seeds)
    assert demo.evaluations_left() == runs * (
        Work(cfg).evaluation("mnist5k") + Work(cfg).evaluation("mnist5k", autoattack=False)
    )
