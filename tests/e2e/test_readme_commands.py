"""The README's commands as a new user runs them: in a fresh copy of the checkout, from its root, exactly as
written (relative paths and all), copied out of README.md so that the test follows the README.

- `make demo`, the main job, with the quick plan (AKD_DEMO_QUICK=1 picks it; the command stays the README's).
  It builds the copy's own .venv as on a fresh machine (about a minute, pip's cache helps).
- The walkthrough of "Training teachers and students", line by line with that .venv: `akd train --config
  configs/...`, `akd compare`, `akd serve --config configs/teachers.toml &`, `akd eval`. Only the budget is
  cut (`--set epochs=1 --set limit_train=256`, `--limit` for eval) and the service gets a free port (AKD_PORT,
  and `--set teacher.url=...` for the student that uses it); every path is the README's.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import httpx
import pytest
from conftest import HANG_S, REPO, copy_checkout, free_port, wait_healthy

README = (REPO / "README.md").read_text()
TRAIN_BUDGET = ["--set", "epochs=1", "--set", "limit_train=256"]
EVAL_BUDGET = ["--limit", "16", "--autoattack-limit", "2"]


def readme_commands(heading: str) -> list[str]:
    """The commands of the first bash block under `heading`, without their comments."""
    section = README.split(f"\n{heading}\n", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.strip() and not line.startswith("#")]


def user_env(clone: Path | None = None) -> dict:
    """A user's shell: none of the outer make's or venv's settings; with `clone`'s .venv activated."""
    outer = str(Path(sys.executable).parent)
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS", "VIRTUAL_ENV")}
    path = [p for p in env.get("PATH", "").split(os.pathsep) if p and p != outer]
    if clone is not None:
        env["VIRTUAL_ENV"] = str(clone / ".venv")
        path.insert(0, str(clone / ".venv" / "bin"))
    env["PATH"] = os.pathsep.join(path)
    return env


def run(command: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=HANG_S)
    assert done.returncode == 0, f"{shlex.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def start_in_background(argv: list[str], cwd: Path, env: dict) -> subprocess.Popen:
    """`argv &`, then wait until it answers /healthz on $AKD_PORT."""
    with open(cwd / "serve.log", "wb") as log:
        service = subprocess.Popen(argv, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
    wait_healthy(f"http://127.0.0.1:{env['AKD_PORT']}", alive=lambda: service.poll() is None, timeout_s=HANG_S)
    return service


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    """A fresh copy of the checkout in which the README's main job ran, as written, with the quick plan."""
    clone = copy_checkout(tmp_path_factory.mktemp("fresh") / "akd")
    make_demo = next(c for c in readme_commands("## The two commands") if c.startswith("make demo"))
    assert make_demo == "make demo"
    run(shlex.split(make_demo), clone, {**user_env(), "AKD_DEMO_QUICK": "1"})
    return clone


def test_make_demo_as_written_writes_runs_demo_results(clone):
    results = (clone / "runs" / "demo" / "RESULTS.md").read_text()
    assert "| pgd-at |" in results and "| akd-ensemble |" in results
    teacher = clone / "runs" / "demo" / "teachers" / "at-s10"
    assert (teacher / "best.pt").exists() and not (teacher / "runs").exists()
    # the run.toml can move with its folder
    assert tomllib.loads((teacher / "run.toml").read_text())["out_dir"] == "."
    served = tomllib.loads((clone / "runs" / "demo" / "service" / "teachers.toml").read_text())
    assert served["teachers"]["ensemble"]["members"][0]["path"] == "../teachers/at-s10/best.pt"


def test_make_installs_the_locked_versions_and_the_readmes_torch_and_the_report_says_so(clone):
    """A fresh clone's `make` ends with torch as the Makefile pins it and every other package at the lock's version
    (scripts/check_env.py, which `make test` runs first, agrees), and the demo's report records that torch."""
    makefile = (clone / "Makefile").read_text()
    pinned = re.search(r"^TORCH \?= torch==(\S+)$", makefile, re.M).group(1)
    python = str(clone / ".venv" / "bin" / "python")
    installed = run([python, "-c", "import torch; print(torch.__version__)"], clone, user_env(clone)).stdout.strip()
    assert installed.split("+")[0] == pinned
    run([python, "scripts/check_env.py", f"torch=={pinned}"], clone, user_env(clone))
    machine = json.loads((clone / "runs" / "demo" / "results.json").read_text())["machine"]
    assert f"torch {installed}," in machine


def test_the_walkthrough_as_written_trains_serves_distils_and_evaluates(clone):
    env = user_env(clone)
    port = free_port()
    service = None
    try:
        for line in readme_commands("## Training teachers and students"):
            argv = shlex.split(line.removesuffix("&").strip())
            assert argv[0] == "akd", line
            if argv[1] == "serve":
                # the README starts it in the background
                assert line.endswith("&")
                service = start_in_background(argv, clone, {**env, "AKD_PORT": str(port)})
                continue
            if argv[1] == "train":
                config = tomllib.loads((clone / argv[argv.index("--config") + 1]).read_text())
                argv += TRAIN_BUDGET + (
                    ["--set", f"teacher.url=http://127.0.0.1:{port}"] if "teacher" in config else []
                )
            if argv[1] == "eval":
                argv += EVAL_BUDGET
            run(argv, clone, env)
        rows = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=HANG_S).text
    finally:
        if service is not None:
            service.terminate()
            service.wait(timeout=HANG_S)
    runs = clone / "runs"
    for name in ("teacher-at", "teacher-weak", "student-akd", "student-at"):
        assert (runs / name / "best.pt").exists(), name
    assert (runs / "teachers" / "compare.md").exists() and (runs / "students" / "compare.md").exists()
    evaluated = json.loads((runs / "student-akd" / "eval.json").read_text())
    assert evaluated["n"] == 16 and {"clean_acc", "pgd_acc", "autoattack_acc"} <= set(evaluated)
    # the service config's cache.dir, relative to its file
    assert (runs / "teacher-cache" / "zarr.json").exists()
    assert re.search(r'akd_rows_total\{teacher="mnist"\} [1-9]', rows), "the AKD student never asked the service"
    nested = [str(p.relative_to(clone)) for p in clone.rglob("runs") if p != runs and ".venv" not in p.parts]
    assert not nested, f"runs landed in nested folders: {nested}"
