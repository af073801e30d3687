"""A device worker's staging of a batch: its requests' rows as one float32 tensor on the host, and the forward passes
of its members over them.

`Staging` is a CPU device's: the rows are gathered only where they must be (a single float32 request is used as is),
into a buffer reused from batch to batch, and each forward pass runs on them where they lie. `DeviceStage` is a CUDA
device's: the rows are gathered into a pinned (page-locked) buffer, copied to the GPU once, without waiting, on the
worker's own stream, every member runs on that stream, each one's logits are copied back into a second pinned buffer
without waiting either, and the host waits once, for the whole batch, at the end.

Both are owned by one `DeviceWorker` and used on its thread only, one batch at a time (the worker runs one batch at
a time, on one thread): their buffers are then never shared between workers or between batches in flight. Each
buffer grows to the largest batch it has held, which the batcher bounds (`[server.batching] max_rows` rows), and is
kept. A `DeviceStage` may be built for a CPU device too (unpinned buffers, no stream): the same code, which is how
its bookkeeping is tested without a GPU; the service builds one only for CUDA (`staging_for`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import numpy as np
import torch

# torch's CPU allocator aligns every tensor it allocates to this many bytes
TORCH_ALIGNMENT = 64

# one member's forward pass: its logits function (rows on the device -> float32 logits there), and the positions of
# the batch's rows it runs on
Pass = tuple[Callable[[torch.Tensor], torch.Tensor], np.ndarray]


class HostBuffer:
    """A float32 host buffer reused from one batch to the next, grown to the largest size asked for and never shrunk;
    pinned where `pinned` (only with CUDA: pinning needs it), so that copies between it and a GPU need not wait."""

    def __init__(self, pinned: bool = False):
        self.pinned = pinned
        self._data = torch.empty(0)
        # how many times it was allocated: once per growth
        self.allocations = 0

    def take(self, shape: tuple[int, ...]) -> torch.Tensor:
        """The buffer's first prod(shape) values as a contiguous tensor of `shape`, starting where the buffer starts
        (so aligned as torch aligns a fresh tensor). The caller overwrites it; it stays valid until the next `take`."""
        n = math.prod(shape)
        if n > self._data.numel():
            # a normal tensor even when first asked for under inference_mode: an inference tensor could not be written
            # to outside it
            with torch.inference_mode(False):
                self._data = torch.empty(n, dtype=torch.float32, pin_memory=self.pinned)
            self.allocations += 1
        return self._data[:n].view(shape)


def gather(parts: list[torch.Tensor], buffer: HostBuffer) -> torch.Tensor:
    """The parts' rows, in order, as float32 in [0, 1] in `buffer`: bit for bit
    `torch.cat([codec.to_unit_float(p) for p in parts])` (the same conversions, uint8 as x.float() / 255.0), without
    the intermediate tensors. Every part must have the first one's row shape: a copy would broadcast where a
    concatenation refuses."""
    x = buffer.take((sum(len(p) for p in parts), *parts[0].shape[1:]))
    start = 0
    for part in parts:
        if part.shape[1:] != x.shape[1:]:
            raise ValueError(f"rows of shape {tuple(part.shape[1:])} in a batch of rows of shape {tuple(x.shape[1:])}")
        rows = x[start : start + len(part)]
        rows.copy_(part)
        if part.dtype == torch.uint8:
            rows.div_(255.0)
        start += len(part)
    return x


def usable_as_is(part: torch.Tensor) -> bool:
    """A float32 request that a forward pass may read where it lies: contiguous and aligned as a fresh tensor, so the
    kernels see what they saw in a gathered copy (some BLAS kernels' sums depend on alignment)."""
    return part.dtype == torch.float32 and part.is_contiguous() and part.data_ptr() % TORCH_ALIGNMENT == 0


class Staging:
    """A CPU device's staging: nothing is copied that need not be, and no buffer is allocated per batch."""

    def __init__(self) -> None:
        self._inputs = HostBuffer()

    def inputs(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """The batch's rows (its requests' inputs, in order) as one float32 tensor in [0, 1], bit for bit their
        concatenation: a single float32 request as is where it may be (`usable_as_is`), else gathered into this
        stage's buffer (valid until the next call)."""
        if len(parts) == 1 and usable_as_is(parts[0]):
            return parts[0]
        return gather(parts, self._inputs)

    def forward(self, x: torch.Tensor, passes: list[Pass], classes: int) -> list[torch.Tensor]:
        """Each pass's logits (rows, classes), in order: its function over its rows of `x` (over `x` itself, without
        a gather, when it runs on every row)."""
        return [logits(x if len(rows) == len(x) else x[torch.from_numpy(rows)]) for logits, rows in passes]


class DeviceStage(Staging):
    """A CUDA device's staging: pinned buffers, the worker's own stream, and one synchronisation a batch.

    Invariant: no copy from or into its buffers is in flight once `forward` returns or raises (it synchronises the
    stream either way), so the next batch may overwrite them. The logits it returns are views of its pinned buffer,
    valid until its next `forward`: the caller copies them out first.
    """

    def __init__(self, device: torch.device):
        cuda = device.type == "cuda"
        self.device = device
        self.stream = torch.cuda.Stream(device) if cuda else None
        self._inputs = HostBuffer(pinned=cuda)
        self._logits = HostBuffer(pinned=cuda)

    def inputs(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """The batch's rows gathered into the pinned buffer, always: a copy from pageable memory would be staged and
        waited for by the driver, while this one is a host copy and the upload need not wait."""
        return gather(parts, self._inputs)

    def forward(self, x: torch.Tensor, passes: list[Pass], classes: int) -> list[torch.Tensor]:
        """Each pass's logits (rows, classes) on the host, in order: `x` (from `inputs`) uploaded once, every pass on
        the stream, its logits copied into the pinned buffer; then one wait for the stream."""
        out = self._logits.take((len(passes), len(x), classes))
        try:
            with self._on_stream():
                rows_there = x.to(self.device, non_blocking=True)
                for i, (logits, rows) in enumerate(passes):
                    if len(rows) != len(x):
                        at = torch.from_numpy(rows).to(self.device, non_blocking=True)
                        out[i, : len(rows)].copy_(logits(rows_there[at]), non_blocking=True)
                    else:
                        out[i].copy_(logits(rows_there), non_blocking=True)
        finally:
            if self.stream is not None:
                self.stream.synchronize()
        return [out[i, : len(rows)] for i, (_, rows) in enumerate(passes)]

    def _on_stream(self) -> contextlib.AbstractContextManager:
        if self.stream is None:
            return contextlib.nullcontext()
        # what was queued on the device's default stream (the weights' copy, channels_last) comes first
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        return torch.cuda.stream(self.stream)


def staging_for(device: torch.device) -> Staging:
    """A device worker's staging: pinned buffers and a stream for CUDA, the plain CPU path otherwise."""
    return DeviceStage(device) if device.type == "cuda" else Staging()
