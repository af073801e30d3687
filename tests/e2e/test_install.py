"""The install is what was tested: scripts/check_env.py, which `make` runs after installing and `make test` runs
first, refuses an environment whose torch is not the Makefile's or whose packages are not requirements.lock's."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from importlib import metadata

from conftest import HANG_S, REPO
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

CHECK = [sys.executable, str(REPO / "scripts" / "check_env.py")]
TORCH = metadata.version("torch")


def check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CHECK, *args], capture_output=True, text=True, timeout=HANG_S)


def lock_pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version
    return pins


def test_the_lock_pins_every_dependency_of_every_extra_within_the_project_ranges_and_leaves_torch_to_the_pin():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    wanted = [Requirement(r) for r in project["dependencies"] + extras["test"] + extras["bench"]]
    pins = lock_pins()
    # the Makefile's TORCH and the image's TORCH build argument decide it
    assert "torch" not in pins
    for requirement in wanted:
        if requirement.name == "torch":
            continue
        pinned = pins.get(canonicalize_name(requirement.name))
        assert pinned is not None, f"{requirement.name} is in pyproject.toml but not pinned in requirements.lock"
        assert requirement.specifier.contains(pinned), f"lock: {requirement.name}=={pinned}, outside {requirement}"


def test_an_environment_that_matches_passes(tmp_path):
    lock = tmp_path / "lock"
    lock.write_text(f"# a comment\nhttpx=={metadata.version('httpx')}\nnot-installed-here==1.0\n")
    done = check(f"torch=={TORCH.split('+')[0]}", str(lock))
    assert done.returncode == 0, done.stderr
    wheel = f"https://example.invalid/whl/torch-{TORCH}-cp311-cp311-linux_x86_64.whl"
    assert check(wheel, str(lock)).returncode == 0


def test_another_torch_is_refused_naming_both_versions(tmp_path):
    lock = tmp_path / "lock"
    lock.write_text("")
    done = check("torch==1.0.0 --index-url https://download.pytorch.org/whl/cpu", str(lock))
    assert done.returncode == 1
    assert f"torch {TORCH} is installed; expected torch==1.0.0" in done.stderr and "make test" in done.stderr


def test_a_package_at_another_version_than_the_lock_is_refused_naming_it(tmp_path):
    lock = tmp_path / "lock"
    lock.write_text(f"httpx==0.0.1\nPyYAML=={metadata.version('pyyaml')}\n")
    done = check(f"torch=={TORCH}", str(lock))
    assert done.returncode == 1
    assert f"httpx {metadata.version('httpx')} is installed; lock pins 0.0.1" in done.stderr
    assert "PyYAML" not in done.stderr and "pyyaml" not in done.stderr
