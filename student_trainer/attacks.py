"""PGD with the threat model as a step class, kept apart from the model (as in MadryLab's `robustness`).

A step class knows only its geometry (random start, ascent step, projection);
`PGD` runs the loop against any model and any per-sample loss, so the same
attack serves PGD-AT, the distillation methods (CE or KL to a target) and
evaluation.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from student_trainer.config import AttackConfig

LossFn = Callable[[torch.Tensor], torch.Tensor]
"""Student logits on x_adv -> per-sample loss (B,) that the attack maximises."""

# Keeps the L2 step finite where the gradient vanishes (e.g. a saturated softmax).
_TINY = 1e-12
# Spread of the "normal" start (TRADES, RSLAD): a nudge off x, so that a KL to p(S(x)) has a gradient.
_NORMAL_START_STD = 0.001


def _expand(per_sample: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) so it broadcasts over one sample's dimensions."""
    return per_sample.view(-1, *([1] * (like.dim() - 1)))


@dataclass(frozen=True)
class RowShard:
    """A generator for one rank's rows [start, stop) of a global batch of `total` rows: noise is drawn for all of
    them and sliced, so each rank gets exactly the noise the single-process run gives those rows, and every rank's
    generator stays in step."""

    generator: torch.Generator
    start: int
    stop: int
    total: int


def _cpu_noise(
    kind: str, shape: torch.Size | tuple[int, ...], like: torch.Tensor, generator: torch.Generator | RowShard | None
) -> torch.Tensor:
    """Noise drawn on the CPU from `generator`, then moved: the same seed gives the same start on any device."""
    draw = torch.rand if kind == "uniform" else torch.randn
    if isinstance(generator, RowShard):
        if shape[0] != generator.stop - generator.start:
            raise ValueError(f"noise for {shape[0]} rows asked of a shard of {generator.stop - generator.start}")
        full = draw((generator.total, *shape[1:]), generator=generator.generator, dtype=like.dtype)
        return full[generator.start : generator.stop].to(like.device)
    return draw(shape, generator=generator, dtype=like.dtype).to(like.device)


class AttackerStep(ABC):
    """A threat model's geometry: where a random start lands, one ascent step, the projection back into the ball."""

    def __init__(self, eps: float, step_size: float) -> None:
        self.eps, self.step_size = eps, step_size

    @abstractmethod
    def random_start(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor: ...

    @abstractmethod
    def step(self, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def project(self, x: torch.Tensor, x_orig: torch.Tensor) -> torch.Tensor: ...


class LinfStep(AttackerStep):
    """L-inf ball of radius eps: sign-gradient steps, coordinate-wise clipping."""

    def random_start(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Uniform in the ball (Madry et al.), then projected into [0, 1]."""
        return self.project(x + (2 * _cpu_noise("uniform", x.shape, x, generator) - 1) * self.eps, x)

    def step(self, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        return x + self.step_size * grad.sign()

    def project(self, x: torch.Tensor, x_orig: torch.Tensor) -> torch.Tensor:
        # Clamping to [0, 1] after the ball only moves points towards x_orig (itself in [0, 1]): both constraints hold.
        return (x_orig + (x - x_orig).clamp(-self.eps, self.eps)).clamp(0, 1)


class L2Step(AttackerStep):
    """L2 ball of radius eps: steps along the per-sample L2-normalised gradient, radial projection."""

    def random_start(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A uniformly random direction (normalised Gaussian) times a radius uniform in [0, eps].

        Not uniform in the ball's volume (that would put almost all starts near the
        surface in high dimension); a uniform radius spreads starts over all scales.
        """
        direction = _cpu_noise("normal", x.shape, x, generator)
        direction = direction / _expand(direction.flatten(1).norm(dim=1) + _TINY, x)
        radius = _cpu_noise("uniform", (len(x),), x, generator) * self.eps
        return self.project(x + _expand(radius, x) * direction, x)

    def step(self, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        return x + self.step_size * grad / _expand(grad.flatten(1).norm(dim=1) + _TINY, grad)

    def project(self, x: torch.Tensor, x_orig: torch.Tensor) -> torch.Tensor:
        # renorm scales down only the samples whose delta is longer than eps; clamping then only shortens deltas.
        delta = (x - x_orig).renorm(p=2, dim=0, maxnorm=self.eps)
        return (x_orig + delta).clamp(0, 1)


STEPS: dict[str, type[AttackerStep]] = {"linf": LinfStep, "l2": L2Step}
STARTS = ("uniform", "normal")


def perturbation_norms(x_adv: torch.Tensor, x: torch.Tensor, norm: str) -> torch.Tensor:
    """Each sample's ||x_adv - x|| in the threat model's norm (B,): how far an attack moved it."""
    delta = (x_adv - x).flatten(1)
    return delta.abs().amax(dim=1) if norm == "linf" else delta.norm(dim=1)


def ce_loss(y: torch.Tensor) -> LossFn:
    """Per-sample cross-entropy to the labels: the Madry / AKD / ARD / IAD attack."""
    return lambda logits: F.cross_entropy(logits, y, reduction="none")


def kl_loss(target_probs: torch.Tensor) -> LossFn:
    """Per-sample KL(target || softmax(logits)), summed over classes: the RSLAD and TRADES attacks.

    Classes with target probability 0 contribute 0 (torch's kl_div uses xlogy).
    """
    return lambda logits: F.kl_div(F.log_softmax(logits, dim=-1), target_probs, reduction="none").sum(dim=-1)


@contextlib.contextmanager
def attack_mode(model: nn.Module, eval_mode: bool) -> Iterator[None]:
    """Put `model` in eval mode (if asked) and restore every submodule's own mode afterwards.

    Restoring per submodule, not with model.train(flag), keeps deliberately frozen
    parts (e.g. a BatchNorm held in eval) as they were.
    """
    modes = [(m, m.training) for m in model.modules()]
    # torch.export modules keep their exported mode
    if eval_mode and not isinstance(model, torch.fx.GraphModule):
        model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


@dataclass(frozen=True, kw_only=True)
class PGD:
    """Projected gradient ascent on a per-sample loss, within an eps-ball around x and inside [0, 1].

    Keyword-only, so that eps, step_size and steps are always spelled out at the call site.
    `start`: "uniform" draws from the threat model's ball (Madry); "normal" is
    x + 0.001 * N(0, 1) (TRADES, RSLAD). `eval_mode`: attack with BatchNorm/dropout
    in eval mode, so the attack neither depends on nor changes the running stats.
    """

    norm: str = "linf"
    eps: float
    step_size: float
    steps: int
    random_start: bool = True
    start: str = "uniform"
    eval_mode: bool = True

    def __post_init__(self) -> None:
        if self.norm not in STEPS:
            raise ValueError(f"unknown norm {self.norm!r}; known: {', '.join(STEPS)}")
        if self.start not in STARTS:
            raise ValueError(f"unknown start {self.start!r}; known: {', '.join(STARTS)}")
        if self.eps < 0 or self.step_size < 0 or self.steps < 0:
            raise ValueError(f"eps, step_size and steps must be >= 0; got {self.eps}, {self.step_size}, {self.steps}")

    @classmethod
    def from_config(cls, attack: AttackConfig) -> PGD:
        """The attack a validated, resolved config describes (AttackConfig.resolved: eps and step size filled in)."""
        return cls(
            norm=attack.norm,
            eps=attack.eps,
            step_size=attack.step_size,
            steps=attack.steps,
            random_start=attack.random_start,
            eval_mode=attack.eval_mode,
        )

    def scaled(self, fraction: float) -> PGD:
        """The same attack in a ball `fraction` times the radius, with steps to match (an eps warm-up)."""
        if fraction == 1:
            return self
        return replace(self, eps=self.eps * fraction, step_size=self.step_size * fraction)

    def perturb(
        self, model: nn.Module, x: torch.Tensor, loss_fn: LossFn, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """x_adv (detached) maximising sum_i loss_fn(model(x_adv))_i.

        steps == 0 returns x unchanged, even with random_start: "no attack" then
        means the clean input, so a zero-step attack turns any method into its clean
        counterpart. Gradients are taken with respect to the input only, so nothing
        accumulates in the parameters' .grad.
        """
        x = x.detach()
        if self.steps == 0:
            return x
        geometry = STEPS[self.norm](self.eps, self.step_size)
        x_adv = self._start(geometry, x, generator)
        with attack_mode(model, self.eval_mode), torch.enable_grad():
            for _ in range(self.steps):
                x_adv.requires_grad_(True)
                (grad,) = torch.autograd.grad(loss_fn(model(x_adv)).sum(), x_adv)
                x_adv = geometry.project(geometry.step(x_adv.detach(), grad), x)
        return x_adv.detach()

    def _start(self, geometry: AttackerStep, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        if not self.random_start:
            return x.clone()
        if self.start == "normal":
            return geometry.project(x + _NORMAL_START_STD * _cpu_noise("normal", x.shape, x, generator), x)
        return geometry.random_start(x, generator)
