"""1. Service overhead: soft targets over HTTP vs the same teacher called in-process.

Inputs are float32 and not multiples of 1/255, like the adversarial examples AKD
sends, so they travel as float32; the cache is bypassed, so every row is computed.
"""

from __future__ import annotations

import functools
import statistics

import httpx
import torch

from bench.context import Context
from bench.sections import Section, Target
from bench.servers import triton_missing
from bench.timing import alternate, median
from bench.triton_client import TRITON, TritonTeacher
from shared import protocol
from shared.protocol import CacheMode
from student_trainer.teacher_client import LocalTeacher, RemoteTeacher
from teacher_service import scrape

TARGET_TEACHER, TARGET_BATCH, TARGET_RATIO = "preact_resnet18", 128, 1.05
# the same client, rows and answers through its shared-memory region (the service on this host)
SHARED_MEMORY = "shared memory"


def run(ctx: Context) -> Section:
    spec = ctx.cfg.overhead
    section = Section(
        "overhead",
        "1. Service overhead",
        "Median time per request for the same teacher's soft targets (probs), through the service "
        "(real uvicorn process, real httpx client, loopback, `cache=bypass`, float32 inputs in request bodies), "
        "through the service with the rows and answers in the client's shared-memory region (`shared memory ms`: "
        "RemoteTeacher's default on the service's host), and in-process "
        "(`LocalTeacher`: the service's own forward pass and ensemble formula, same device); alternated. "
        "`server forward ms`: the service's own mean batch time (its `akd_compute_seconds` metric), so "
        "`service - server forward` (means) is what the HTTP path adds, apart from how fast each process runs the "
        "model. `Triton ms`: the same rows from Triton Inference Server serving the same teacher (PyTriton, the "
        "same forward pass; bench/triton_client.py's binary-tensor request over one persistent httpx connection, "
        "alternated with the other two); its client does less than RemoteTeacher (no answer checks beyond the row "
        "count, no courier thread), which favours Triton.",
        [
            "teacher",
            "batch",
            "service ms",
            "in-process ms",
            "overhead ms",
            "ratio",
            "server forward ms",
            "service - server forward ms",
            "shared memory ms",
            "shared memory / in-process",
            "Triton ms",
            "service / Triton",
        ],
    )
    missing = triton_missing()
    if missing:
        section.notes.append(f"Triton not run: {missing}.")
    url = ctx.service().url
    for name in spec.teachers:
        candidates = {
            "service": RemoteTeacher(url, name, temperature=1.0, clean_cache=CacheMode.bypass, shared_memory=False),
            SHARED_MEMORY: RemoteTeacher(url, name, temperature=1.0, clean_cache=CacheMode.bypass, shared_memory=True),
            "in-process": LocalTeacher(ctx.service_config, name, temperature=1.0, device=ctx.device),
        }
        try:
            if not missing:
                candidates[TRITON] = TritonTeacher(ctx.triton(name).url, name)
            for batch in spec.batches:
                ctx.progress(f"overhead: {name} batch {batch}")
                section.rows.append(_measure(ctx, url, name, batch, candidates))
        finally:
            for teacher in candidates.values():
                teacher.close()
            ctx.stop(f"triton-{name}")
    _targets(section)
    return section


def _measure(ctx: Context, url: str, name: str, batch: int, teachers: dict) -> dict:
    """One teacher and batch: each of `teachers` (name -> teacher(x)) timed on the same rows, alternated."""
    x = torch.rand(batch, *ctx.teacher(name).input_shape, generator=torch.Generator().manual_seed(batch))
    x = x.to(ctx.device)
    # warm-up here rather than in `alternate`, so that the service's metric counts timed calls only
    for _ in range(ctx.cfg.warmup):
        for teacher in teachers.values():
            teacher(x)
    before = server_compute(url, name)
    times = alternate(
        {label: functools.partial(teacher, x) for label, teacher in teachers.items()},
        ctx.cfg.repetitions,
        0,
        ctx.device,
        ctx.cfg.min_seconds,
    )
    after = server_compute(url, name)
    service_s, local_s = median(times["service"]), median(times["in-process"])
    forward_s = (after[0] - before[0]) / max(after[1] - before[1], 1)
    triton_s = median(times[TRITON]) if TRITON in times else None
    return {
        "teacher": name,
        "batch": batch,
        "service ms": service_s * 1e3,
        "in-process ms": local_s * 1e3,
        "overhead ms": (service_s - local_s) * 1e3,
        "ratio": service_s / local_s,
        "server forward ms": forward_s * 1e3,
        "service - server forward ms": (statistics.mean(times["service"]) - forward_s) * 1e3,
        "shared memory ms": median(times[SHARED_MEMORY]) * 1e3,
        "shared memory / in-process": median(times[SHARED_MEMORY]) / local_s,
        "Triton ms": None if triton_s is None else triton_s * 1e3,
        "service / Triton": None if triton_s is None else service_s / triton_s,
        "samples": times,
    }


def server_compute(url: str, teacher: str) -> tuple[float, float]:
    """(seconds, batches) the service has spent computing for `teacher`, from its /metrics."""
    text = httpx.get(url + protocol.METRICS_PATH, timeout=30).text
    return tuple(scrape.total(text, f"akd_compute_seconds_{part}", teacher=teacher) for part in ("sum", "count"))


def _targets(section: Section) -> None:
    for row in section.rows:
        if row["teacher"] == TARGET_TEACHER and row["batch"] == TARGET_BATCH:
            section.targets.append(
                Target(
                    f"service / in-process time, {TARGET_TEACHER}, batch {TARGET_BATCH}",
                    "<=",
                    TARGET_RATIO,
                    row["ratio"],
                    f"{row['service ms']:.1f} ms vs {row['in-process ms']:.1f} ms: {row['overhead ms']:.1f} ms per "
                    "request; "
                    f"the service's own forward took {row['server forward ms']:.1f} ms, so its HTTP path added "
                    f"{row['service - server forward ms']:.1f} ms{_triton_text(row)}",
                )
            )
    small = [r for r in section.rows if r["teacher"] != TARGET_TEACHER]
    for row in small:
        section.notes.append(
            f"{row['teacher']}, batch {row['batch']}: the service adds {row['overhead ms']:.2f} ms per request "
            f"({row['ratio']:.2f}x the in-process {row['in-process ms']:.2f} ms); its HTTP path, apart from the "
            f"forward pass, {row['service - server forward ms']:.2f} ms{_triton_text(row)}."
        )


def _triton_text(row: dict) -> str:
    if row["Triton ms"] is None:
        return ""
    ratio = row["service / Triton"]
    return f"; Triton answered the same rows in {row['Triton ms']:.2f} ms (service / Triton {ratio:.2f})"
