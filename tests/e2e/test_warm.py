"""`akd warm`: a run's clean inputs (every augmented view) sent through a real service once, so that the run's
teacher queries all hit; a second warm computes nothing; and the views are exactly those training draws."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import HANG_S, REPO, live_server, mnist_teacher, save_member, write_config
from test_demo_plans import write_synthetic_cifar10

from student_trainer.config import load_train_config
from student_trainer.data import AUGMENTED_VIEWS, augment_batch, augmentation_space
from student_trainer.train import train


def akd_warm(*args: str, command: tuple[str, ...] = ("warm",)) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "akd", *command, *args], cwd=REPO, capture_output=True, text=True, timeout=HANG_S
    )


def test_the_augmentation_space_holds_every_view_training_draws():
    x = torch.randint(0, 256, (4, 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    # (B, views, C, H, W)
    views = torch.stack(list(augmentation_space(x)), dim=1)
    assert views.shape[1] == AUGMENTED_VIEWS == 162
    # all different
    assert len({v.numpy().tobytes() for v in views[0]}) == 162
    generator = torch.Generator().manual_seed(1)
    for _ in range(20):
        drawn = augment_batch(x, generator)
        for row in range(len(x)):
            assert (views[row] == drawn[row]).flatten(1).all(1).any(), "a drawn view is missing from the space"


@pytest.fixture
def service(tmp_path, mnist_members):
    config = write_config(
        tmp_path / "t.toml", {"mnist": mnist_teacher([(mnist_members["a"], 1.0)])}, {"cache": {"dir": "cache"}}
    )
    with live_server(config) as (base, _):
        yield base


def test_warm_makes_every_ard_query_a_hit_and_a_second_warm_computes_nothing(service, tmp_path):
    run = ["--set", "limit_train=256", "--set", "val_size=64", "--set", f"teacher.url={service}"]
    first = akd_warm(*run, "--batch-rows", "100")
    assert first.returncode == 0, first.stderr
    assert "warmed 256 rows" in first.stdout and "256 computed, 0 already cached" in first.stdout
    # the same command under `akd cache`
    again = akd_warm(*run, command=("cache", "warm"))
    # resumable: redoes nothing
    assert again.returncode == 0 and "0 computed, 256 already cached" in again.stdout
    out = tmp_path / "ard"
    sets = ["limit_train=256", "val_size=64", "epochs=1", "batch_size=64", "attack.steps=1", "method=ard"]
    train(load_train_config(sets=[*sets, f"out_dir={out}", f"teacher.url={service}"]))
    [epoch] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # the first epoch already all hits
    assert epoch["teacher_rows"] == epoch["teacher_cache_hits"] == 256
    # asked for by key: no row went up whole
    assert epoch["teacher_rows_uploaded"] == 0


def test_warm_sends_every_augmented_view_of_a_cifar_run(tmp_path):
    # 10 training images
    write_synthetic_cifar10(tmp_path / "c10", per_batch=2)
    member = save_member(tmp_path / "m.pt", seed=0, arch="preact_resnet18", shape=(3, 32, 32))
    teacher = {"num_classes": 10, "input_shape": [3, 32, 32], "members": [{"path": str(member)}]}
    config = write_config(tmp_path / "t.toml", {"c10": teacher}, {"cache": {"dir": "cache"}})
    with live_server(config) as (base, _):
        sets = ["dataset=cifar10", f"data_dir={tmp_path / 'c10'}", "val_size=2", f"teacher.url={base}"]
        done = akd_warm(*[a for s in sets for a in ("--set", s)])
    assert done.returncode == 0, done.stderr
    # 8 training images x 162 views
    assert f"warmed {8 * AUGMENTED_VIEWS:,} rows" in done.stdout


def test_warm_needs_a_teacher_service_that_may_store_clean_rows():
    done = akd_warm("--set", "limit_train=16")
    assert done.returncode == 2 and "needs a teacher service" in done.stderr
    done = akd_warm("--set", "teacher.url=http://127.0.0.1:9", "--set", 'teacher.cache.clean="bypass"')
    assert done.returncode == 2 and 'teacher.cache.clean must be "use", not "bypass"' in done.stderr
