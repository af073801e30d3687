"""The training loop: one method, one attack, one optional teacher; checkpoints, early stopping, resume.

Everything random draws from two generators seeded by the run's seed (data order
and augmentation; attack starts), and both are saved in `last.pt`, so a resumed
run continues exactly where it stopped. Under torchrun each rank trains its share of
every global batch and DDP averages the gradients (student_trainer/distributed.py);
rank 0 validates and writes the run's files.

With a teacher service, the teacher's answers overlap the student's work (teacher.overlap): the steps ask early
(losses.py), and the loop asks about the next batch's clean inputs before this batch's step runs (`asked_ahead`).

Nothing non-finite is ever applied or saved: a step whose loss or gradients are NaN or infinite is not applied and
ends the run (NonFiniteStep), as does an epoch that ends with non-finite weights, so the run's checkpoints keep the
last finite weights, from which `akd train --resume` continues. (The teacher's answers are checked by the teacher
client before a loss sees them.)
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import time
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import torch

from shared.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from shared.client.query_thread import Pending
from shared.codec import to_unit_float
from shared.devices import resolve_device
from shared.models import build_model
from student_trainer.attacks import PGD, RowShard, perturbation_norms
from student_trainer.config import TrainConfig
from student_trainer.data import Dataset, iterate_batches, load_dataset
from student_trainer.distributed import World
from student_trainer.dynamics import CorrectnessLog
from student_trainer.evaluate import evaluate
from student_trainer.losses import Step, get_method
from student_trainer.progress import Progress
from student_trainer.teacher_client import LocalTeacher, RemoteTeacher, Teacher

log = logging.getLogger("akd.train")

B = TypeVar("B", bound=tuple)

METRICS_FILE = "metrics.jsonl"


class NonFiniteStep(RuntimeError):
    """A step's loss or gradients, or an epoch's weights, held NaN or infinite values: the run stops there, the step
    not applied and nothing after it saved (one NaN reaches every weight in a step or two, and stays)."""


def make_teacher(cfg: TrainConfig, dataset: Dataset, device: torch.device) -> Teacher | None:
    """Connect to the teacher and check it fits the dataset before the first step."""
    if cfg.teacher is None:
        return None
    t = cfg.teacher
    if t.url is not None:
        teacher = RemoteTeacher(
            t.urls,
            t.name,
            cfg.temperature,
            t.token,
            t.timeout_s,
            t.give_up_after_s,
            clean_cache=t.cache.clean,
            adversarial_cache=t.cache.adversarial,
            affinity=t.affinity,
            keys_first=t.keys_first,
            shared_memory=t.shared_memory,
        )
    else:
        teacher = LocalTeacher(t.config, t.name, cfg.temperature, device)
    info = teacher.info()
    if info.num_classes != dataset.num_classes or tuple(info.input_shape) != tuple(dataset.input_shape):
        raise ValueError(
            f"teacher {info.name!r} has {info.num_classes} classes and input shape {tuple(info.input_shape)}; "
            f"dataset {dataset.name} has {dataset.num_classes} classes and input shape {dataset.input_shape}"
        )
    return teacher


def make_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, total_steps: int):
    """The learning-rate schedule `cfg.schedule` names, over `total_steps`: stepped every iteration, not every epoch."""
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=total_steps)
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    milestones = [m * total_steps for m in cfg.milestones] if cfg.schedule == "piecewise" else []
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.1 ** sum(step >= m for m in milestones))


@dataclass
class RunState:
    """What `last.pt` carries beyond the weights, to resume exactly."""

    # epochs completed
    epoch: int = 0
    best_val_robust: float = -1.0
    best_epoch: int = -1
    history: list[dict] = field(default_factory=list)


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.out = Path(cfg.out_dir)
        self.world = World.from_env()
        self.device = self.world.device(resolve_device(cfg.device))
        self.world.start(self.device)
        if not self.world.is_main:
            # one rank reports progress
            logging.getLogger("akd").setLevel(logging.WARNING)
        torch.manual_seed(cfg.seed)
        self.data = load_dataset(cfg.dataset, cfg.data_dir, cfg.val_size, cfg.limit_train)
        self.model = build_model(
            cfg.arch, self.data.num_classes, self.data.input_shape, self.data.mean, self.data.std
        ).to(self.device)
        self.trained = self._parallel(self.model)
        self.optimizer = torch.optim.SGD(
            self.model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
        self.steps_per_epoch = math.ceil(len(self.data.train) / cfg.batch_size)
        self.scheduler = make_scheduler(cfg, self.optimizer, cfg.epochs * self.steps_per_epoch)
        self.method = get_method(cfg.method)
        self.attack = PGD.from_config(cfg.train_attack)
        self.val_attack = PGD.from_config(cfg.val_attack)
        self.teacher = make_teacher(cfg, self.data, self.device)
        if cfg.init_from is not None:
            self._initialise_from(cfg.init_from)
        self.data_gen = torch.Generator().manual_seed(cfg.seed)
        self.attack_gen = torch.Generator().manual_seed(cfg.seed + 1)
        self.state = RunState()
        self.dynamics = CorrectnessLog(len(self.data.train)) if cfg.track_dynamics else None
        self._check_batches_fill_the_world()

    def _parallel(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model the steps train: DDP over the ranks under torchrun, the model itself otherwise."""
        if not self.world.distributed:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def _check_batches_fill_the_world(self) -> None:
        last = len(self.data.train) % self.cfg.batch_size
        if self.world.distributed and (self.cfg.batch_size < self.world.size or 0 < last < self.world.size):
            raise ValueError(
                f"{self.world.size} ranks need at least {self.world.size} rows in every batch; batch_size "
                f"{self.cfg.batch_size} over {len(self.data.train)} training images leaves "
                f"{last or self.cfg.batch_size} in one: change batch_size or limit_train"
            )

    def _initialise_from(self, path: Path) -> None:
        """Weights from another run's checkpoint (a warm start); the optimiser, schedule and RNGs start fresh."""
        ckpt = load_checkpoint(path, map_location=self.device)
        ours = (self.cfg.arch, self.data.num_classes, tuple(self.data.input_shape))
        theirs = (ckpt.arch, ckpt.num_classes, tuple(ckpt.input_shape))
        if ours != theirs:
            raise ValueError(
                f"init_from {path} holds {theirs[0]} with {theirs[1]} classes and input shape {theirs[2]}; "
                f"this run trains {ours[0]} with {ours[1]} classes and input shape {ours[2]}"
            )
        self.model.load_state_dict(ckpt.state_dict)
        log.info("initialised from %s", path)

    def radius_fraction(self, epoch: int, step_in_epoch: int) -> float:
        """How much of attack.eps the training attack uses now: linear from 0 over eps_warmup_epochs, then 1."""
        warmup = self.cfg.eps_warmup_epochs * self.steps_per_epoch
        done = epoch * self.steps_per_epoch + step_in_epoch + 1
        return 1.0 if done >= warmup else done / warmup

    # -- checkpoints -------------------------------------------------------------------------

    def _checkpoint(self, metrics: dict, resumable: bool) -> Checkpoint:
        extra = {}
        if resumable:
            extra = {
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "data_gen": self.data_gen.get_state(),
                "attack_gen": self.attack_gen.get_state(),
                "torch_rng": torch.get_rng_state(),
                "state": {
                    "epoch": self.state.epoch,
                    "best_val_robust": self.state.best_val_robust,
                    "best_epoch": self.state.best_epoch,
                    "history": self.state.history,
                },
            }
        return Checkpoint(
            self.cfg.arch,
            self.data.num_classes,
            self.data.input_shape,
            {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            {"epoch": self.state.epoch, "metrics": metrics, "config": self.cfg.model_dump(mode="json")},
            extra,
        )

    def _save(self, metrics: dict) -> None:
        if not self.world.is_main:
            return
        epoch = self.state.epoch
        if epoch % self.cfg.save_every == 0 or epoch == self.cfg.epochs:
            save_checkpoint(self.out / f"epoch_{epoch:03d}.pt", self._checkpoint(metrics, resumable=False))
        if self.state.best_epoch == epoch:
            save_checkpoint(self.out / "best.pt", self._checkpoint(metrics, resumable=False))
        if self.dynamics is not None:
            self.dynamics.save(self.out / "dynamics.npz")
        # last: it commits the epoch
        save_checkpoint(self.out / "last.pt", self._checkpoint(metrics, resumable=True))

    def resume(self) -> None:
        if not (self.out / "last.pt").exists():
            raise FileNotFoundError(f"cannot resume: {self.out / 'last.pt'} does not exist")
        ckpt = load_checkpoint(self.out / "last.pt", map_location=self.device)
        self.model.load_state_dict(ckpt.state_dict)
        extra = ckpt.extra
        self.optimizer.load_state_dict(extra["optimizer"])
        self.scheduler.load_state_dict(extra["scheduler"])
        self.data_gen.set_state(extra["data_gen"])
        self.attack_gen.set_state(extra["attack_gen"])
        torch.set_rng_state(extra["torch_rng"])
        self.state = RunState(**extra["state"])
        if self.dynamics is not None and (self.out / "dynamics.npz").exists():
            self.dynamics = self._restored_dynamics(self.out / "dynamics.npz")
        log.info("resumed %s after epoch %d", self.out, self.state.epoch)

    def _restored_dynamics(self, path: Path) -> CorrectnessLog:
        """The run's correctness log; one that cannot be read (damaged, or torn by a writer that was not atomic) costs
        its history, not the run."""
        try:
            return CorrectnessLog.load(path)
        except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile) as exc:
            log.warning("%s is unreadable (%s): training dynamics restart at epoch %d", path, exc, self.state.epoch + 1)
            return self.dynamics

    # -- the loop ------------------------------------------------------------------------------

    def fit(self, stop_after: int | None = None) -> RunState:
        """Train until `stop_after` epochs are done (default: all), as an interruption would leave it."""
        if self.world.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.json").write_text(json.dumps(self.cfg.model_dump(mode="json"), indent=2))
            self._rewrite_metrics()
        progress = Progress(
            total_epochs=self.cfg.epochs, steps_per_epoch=self.steps_per_epoch, start_epoch=self.state.epoch
        )
        while self.state.epoch < min(stop_after or self.cfg.epochs, self.cfg.epochs):
            metrics = self._epoch(self.state.epoch, progress)
            self._refuse_non_finite_weights()
            self.state.epoch += 1
            self.state.history.append(metrics)
            if self.world.is_main:
                with open(self.out / METRICS_FILE, "a") as f:
                    f.write(json.dumps(metrics) + "\n")
            self._save(metrics)
            progress.epoch_done(metrics)
        progress.close()
        if self.world.is_main:
            self._pictures()
        return self.state

    def _epoch(self, epoch: int, progress: Progress) -> dict:
        started = time.perf_counter()
        before = self._teacher_counts()
        totals = {"loss": 0.0, "clean": 0, "adv": 0, "perturbation": 0.0, "n": 0}
        # (indices, clean correct, adversarial correct) per batch, for the training dynamics
        records = []
        self.model.train()
        with contextlib.closing(self.asked_ahead(self._my_rows())) as batches:
            for step_in_epoch, ((x, y, indices, rows), clean_targets) in enumerate(batches):
                attack = self.attack.scaled(self.radius_fraction(epoch, step_in_epoch))
                result = self.step(x, y, epoch, attack, rows=rows, clean_targets=clean_targets)
                self._tally(result, x, y, indices, attack, totals, records)
                progress.step(loss=totals["loss"] / totals["n"], adv_acc=totals["adv"] / totals["n"])
        self._record_dynamics(epoch, records)
        teacher = [now - then for now, then in zip(self._teacher_counts(), before, strict=True)]
        keys = list(totals)
        summed = self.world.sum([totals[k] for k in keys] + teacher, self.device)
        totals = dict(zip(keys, summed))
        metrics = {
            "epoch": epoch + 1,
            "lr": self.optimizer.param_groups[0]["lr"],
            "train_eps": self.attack.scaled(self.radius_fraction(epoch, self.steps_per_epoch - 1)).eps,
            "train_loss": totals["loss"] / totals["n"],
            "train_clean_acc": totals["clean"] / totals["n"],
            "train_adv_acc": totals["adv"] / totals["n"],
            # the mean distance the attack moved a training input: near train_eps when it reaches the ball's surface
            "train_perturbation": totals["perturbation"] / totals["n"],
            "teacher_rows": int(summed[-3]),
            "teacher_cache_hits": int(summed[-2]),
            # rows sent whole to the service: the others were answered by key (keys first) or in-process
            "teacher_rows_uploaded": int(summed[-1]),
            "world_size": self.world.size,
        }
        metrics.update(self._validate(epoch + 1, progress))
        metrics["epoch_time_s"] = time.perf_counter() - started
        return metrics

    def _my_rows(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[slice, int]]]:
        """This epoch's batches, as this rank's share of each (all of it on one process): (x in [0, 1] on the device,
        y, the rows' indices, (which rows of the global batch, of how many))."""
        for indices, xb, yb in iterate_batches(self.data.train, self.cfg.batch_size, self.data_gen, self.data.augment):
            mine = self.world.rows(len(yb))
            yield to_unit_float(xb[mine]).to(self.device), yb[mine].to(self.device), indices[mine], (mine, len(yb))

    def _tally(self, result, x, y, indices, attack: PGD, totals: dict, records: list) -> None:
        """A step's result into the epoch's totals (and its rows' correctness into `records`, for the dynamics)."""
        correct_clean = self._clean_correct(result, x, y)
        correct_adv = result.logits_adv.argmax(1) == y
        if self.dynamics is not None:
            records.append((indices, correct_clean.cpu(), correct_adv.cpu()))
        n = len(y)
        totals["loss"] += float(result.loss.detach()) * n
        totals["clean"] += int(correct_clean.sum())
        totals["adv"] += int(correct_adv.sum())
        totals["perturbation"] += float(perturbation_norms(result.x_adv, x, attack.norm).sum())
        totals["n"] += n

    def asked_ahead(self, batches: Iterable[B]) -> Iterator[tuple[B, Pending | None]]:
        """Each batch (x, its clean inputs, first) with the teacher's answer on x already asked for: the next batch's
        is asked before this one is handed out, so the service answers it while this batch's step runs.

        Only where that hides a wait and changes nothing: the method asks about clean inputs (ARD, RSLAD, IAD),
        teacher.overlap is on, and the teacher answers apart from this process (a local teacher would compute here,
        outside the step's autocast). Otherwise every batch comes with None, and the step asks itself. Nothing is
        asked across an epoch's end (the epoch's teacher counts are read then), and closing the iterator cancels the
        query asked for a batch it never handed out (a step failed).
        """
        teacher = self.teacher
        ahead = teacher is not None and self.method.asks_clean and self.cfg.teacher.overlap and teacher.overlaps
        if not ahead:
            yield from ((batch, None) for batch in batches)
            return
        batches = iter(batches)
        asked = [(batch, teacher.submit(batch[0])) for batch in itertools.islice(batches, 1)]
        try:
            while asked:
                asked += [(batch, teacher.submit(batch[0])) for batch in itertools.islice(batches, 1)]
                yield asked.pop(0)
        finally:
            for _, pending in asked:
                pending.cancel()

    def step(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        epoch: int,
        attack: PGD | None = None,
        rows: tuple[slice, int] | None = None,
        clean_targets: Pending | None = None,
    ):
        """One optimisation step: the attack (default: the full-radius one), the teacher query (if any), the loss, the
        update. `rows`: which rows of a global batch of how many x is, under torchrun; `clean_targets`: the teacher's
        answer on x, already asked for (`asked_ahead`)."""
        attack = attack or self.attack
        generator, weight = self.attack_gen, 1.0
        if rows is not None and self.world.distributed:
            mine, total = rows
            generator = RowShard(self.attack_gen, mine.start, mine.stop, total)
            # DDP averages over ranks: this makes it the batch's mean
            weight = len(y) * self.world.size / total
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.amp == "bf16"):
            result = self.method(
                Step(self.trained, x, y, attack, self.cfg, self.teacher, epoch, generator, clean_targets)
            )
        self.optimizer.zero_grad(set_to_none=True)
        (result.loss * weight if weight != 1.0 else result.loss).backward()
        self._refuse_non_finite(result.loss, epoch)
        self.optimizer.step()
        self.scheduler.step()
        return result

    def _refuse_non_finite(self, loss: torch.Tensor, epoch: int) -> None:
        """NonFiniteStep, before the optimiser applies the step, when its loss or gradients are not finite.

        Under torchrun the gradients are every rank's sum (DDP), so a non-finite loss on one rank reaches every
        rank's gradients and every rank stops at the same step. One sync a step (the loss is read for the metrics
        anyway)."""
        loss = loss.detach().float()
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=loss.device)
        finite = torch.stack([torch.isfinite(loss), torch.isfinite(norm.to(loss.device))])
        if bool(finite.all()):
            return
        self.optimizer.zero_grad(set_to_none=True)
        step = self.scheduler.last_epoch - epoch * self.steps_per_epoch + 1
        what = f"the training loss is {float(loss):g}"
        if bool(finite[0]):
            what = f"the gradients' norm is {float(norm):g}"
        raise NonFiniteStep(
            f"training stopped at epoch {epoch + 1}, step {step} of {self.steps_per_epoch}: {what} (expected a "
            "finite loss and gradients); the step was not applied and nothing after the last saved epoch is saved"
        )

    def _refuse_non_finite_weights(self) -> None:
        """NonFiniteStep when the weights that would be saved hold NaN or infinite values (which a finite step can
        still make, in a weight past float32's range), so that no checkpoint ever holds them."""
        tensors = self.model.state_dict()
        bad = [name for name, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
        if bad:
            raise NonFiniteStep(
                f"after epoch {self.state.epoch + 1} {len(bad)} of the model's {len(tensors)} tensors hold NaN or "
                f"infinite values ({bad[0]} first; expected finite weights); the epoch is not saved"
            )

    def _clean_correct(self, result, x, y) -> torch.Tensor:
        """Clean train accuracy: the method's own clean logits when it has them, else one eval-mode pass."""
        if result.logits_clean is not None:
            return result.logits_clean.argmax(1) == y
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad():
            correct = self.model(x).argmax(1) == y
        self.model.train(was_training)
        return correct

    def _validate(self, epoch: int, progress: Progress) -> dict:
        if not self.world.is_main or (epoch % self.cfg.eval.every != 0 and epoch != self.cfg.epochs):
            return {"val_clean_acc": None, "val_robust_acc": None}
        progress.note("validating")
        val = self.data.val
        result = evaluate(
            self.model,
            to_unit_float(val.x),
            val.y,
            attacks=("clean", "pgd"),
            attack=self.val_attack,
            batch_size=self.cfg.eval.batch_size,
            device=self.device,
            seed=self.cfg.seed,
        )
        if result.pgd_acc > self.state.best_val_robust:
            self.state.best_val_robust, self.state.best_epoch = result.pgd_acc, epoch
        return {
            "val_clean_acc": result.clean_acc,
            "val_robust_acc": result.pgd_acc,
            "val_ece": result.ece,
            "best_epoch": self.state.best_epoch,
        }

    def _teacher_counts(self) -> tuple[int, int, int]:
        if self.teacher is None:
            return 0, 0, 0
        return self.teacher.rows_requested, self.teacher.cache_hits, self.teacher.rows_uploaded

    def _rewrite_metrics(self) -> None:
        """metrics.jsonl holds exactly the epochs this run has completed (a resumed run drops any others)."""
        with open(self.out / METRICS_FILE, "w") as f:
            for metrics in self.state.history:
                f.write(json.dumps(metrics) + "\n")

    def _pictures(self) -> None:
        from student_trainer.plots import training_curves

        training_curves(self.out / METRICS_FILE, self.out / "curves.png", labels=[self.cfg.method])

    def _record_dynamics(self, epoch: int, records: list) -> None:
        """Every rank's rows into rank 0's correctness log."""
        if self.dynamics is None:
            return
        for rank_records in self.world.gather(records):
            for indices, clean, adv in rank_records:
                self.dynamics.record(epoch, indices, clean, adv)

    def close(self) -> None:
        if self.teacher is not None:
            self.teacher.close()
        # rank 0 may still be writing the last epoch's files
        self.world.barrier()
        self.world.stop()


def train(cfg: TrainConfig, resume: bool = False) -> RunState:
    trainer = Trainer(cfg)
    try:
        if resume:
            trainer.resume()
        return trainer.fit()
    finally:
        trainer.close()
