"""One OpenMP thread team in the service's process: its device thread's.

Each thread that runs a parallel CPU op (a convolution, but also a softmax over a few rows) gets an OpenMP team of its
own from libgomp, kept for the thread's life. Once libgomp manages more threads than the machine has CPUs, it stops
spinning between parallel regions (its "throttled" spin count): every team's threads then sleep after each layer and
are woken for the next, and a small model's CPU forward pass runs markedly slower than in a process with one team. A
second team takes nothing more than one parallel op on another thread: the start-up probe on the main thread, or the
answers' softmax on the event loop.

So a CPU device's thread is the only one that runs parallel CPU ops with torch's intra-op threads (it loads and
probes the teachers too: `device_pool.DeviceWorker`); the event loop's thread and the threads that code request bodies
run theirs serially, on themselves (`serial_cpu_ops`). Their work is per request and small: decoding, a softmax over
its rows.

A GPU's thread runs its CPU ops serially too (`device_thread_setup`): they are a batch's gathering and placing of
rows, small beside the copy to the device, and a team for them, alone in the process and so never throttled, spins
between batches on every core it has, whatever the load. The measurements behind both rules are in
docs/design/teacher-service.md.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from threadpoolctl import threadpool_limits


def serial_cpu_ops() -> threadpool_limits:
    """Run this thread's parallel CPU ops on it alone, without a team: from now on, or until the `with` block that
    this is used as ends (the returned limiter restores the thread's setting)."""
    # torch sets a thread's OpenMP threads at its first parallel op: have that done first
    torch.get_num_threads()
    return threadpool_limits(limits=1, user_api="openmp")


def device_thread_setup(device: torch.device) -> Callable[[], object] | None:
    """What a device's thread runs first: nothing for a CPU, whose forward passes are the team's work; for any other
    device, `serial_cpu_ops`."""
    return None if device.type == "cpu" else serial_cpu_ops
