"""A device worker's staging (teacher_service/staging.py): a batch's rows gathered into a reused float32 buffer bit
for bit as their concatenation, and the forward passes over them giving `TeacherRunner.forward`'s logits bit for bit.

No GPU here, and none needed: `DeviceStage`, the CUDA path, is built for a CPU device, which runs the same code with
its buffers unpinned (pinning needs CUDA) and no stream; what a GPU adds (pinning, the stream, its one
synchronisation) is measured by the prepared GPU command (docs/design/benchmarks.md). Cheap: two small CNNs on a few
MNIST-sized rows, well under a second.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import mnist_teacher, random_inputs, write_config

from shared.codec import to_unit_float
from shared.protocol import CacheMode
from teacher_service.config import load_config
from teacher_service.inference import Rows, TeacherRunner
from teacher_service.metrics import Metrics
from teacher_service.registry import load_teachers
from teacher_service.staging import TORCH_ALIGNMENT, DeviceStage, HostBuffer, Staging, gather, staging_for

CPU = torch.device("cpu")


def bits(x: torch.Tensor) -> torch.Tensor:
    """float32 values as their bit patterns: equal only where every bit is (0.0 and -0.0 differ)."""
    return x.contiguous().view(torch.int32)


def concatenated(parts: list[torch.Tensor]) -> torch.Tensor:
    """What the service gathered a batch into before staging: the reference for every gathered batch."""
    return torch.cat([to_unit_float(p) for p in parts])


def mixed_parts() -> list[torch.Tensor]:
    """Requests of every wire dtype, and a slice of a larger request (a view with an offset), as a batch holds them."""
    return [
        random_inputs(3, torch.uint8, seed=1),
        random_inputs(2, torch.float16, seed=2),
        random_inputs(4, seed=3),
        random_inputs(9, seed=4)[5:8],
    ]


def test_a_batch_is_gathered_bit_for_bit_as_its_concatenation_into_one_reused_buffer():
    buffer, parts = HostBuffer(), mixed_parts()
    x = gather(parts, buffer)
    assert x.dtype == torch.float32 and x.shape == (12, 1, 28, 28)
    assert torch.equal(bits(x), bits(concatenated(parts)))
    first = x.data_ptr()
    assert first % TORCH_ALIGNMENT == 0
    # a smaller batch reuses the buffer from its start
    smaller = [random_inputs(5, torch.uint8, seed=5)]
    y = gather(smaller, buffer)
    assert y.data_ptr() == first and buffer.allocations == 1
    assert torch.equal(bits(y), bits(concatenated(smaller)))
    # a larger one grows it, once
    larger = [random_inputs(20, seed=6), random_inputs(1, torch.uint8, seed=7)]
    z = gather(larger, buffer)
    assert buffer.allocations == 2 and z.shape == (21, 1, 28, 28)
    assert torch.equal(bits(z), bits(concatenated(larger)))
    assert gather(parts, buffer).data_ptr() == z.data_ptr() and buffer.allocations == 2


def test_rows_of_another_shape_are_refused_not_broadcast():
    with pytest.raises(ValueError, match=r"rows of shape \(1, 1, 28\)"):
        gather([random_inputs(2), random_inputs(2, shape=(1, 1, 28))], HostBuffer())


def test_a_single_float32_request_is_used_as_is_and_anything_else_is_converted_into_the_buffer():
    staging = Staging()
    x = random_inputs(6, seed=1)
    assert x.data_ptr() % TORCH_ALIGNMENT == 0
    assert staging.inputs([x]) is x
    # not aligned as torch allocates: gathered, so the kernels see what they always saw
    misaligned = torch.empty(x.numel() + 1)[1:].view_as(x).copy_(x)
    for single in (misaligned, random_inputs(6, torch.uint8, seed=2), random_inputs(6, torch.float16, seed=3)):
        got = staging.inputs([single])
        assert got.data_ptr() != single.data_ptr() and got.data_ptr() % TORCH_ALIGNMENT == 0
        assert torch.equal(bits(got), bits(concatenated([single])))
    # several requests, even float32 ones, are one batch: gathered
    pair = [random_inputs(2, seed=4), random_inputs(3, seed=5)]
    assert torch.equal(bits(staging.inputs(pair)), bits(concatenated(pair)))


def test_the_gpu_path_gathers_every_batch_into_its_own_buffer_and_a_cpu_device_gets_the_plain_path():
    stage = DeviceStage(CPU)
    # pinning needs CUDA, which this machine lacks: a DeviceStage for a CPU device leaves its buffers unpinned
    assert stage.stream is None and not stage._inputs.pinned
    x = random_inputs(4, seed=1)
    got = stage.inputs([x])
    # always copied into the (pinned, on a GPU) buffer, whence the upload need not wait
    assert got.data_ptr() != x.data_ptr() and torch.equal(bits(got), bits(x))
    # the service builds a DeviceStage for CUDA only
    assert type(staging_for(CPU)) is Staging


def member_logits(seed: int):
    torch.manual_seed(seed)
    layer = torch.nn.Linear(784, 10)
    return lambda rows: layer(rows.flatten(1)).float()


@pytest.mark.parametrize("stage", [Staging(), DeviceStage(CPU)], ids=["cpu", "gpu path on the cpu"])
def test_each_pass_runs_on_its_rows_and_its_logits_come_back_in_order(stage):
    x = stage.inputs(mixed_parts())
    a, b = member_logits(1), member_logits(2)
    every, some = np.arange(len(x)), np.array([0, 4, 11])
    with torch.inference_mode():
        got = stage.forward(x, [(a, every), (b, some), (a, some[:1])], classes=10)
        expected = [a(x), b(x[torch.from_numpy(some)]), a(x[:1])]
    assert [tuple(g.shape) for g in got] == [(12, 10), (3, 10), (1, 10)]
    for g, e in zip(got, expected):
        assert torch.equal(bits(g), bits(e))


def test_the_gpu_path_returns_views_of_its_reused_logits_buffer():
    stage = DeviceStage(CPU)
    x = stage.inputs([random_inputs(5, seed=1)])
    with torch.inference_mode():
        first = stage.forward(x, [(member_logits(1), np.arange(5))], classes=10)[0]
    # buffers first made under inference_mode are written to outside it
    with torch.no_grad():
        second = stage.forward(stage.inputs([random_inputs(5, seed=2)]), [(member_logits(2), np.arange(5))], 10)[0]
    assert first.data_ptr() == second.data_ptr() and stage._logits.allocations == 1


@pytest.fixture
def teacher(tmp_path, mnist_members):
    """A two-member small-CNN teacher (a checkpoint and a torch.export file), loaded as the service loads it."""
    members = [(mnist_members["a"], 1.0), (mnist_members["c"], 2.0)]
    config = load_config(write_config(tmp_path / "t.toml", {"t": mnist_teacher(members)}), environ={})
    return load_teachers(config, CPU)["t"]


def reference_compute(runner: TeacherRunner, batch: list[Rows], misses: list[np.ndarray]) -> torch.Tensor:
    """What `compute` did before staging, member by member through `forward`: the rows concatenated, each member run
    on all of them or on the ones it misses."""
    x = concatenated([r.inputs for r in batch])
    out = torch.zeros(len(runner.teacher.members), len(x), 10)
    for m, (member, miss) in enumerate(zip(runner.teacher.members, misses)):
        if len(miss) == len(x):
            out[m] = runner.forward(member, x)
        elif len(miss):
            out[m][torch.from_numpy(miss)] = runner.forward(member, x[torch.from_numpy(miss)])
    return out


@pytest.mark.parametrize(
    "settings", [{}, {"channels_last": True}, {"autocast": "bf16"}], ids=["float32", "channels_last", "bf16"]
)
def test_compute_gives_the_reference_paths_logits_bit_for_bit_on_either_path(teacher, settings):
    batches = [
        [Rows(random_inputs(6, seed=1), None, CacheMode.bypass)],
        [Rows(random_inputs(6, torch.uint8, seed=2), None, CacheMode.bypass)],
        [Rows(p, None, CacheMode.bypass) for p in mixed_parts()],
    ]
    for staging in (Staging(), DeviceStage(CPU)):
        runner = TeacherRunner(teacher, None, CPU, Metrics(), staging=staging, **settings)
        for batch in batches:
            n = sum(len(r) for r in batch)
            # every row missed by both, then some rows missed by one member only, none by the other (cache hits)
            for misses in ([np.arange(n), np.arange(n)], [np.array([0, 2, n - 1]), np.array([], dtype=np.int64)]):
                work = runner.lookup(batch)
                work.out.zero_()
                work.misses = misses
                got = runner.compute(work).out
                assert torch.equal(bits(got), bits(reference_compute(runner, batch, misses))), (staging, settings)
