"""One student trained by several processes under torchrun (DistributedDataParallel): who this process is, which rows
of each global batch are its own, and the few collectives the trainer needs.

Every rank draws the same global batches (same data-order and augmentation generator) and keeps its contiguous share
of rows; attack noise is drawn for the whole batch and sliced the same way (`attacks.RowShard`). With gradients
averaged by DDP and each rank's loss weighted by its share of rows, a run on N ranks takes the single-process run's
steps, up to floating-point order. Without torchrun's environment the world is one process and nothing here
communicates.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> World:
        """What torchrun set (RANK, WORLD_SIZE, LOCAL_RANK); a lone process is rank 0 of 1."""
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size < 1:
            raise ValueError(f"WORLD_SIZE must be >= 1, got {size}")
        return cls(int(os.environ.get("RANK", "0")), size, int(os.environ.get("LOCAL_RANK", "0")))

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 validates, writes checkpoints, metrics and pictures, and prints progress."""
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        """Each rank its own GPU (LOCAL_RANK); CPU ranks share the CPU."""
        return torch.device("cuda", self.local_rank) if device.type == "cuda" and self.distributed else device

    def start(self, device: torch.device) -> None:
        if self.distributed and not dist.is_initialized():
            if device.type == "cuda":
                torch.cuda.set_device(device)
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    def stop(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()

    def rows(self, n: int) -> slice:
        """This rank's contiguous share of a global batch of n rows (the first n % size ranks get one more)."""
        base, extra = divmod(n, self.size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))

    def sum(self, values: list[float], device: torch.device) -> list[float]:
        """Element-wise sums over the ranks (float64)."""
        if not self.distributed:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def gather(self, obj: object) -> list[object]:
        """Every rank's `obj`, in rank order, on rank 0 (others get an empty list)."""
        if not self.distributed:
            return [obj]
        gathered = [None] * self.size if self.is_main else None
        dist.gather_object(obj, gathered, dst=0)
        return gathered or []

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()
