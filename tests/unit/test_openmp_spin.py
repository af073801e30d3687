"""Every `akd` command shortens libgomp's idle spin before torch loads it (shared/openmp_spin.py), and leaves a
setting already in the environment alone. Each case is a fresh interpreter: libgomp reads its environment once."""

from __future__ import annotations

import os
import subprocess
import sys

from shared.openmp_spin import SPIN_COUNT

# what the child prints: whether it set the spin, then the setting libgomp would read
CHILD = """
import os, sys
{before}
from shared.openmp_spin import short_openmp_spin
print(short_openmp_spin(), os.environ.get("GOMP_SPINCOUNT"))
"""


def run(before: str = "", **env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    out = subprocess.run(
        [sys.executable, "-c", CHILD.format(before=before)],
        env={**clean, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


def test_the_spin_is_set_where_nothing_says_how_openmp_waits():
    assert run() == f"True {SPIN_COUNT}"


def test_a_setting_in_the_environment_is_left_alone():
    assert run(GOMP_SPINCOUNT="300000") == "False 300000"
    assert run(OMP_WAIT_POLICY="active") == "False None"


def test_nothing_is_set_once_torch_has_loaded_libgomp():
    assert run(before="import torch") == "False None"


def test_every_akd_command_sets_it_before_its_subcommand_loads_torch():
    """`akd` as installed: the setting is in its environment by the time a subcommand's module is imported."""
    code = (
        "import os, sys, akd.cli as cli\n"
        "sys.argv = ['akd', '--help']\n"
        "try:\n    cli.main()\nexcept SystemExit:\n    pass\n"
        "print('torch' in sys.modules, os.environ.get('GOMP_SPINCOUNT'), file=sys.stderr)\n"
    )
    clean = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    out = subprocess.run([sys.executable, "-c", code], env=clean, capture_output=True, text=True, check=True)
    assert out.stderr.strip().splitlines()[-1] == f"False {SPIN_COUNT}"
