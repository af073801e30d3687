"""One formed batch through a teacher: cache lookups, forward passes for misses, inserts.

Runs on the single inference thread, which therefore owns every cache mutation and
does all of the service's parallel tensor work (one OpenMP thread team per process).
Each member runs only on the rows it misses; a batch whose rows all hit costs
no forward pass.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch

from shared.codec import to_unit_float
from shared.protocol import CacheMode
from teacher_service.cache import LogitCache, MemberCache
from teacher_service.metrics import Metrics
from teacher_service.registry import Member, Teacher

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Rows:
    """A request's rows (or a slice of them) waiting for a batch."""

    inputs: torch.Tensor  # (n, C, H, W) as sent (uint8 0..255, or float in [0, 1]), on the CPU
    keys: list[bytes]
    cache: CacheMode


@dataclass
class RowsResult:
    member_logits: torch.Tensor  # (M, n, K) float32
    cache_hits: int  # rows for which every member came from the cache


class TeacherRunner:
    def __init__(
        self,
        teacher: Teacher,
        cache: LogitCache | None,
        device: torch.device,
        metrics: Metrics,
        autocast: str = "none",
        channels_last: bool = False,
    ):
        self.teacher = teacher
        self.device = device
        self.metrics = metrics
        self.channels_last = channels_last
        self.autocast_dtype = AUTOCAST_DTYPES.get(autocast)
        k = teacher.config.num_classes
        self.caches: list[MemberCache | None] = [
            cache.namespace(m.version, k) if cache else None for m in teacher.members
        ]
        if channels_last:
            for m in teacher.members:
                m.model.to(memory_format=torch.channels_last)

    def run(self, batch: list[Rows]) -> list[RowsResult]:
        x = torch.cat([to_unit_float(r.inputs) for r in batch])  # here: all of the service's tensor work on one thread
        keys = [k for r in batch for k in r.keys]
        modes = np.concatenate([np.full(len(r.keys), r.cache.value) for r in batch])
        readable, writable = modes == CacheMode.use.value, modes != CacheMode.bypass.value
        out = torch.empty(len(self.teacher.members), len(keys), self.teacher.config.num_classes)
        all_hit = np.ones(len(keys), dtype=bool)
        for m, (member, cache) in enumerate(zip(self.teacher.members, self.caches)):
            hit = self._fill_member(out[m], member, cache, x, keys, readable, writable)
            all_hit &= hit
        return self._split(batch, out, all_hit)

    def _fill_member(self, out, member: Member, cache, x, keys, readable, writable) -> np.ndarray:
        positions = cache.lookup(keys) if cache else np.full(len(keys), -1)
        hit = (positions >= 0) & readable
        if hit.any():
            out[torch.from_numpy(hit)] = torch.from_numpy(cache.take(positions[hit]))
        miss = np.flatnonzero(~hit)
        self.metrics.cache_lookups(member.version, hits=int(hit.sum()), misses=len(miss))
        if len(miss):
            logits = self.forward(member, x[torch.from_numpy(miss)])
            out[torch.from_numpy(miss)] = logits
            if cache:
                self._store(cache, [keys[i] for i in miss], logits.numpy(), writable[miss])
        return hit

    @staticmethod
    def _store(cache: MemberCache, keys: list[bytes], logits: np.ndarray, writable: np.ndarray) -> None:
        first = {}  # one stored row per distinct key in this batch
        for i, (key, ok) in enumerate(zip(keys, writable)):
            if ok and key not in first:
                first[key] = i
        if first:
            cache.insert(list(first), logits[list(first.values())])

    def forward(self, member: Member, x: torch.Tensor) -> torch.Tensor:
        """Member logits as float32 on the CPU; the in-process reference path too."""
        amp = (
            torch.autocast(self.device.type, dtype=self.autocast_dtype)
            if self.autocast_dtype is not None
            else contextlib.nullcontext()
        )
        with torch.inference_mode(), amp:
            x = x.to(self.device, non_blocking=True)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            return member.model(x).float().cpu()

    @staticmethod
    def _split(batch: list[Rows], out: torch.Tensor, all_hit: np.ndarray) -> list[RowsResult]:
        results, start = [], 0
        for r in batch:
            stop = start + len(r.keys)
            results.append(RowsResult(out[:, start:stop].clone(), int(all_hit[start:stop].sum())))
            start = stop
        return results
