"""9. Warming the cache: `akd warm` over a run's augmentation space, and an ARD epoch against the cold cache and
against the warmed one.

For each student architecture and round, two teacher services (`python -m teacher_service`, each with its own empty
cache folder, and one untimed `cache=bypass` request answered before anything is measured) serve the same teacher:

- cold: one ARD epoch (`python -m student_trainer train --set method=ard --set epochs=1 ...`, the code path of
  `akd train`) against the empty cache; then `akd warm`'s function over the same run, which finds every row the
  epoch stored (ARD asks about clean images with `cache=use`), so it computes nothing;
- warmed: `akd warm`'s function (`student_trainer.warm.warm`) over the run's training split in every view its
  augmentation can draw, then once more (it must compute nothing), then the same ARD epoch, whose teacher rows must
  all hit.

Teacher rows, hits and uploads come from the trainer's metrics.jsonl (`teacher_rows`, `teacher_cache_hits`,
`teacher_rows_uploaded`) and from `Warmed`; rows the service computed and its compute seconds (cache + forward)
from its /metrics, before and after each step.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch

from bench import servers
from bench.context import Context
from bench.sections import Section, Table, Target
from bench.timing import median, order
from shared import codec, protocol
from student_trainer.config import load_train_config
from student_trainer.data import default_val_size
from student_trainer.warm import warm
from teacher_service import scrape

COLUMNS = [
    "student",
    "round",
    "step",
    "s",
    "teacher rows",
    "hits",
    "uploaded",
    "computed",
    "service compute s",
    "rows/s",
]
SUMMARY_COLUMNS = [
    "student",
    "teacher rows an epoch",
    "cold epoch s",
    "warmed epoch s",
    "cold / warmed",
    "saved s",
    "service compute s, cold epoch",
    "warm s",
    "warm rows/s",
    "second warm computed",
]
COLD, WARMED = "ARD epoch, cold cache", "ARD epoch, warmed cache"
WARM, AGAIN, AFTER_COLD = "akd warm", "akd warm again", "akd warm after the cold epoch"


def run(ctx: Context) -> Section:
    spec = ctx.cfg.warm
    section = Section("warm", "9. Warming the cache", about(ctx), COLUMNS)
    for r in range(spec.rounds):
        for student in spec.students:
            for leg in order([cold_leg, warmed_leg], r):
                section.rows += leg(ctx, student, r + 1)
    summary = Table("Cold against warmed, per student (medians over rounds)", SUMMARY_COLUMNS)
    for student in spec.students:
        summary.rows.append(summarise(section.rows, student))
        checks(section, student)
    section.tables.append(summary)
    section.notes += [
        "The teacher has random weights (the bench context trains nothing): the speed of its forward pass and of "
        "the cache does not depend on what it has learned; the student learns from random soft targets, which "
        "changes nothing of an epoch's cost either.",
        "s: an epoch's `epoch_time_s` (metrics.jsonl: its training steps and its validation, "
        f"{val_text(ctx)} held-out images under the training attack, which asks the teacher nothing; the process's "
        "start-up and data loading are not in it); a warm's `Warmed.seconds` (after the data is loaded). hits: rows "
        "the service's cache answered (for a warm: rows already cached); uploaded: rows sent whole because the "
        "service did not hold them (the rest were asked for by key, 16 bytes a row); computed: member rows the "
        "service computed (`akd_cache_misses_total`); service compute s: its `akd_compute_seconds_sum` (cache "
        "lookups and forward passes of the batches it formed), both differences of /metrics around the step.",
        "A cold run stores its clean rows as it goes (ARD's clean queries are `cache=use`), so from its second epoch "
        "on it hits as a warmed one does when the dataset has no augmentation (mnist5k: one view an image); the "
        "warm after the cold epoch shows it. Warming buys the first epoch, and with augmentation (162 views an "
        "image for CIFAR) every view an epoch has not drawn yet.",
    ]
    return section


def about(ctx: Context) -> str:
    spec = ctx.cfg.warm
    t = ctx.teacher(spec.teacher)
    limit = f"the first {spec.limit_train:,} training images" if spec.limit_train else "the whole training split"
    return (
        f"Teacher {spec.teacher} ({t.arch}, input {'x'.join(map(str, t.input_shape))}, {t.num_classes} classes, "
        f"random weights) behind `python -m teacher_service` with an empty cache folder of its own per leg (its "
        f"first forward pass paid before timing: one untimed `cache=bypass` request of random rows); "
        f"students {', '.join(spec.students)}. ARD epoch: `python -m student_trainer train --set method=ard --set "
        f"epochs=1` on {spec.dataset} ({limit}), batch {spec.batch_size}, PGD-{spec.attack_steps} against the "
        f"student, teacher on the clean batch (keys first, `cache=use`). Warm: `student_trainer.warm.warm`, what "
        f"`akd warm` runs, over the same run's config, {spec.batch_rows} rows a request. Each round runs a cold leg "
        f"(a fresh service: the epoch, then a warm) and a warmed leg (a fresh service: warm, warm again, the "
        f"epoch), in alternating order; {spec.rounds} round(s)."
    )


def val_text(ctx: Context) -> str:
    spec = ctx.cfg.warm
    return f"{default_val_size(spec.dataset) if spec.val_size is None else spec.val_size:,}"


# ------------------------------------------------------------------------------------------------------- the legs


def cold_leg(ctx: Context, student: str, round_: int) -> list[dict]:
    """The ARD epoch against an empty cache, then a warm over what it stored."""
    server, folder = service(ctx, f"warm-cold-{student}-{round_}")
    try:
        ctx.progress(f"warm: {student} round {round_}: ARD epoch against the cold cache")
        epoch = measured(server, lambda: epoch_row(ctx, student, server.url, folder / "run"))
        if epoch["hits"] or epoch["computed"] != epoch["teacher rows"]:
            raise RuntimeError(
                f"warm invalid: the cold epoch hit {epoch['hits']} and the service computed {epoch['computed']} of "
                f"{epoch['teacher rows']} rows; a cold cache hits none and computes all"
            )
        after = measured(server, lambda: warm_row(ctx, student, server.url, folder / "run"))
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)
    return [label(epoch, student, round_, COLD), label(after, student, round_, AFTER_COLD)]


def warmed_leg(ctx: Context, student: str, round_: int) -> list[dict]:
    """Warm an empty cache, warm it again, then the ARD epoch against it."""
    server, folder = service(ctx, f"warm-warmed-{student}-{round_}")
    try:
        ctx.progress(f"warm: {student} round {round_}: akd warm, twice, then the ARD epoch")
        first = measured(server, lambda: warm_row(ctx, student, server.url, folder / "run"))
        again = measured(server, lambda: warm_row(ctx, student, server.url, folder / "run"))
        epoch = measured(server, lambda: epoch_row(ctx, student, server.url, folder / "run"))
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)
    return [
        label(first, student, round_, WARM),
        label(again, student, round_, AGAIN),
        label(epoch, student, round_, WARMED),
    ]


def service(ctx: Context, name: str) -> tuple[servers.ServerProcess, Path]:
    """`akd serve` with batching and a cache folder of its own, empty; warmed up (not its cache: its forward pass)."""
    folder = ctx.workdir / "warm" / name
    shutil.rmtree(folder, ignore_errors=True)
    ctx.progress(f"starting {name}")
    server = servers.teacher_service(
        name, ctx.service_config, ctx.workdir / "logs", ctx.device.type, True, folder / "cache"
    )
    try:
        first_forward(ctx, server.url)
    except BaseException:
        server.stop()
        raise
    return server, folder


def first_forward(ctx: Context, url: str) -> None:
    """One untimed request of random rows with `cache=bypass` (nothing stored): the service's first forward pass
    and whatever torch sets up for it are then paid before either leg measures anything, not by the cold epoch."""
    spec = ctx.cfg.warm
    shape = ctx.teacher(spec.teacher).input_shape
    x = torch.randint(0, 256, (spec.batch_size, *shape), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    params = {"teacher": spec.teacher, "cache": "bypass"}
    httpx.post(
        url + protocol.SOFT_TARGETS_PATH, content=codec.encode_inputs(x), params=params, timeout=300
    ).raise_for_status()


def label(row: dict, student: str, round_: int, step: str) -> dict:
    return {"student": student, "round": round_, "step": step, **row}


def measured(server: servers.ServerProcess, step) -> dict:
    """The step's row, with what the service computed meanwhile (from its /metrics before and after)."""
    before = service_counts(server.url)
    row = step()
    after = service_counts(server.url)
    row["computed"] = int(after[0] - before[0])
    row["service compute s"] = after[1] - before[1]
    return row


def service_counts(url: str) -> tuple[float, float]:
    """(member rows computed, seconds spent computing batches) so far, from the service's /metrics."""
    text = httpx.get(url + protocol.METRICS_PATH, timeout=30).text
    return scrape.total(text, "akd_cache_misses_total"), scrape.total(text, "akd_compute_seconds_sum")


# ------------------------------------------------------------------------------------------------------ the steps


def run_sets(ctx: Context, student: str, url: str, out: Path) -> list[str]:
    """The run both the epoch and the warm are about: `akd train --set ...`'s settings."""
    spec = ctx.cfg.warm
    sets = [
        f"dataset={spec.dataset}",
        f"arch={student}",
        "method=ard",
        "epochs=1",
        f"batch_size={spec.batch_size}",
        f"attack.steps={spec.attack_steps}",
        f"teacher.url={url}",
        f"teacher.name={spec.teacher}",
        f"device={ctx.device.type}",
        f"out_dir={out}",
    ]
    if spec.limit_train is not None:
        sets.append(f"limit_train={spec.limit_train}")
    if spec.val_size is not None:
        sets.append(f"val_size={spec.val_size}")
    return sets


def epoch_row(ctx: Context, student: str, url: str, out: Path) -> dict:
    """One ARD epoch as `akd train` runs it, in its own process; its metrics.jsonl line."""
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "student_trainer", "train"]
    command += [arg for s in run_sets(ctx, student, url, out) for arg in ("--set", s)]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ))
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"warm: the ARD epoch of a {student} student failed:\n{(done.stdout + done.stderr)[-3000:]}")
    [epoch] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {
        "s": epoch["epoch_time_s"],
        "process s": wall,
        "teacher rows": epoch["teacher_rows"],
        "hits": epoch["teacher_cache_hits"],
        "uploaded": epoch["teacher_rows_uploaded"],
    }


def warm_row(ctx: Context, student: str, url: str, out: Path) -> dict:
    """`akd warm` over the run (the function the command calls, with its --batch-rows)."""
    done = warm(load_train_config(sets=run_sets(ctx, student, url, out)), ctx.cfg.warm.batch_rows)
    return {
        "s": done.seconds,
        "teacher rows": done.rows,
        "hits": done.rows - done.uploaded,
        "uploaded": done.uploaded,
        "rows/s": done.rows_per_s,
    }


# ------------------------------------------------------------------------------------------------ summary, checks


def steps(rows: list[dict], student: str, step: str) -> list[dict]:
    return [r for r in rows if r["student"] == student and r["step"] == step]


def summarise(rows: list[dict], student: str) -> dict:
    cold, warmed = steps(rows, student, COLD), steps(rows, student, WARMED)
    first, again = steps(rows, student, WARM), steps(rows, student, AGAIN)
    cold_s, warmed_s = median([r["s"] for r in cold]), median([r["s"] for r in warmed])
    return {
        "student": student,
        "teacher rows an epoch": cold[0]["teacher rows"],
        "cold epoch s": cold_s,
        "warmed epoch s": warmed_s,
        "cold / warmed": cold_s / warmed_s,
        "saved s": cold_s - warmed_s,
        "service compute s, cold epoch": median([r["service compute s"] for r in cold]),
        "warm s": median([r["s"] for r in first]),
        "warm rows/s": median([r["rows/s"] for r in first]),
        "second warm computed": max(r["computed"] for r in again),
    }


def checks(section: Section, student: str) -> None:
    """Every round's warmed epoch hit every teacher row; every second warm found every row cached."""
    warmed, again = steps(section.rows, student, WARMED), steps(section.rows, student, AGAIN)
    hit = min(r["hits"] / r["teacher rows"] for r in warmed)
    section.targets.append(
        Target(
            f"warmed ARD epoch, {student} student: teacher rows hit / asked",
            ">=",
            1.0,
            hit,
            "; ".join(
                f"{r['hits']:,} of {r['teacher rows']:,} hit, {r['uploaded']:,} uploaded, {r['computed']:,} computed"
                for r in warmed
            ),
        )
    )
    cached = min((r["teacher rows"] - r["computed"]) / r["teacher rows"] for r in again)
    section.targets.append(
        Target(
            f"second akd warm, {student} student: rows not computed / rows",
            ">=",
            1.0,
            cached,
            "; ".join(f"{r['computed']:,} of {r['teacher rows']:,} computed in {r['s']:.2f} s" for r in again),
        )
    )
