"""Evaluation of a student: clean accuracy, PGD and AutoAttack robust accuracy, calibration.

Everything runs in eval mode (robust accuracy of a model in train mode is not the
number anyone reports), batch by batch so a large test set fits any device, and
seeded so two evaluations of the same model give the same numbers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from .attack_names import AUTOATTACK_VERSIONS, EVAL_ATTACKS
from .attacks import PGD, attack_mode, ce_loss
from .calibration import expected_calibration_error, reliability_diagram

if TYPE_CHECKING:
    from .config import TrainConfig

_AUTOATTACK_NORMS = {"linf": "Linf", "l2": "L2"}

Progress = Callable[[str], None]

AUTOATTACK_VERSION = "standard"


def threat_model(
    attack: dict, autoattack_n: int | None, standard: bool, autoattack_version: str = AUTOATTACK_VERSION
) -> dict:
    """The full threat model of one evaluation, as recorded in eval.json's `attack` entry.

    A robust accuracy means nothing without it: norm, eps, PGD steps, step size and
    restarts (0: one random start), whether it is the dataset's standard one, and
    AutoAttack's version, attacks, package and image count (None when it did not run).
    """
    from importlib.metadata import PackageNotFoundError, version

    autoattack = None
    if autoattack_n is not None:
        try:
            package = f"pyautoattack {version('pyautoattack')}"
        except PackageNotFoundError:
            package = "pyautoattack (not installed)"
        autoattack = {
            "version": autoattack_version,
            "attacks": list(AUTOATTACK_VERSIONS[autoattack_version]),
            "package": package,
            "n": autoattack_n,
        }
    return {**attack, "restarts": 0, "standard": standard, "autoattack": autoattack}


def describe_threat_model(entry: dict) -> str:
    """One line for people: `akd eval` prints it and the demo's report header states it."""
    start = "random start" if entry.get("random_start", True) else "no random start"
    text = (
        f"{entry['norm']} eps {entry['eps']:.4g}, PGD-{entry['steps']} step size {entry['step_size']:.4g}, "
        f"{start}, {entry.get('restarts', 0)} restarts"
    )
    aa = entry.get("autoattack")
    if aa:
        text += f"; AutoAttack {aa['version']} ({', '.join(aa['attacks'])}; {aa['package']}) on {aa['n']} images"
    return text


@dataclass
class EvalResult:
    clean_acc: float
    pgd_acc: float | None
    autoattack_acc: float | None
    ece: float
    ece_pgd: float | None
    n: int
    # Which images each attack left correctly classified, in test-split order: "1" right, "0" wrong (correct_digits).
    # Kept so that a comparison can count image-sampling error beside the seed error (the images are shared).
    correct: dict[str, str] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict:
        """The fields as a JSON-ready dict; attacks not run stay None (null)."""
        return dataclasses.asdict(self)


def _batches(n: int, batch_size: int) -> list[slice]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    return [slice(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]


def predict(
    model: nn.Module, x: torch.Tensor, batch_size: int = 256, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """Softmax probabilities (N, K) on the CPU; `model` must already live on `device`."""
    with attack_mode(model, eval_mode=True), torch.inference_mode():
        return torch.cat(
            [torch.softmax(model(x[s].to(device)).float(), dim=1).cpu() for s in _batches(len(x), batch_size)]
        )


def pgd_examples(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    attack: PGD,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    seed: int = 0,
    progress: Progress | None = None,
) -> torch.Tensor:
    """PGD examples (on the CPU) maximising cross-entropy; one CPU generator (PGD draws
    its starts on the CPU) seeded once for the whole set, so the result depends only on `seed`."""
    generator = torch.Generator().manual_seed(seed)
    batches = _batches(len(x), batch_size)
    adversarial = []
    with attack_mode(model, eval_mode=True):
        for i, s in enumerate(batches, 1):
            if progress:
                progress(f"pgd {i}/{len(batches)} batches")
            x_b, y_b = x[s].to(device), y[s].to(device)
            adversarial.append(attack.perturb(model, x_b, ce_loss(y_b), generator=generator).detach().cpu())
    return torch.cat(adversarial)


def autoattack_examples(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    norm: str,
    eps: float,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    seed: int = 0,
    version: str = AUTOATTACK_VERSION,
) -> torch.Tensor:
    """AutoAttack examples, on the CPU: "standard" (APGD-CE, APGD-T, FAB-T, Square) or its "apgd" subset.

    AutoAttack reseeds the global RNG before each attack; the fork keeps that from
    leaking into the caller's training randomness.
    """
    if norm not in _AUTOATTACK_NORMS:
        raise ValueError(f"AutoAttack norm must be one of {', '.join(_AUTOATTACK_NORMS)}; got {norm!r}")
    device = torch.device(device)
    cuda_devices = [device.index or 0] if device.type == "cuda" else []
    with attack_mode(model, eval_mode=True), torch.random.fork_rng(devices=cuda_devices):
        aa = _autoattack(model, _AUTOATTACK_NORMS[norm], eps, version, device, seed)
        x_adv, _ = aa.run_standard_evaluation(x.cpu(), y.cpu(), batch_size=batch_size)
    return x_adv.detach().cpu()


def _autoattack(model: nn.Module, norm: str, eps: float, version: str, device: torch.device, seed: int):
    from pyautoattack import AutoAttack

    if version not in AUTOATTACK_VERSIONS:
        raise ValueError(f"unknown AutoAttack version {version!r}; known: {', '.join(AUTOATTACK_VERSIONS)}")
    if version == "standard":
        return AutoAttack(model, norm=norm, eps=eps, version="standard", device=device, seed=seed)
    aa = AutoAttack(
        model,
        norm=norm,
        eps=eps,
        version="custom",
        attacks=list(AUTOATTACK_VERSIONS[version]),
        device=device,
        seed=seed,
    )
    # as "standard" sets them for Linf and L2
    aa.apgd.n_restarts = aa.apgd_targeted.n_restarts = 1
    aa.apgd_targeted.n_target_classes = 9
    return aa


def _accuracy(probs: torch.Tensor, y: torch.Tensor) -> float:
    return (probs.argmax(dim=1) == y.cpu()).float().mean().item()


def correct_digits(probs: torch.Tensor, y: torch.Tensor) -> str:
    """Per-image correctness as a string of "0"/"1", one character per image (readable in any JSON tool)."""
    return "".join("01"[hit] for hit in (probs.argmax(dim=1) == y.cpu()).tolist())


def _check_attacks(attacks: Sequence[str], attack: PGD | None) -> None:
    unknown = [a for a in attacks if a not in EVAL_ATTACKS]
    if unknown:
        raise ValueError(f"unknown attack(s) {', '.join(map(repr, unknown))}; known: {', '.join(EVAL_ATTACKS)}")
    needs_pgd = [a for a in attacks if a in ("pgd", "autoattack")]
    if needs_pgd and attack is None:
        raise ValueError(f"{', '.join(needs_pgd)} needs `attack` (a PGD giving the norm and eps)")


def evaluate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    attacks: Sequence[str] = ("clean", "pgd"),
    attack: PGD | None = None,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    seed: int = 0,
    diagram: Path | None = None,
    progress: Progress | None = None,
    autoattack_version: str = AUTOATTACK_VERSION,
) -> EvalResult:
    """Clean accuracy and ECE always; PGD accuracy and ECE with "pgd"; AutoAttack
    accuracy with "autoattack" (at `attack`'s norm and eps, so both attack the same
    threat model). Writes the clean/PGD reliability diagram to `diagram` if given."""
    _check_attacks(attacks, attack)
    report = progress or (lambda _: None)
    with attack_mode(model, eval_mode=True):
        report("clean")
        probs = predict(model, x, batch_size, device)
        curves = {"clean": (probs, y)}
        correct = {"clean": correct_digits(probs, y)}
        pgd_acc = ece_pgd = autoattack_acc = None
        if "pgd" in attacks:
            x_pgd = pgd_examples(model, x, y, attack, batch_size, device, seed, progress)
            probs_pgd = predict(model, x_pgd, batch_size, device)
            pgd_acc, ece_pgd = _accuracy(probs_pgd, y), expected_calibration_error(probs_pgd, y)
            curves["PGD"] = (probs_pgd, y)
            correct["pgd"] = correct_digits(probs_pgd, y)
        if "autoattack" in attacks:
            report(
                f"autoattack {autoattack_version} on {len(x)} images "
                f"({', '.join(AUTOATTACK_VERSIONS[autoattack_version])})"
            )
            x_aa = autoattack_examples(
                model, x, y, attack.norm, attack.eps, batch_size, device, seed, autoattack_version
            )
            probs_aa = predict(model, x_aa, batch_size, device)
            autoattack_acc = _accuracy(probs_aa, y)
            correct["autoattack"] = correct_digits(probs_aa, y)
    if diagram is not None:
        reliability_diagram(curves, diagram, title=f"n={len(x)}")
    return EvalResult(
        clean_acc=_accuracy(probs, y),
        pgd_acc=pgd_acc,
        autoattack_acc=autoattack_acc,
        ece=expected_calibration_error(probs, y),
        ece_pgd=ece_pgd,
        n=len(x),
        correct=correct,
    )


@dataclass
class CheckpointEvaluation:
    """`akd eval`'s job: one checkpoint on its dataset's test split, under one stated threat model.

    The threat model is the dataset's standard one (config.EVAL_ATTACK), not the checkpoint's training attack;
    `--set attack.*` is the only way to change it, and the record says which it was (`standard`).
    """

    path: Path
    model: nn.Module
    cfg: TrainConfig
    # the test images evaluated (the first `limit` of the split), in [0, 1]
    x: torch.Tensor
    y: torch.Tensor
    attacks: list[str]
    standard: bool
    autoattack_limit: int | None = None
    autoattack_version: str = AUTOATTACK_VERSION

    @classmethod
    def load(
        cls, path: Path, attacks: list[str], sets: list[str], limit: int | None = None, **options
    ) -> CheckpointEvaluation:
        """The checkpoint (a project .pt or a torch.export .pt2), the config it is evaluated under and the test images;
        ConfigError for anything a user must fix."""
        from shared.checkpoint import load_checkpoint
        from shared.codec import to_unit_float
        from shared.configfile import ConfigError, parse_set
        from shared.safe_load import load_export, not_a_model_file
        from student_trainer.config import EVAL_ATTACK, load_train_config
        from student_trainer.data import load_dataset

        unknown = sorted(set(attacks) - set(EVAL_ATTACKS))
        if unknown:
            raise ConfigError(f"--attacks: unknown {unknown}; known: {', '.join(EVAL_ATTACKS)}")
        if (problem := not_a_model_file(path)) is not None:
            raise ConfigError(f"--checkpoint {path} {problem}")
        if path.suffix == ".pt2":
            model, base = load_export(path), {}
        else:
            checkpoint = load_checkpoint(path)
            model, base = checkpoint.build(), checkpoint.metadata.get("config", {})
        # Evaluation trains nothing (no method, no teacher), and it attacks with the dataset's standard threat model.
        base = {**base, "method": "standard", "teacher": None, "attack": EVAL_ATTACK.model_dump(exclude_none=True)}
        cfg = load_train_config(None, sets, base=base)
        standard = not any(parse_set(assignment)[0][0] == "attack" for assignment in sets)
        test = load_dataset(cfg.dataset, cfg.data_dir, cfg.val_size).test
        return cls(path, model, cfg, to_unit_float(test.x[:limit]), test.y[:limit], attacks, standard, **options)

    @property
    def attack(self):
        return self.cfg.attack.resolved(self.cfg.dataset)

    @property
    def autoattack_n(self) -> int | None:
        """How many of the images AutoAttack runs on (the first ones); None when it does not run."""
        if "autoattack" not in self.attacks:
            return None
        return min(len(self.y), self.autoattack_limit if self.autoattack_limit is not None else len(self.y))

    def threat(self) -> dict:
        """The threat model as recorded in eval.json."""
        return threat_model(self.attack.model_dump(), self.autoattack_n, self.standard, self.autoattack_version)

    def run(self, diagram: Path, progress: Progress | None = None) -> dict:
        """The evaluation's record (eval.json): every metric, the checkpoint, the data and the threat model."""
        from shared.devices import resolve_device

        device = resolve_device(self.cfg.device)
        x, y, aa_n = self.x, self.y, self.autoattack_n
        common = dict(
            attack=PGD.from_config(self.attack),
            batch_size=self.cfg.eval.batch_size,
            device=device,
            seed=self.cfg.seed,
            autoattack_version=self.autoattack_version,
            progress=progress,
        )
        # AutoAttack on the first aa_n images only
        split_aa = aa_n is not None and aa_n < len(y)
        first = [a for a in self.attacks if a != "autoattack"] if split_aa else self.attacks
        result = evaluate(self.model.to(device), x, y, attacks=first, diagram=diagram, **common)
        report = {
            **result.to_json(),
            "checkpoint": str(self.path),
            "dataset": self.cfg.dataset,
            "split": "test",
            "attack": self.threat(),
            "attacks": self.attacks,
            "autoattack_n": aa_n,
        }
        if split_aa and aa_n > 0:
            autoattacked = evaluate(self.model, x[:aa_n], y[:aa_n], attacks=("clean", "autoattack"), **common)
            report["autoattack_acc"] = autoattacked.autoattack_acc
            # the first aa_n images' only
            report["correct"]["autoattack"] = autoattacked.correct["autoattack"]
        return report
