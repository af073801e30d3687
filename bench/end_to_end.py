"""5. End to end: AKD training steps with the teacher behind the service vs in-process.

Two trainers built from the same config (`student_trainer.train.Trainer`), one
asking the running service for soft targets (as the demo's students do, default
cache mode), one running the same teacher in its own process; they take the
same real batches, alternating step by step. A PGD-AT trainer (no teacher) runs
alongside, to show what the teacher query costs at all.
"""

from __future__ import annotations

import itertools

import torch

from bench.context import Context
from bench.sections import Section, Target
from bench.timing import alternate, median
from shared.codec import to_unit_float
from student_trainer.config import AttackConfig, TeacherRef, TrainConfig
from student_trainer.data import iterate_batches
from student_trainer.train import Trainer

TARGET_RATIO = 1.10


def _config(ctx: Context, method: str, teacher: TeacherRef | None, folder: str) -> TrainConfig:
    spec = ctx.cfg.end_to_end
    return TrainConfig(
        dataset=spec.dataset,
        arch=spec.student_arch,
        method=method,
        batch_size=spec.batch_size,
        attack=AttackConfig(steps=spec.attack_steps),
        device=ctx.device.type,
        out_dir=ctx.workdir / "e2e" / folder,
        track_dynamics=False,
        teacher=teacher,
        schedule="constant",
    )


def run(ctx: Context) -> Section:
    spec = ctx.cfg.end_to_end
    section = Section(
        "end_to_end",
        "5. End to end: an AKD training step",
        f"`Trainer.step` (PGD-{spec.attack_steps} against the student, teacher soft targets on the adversarial "
        f"batch, loss, SGD update) for a {spec.student_arch} student on {spec.dataset}, batch {spec.batch_size}, "
        f"teacher {spec.teacher}; median over {spec.steps} steps each, alternated.",
        ["trainer", "step ms", "vs in-process AKD"],
    )
    trainers = {
        "AKD, teacher behind the service": Trainer(
            _config(ctx, "akd", TeacherRef(url=ctx.service().url, name=spec.teacher), "service")
        ),
        "AKD, teacher in-process": Trainer(
            _config(ctx, "akd", TeacherRef(config=ctx.service_config, name=spec.teacher), "local")
        ),
        "PGD-AT, no teacher": Trainer(_config(ctx, "at", None, "at")),
    }
    try:
        first = next(iter(trainers.values()))
        batches = iterate_batches(
            first.data.train, spec.batch_size, torch.Generator().manual_seed(0), first.data.augment
        )
        data = [
            (to_unit_float(xb).to(ctx.device), yb.to(ctx.device))
            for _, (_, xb, yb) in zip(range(spec.steps + ctx.cfg.warmup), batches)
        ]
        ctx.progress(f"end to end: {len(trainers)} trainers x {spec.steps} steps")
        steps = {name: _stepper(t, data) for name, t in trainers.items()}
        times = alternate(steps, spec.steps, ctx.cfg.warmup, ctx.device)
    finally:
        for t in trainers.values():
            t.close()
    local = median(times["AKD, teacher in-process"])
    for name, samples in times.items():
        section.rows.append(
            {
                "trainer": name,
                "step ms": median(samples) * 1e3,
                "vs in-process AKD": median(samples) / local,
                "samples": samples,
            }
        )
    service = median(times["AKD, teacher behind the service"])
    at = median(times["PGD-AT, no teacher"])
    section.targets.append(
        Target(
            "AKD step time, service / in-process",
            "<=",
            TARGET_RATIO,
            service / local,
            f"{service * 1e3:.0f} vs {local * 1e3:.0f} ms per step; PGD-AT without a teacher: {at * 1e3:.0f} ms",
        )
    )
    return section


def _stepper(trainer: Trainer, data: list):
    batches = itertools.cycle(data)

    def step() -> None:
        x, y = next(batches)
        trainer.model.train()
        trainer.step(x, y, epoch=0)

    return step
