"""One formed batch through a teacher: cache lookups, forward passes for misses, inserts.

A batch goes through three steps: `lookup` (cache reads), `compute` (the forward
passes for the misses, on the runner's device) and `finish` (cache inserts, the
answer). `lookup` and `finish` run on the one thread that owns every cache mutation;
`compute` runs on the device's own worker thread. With one device both threads are
the same inference thread (`run` does all three), which then does all of the
service's parallel tensor work (one OpenMP thread team per process). Each member runs
only on the rows it misses; a batch whose rows all hit costs no forward pass.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import numpy as np
import torch

from shared.codec import to_unit_float
from shared.protocol import CacheMode
from teacher_service.cache import LogitCache, MemberCache, namespace_name
from teacher_service.metrics import Metrics
from teacher_service.registry import Member, Teacher

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Rows:
    """A request's rows (or a slice of them) waiting for a batch."""

    inputs: torch.Tensor  # (n, C, H, W) as sent (uint8 0..255, or float in [0, 1]), on the CPU
    keys: list[bytes] | None  # None only for rows no cache reads or stores: cache=bypass, or a service without one
    cache: CacheMode

    def __len__(self) -> int:
        return len(self.inputs)


@dataclass
class RowsResult:
    member_logits: torch.Tensor  # (M, n, K) float32
    cache_hits: int  # rows for which every member came from the cache


@dataclass
class BatchWork:
    """A formed batch between its three steps."""

    batch: list[Rows]
    keys: list[bytes | None]  # None for rows without keys (Rows.keys), which no cache reads or stores
    readable: np.ndarray  # rows that may be answered from the cache (mode use)
    writable: np.ndarray  # rows the cache may store (mode use or refresh)
    out: torch.Tensor | None = None  # (M, n, K): hits after lookup, every row after compute
    all_hit: np.ndarray | None = None  # rows for which every member came from the cache
    misses: list[np.ndarray] = field(default_factory=list)  # per member, the row positions it computes


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
        k, fmt = teacher.config.num_classes, teacher.config.row_format
        self.caches: list[MemberCache | None] = [
            cache.namespace(namespace_name(m.version, fmt), k, fmt) if cache else None for m in teacher.members
        ]
        if channels_last:
            for m in teacher.members:
                m.model.to(memory_format=torch.channels_last)

    def run(self, batch: list[Rows]) -> list[RowsResult]:
        """All three steps on the calling thread: the one-device service, which has a single inference thread."""
        return self.finish(self.compute(self.lookup(batch)))

    def lookup(self, batch: list[Rows]) -> BatchWork:
        """Cache reads: each member's hits copied into the answer, its misses listed (on the cache's thread)."""
        keys = [k for r in batch for k in (r.keys if r.keys is not None else [None] * len(r))]
        modes = np.concatenate([np.full(len(r), r.cache.value) for r in batch])
        readable = modes == CacheMode.use.value
        work = BatchWork(batch, keys, readable, modes != CacheMode.bypass.value)
        work.out = torch.empty(len(self.teacher.members), len(keys), self.teacher.config.num_classes)
        work.all_hit = np.ones(len(keys), dtype=bool)
        readable_at = np.flatnonzero(readable)
        for m, cache in enumerate(self.caches):
            hit = np.zeros(len(keys), dtype=bool)
            if cache and len(readable_at):
                found, logits = cache.get([keys[i] for i in readable_at])
                hit[readable_at[found]] = True
                if found.any():
                    work.out[m][torch.from_numpy(hit)] = torch.from_numpy(logits)
            work.misses.append(np.flatnonzero(~hit))
            work.all_hit &= hit
            self.metrics.cache_lookups(self._label(m), hits=int(hit.sum()), misses=len(work.misses[m]))
        return work

    def cached(self, keys: list[bytes]) -> tuple[torch.Tensor, np.ndarray]:
        """Keys first (on the cache's thread): the member logits (M, hits, K) of the rows every member holds, and which
        rows those are. Only those rows count as hits here; the others are counted when they are uploaded."""
        found = np.ones(len(keys), dtype=bool)
        held = []
        for cache in self.caches:
            at, logits = cache.get(keys) if cache else (np.zeros(len(keys), dtype=bool), None)
            held.append((at, logits))
            found &= at
        out = torch.empty(len(self.caches), int(found.sum()), self.teacher.config.num_classes)
        for m, (at, logits) in enumerate(held):
            if found.any():
                out[m] = torch.from_numpy(logits[found[at]])  # this member's rows, of those every member holds
            self.metrics.cache_lookups(self._label(m), hits=int(found.sum()), misses=0)
        return out, found

    def _label(self, m: int) -> str:
        """Member m's metrics label: its cache namespace (the version, with the store format where not float32)."""
        cache = self.caches[m]
        return cache.version if cache else self.teacher.members[m].version

    def compute(self, work: BatchWork) -> BatchWork:
        """Forward passes for the misses (on this runner's device's thread): no cache access here."""
        if not any(len(miss) for miss in work.misses):
            return work
        x = torch.cat([to_unit_float(r.inputs) for r in work.batch])
        for m, (member, miss) in enumerate(zip(self.teacher.members, work.misses)):
            if len(miss) == len(x):  # every row (cache=bypass, a cold cache): no gather, no scatter
                work.out[m] = self.forward(member, x)
            elif len(miss):
                work.out[m][torch.from_numpy(miss)] = self.forward(member, x[torch.from_numpy(miss)])
        return work

    def finish(self, work: BatchWork) -> list[RowsResult]:
        """Cache inserts for the computed rows (on the cache's thread), then each request's part of the answer."""
        for m, cache in enumerate(self.caches):
            stored = work.misses[m][work.writable[work.misses[m]]]
            if cache and len(stored):
                rows = work.out[m][torch.from_numpy(stored)].numpy()
                self._store(cache, [work.keys[i] for i in stored], rows, work.readable[stored])
        return self._split(work.batch, work.out, work.all_hit)

    @staticmethod
    def _store(cache: MemberCache, keys: list[bytes], logits: np.ndarray, readable: np.ndarray) -> None:
        """One stored row per distinct key, of rows the cache may store. A `use` row stored since the lookup (by a
        batch that computed on another device meanwhile) is not stored again: the cache appends, so it would only
        waste a row. `refresh` rows are stored anew (newest wins)."""
        stored_since = (cache.lookup(keys) >= 0) & readable
        first = {}
        for i, (key, ok) in enumerate(zip(keys, ~stored_since)):
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
            stop = start + len(r)
            results.append(RowsResult(out[:, start:stop].clone(), int(all_hit[start:stop].sum())))
            start = stop
        return results
