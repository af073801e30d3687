"""One formed batch through a teacher: cache lookups, forward passes for misses, inserts.

A batch goes through three steps: `lookup` (cache reads), `compute` (the forward passes for the misses, on the
runner's device, through its device worker's staging: staging.py) and `finish` (cache inserts, the answer). `lookup`
and `finish` run on the one thread that owns every cache mutation; `compute` runs on the device's own worker thread.
With one device both threads are the same inference thread (`run` does all three), which then does all of the
service's parallel tensor work (one OpenMP thread team per process: openmp.py). Each member runs only on the rows it
misses; a batch whose rows all hit costs no forward pass.

A row whose member logits (or their weighted mean) are not finite is never answered as a success, nor stored:
`finish` fails only the requests that own such rows (500 `non_finite_output`, naming the member), logs the member and
counts the rows in `akd_nonfinite_rows_total`; the other requests of the batch are answered as usual.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from shared.protocol import NON_FINITE_OUTPUT, CacheMode
from teacher_service.cache.member import MemberCache
from teacher_service.cache.row_formats import namespace_name
from teacher_service.cache.store import LogitCache
from teacher_service.ensemble import mean_logits
from teacher_service.errors import ServiceError
from teacher_service.metrics import Metrics
from teacher_service.registry import Member, Teacher
from teacher_service.staging import Staging, staging_for

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# akd_nonfinite_rows_total's `member` for rows whose members' weighted mean overflowed
MEAN_LABEL = "weighted_mean"

log = logging.getLogger("akd.service")


@dataclass
class Rows:
    """A request's rows (or a slice of them) waiting for a batch."""

    # (n, C, H, W) as sent (uint8 0..255, or float in [0, 1]), on the CPU
    inputs: torch.Tensor
    # None only for rows no cache reads or stores: cache=bypass, or a service without one
    keys: list[bytes] | None
    cache: CacheMode

    def __len__(self) -> int:
        return len(self.inputs)


class RowsResult:
    """A request's rows answered: their member logits (M, n, K) float32, or the refusal that stands for them.

    A request owning a row no answer may be made of (`unanswerable`) carries `refusal`, and reading its
    `member_logits` raises it: every reader (the batcher joining a request's slices, the route encoding the
    answer) fails that request with it, so no path can answer such a row as a success.
    """

    def __init__(self, member_logits: torch.Tensor, cache_hits: int, refusal: ServiceError | None = None):
        self._member_logits = member_logits
        # rows for which every member came from the cache
        self.cache_hits = cache_hits
        self.refusal = refusal

    @property
    def member_logits(self) -> torch.Tensor:
        if self.refusal is not None:
            raise self.refusal
        return self._member_logits


@dataclass
class BatchWork:
    """A formed batch between its three steps."""

    batch: list[Rows]
    # None for rows without keys (Rows.keys), which no cache reads or stores
    keys: list[bytes | None]
    # rows that may be answered from the cache (mode use)
    readable: np.ndarray
    # rows the cache may store (mode use or refresh)
    writable: np.ndarray
    # (M, n, K): hits after lookup, every row after compute
    out: torch.Tensor | None = None
    # rows for which every member came from the cache
    all_hit: np.ndarray | None = None
    # per member, the row positions it computes
    misses: list[np.ndarray] = field(default_factory=list)


class TeacherRunner:
    def __init__(
        self,
        teacher: Teacher,
        cache: LogitCache | None,
        device: torch.device,
        metrics: Metrics,
        autocast: str = "none",
        channels_last: bool = False,
        staging: Staging | None = None,
    ):
        """`staging`: the device worker's, shared by its runners (they run on its one thread); None: one of its own."""
        self.teacher = teacher
        self.device = device
        self.staging = staging if staging is not None else staging_for(device)
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

    def cached(self, keys: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        """Keys first (on the cache's thread): the member logits (M, hits, K) of the rows every member holds, and which
        rows those are. Only those rows count as hits here; the others are counted when they are uploaded.

        Stored rows are finite, but their weighted mean may not be (`unanswerable`): such a row is left out as not
        found, so that it is sent to POST /soft-targets, which refuses it with the reason."""
        found = np.ones(len(keys), dtype=bool)
        held = []
        for cache in self.caches:
            at, logits = cache.get(keys) if cache else (np.zeros(len(keys), dtype=bool), None)
            held.append((at, logits))
            found &= at
        out = torch.empty(len(self.caches), int(found.sum()), self.teacher.config.num_classes)
        for m, (at, logits) in enumerate(held):
            if found.any():
                # this member's rows, of those every member holds
                out[m] = torch.from_numpy(logits[found[at]])
        bad_member, bad_mean = unanswerable(out, self.teacher.weights)
        answerable = ~(bad_member.any(dim=0) | bad_mean)
        if not answerable.all():
            found[np.flatnonzero(found)[~answerable.numpy()]] = False
            out = out[:, answerable]
        for m in range(len(self.caches)):
            self.metrics.cache_lookups(self._label(m), hits=int(found.sum()), misses=0)
        return out, found

    def _label(self, m: int) -> str:
        """Member m's metrics label: its cache namespace (the version, with the store format where not float32)."""
        cache = self.caches[m]
        return cache.version if cache else self.teacher.members[m].version

    def compute(self, work: BatchWork) -> BatchWork:
        """Forward passes for the misses (on this runner's device's thread): no cache access here.

        Through the staging: on a CPU the rows are gathered only where needed and each pass runs where they lie; on a
        GPU they are uploaded once and the host waits once, for every member's logits (staging.DeviceStage). Either
        way the logits are `forward`'s, bit for bit."""
        passes = [(m, miss) for m, miss in enumerate(work.misses) if len(miss)]
        if not passes:
            return work
        x = self.staging.inputs([r.inputs for r in work.batch])
        members = self.teacher.members
        runs = [(functools.partial(self.logits, members[m]), miss) for m, miss in passes]
        logits = self.staging.forward(x, runs, self.teacher.config.num_classes)
        for (m, miss), member_logits in zip(passes, logits):
            # the member misses every row (cache=bypass, a cold cache): no scatter
            if len(miss) == len(x):
                work.out[m] = member_logits
            else:
                work.out[m][torch.from_numpy(miss)] = member_logits
        return work

    def finish(self, work: BatchWork) -> list[RowsResult]:
        """Cache inserts for the computed rows (on the cache's thread), then each request's part of the answer.

        A member's row that is not finite is not stored, and the requests owning an unanswerable row get a refusal
        in place of their answer (RowsResult); the batch's other requests are answered."""
        bad_member, bad_mean = unanswerable(work.out, self.teacher.weights)
        self._report(bad_member, bad_mean, work.out)
        for m, cache in enumerate(self.caches):
            if cache is None:
                continue
            computed = work.misses[m][work.writable[work.misses[m]]]
            stored = computed[~bad_member[m].numpy()[computed]]
            if len(stored):
                rows = work.out[m][torch.from_numpy(stored)].numpy()
                self._store(cache, [work.keys[i] for i in stored], rows, work.readable[stored])
        return self._split(work, bad_member, bad_mean)

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
        """Member logits as float32 on the CPU, of rows anywhere; the in-process reference path (local.py)."""
        with torch.inference_mode():
            return self.logits(member, x.to(self.device, non_blocking=True)).cpu()

    def logits(self, member: Member, x: torch.Tensor) -> torch.Tensor:
        """Member logits as float32 on this runner's device, of rows already there: autocast and memory format as the
        server's settings say. Both `forward` and `compute` run the members through this alone."""
        amp = (
            torch.autocast(self.device.type, dtype=self.autocast_dtype)
            if self.autocast_dtype is not None
            else contextlib.nullcontext()
        )
        with torch.inference_mode(), amp:
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            return member.model(x).float()

    def _split(self, work: BatchWork, bad_member: torch.Tensor, bad_mean: torch.Tensor) -> list[RowsResult]:
        """Each request's rows of the batch, in order; a request owning an unanswerable row gets its refusal."""
        results, start = [], 0
        for r in work.batch:
            at = slice(start, start + len(r))
            logits = work.out[:, at]
            refusal = self._refusal(bad_member[:, at], bad_mean[at], logits)
            results.append(RowsResult(logits.clone(), int(work.all_hit[at].sum()), refusal))
            start = at.stop
        return results

    def _describe(self, m: int) -> str:
        member = self.teacher.members[m]
        return f"member {m} ({member.path}, version {member.version})"

    def _report(self, bad_member: torch.Tensor, bad_mean: torch.Tensor, out: torch.Tensor) -> None:
        """One log line and a count in akd_nonfinite_rows_total for each member (or weighted mean) at fault."""
        name, n = self.teacher.name, out.shape[1]
        for m, bad in enumerate(bad_member):
            if rows := int(bad.sum()):
                self.metrics.nonfinite(name, self._label(m), rows)
                log.error(
                    "teacher %r: %s overflowed (%s) on %d of %d rows of a batch; their requests are refused "
                    "(500 non_finite_output) and those rows are not cached",
                    name,
                    self._describe(m),
                    non_finite_kinds(out[m][bad]),
                    rows,
                    n,
                )
        if rows := int(bad_mean.sum()):
            self.metrics.nonfinite(name, MEAN_LABEL, rows)
            log.error(
                "teacher %r: the weighted mean of its members' logits overflowed (%s) on %d of %d rows of a batch; "
                "their requests are refused (500 non_finite_output)",
                name,
                non_finite_kinds(mean_logits(out[:, bad_mean], self.teacher.weights)),
                rows,
                n,
            )

    def _refusal(self, bad_member: torch.Tensor, bad_mean: torch.Tensor, logits: torch.Tensor) -> ServiceError | None:
        """The 500 for a request with unanswerable rows (None when it has none): which member, how many rows, what."""
        faults = [
            (self._describe(m), int(bad.sum()), non_finite_kinds(logits[m][bad]))
            for m, bad in enumerate(bad_member)
            if bad.any()
        ]
        if bad_mean.any():
            mean = mean_logits(logits[:, bad_mean], self.teacher.weights)
            faults.append(("the members' weighted mean", int(bad_mean.sum()), non_finite_kinds(mean)))
        if not faults:
            return None
        # these rows may be one slice of a larger request: the message counts in the slice
        return ServiceError(
            500,
            NON_FINITE_OUTPUT,
            f"teacher {self.teacher.name!r} cannot answer this request: of its {_rows(len(bad_mean))} in one batch, "
            + "; ".join(f"{who} overflowed on {_rows(rows)}" for who, rows, _ in faults)
            + ". Nothing non-finite was cached.",
            "finite logits",
            "; ".join(f"{who}: {kinds}" for who, _, kinds in faults),
        )


def _rows(n: int) -> str:
    return f"{n} row" if n == 1 else f"{n} rows"


def unanswerable(member_logits: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows no answer may be made of: (M, n) where a member's logits, and (n,) where (for rows every member passes)
    their weighted mean, are not finite or span more than float32 holds (max - min overflows).

    Every output is made of the member logits and their weighted mean (ensemble.py), whose softmax subtracts the
    row's max before tempering: with max - min finite, each tempered logit is in [-inf, 0] and the largest is 0, so
    the softmax is finite at any temperature a request may name (even one past float32's range). A row that passes
    gives finite outputs of every kind; one that fails is refused rather than answered.
    """
    bad_member = ~_finite_span(member_logits)
    if len(member_logits) == 1:
        # one member's weight normalises to exactly 1.0: its mean is its logits, bit for bit, already checked
        return bad_member, torch.zeros(member_logits.shape[1], dtype=torch.bool)
    bad_mean = ~_finite_span(mean_logits(member_logits, weights)) & ~bad_member.any(dim=0)
    return bad_member, bad_mean


def _finite_span(logits: torch.Tensor) -> torch.Tensor:
    """max - min over classes is finite: no NaN or inf among the logits, and no overflow between them."""
    low, high = torch.aminmax(logits, dim=-1)
    return torch.isfinite(high - low)


def non_finite_kinds(logits: torch.Tensor) -> str:
    """What unanswerable logits hold, for a message: "NaN, +inf", or the span that overflowed."""
    kinds = [
        kind
        for kind, present in (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf))
        if present(logits).any()
    ]
    return ", ".join(kinds) or "finite logits spanning more than float32 holds"
