"""A serving `akd` command makes its idle OpenMP workers sleep before torch loads libgomp (shared/openmp_spin.py);
every other command, and a setting already in the environment, is left alone. Each case is a fresh interpreter:
libgomp reads its environment once."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from shared.openmp_spin import SERVING_SPIN_COUNT, serves

CLEAN = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}


def child(code: str, **env: str) -> str:
    run = subprocess.run([sys.executable, "-c", code], env={**CLEAN, **env}, capture_output=True, text=True)
    return run.stdout.strip().splitlines()[-1]


SET = (
    "import os\n{before}\nfrom shared.openmp_spin import idle_openmp_workers_sleep as sleep\n"
    "print(sleep(), os.environ.get('GOMP_SPINCOUNT'))"
)


def test_the_spin_is_set_where_nothing_says_how_openmp_waits():
    assert child(SET.format(before="")) == f"True {SERVING_SPIN_COUNT}"


def test_a_setting_in_the_environment_is_left_alone():
    assert child(SET.format(before=""), GOMP_SPINCOUNT="300000") == "False 300000"
    assert child(SET.format(before=""), OMP_WAIT_POLICY="active") == "False None"


def test_nothing_is_set_once_torch_has_loaded_libgomp():
    assert child(SET.format(before="import torch")) == "False None"


@pytest.mark.parametrize(
    ("argv", "serving"),
    [
        (["serve", "--config", "t.toml"], True),
        (["demo", "--stage", "serve", "--port", "8000"], True),
        (["demo", "--out", "runs/x", "--stage=serve"], True),
        (["demo", "--stage", "students"], False),
        (["demo"], False),
        (["train", "--config", "serve"], False),
        (["bench", "--only", "round_trip"], False),
        ([], False),
    ],
)
def test_which_commands_serve(argv, serving):
    assert serves(argv) is serving


def test_akd_serve_sets_it_before_its_module_loads_torch_and_akd_train_does_not():
    """`akd` as installed: the setting is in the environment by the time `serve`'s module is imported, and not for
    `train`."""
    code = (
        "import os, sys, akd.cli as cli\n"
        "sys.argv = ['akd', {command!r}, '--help']\n"
        "try:\n    cli.main()\nexcept SystemExit:\n    pass\n"
        "print(os.environ.get('GOMP_SPINCOUNT'))\n"
    )
    assert child(code.format(command="serve")) == str(SERVING_SPIN_COUNT)
    assert child(code.format(command="train")) == "None"
