"""The example configs of the README's walkthrough are valid and fit together."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

import pytest
from conftest import REPO

from student_trainer.config import load_train_config
from teacher_service.config import load_config

CONFIGS = REPO / "configs"


@pytest.mark.parametrize("name", ["teacher-at", "teacher-weak", "student-at", "student-akd"])
def test_run_configs_validate(name):
    cfg = load_train_config(CONFIGS / f"{name}.toml")
    # relative to the config file, not the caller's folder
    assert Path(cfg.out_dir).resolve() == REPO / "runs" / name


def test_weak_teacher_trains_weaker_but_validates_at_full_strength():
    weak, strong = load_train_config(CONFIGS / "teacher-weak.toml"), load_train_config(CONFIGS / "teacher-at.toml")
    assert weak.train_attack.eps < strong.train_attack.eps and weak.train_attack.steps < strong.train_attack.steps
    assert weak.val_attack.eps == strong.val_attack.eps and weak.val_attack.steps == strong.val_attack.steps


def test_service_serves_the_teachers_best_checkpoints_where_the_student_looks():
    service = load_config(CONFIGS / "teachers.toml", environ={})
    members = {Path(m.path).resolve() for m in service.teachers["mnist"].members}
    runs = {
        (Path(load_train_config(CONFIGS / f"{n}.toml").out_dir) / "best.pt").resolve()
        for n in ("teacher-at", "teacher-weak")
    }
    assert members == runs
    student = load_train_config(CONFIGS / "student-akd.toml")
    assert urlparse(student.teacher.url).port == service.server.port and student.teacher.name in service.teachers
