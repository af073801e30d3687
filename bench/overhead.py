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
from bench.timing import alternate, median
from shared import protocol
from shared.protocol import CacheMode
from student_trainer.teacher_client import LocalTeacher, RemoteTeacher
from teacher_service import scrape

TARGET_TEACHER, TARGET_BATCH, TARGET_RATIO = "preact_resnet18", 128, 1.05


def run(ctx: Context) -> Section:
    spec = ctx.cfg.overhead
    section = Section(
        "overhead",
        "1. Service overhead",
        "Median time per request for the same teacher's soft targets (probs), through the service "
        "(real uvicorn process, real httpx client, loopback, `cache=bypass`, float32 inputs) and in-process "
        "(`LocalTeacher`: the service's own forward pass and ensemble formula, same device); alternated. "
        "`server forward ms`: the service's own mean batch time (its `akd_compute_seconds` metric), so "
        "`service - server forward` (means) is what the HTTP path adds, apart from how fast each process runs the "
        "model.",
        [
            "teacher",
            "batch",
            "service ms",
            "in-process ms",
            "overhead ms",
            "ratio",
            "server forward ms",
            "service - server forward ms",
        ],
    )
    url = ctx.service().url
    for name in spec.teachers:
        shape = ctx.teacher(name).input_shape
        remote = RemoteTeacher(url, name, temperature=1.0, clean_cache=CacheMode.bypass)
        local = LocalTeacher(ctx.service_config, name, temperature=1.0, device=ctx.device)
        try:
            for batch in spec.batches:
                ctx.progress(f"overhead: {name} batch {batch}")
                x = torch.rand(batch, *shape, generator=torch.Generator().manual_seed(batch)).to(ctx.device)
                # warm-up here rather than in `alternate`, so that the service's metric counts timed calls only
                for _ in range(ctx.cfg.warmup):
                    remote(x), local(x)
                before = server_compute(url, name)
                times = alternate(
                    {"service": functools.partial(remote, x), "in-process": functools.partial(local, x)},
                    ctx.cfg.repetitions,
                    0,
                    ctx.device,
                    ctx.cfg.min_seconds,
                )
                after = server_compute(url, name)
                service_s, local_s = median(times["service"]), median(times["in-process"])
                forward_s = (after[0] - before[0]) / max(after[1] - before[1], 1)
                section.rows.append(
                    {
                        "teacher": name,
                        "batch": batch,
                        "service ms": service_s * 1e3,
                        "in-process ms": local_s * 1e3,
                        "overhead ms": (service_s - local_s) * 1e3,
                        "ratio": service_s / local_s,
                        "server forward ms": forward_s * 1e3,
                        "service - server forward ms": (statistics.mean(times["service"]) - forward_s) * 1e3,
                        "samples": times,
                    }
                )
        finally:
            remote.close()
    _targets(section)
    return section


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
                    f"{row['service - server forward ms']:.1f} ms",
                )
            )
    small = [r for r in section.rows if r["teacher"] != TARGET_TEACHER]
    for row in small:
        section.notes.append(
            f"{row['teacher']}, batch {row['batch']}: the service adds {row['overhead ms']:.2f} ms per request "
            f"({row['ratio']:.2f}x the in-process {row['in-process ms']:.2f} ms); its HTTP path, apart from the "
            f"forward pass, {row['service - server forward ms']:.2f} ms."
        )
