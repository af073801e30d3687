"""2. Cache: rows/s when every row is a cache hit vs when the service recomputes them.

Inputs are clean images (exact multiples of 1/255, sent as uint8): the inputs that
repeat across epochs and jobs, and so the ones a cache can serve.
"""

from __future__ import annotations

import torch

from bench.context import Context
from bench.results import Section, Target
from bench.timing import alternate, median
from shared.protocol import CacheMode
from student_trainer.teacher_client import RemoteTeacher

TARGET_TEACHER, TARGET_SPEEDUP = "preact_resnet18", 20.0


def run(ctx: Context) -> Section:
    spec = ctx.cfg.cache
    section = Section(
        "cache", "2. Cache hits vs recomputation",
        "Rows per second through the service for one batch sent again and again: all rows cache hits "
        "(`cache=use`, after one priming request) vs recomputed (`cache=bypass`); uint8 inputs; alternated.",
        ["teacher", "batch", "hit rows/s", "recompute rows/s", "speed-up"],
    )
    url = ctx.service().url
    for name in spec.teachers:
        shape = ctx.teacher(name).input_shape
        hits = RemoteTeacher(url, name, temperature=1.0, cache=CacheMode.use)
        recompute = RemoteTeacher(url, name, temperature=1.0, cache=CacheMode.bypass)
        try:
            for batch in spec.batches:
                ctx.progress(f"cache: {name} batch {batch}")
                images = torch.randint(0, 256, (batch, *shape), generator=torch.Generator().manual_seed(batch), dtype=torch.uint8)
                x = (images.float() / 255).to(ctx.device)
                hits(x)  # prime: stores every row
                before = hits.cache_hits
                times = alternate({"hit": lambda: hits(x), "recompute": lambda: recompute(x)},
                                  ctx.cfg.repetitions, ctx.cfg.warmup, ctx.device, ctx.cfg.min_seconds)
                served_from_cache = hits.cache_hits - before
                expected = batch * (len(times["hit"]) + ctx.cfg.warmup)
                if served_from_cache != expected:
                    raise RuntimeError(f"cache benchmark invalid: {served_from_cache} of {expected} rows were hits")
                hit_s, recompute_s = median(times["hit"]), median(times["recompute"])
                section.rows.append({
                    "teacher": name, "batch": batch, "hit rows/s": batch / hit_s, "recompute rows/s": batch / recompute_s,
                    "speed-up": recompute_s / hit_s, "samples": times,
                })
        finally:
            hits.close()
            recompute.close()
    for row in section.rows:
        if row["teacher"] == TARGET_TEACHER:
            section.targets.append(Target(
                f"hit / recompute rows/s, {TARGET_TEACHER}, batch {row['batch']}", ">=", TARGET_SPEEDUP, row["speed-up"],
                f"{row['hit rows/s']:,.0f} vs {row['recompute rows/s']:,.0f} rows/s",
            ))
    return section
