"""PGD and its threat models: constraints, ascent, reproducibility, and no side effects on the model."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from torch import nn

from student_trainer.attacks import PGD, STEPS, L2Step, LinfStep, attack_mode, ce_loss, kl_loss

SHAPE = (1, 4, 4)
K = 3
EPS = {"linf": 0.1, "l2": 0.5}


def linear_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(SHAPE), K))


def bn_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, K))


def batch(n: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs with many pixels at or next to 0 and 1, so clamping to [0, 1] matters."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, *SHAPE, generator=g)
    x = torch.where(x < 0.3, x * 0.05, x)
    x = torch.where(x > 0.7, 1 - (1 - x) * 0.05, x)
    return x, torch.randint(0, K, (n,), generator=g)


def pgd(norm: str, **kw) -> PGD:
    return PGD(**{"norm": norm, "eps": EPS[norm], "step_size": EPS[norm] / 2, "steps": 5, **kw})


def delta_norms(x_adv: torch.Tensor, x: torch.Tensor, norm: str) -> torch.Tensor:
    d = (x_adv - x).flatten(1)
    return d.abs().amax(1) if norm == "linf" else d.norm(dim=1)


def assert_feasible(x_adv, x, norm):
    assert float(delta_norms(x_adv, x, norm).max()) <= EPS[norm] + (1e-6 if norm == "linf" else 1e-5)
    assert float(x_adv.min()) >= 0 and float(x_adv.max()) <= 1


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("start", ["uniform", "normal"])
def test_stays_in_ball_and_box(norm, start):
    x, y = batch()
    # A step as large as the ball pushes every step against both the ball and the box.
    attack = pgd(norm, step_size=EPS[norm], start=start)
    x_adv = attack.perturb(linear_model(), x, ce_loss(y), torch.Generator().manual_seed(1))
    assert_feasible(x_adv, x, norm)
    assert not x_adv.requires_grad
    # the attack did move
    assert float(delta_norms(x_adv, x, norm).max()) > EPS[norm] / 2
    clamped = ((x_adv == 0) | (x_adv == 1)).float().mean()
    # the box was active
    assert clamped > 0.1


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_random_start_is_feasible(norm):
    x, _ = batch()
    step = STEPS[norm](EPS[norm], 0.01)
    x0 = step.random_start(x, torch.Generator().manual_seed(0))
    assert_feasible(x0, x, norm)
    assert not torch.equal(x0, x)


def test_l2_random_start_radius_is_spread_over_the_ball():
    # far from the box, so the radius is not clamped
    x = torch.full((64, *SHAPE), 0.5)
    radii = (L2Step(0.2, 0.01).random_start(x, torch.Generator().manual_seed(0)) - x).flatten(1).norm(dim=1)
    assert float(radii.max()) <= 0.2 + 1e-6
    assert float(radii.min()) < 0.05 and float(radii.max()) > 0.15


def test_step_geometry():
    x = torch.zeros(2, 1, 1, 2)
    grad = torch.tensor([[3.0, -4.0], [0.0, 0.0]]).view(2, 1, 1, 2)
    assert torch.equal(LinfStep(1.0, 0.5).step(x, grad).flatten(1), torch.tensor([[0.5, -0.5], [0.0, 0.0]]))
    # L2: step_size along the unit gradient; a zero gradient gives no step (and no NaN).
    torch.testing.assert_close(L2Step(1.0, 0.5).step(x, grad).flatten(1), torch.tensor([[0.3, -0.4], [0.0, 0.0]]))
    orig = torch.full((2, 1, 1, 2), 0.5)
    far = torch.tensor([[1.5, 0.5], [0.5, -0.7]]).view(2, 1, 1, 2)
    torch.testing.assert_close(LinfStep(0.2, 0).project(far, orig).flatten(1), torch.tensor([[0.7, 0.5], [0.5, 0.3]]))
    torch.testing.assert_close(L2Step(0.3, 0).project(far, orig).flatten(1), torch.tensor([[0.8, 0.5], [0.5, 0.2]]))
    near = torch.tensor([[0.55, 0.45], [0.5, 0.5]]).view(2, 1, 1, 2)
    # inside the ball: untouched
    assert torch.equal(L2Step(0.3, 0).project(near, orig), near)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_attack_raises_the_loss(norm):
    model, (x, y) = linear_model(), batch(32)
    clean_loss = ce_loss(y)(model(x)).detach()
    for attack in (pgd(norm, random_start=False), pgd(norm)):
        x_adv = attack.perturb(model, x, ce_loss(y), torch.Generator().manual_seed(0))
        adv_loss = ce_loss(y)(model(x_adv)).detach()
        assert bool((adv_loss >= clean_loss - 1e-6).all())
        assert float(adv_loss.mean()) > float(clean_loss.mean()) + 0.05


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_same_seed_same_examples(norm):
    model, (x, y) = linear_model(), batch()
    # small steps: the start still shows in the result
    attack = pgd(norm, step_size=EPS[norm] / 10, steps=2)
    runs = [attack.perturb(model, x, ce_loss(y), torch.Generator().manual_seed(s)) for s in (7, 7, 8)]
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


def test_without_random_start_no_generator_is_needed():
    model, (x, y) = linear_model(), batch()
    attack = pgd("linf", random_start=False)
    assert torch.equal(attack.perturb(model, x, ce_loss(y)), attack.perturb(model, x, ce_loss(y)))


@pytest.mark.parametrize("eval_mode", [True, False])
@pytest.mark.parametrize("training", [True, False])
def test_model_mode_restored_and_no_parameter_grads(training, eval_mode):
    model, (x, y) = bn_model(), batch()
    model.train(training)
    # a submodule deliberately frozen: must stay so
    model[1].eval()
    seen = []
    model[1].register_forward_hook(lambda m, i, o: seen.append(m.training))
    pgd("linf", eval_mode=eval_mode).perturb(model, x, ce_loss(y), torch.Generator().manual_seed(0))
    assert model.training is training
    assert model[0].training is training and model[1].training is False
    # BatchNorm saw eval mode throughout
    assert seen and not any(seen)
    assert all(p.grad is None for p in model.parameters())


def test_eval_mode_keeps_batchnorm_statistics():
    model, (x, y) = bn_model(), batch()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pgd("linf").perturb(model, x, ce_loss(y), torch.Generator().manual_seed(0))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.training
    # The control: attacking in train mode does move them.
    pgd("linf", eval_mode=False).perturb(model, x, ce_loss(y), torch.Generator().manual_seed(0))
    assert not torch.equal(before["1.running_mean"], model.state_dict()["1.running_mean"])


def test_attack_mode_restores_on_error():
    model = bn_model().train()
    with pytest.raises(RuntimeError), attack_mode(model, eval_mode=True):
        assert not model.training
        raise RuntimeError
    assert model.training


def test_works_under_no_grad():
    model, (x, y) = linear_model(), batch()
    attack = pgd("linf")
    with torch.no_grad():
        x_adv = attack.perturb(model, x, ce_loss(y), torch.Generator().manual_seed(0))
    assert torch.equal(x_adv, attack.perturb(model, x, ce_loss(y), torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_zero_steps_returns_x_unchanged(norm):
    model, (x, y) = linear_model(), batch()
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    x_adv = pgd(norm, steps=0).perturb(model, x, ce_loss(y), g)
    assert torch.equal(x_adv, x)
    # no random start drawn either
    assert torch.equal(g.get_state(), state)


def test_gradient_flows_from_the_summed_per_sample_loss():
    """With one step and no start, PGD-linf is x + step * sign(d loss_i / d x_i), sample by sample."""
    model, (x, y) = linear_model(), batch()
    x_req = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(ce_loss(y)(model(x_req)).sum(), x_req)
    expected = (x + 0.01 * grad.sign()).clamp(0, 1)
    got = PGD(eps=0.1, step_size=0.01, steps=1, random_start=False).perturb(model, x, ce_loss(y))
    assert torch.equal(got, expected)


def test_ce_and_kl_losses_on_hand_tensors():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.5, 0.25, 0.25]]))
    ln2 = math.log(2)
    torch.testing.assert_close(ce_loss(torch.tensor([0, 1]))(logits), torch.tensor([ln2, 2 * ln2]))
    target = torch.tensor([[1.0, 0.0, 0.0], [0.25, 0.25, 0.5]])
    # KL([1,0,0] || q) = ln 2; KL([.25,.25,.5] || [.5,.25,.25]) = .25 ln .5 + 0 + .5 ln 2 = .25 ln 2.
    torch.testing.assert_close(kl_loss(target)(logits), torch.tensor([ln2, 0.25 * ln2]))
    torch.testing.assert_close(kl_loss(torch.softmax(logits, 1))(logits), torch.zeros(2))


def test_kl_attack_moves_away_from_the_target():
    model, (x, _) = linear_model(), batch()
    with torch.no_grad():
        target = torch.softmax(model(x), 1)
    attack = pgd("linf", start="normal")
    x_adv = attack.perturb(model, x, kl_loss(target), torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert float(kl_loss(target)(model(x_adv)).mean()) > 1e-3


def test_bad_configuration_is_refused():
    with pytest.raises(ValueError, match="linf"):
        PGD(norm="l1", eps=0.1, step_size=0.01, steps=1)
    with pytest.raises(ValueError, match="uniform"):
        PGD(eps=0.1, step_size=0.01, steps=1, start="gaussian")
    with pytest.raises(ValueError):
        PGD(eps=-0.1, step_size=0.01, steps=1)
    with pytest.raises(TypeError):
        # keyword-only
        PGD("linf", 0.1, 0.01, 1)
    assert replace(pgd("l2"), start="normal").norm == "l2"
