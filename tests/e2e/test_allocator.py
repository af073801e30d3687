"""shared.allocator: with freed memory kept, a repeated large allocation is served from pages the process already
holds (few or no page faults); with the system's defaults, each one faults its pages in again. Counted by the kernel
(minor faults, getrusage), in a fresh interpreter each time, so nothing here depends on speed. torch's tensors, not
numpy's: numpy asks for huge pages for large arrays, which hides the faults."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import REPO

FAULTS = """
import resource
from concurrent.futures import ThreadPoolExecutor
import torch
from shared.allocator import keep_freed_memory
kept = keep_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def step(n):  # as a forward pass does: large tensors, allocated afresh each call, touched, freed
    a = torch.ones(n); b = torch.ones(n // 2)
    del a, b
inference = ThreadPoolExecutor(1)  # as the service runs its forward passes: on a thread of their own
def both():
    step(16_000_000)  # 64 and 32 MB, on the main thread
    inference.submit(step, 32_000_000).result()  # 128 and 64 MB, past a thread arena's 64 MiB heaps
for _ in range(8):  # until the heap holds what a step needs
    both()
before = faults()
for _ in range(8):
    both()
print(kept, faults() - before)
"""


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "AKD_MALLOC"} | env
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=environ, capture_output=True, text=True, timeout=300
    )


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc and getrusage's fault counts")
def test_kept_memory_serves_a_repeated_large_allocation_without_faulting_it_in_again():
    kept = run_python(FAULTS)
    assert kept.returncode == 0, kept.stderr
    applied, kept_faults = kept.stdout.split()
    assert applied == "True"
    system = run_python(FAULTS, AKD_MALLOC="system")
    applied, system_faults = system.stdout.split()
    # past 32 MiB, mapped afresh each step
    assert applied == "False" and int(system_faults) > 400_000, system.stdout
    # Kept: usually none at all; the heap's layout can still make it grow by a block now and then (once, 31,251
    # pages in 4 steps, seen in CI), never by every block every step as the defaults do.
    assert int(kept_faults) < int(system_faults) // 4, (kept.stdout, system.stdout)


def test_a_bad_akd_malloc_is_refused_by_name():
    for command in (["-m", "akd", "--help"], ["-m", "teacher_service", "--config", "x.toml"]):
        result = subprocess.run(
            [sys.executable, *command],
            cwd=REPO,
            env=os.environ | {"AKD_MALLOC": "jemalloc"},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 2
        assert "AKD_MALLOC must be one of keep, system; got 'jemalloc'" in result.stderr, result.stderr
