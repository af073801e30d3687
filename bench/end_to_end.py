"""5. End to end: distillation training steps with the teacher behind the service (rows in request bodies, or in
shared memory) vs in-process.

For each method (AKD: the teacher on the adversarial batch; ARD: on the clean one), three trainers built from the
same config (`student_trainer.train.Trainer`): one asking the running service for soft targets with teacher.overlap
on (the query in flight while the student computes), one with it off (each query waited for where its answer is
needed), one running the same teacher in its own process. They take the same real batches, alternating step by step.
A PGD-AT trainer (no teacher) runs alongside, to show what the teacher query costs at all.
"""

from __future__ import annotations

import itertools

import torch

from bench.context import Context
from bench.sections import Section, Target
from bench.timing import alternate, median
from shared.codec import to_unit_float
from shared.protocol import CacheMode
from student_trainer.config import AttackConfig, TeacherCache, TeacherRef, TrainConfig
from student_trainer.data import iterate_batches
from student_trainer.train import Trainer

# service / in-process step time: with overlap the query hides behind the student's work, so the service's step is
# no slower; without it, the round trip adds to the step
TARGET_RATIO = 1.0
TARGET_RATIO_WITHOUT_OVERLAP = 1.10


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


def _trainers(ctx: Context) -> dict[str, tuple[Trainer, str | None]]:
    """Each trainer by name, with the method it trains (None: PGD-AT). Per method: through the service with overlap
    on and off, and in-process. The service computes every row (its cache bypassed), as in a first epoch: the cycled
    batches would otherwise hit its cache from the second round on."""
    spec = ctx.cfg.end_to_end
    computed = TeacherCache(clean=CacheMode.bypass, adversarial=CacheMode.bypass)
    trainers = {}
    for method in spec.methods:
        for overlap in ("on", "off"):
            ref = TeacherRef(
                url=ctx.service().url, name=spec.teacher, cache=computed, overlap=overlap == "on", shared_memory=False
            )
            trainer = Trainer(_config(ctx, method, ref, f"{method}-service-{overlap}"))
            trainers[_name(method, f"service, overlap {overlap}")] = trainer, method
        # the same host: rows and answers through the client's shared-memory region, what a trainer does by default
        ref = TeacherRef(url=ctx.service().url, name=spec.teacher, cache=computed, overlap=True, shared_memory=True)
        trainer = Trainer(_config(ctx, method, ref, f"{method}-service-shm"))
        trainers[_name(method, SHARED_MEMORY)] = trainer, method
        local = TeacherRef(config=ctx.service_config, name=spec.teacher)
        trainers[_name(method, "in-process")] = Trainer(_config(ctx, method, local, f"{method}-local")), method
    trainers["PGD-AT, no teacher"] = Trainer(_config(ctx, "at", None, "at")), None
    return trainers


SHARED_MEMORY = "service, shared memory, overlap on"


def _name(method: str, where: str) -> str:
    return f"{method.upper()}, {where}"


def run(ctx: Context) -> Section:
    spec = ctx.cfg.end_to_end
    methods = ", ".join(m.upper() for m in spec.methods)
    section = Section(
        "end_to_end",
        "5. End to end: a distillation training step",
        f"`Trainer.step` ({methods}: PGD-{spec.attack_steps} against the student, the teacher's soft targets (AKD, "
        f"IAD: on the adversarial batch; ARD, RSLAD, IAD: on the clean one), loss, SGD update) for a "
        f"{spec.student_arch} student on {spec.dataset}, batch {spec.batch_size}, teacher {spec.teacher}; through "
        "the service (every row computed, its cache bypassed; rows in request bodies) with teacher.overlap on and "
        "off, through the service with rows and answers in the client's shared-memory region (teacher.shared_memory, "
        "the default on the service's host), and in-process. With overlap on, the next batch's clean query is asked "
        "at the start of each step, as the training loop asks it. "
        f"Median over {spec.steps} steps each, alternated.",
        ["trainer", "step ms", "vs in-process"],
    )
    trained = _trainers(ctx)
    trainers = {name: trainer for name, (trainer, _) in trained.items()}
    steps = {}
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
        steps = {name: _Stepper(t, data) for name, t in trainers.items()}
        times = alternate(steps, spec.steps, ctx.cfg.warmup, ctx.device)
    finally:
        for stepper in steps.values():
            stepper.close()
        for t in trainers.values():
            t.close()
    step_s = {name: median(samples) for name, samples in times.items()}
    for name, samples in times.items():
        method = trained[name][1]
        # the same method's in-process step; none for PGD-AT
        versus = None if method is None else step_s[name] / step_s[_name(method, "in-process")]
        row = {"trainer": name, "step ms": step_s[name] * 1e3, "vs in-process": versus, "samples": samples}
        section.rows.append(row)
    _targets(section, spec.methods, step_s)
    return section


def _targets(section: Section, methods: list[str], step_s: dict[str, float]) -> None:
    at = step_s["PGD-AT, no teacher"]
    for method in methods:
        local = step_s[_name(method, "in-process")]
        for overlap, threshold in (("on", TARGET_RATIO), ("off", TARGET_RATIO_WITHOUT_OVERLAP)):
            # without overlap, only AKD's: the target the benchmark had before there was overlap
            if overlap == "off" and method != "akd":
                continue
            service = step_s[_name(method, f"service, overlap {overlap}")]
            section.targets.append(
                Target(
                    f"{method.upper()} step time, service with overlap {overlap} / in-process",
                    "<=",
                    threshold,
                    service / local,
                    f"{service * 1e3:.0f} vs {local * 1e3:.0f} ms per step; PGD-AT, no teacher: {at * 1e3:.0f} ms",
                )
            )


class _Stepper:
    """One trainer's steps over the cycled batches, each with the teacher's answer on its clean inputs asked ahead
    where the trainer asks ahead (`Trainer.asked_ahead`: ARD, RSLAD, IAD with overlap on)."""

    def __init__(self, trainer: Trainer, data: list) -> None:
        self.trainer = trainer
        self.batches = trainer.asked_ahead(itertools.cycle(data))

    def __call__(self) -> None:
        (x, y), clean_targets = next(self.batches)
        self.trainer.model.train()
        self.trainer.step(x, y, epoch=0, clean_targets=clean_targets)

    def close(self) -> None:
        """The query asked ahead for a step never taken: cancelled."""
        self.batches.close()
