"""Training methods, registered by name where they are defined: one step's loss for each robust training method.

Standard, PGD-AT, TRADES, AKD, ARD, RSLAD and IAD-I, with the formulas and defaults of
their papers. A method gets one `Step` (the student, a clean batch, the threat model as a
`PGD`, the teacher's `SoftTargets`, the run's config) and returns the loss to backpropagate plus what the
trainer logs. The formulas are public pure functions so each can be checked against a hand
computation. Which methods there are, and which distil a teacher, is methods.py's list: `METHODS` binds each
name on it to its step.

Conventions: KL(P || Q) sums over classes and averages over the batch (not torch's
element-wise mean); the teacher's probabilities are constants (no gradient, called
once per input kind per step); the model's train/eval mode is left as it was.

Overlap: a step asks the teacher as soon as the inputs are known (`_ask`) and collects the answer where its loss
needs it (`_collect`), so that a teacher with a query in flight (the service's client) answers while the student
computes. The student computes the same things in the same order either way: asking touches neither the student
nor a random generator, so the weights are those of a step that calls the teacher where it needs the answer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from student_trainer.attacks import PGD, attack_mode, ce_loss, kl_loss
from student_trainer.methods import DISTILS

if TYPE_CHECKING:
    from shared.client.query_thread import Pending
    from student_trainer.config import TrainConfig


class SoftTargets(Protocol):
    """x in [0, 1] -> teacher probabilities (B, K), already tempered and ensemble-aggregated (by the service). A
    `teacher_client.Teacher` is one; the losses need nothing else of it, but use its `submit` where it has one (and
    the run's teacher.overlap is on) to ask ahead."""

    def __call__(self, x: torch.Tensor, *, adversarial: bool) -> torch.Tensor: ...


@dataclass(frozen=True)
class Step:
    """What one training step of any method may read. `cfg` is the run's validated config: the methods read
    alpha, temperature, trades_beta, iad_beta, iad_warmup_epochs and teacher.overlap from it."""

    model: nn.Module
    # the clean batch, in [0, 1]
    x: torch.Tensor
    y: torch.Tensor
    attack: PGD
    cfg: TrainConfig
    teacher: SoftTargets | None = None
    # 0-based
    epoch: int = 0
    # the attack's random starts
    generator: torch.Generator | None = None
    # the teacher's answer on the clean x, asked for ahead by the trainer; None: the step asks (methods that use it)
    clean_targets: Pending | None = None


@dataclass
class StepResult:
    # scalar, to backprop
    loss: torch.Tensor
    # student logits on x_adv (detached), for train robust accuracy
    logits_adv: torch.Tensor
    # student logits on clean x (detached) when the method computed them
    logits_clean: torch.Tensor | None
    # detached
    x_adv: torch.Tensor


@dataclass(frozen=True)
class Method:
    name: str
    # whether it needs a teacher
    distils: bool
    step: Callable[[Step], StepResult]
    # whether its step asks the teacher about the clean batch (and so takes Step.clean_targets)
    asks_clean: bool = False

    def __call__(self, step: Step) -> StepResult:
        return self.step(step)


METHODS: dict[str, Method] = {}


def method(
    name: str, asks_clean: bool = False
) -> Callable[[Callable[[Step], StepResult]], Callable[[Step], StepResult]]:
    """Register a method's step function under `name`, one of methods.py's (whether it distils comes from there)."""

    def register(step: Callable[[Step], StepResult]) -> Callable[[Step], StepResult]:
        METHODS[name] = Method(name, DISTILS[name], step, asks_clean)
        return step

    return register


# ---------------------------------------------------------------- formulas


def soft_cross_entropy(logits: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """mean_i -sum_c q_ic log softmax(z_i)_c: cross-entropy to a soft target (AKD's loss)."""
    return -(q * F.log_softmax(logits, dim=-1)).sum(dim=-1).mean()


def kl_div(p_target: torch.Tensor, logits_student: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """mean_i KL(p_target_i || softmax(z_i / tau)); gradients flow into p_target too when it has them (TRADES)."""
    return kl_loss(p_target)(logits_student / temperature).mean()


def mix_labels(probs: torch.Tensor, y: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha * probs + (1 - alpha) * onehot(y): the paper's label mixing of any method's target."""
    return alpha * probs + (1 - alpha) * F.one_hot(y, probs.shape[-1]).to(probs.dtype)


def iad_trust(teacher_probs_adv: torch.Tensor, y: torch.Tensor, beta: float) -> torch.Tensor:
    """a_i = P_T(y_i | x'_i)^beta: how far IAD trusts the teacher on sample i."""
    return teacher_probs_adv.gather(1, y[:, None]).squeeze(1).pow(beta)


def iad_introspection(logits_clean: torch.Tensor, logits_adv: torch.Tensor, trust: torch.Tensor) -> torch.Tensor:
    """mean_i (1 - a_i) * KL(p(S(x_i)) || p(S(x'_i))): where the teacher is unreliable, the student's
    own clean prediction guides it. Not detached on the clean side, as in the official IAD-I code."""
    return ((1 - trust) * kl_loss(F.softmax(logits_clean, dim=-1))(logits_adv)).mean()


# ---------------------------------------------------------------- pieces the methods share


def _attack_ce(model: nn.Module, x, y, attack: PGD, generator) -> torch.Tensor:
    """x' = PGD on the student maximising CE(S(x'), y) (PGD-AT, AKD, ARD, IAD)."""
    return attack.perturb(model, x, ce_loss(y), generator)


def _kl_attack(attack: PGD) -> PGD:
    """The KL attack of TRADES and RSLAD: the caller's ball and steps, starting at x + 0.001 * N(0, 1)."""
    return replace(attack, random_start=True, start="normal")


class _WhenCollected:
    """A teacher called when its answer is collected: where a step without overlap calls it."""

    def __init__(self, teacher: SoftTargets, x: torch.Tensor, adversarial: bool) -> None:
        self._teacher, self._x, self._adversarial = teacher, x, adversarial

    def result(self) -> torch.Tensor:
        return self._teacher(self._x, adversarial=self._adversarial)

    def cancel(self) -> bool:
        return True


def _ask(step: Step, x: torch.Tensor, adversarial: bool) -> Pending:
    """The teacher's probabilities on x, asked for now and collected (`_collect`) where the loss needs them: sent now
    by a teacher with `submit` when the run's teacher.overlap is on, else asked of the teacher at the collection."""
    if step.teacher is None:
        raise ValueError("this method needs a teacher; got teacher=None")
    overlap = step.cfg.teacher is None or step.cfg.teacher.overlap
    submit = getattr(step.teacher, "submit", None) if overlap else None
    if submit is None:
        return _WhenCollected(step.teacher, x.detach(), adversarial)
    with torch.no_grad():
        return submit(x.detach(), adversarial=adversarial)


def _ask_clean(step: Step) -> Pending:
    """The teacher's probabilities on the clean batch: the trainer's, asked for ahead, or asked for now."""
    return step.clean_targets if step.clean_targets is not None else _ask(step, step.x, adversarial=False)


def _collect(asked: Pending, x: torch.Tensor) -> torch.Tensor:
    """The answer `_ask` asked for about x, as constants on x's device."""
    with torch.no_grad():
        probs = asked.result()
    if probs.dim() != 2 or len(probs) != len(x):
        raise ValueError(f"teacher returned shape {tuple(probs.shape)} for {len(x)} inputs; expected (B, K)")
    return probs.detach().to(x.device)


def _result(loss, logits_adv, x_adv, logits_clean=None) -> StepResult:
    return StepResult(
        loss=loss,
        logits_adv=logits_adv.detach(),
        logits_clean=None if logits_clean is None else logits_clean.detach(),
        x_adv=x_adv.detach(),
    )


def _ard_loss(model: nn.Module, x, y, x_adv, p_teacher_clean, cfg: TrainConfig):
    """alpha * tau^2 * KL(p_T(x) || p(S(x')/tau)) + (1 - alpha) * CE(S(x), y): ARD, and IAD-I's first two terms.

    Returns the loss and the (undetached) adversarial and clean logits.
    """
    logits_adv, logits_clean = model(x_adv), model(x)
    tau = cfg.temperature
    distill = cfg.alpha * tau**2 * kl_div(p_teacher_clean, logits_adv, tau)
    return distill + (1 - cfg.alpha) * F.cross_entropy(logits_clean, y), logits_adv, logits_clean


# ---------------------------------------------------------------- the methods


@method("standard")
def _standard(step: Step) -> StepResult:
    """CE(S(x), y); no attack, so x_adv = x."""
    logits = step.model(step.x)
    return _result(F.cross_entropy(logits, step.y), logits, step.x, logits_clean=logits)


@method("at")
def _at(step: Step) -> StepResult:
    """PGD-AT (Madry): CE(S(x'), y)."""
    x_adv = _attack_ce(step.model, step.x, step.y, step.attack, step.generator)
    logits_adv = step.model(x_adv)
    return _result(F.cross_entropy(logits_adv, step.y), logits_adv, x_adv)


@method("trades")
def _trades(step: Step) -> StepResult:
    """CE(S(x), y) + beta * KL(p(S(x)) || p(S(x'))), x' maximising that KL.

    The attack's target p(S(x)) is computed in the attack's mode without gradient
    (the official code evaluates it in eval mode); the loss's is not detached.
    """
    with attack_mode(step.model, step.attack.eval_mode), torch.no_grad():
        p_clean = F.softmax(step.model(step.x), dim=-1)
    x_adv = _kl_attack(step.attack).perturb(step.model, step.x, kl_loss(p_clean), step.generator)
    logits_clean, logits_adv = step.model(step.x), step.model(x_adv)
    loss = F.cross_entropy(logits_clean, step.y) + step.cfg.trades_beta * kl_div(
        F.softmax(logits_clean, dim=-1), logits_adv
    )
    return _result(loss, logits_adv, x_adv, logits_clean)


@method("akd")
def _akd(step: Step) -> StepResult:
    """soft-CE(S(x'), alpha * p_T(x') + (1 - alpha) * onehot(y)), the teacher on the student's own x'.

    alpha = 0 is PGD-AT exactly, and then the teacher is not called at all. The teacher is asked about x' as soon as
    the attack has made it, and answers during the student's forward pass on it.
    """
    x_adv = _attack_ce(step.model, step.x, step.y, step.attack, step.generator)
    asked = None if step.cfg.alpha == 0 else _ask(step, x_adv, adversarial=True)
    logits_adv = step.model(x_adv)
    if asked is None:
        return _result(F.cross_entropy(logits_adv, step.y), logits_adv, x_adv)
    q = mix_labels(_collect(asked, x_adv), step.y, step.cfg.alpha)
    return _result(soft_cross_entropy(logits_adv, q), logits_adv, x_adv)


@method("ard", asks_clean=True)
def _ard(step: Step) -> StepResult:
    """ARD: the teacher on clean x, the student on x' (PGD-CE); its (1 - alpha) CE term is its label term. The teacher
    is asked about x before the attack, which hides the wait."""
    clean = _ask_clean(step)
    x_adv = _attack_ce(step.model, step.x, step.y, step.attack, step.generator)
    loss, logits_adv, logits_clean = _ard_loss(step.model, step.x, step.y, x_adv, _collect(clean, step.x), step.cfg)
    return _result(loss, logits_adv, x_adv, logits_clean)


@method("rslad", asks_clean=True)
def _rslad(step: Step) -> StepResult:
    """RSLAD with label mixing: P = alpha * p_T(x) + (1 - alpha) * onehot(y) (alpha = 1: plain RSLAD);
    x' maximises KL(P || p(S(x'))); loss 5/6 KL(P || p(S(x'))) + 1/6 KL(P || p(S(x))). tau = 1 on the student.
    The attack needs P from its start, so only the trainer's asking ahead (the previous step's time) hides the wait."""
    target = mix_labels(_collect(_ask_clean(step), step.x), step.y, step.cfg.alpha)
    x_adv = _kl_attack(step.attack).perturb(step.model, step.x, kl_loss(target), step.generator)
    logits_adv, logits_clean = step.model(x_adv), step.model(step.x)
    loss = 5 / 6 * kl_div(target, logits_adv) + 1 / 6 * kl_div(target, logits_clean)
    return _result(loss, logits_adv, x_adv, logits_clean)


@method("iad", asks_clean=True)
def _iad(step: Step) -> StepResult:
    """IAD-I: ARD's loss, plus from the warm-up epoch on alpha * mean_i (1 - a_i) KL(p(S(x_i)) || p(S(x'_i))).

    a_i = P_T(y | x')^beta from the teacher's (tempered) probabilities; the official
    code uses tau = 1 there, which is what the default tau gives. Before the warm-up
    the teacher is not called on x' (a_i is unused), saving its uncacheable request.
    The teacher is asked about x before the attack, and about x' before the student's forward passes.
    """
    clean = _ask_clean(step)
    x_adv = _attack_ce(step.model, step.x, step.y, step.attack, step.generator)
    introspect = step.epoch >= step.cfg.iad_warmup_epochs
    adversarial = _ask(step, x_adv, adversarial=True) if introspect else None
    loss, logits_adv, logits_clean = _ard_loss(step.model, step.x, step.y, x_adv, _collect(clean, step.x), step.cfg)
    if adversarial is not None:
        trust = iad_trust(_collect(adversarial, x_adv), step.y, step.cfg.iad_beta)
        loss = loss + step.cfg.alpha * iad_introspection(logits_clean, logits_adv, trust)
    return _result(loss, logits_adv, x_adv, logits_clean)


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(METHODS)}") from None
