"""One OpenMP thread team in the service's process: its device thread's.

Each thread that runs a parallel CPU op (a convolution, but also a softmax over a few rows) gets an OpenMP team of its
own from libgomp, kept for the thread's life. Once libgomp manages more threads than the machine has CPUs, it stops
spinning between parallel regions (its "throttled" spin count of 100): every team's threads then sleep after each
layer and are woken for the next. On the 2-core VM the project is measured on, the start-up probe (main thread) and
the answers' softmax (event loop) had each made a team beside the inference thread's, and the service's small-CNN
forward at batch 32 took 16 to 17 ms against 9 to 11 ms in the caller's process, which has one team (bench/RESULTS.md,
section 10; `python scripts/forward_profile.py --modes keep --arch small_cnn --batch 32`).

So a CPU device's thread is the only one that runs parallel CPU ops with torch's intra-op threads (it loads and
probes the teachers too: `device_pool.DeviceWorker`); the event loop's thread and the threads that code request bodies
run theirs serially, on themselves (`serial_cpu_ops`). Their work is per request and small: decoding, a softmax over
its rows.

A GPU's thread runs its CPU ops serially too (`device_thread_setup`): they are a batch's gathering and placing of
rows, small beside the copy to the device, and a team for them spins. On a lent 16-core H200 the service's
inference thread made a 15-thread team for placing each batch's logits (an index_put on a (B, 10) tensor); its
threads spun between batches and kept 7 to 15 cores busy whatever the load, beside the event loop and the clients
(bench/RESULTS.md, section 11).
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
