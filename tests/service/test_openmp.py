"""One OpenMP thread team in the service's process, its device thread's (teacher_service/openmp.py).

A thread that runs a parallel CPU op gets a team of its own; past as many threads as CPUs, libgomp stops spinning
and every team's forward pass slows down. These tests run the real app under a real uvicorn in this process, where
its threads can be told apart: Python's threads are listed by `threading`, OpenMP's are not.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch
from conftest import HANG_S, REPO, live_server, mnist_teacher, random_inputs, write_config

from shared import codec, protocol
from teacher_service.openmp import device_thread_setup

# a uint8 body and two members' logits past what is decoded and encoded on the loop
# (body.INLINE_BODY_BYTES, INLINE_ANSWER_BYTES)
LARGE_ROWS = 2048


def openmp_threads() -> set[str]:
    """This process's threads that Python did not start and libuv did not name: OpenMP's workers."""
    python = {str(t.native_id) for t in threading.enumerate()}
    native = set(os.listdir("/proc/self/task")) - python
    return {tid for tid in native if _name(tid) != "libuv-worker"}


def _name(tid: str) -> str:
    try:
        return Path(f"/proc/self/task/{tid}/comm").read_text().strip()
    except OSError:
        # the thread ended meanwhile
        return ""


def exercise(base: str) -> None:
    """Every route that touches tensors, small bodies on the event loop and large ones on the coding threads."""
    small, large = random_inputs(16), random_inputs(LARGE_ROWS, torch.uint8, seed=1)
    for x, outputs in ((small, "probs"), (large, "probs,logits,member_logits"), (small, "logits")):
        r = httpx.post(
            base + protocol.SOFT_TARGETS_PATH,
            params={"outputs": outputs},
            content=codec.encode_inputs(x),
            timeout=HANG_S,
        )
        assert r.status_code == 200, r.text
    r = httpx.post(base + protocol.SOFT_TARGET_KEYS_PATH, content=codec.encode_keys(large), timeout=HANG_S)
    assert r.status_code == 200 and codec.decode(r.content)[protocol.FOUND_KEY].all(), r.text
    for path in (protocol.TEACHERS_PATH, protocol.HEALTH_PATH, protocol.METRICS_PATH):
        assert httpx.get(base + path, timeout=HANG_S).status_code == 200


def test_the_service_keeps_one_openmp_team_whatever_its_routes_do(tmp_path, mnist_members):
    # this (the test's) thread's own team, made before the count
    torch.softmax(torch.rand(256, 1000), dim=-1)
    config = write_config(
        tmp_path / "t.toml",
        {"mnist": mnist_teacher([(mnist_members["a"], 1.0), (mnist_members["b"], 1.0)])},
        {"cache": {"dir": str(tmp_path / "cache")}, "limits": {"queue_rows": 4096}},
    )
    before = openmp_threads()
    with live_server(config) as (base, _):
        exercise(base)
        started = openmp_threads() - before
    # the device thread's team: torch's intra-op threads, less the device thread itself. Before openmp.py, the event
    # loop's softmax made a second one (and the main thread's start-up probe a third, in `akd serve`).
    assert len(started) == torch.get_num_threads() - 1, (started, torch.get_num_threads())


def test_every_forward_pass_of_the_service_runs_on_its_device_thread(tmp_path, mnist_members):
    """The start-up probe included: a forward pass on the main thread would give it a team of its own."""
    ran_on: list[str] = []
    hook = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda module, args: ran_on.append(threading.current_thread().name)
    )
    config = write_config(tmp_path / "t.toml", {"mnist": mnist_teacher([(mnist_members["a"], 1.0)])})
    try:
        with live_server(config) as (base, _):
            r = httpx.post(
                base + protocol.SOFT_TARGETS_PATH, content=codec.encode_inputs(random_inputs(4)), timeout=HANG_S
            )
            assert r.status_code == 200, r.text
    finally:
        hook.remove()
    assert ran_on and {name.rsplit("_", 1)[0] for name in ran_on} == {"akd-inference-cpu"}, set(ran_on)


def team_started_by_a_device_thread(device: str) -> int:
    """New OpenMP threads once a device's thread (as DeviceWorker starts it) has placed a batch's rows into a tensor
    (an index_put, what `TeacherRunner` does with cached and computed rows), counted while that thread lives."""

    def place_rows() -> None:
        out = torch.zeros(4096, 1000)
        out[torch.arange(0, 4096, 2)] = torch.rand(2048, 1000)

    before = openmp_threads()
    with ThreadPoolExecutor(1, initializer=device_thread_setup(torch.device(device))) as thread:
        thread.submit(place_rows).result()
        return len(openmp_threads() - before)


def test_a_gpu_devices_thread_runs_its_cpu_ops_without_a_team_and_a_cpu_devices_keeps_its_own():
    """A GPU's device thread must run its CPU ops (placing rows) serially: given an OpenMP team, that team spins
    between batches on the host's other cores (docs/design/teacher-service.md, openmp). Not a CUDA test: which setup
    a device's thread gets depends only on the device's type, and what the setup does is measured here, on a CPU."""
    assert team_started_by_a_device_thread("cuda") == 0
    # the forward passes' team
    assert team_started_by_a_device_thread("cpu") == torch.get_num_threads() - 1


SENDS_A_BATCH = """
import os, threading, numpy as np, torch
from shared import codec
from shared.client import arrays
def native():
    return set(os.listdir("/proc/self/task")) - {str(t.native_id) for t in threading.enumerate()}
clean = np.random.default_rng(0).integers(0, 256, (512, 3, 32, 32)).astype(np.float32) / np.float32(255)
batches = [torch.from_numpy(clean), torch.from_numpy(clean + np.float32(1e-3))]  # sent as uint8, and as float32
before = native()
for x in batches:
    codec.encode_inputs(codec.to_transport(x))
    # the client's own path (the trainer's): its wire form, its body, its keys, an answer back on x's device
    rows, device = arrays.wire_rows(x, own=True)
    arrays.encode_inputs(rows), arrays.encode_keys(rows)
    arrays.like_input(np.full((512, 10), 0.1, np.float32), device)
print(len(native() - before))
"""


def test_a_trainer_encodes_its_request_without_starting_an_openmp_team():
    """`to_transport` runs for every teacher request; as a torch op it started a team whose threads spun for
    milliseconds after each request, on the cores a co-located service computes on. A fresh process, whose only
    parallel work this is."""
    result = subprocess.run(
        [sys.executable, "-c", SENDS_A_BATCH], cwd=REPO, capture_output=True, text=True, timeout=HANG_S
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["0"], result.stdout
