"""shared.allocator: with freed memory kept, a repeated large allocation is served from pages the process already
holds (no page faults); with the system's defaults, each one faults its pages in again. Counted by the kernel
(minor faults, getrusage), in a fresh interpreter each time, so nothing here depends on speed. torch's tensors, not
numpy's: numpy asks for huge pages for large arrays, which hides the faults."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FAULTS = """
import resource
import torch
from shared.allocator import keep_freed_memory
kept = keep_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def step():  # as a forward pass does: large tensors, allocated afresh each call, touched, freed
    a = torch.ones(16_000_000); b = torch.ones(8_000_000)  # 64 and 32 MB
    del a, b
for _ in range(8):  # until the heap holds what a step needs
    step()
before = faults()
for _ in range(4):
    step()
print(kept, faults() - before)
"""


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "AKD_MALLOC"} | env
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=environ, capture_output=True, text=True, timeout=300
    )


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc and getrusage's fault counts")
def test_kept_memory_serves_a_repeated_large_allocation_without_faulting_it_in_again():
    kept = run_python(FAULTS)
    assert kept.returncode == 0, kept.stderr
    applied, faults = kept.stdout.split()
    assert applied == "True" and int(faults) < 1000, kept.stdout  # 4 steps of 96 MB, nearly none of it faulted in
    system = run_python(FAULTS, AKD_MALLOC="system")
    applied, faults = system.stdout.split()
    assert applied == "False" and int(faults) > 40_000, system.stdout  # the 64 MB tensor is mapped afresh each step


def test_a_bad_akd_malloc_is_refused_by_name():
    for command in (["-m", "shared.cli", "--help"], ["-m", "teacher_service", "--config", "x.toml"]):
        result = subprocess.run(
            [sys.executable, *command],
            cwd=ROOT,
            env=os.environ | {"AKD_MALLOC": "jemalloc"},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 2
        assert "AKD_MALLOC must be one of keep, system; got 'jemalloc'" in result.stderr, result.stderr
