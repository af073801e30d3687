"""2. Cache: rows/s when every row is a cache hit vs when the service recomputes them;
and what `[server.cache] durable` costs: rows/s committed to the store with fsync off vs on.

Inputs are clean images (exact multiples of 1/255, sent as uint8): the inputs that
repeat across epochs and jobs, and so the ones a cache can serve.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch

from bench.context import Context
from bench.sections import Section, Target
from bench.timing import alternate, median, order, timed
from shared.hashing import KEY_BYTES
from shared.protocol import CacheMode
from student_trainer.teacher_client import RemoteTeacher
from teacher_service.cache.settings import CacheSettings
from teacher_service.cache.store import LogitCache

TARGET_TEACHER, TARGET_SPEEDUP = "preact_resnet18", 20.0


def run(ctx: Context) -> Section:
    spec = ctx.cfg.cache
    section = Section(
        "cache",
        "2. Cache hits vs recomputation",
        "Rows per second through the service for one batch sent again and again: all rows cache hits "
        "(`cache=use`, after one priming request) vs recomputed (`cache=bypass`); uint8 inputs; alternated. "
        f"Writes: {spec.write_rows:,} rows committed to a fresh local store (chunks of {spec.write_chunk_rows} rows) "
        "through "
        "`LogitCache.insert` of `batch` rows at a time and a final flush, `[server.cache] durable` off vs on (fsync of "
        "every chunk file "
        "and folder before its commit, and of the commit); alternated; on the disk under `--out`.",
        [
            "teacher",
            "batch",
            "hit rows/s",
            "recompute rows/s",
            "speed-up",
            "write rows/s",
            "durable write rows/s",
            "durable cost",
        ],
    )
    # per (classes, batch): the same for every teacher
    writes: dict[tuple[int, int], dict[str, list[float]]] = {}
    url = ctx.service().url
    for name in spec.teachers:
        shape = ctx.teacher(name).input_shape
        hits = RemoteTeacher(url, name, temperature=1.0, clean_cache=CacheMode.use)
        recompute = RemoteTeacher(url, name, temperature=1.0, clean_cache=CacheMode.bypass)
        try:
            for batch in spec.batches:
                ctx.progress(f"cache: {name} batch {batch}")
                images = torch.randint(
                    0, 256, (batch, *shape), generator=torch.Generator().manual_seed(batch), dtype=torch.uint8
                )
                x = (images.float() / 255).to(ctx.device)
                # prime: stores every row
                hits(x)
                before = hits.cache_hits
                times = alternate(
                    {"hit": lambda hits=hits, x=x: hits(x), "recompute": lambda recompute=recompute, x=x: recompute(x)},
                    ctx.cfg.repetitions,
                    ctx.cfg.warmup,
                    ctx.device,
                    ctx.cfg.min_seconds,
                )
                served_from_cache = hits.cache_hits - before
                expected = batch * (len(times["hit"]) + ctx.cfg.warmup)
                if served_from_cache != expected:
                    raise RuntimeError(f"cache benchmark invalid: {served_from_cache} of {expected} rows were hits")
                hit_s, recompute_s = median(times["hit"]), median(times["recompute"])
                classes = ctx.teacher(name).num_classes
                if (classes, batch) not in writes:
                    ctx.progress(f"cache: writes of {classes} classes, batch {batch}, durable off vs on")
                    writes[classes, batch] = write_times(
                        ctx.workdir / "cache-writes",
                        classes,
                        batch,
                        spec.write_rows,
                        spec.write_chunk_rows,
                        ctx.cfg.repetitions,
                        ctx.cfg.warmup,
                    )
                write_s, durable_s = median(writes[classes, batch]["off"]), median(writes[classes, batch]["on"])
                section.rows.append(
                    {
                        "teacher": name,
                        "batch": batch,
                        "hit rows/s": batch / hit_s,
                        "recompute rows/s": batch / recompute_s,
                        "speed-up": recompute_s / hit_s,
                        "write rows/s": spec.write_rows / write_s,
                        "durable write rows/s": spec.write_rows / durable_s,
                        "durable cost": durable_s / write_s,
                        "samples": {
                            **times,
                            "write": writes[classes, batch]["off"],
                            "durable write": writes[classes, batch]["on"],
                        },
                    }
                )
        finally:
            hits.close()
            recompute.close()
    for row in section.rows:
        if row["teacher"] == TARGET_TEACHER:
            section.targets.append(
                Target(
                    f"hit / recompute rows/s, {TARGET_TEACHER}, batch {row['batch']}",
                    ">=",
                    TARGET_SPEEDUP,
                    row["speed-up"],
                    f"{row['hit rows/s']:,.0f} vs {row['recompute rows/s']:,.0f} rows/s",
                )
            )
    section.notes.append(
        "durable cost: time to commit the same rows with `[server.cache] durable = true` / without (1.0: free)."
    )
    return section


def write_times(
    workdir: Path, classes: int, batch: int, rows: int, chunk_rows: int, repetitions: int, warmup: int
) -> dict[str, list[float]]:
    """Seconds to insert `rows` rows `batch` at a time and flush until all are committed, into a fresh store each time.

    The store is created (and its metadata synced) before the clock starts: what is timed is the steady
    state of a running service, where every whole chunk is written, then committed.
    """
    generator = np.random.default_rng(classes)
    keys = [bytes(k) for k in generator.integers(0, 256, (rows, KEY_BYTES), dtype=np.uint8)]
    logits = generator.standard_normal((rows, classes), dtype=np.float32)
    times: dict[str, list[float]] = {"off": [], "on": []}
    for rep in range(warmup + repetitions):
        for mode in order(list(times), rep):
            folder = workdir / f"{classes}-{batch}-{mode}-{rep}"
            cache = LogitCache(
                str(folder), CacheSettings(max_bytes=1 << 40, chunk_rows=chunk_rows, durable=mode == "on")
            )
            ns = cache.namespace("bench", classes)

            def commit_all(ns=ns, cache=cache) -> None:
                for start in range(0, rows, batch):
                    ns.insert(keys[start : start + batch], logits[start : start + batch])
                cache.flush()

            seconds = timed(commit_all, torch.device("cpu"))
            cache.close()
            if ns.committed != rows:
                raise RuntimeError(f"cache write benchmark invalid: {ns.committed} of {rows} rows were committed")
            shutil.rmtree(folder)
            if rep >= warmup:
                times[mode].append(seconds)
    return times
