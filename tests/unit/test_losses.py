"""The training methods: each formula against a hand computation, each method against its formula."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from shared.models import build_model
from student_trainer.attacks import PGD, ce_loss, kl_loss
from student_trainer.config import TrainConfig
from student_trainer.losses import (
    METHODS,
    Step,
    get_method,
    iad_introspection,
    iad_trust,
    kl_div,
    mix_labels,
    soft_cross_entropy,
)
from student_trainer.methods import METHOD_NAMES

LN2 = math.log(2)
SHAPE = (1, 4, 4)
K = 3


# ---------------------------------------------------------------- formulas on hand-built tensors


def test_soft_cross_entropy_by_hand():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.25, 0.5, 0.25]]))
    q = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]])
    # sample 1: -ln .5 = ln 2; sample 2: -(.5 ln .25 + .5 ln .5) = 1.5 ln 2; mean 1.25 ln 2.
    torch.testing.assert_close(soft_cross_entropy(logits, q), torch.tensor(1.25 * LN2))


def test_kl_div_by_hand_with_temperature():
    # /tau=2 -> [.5, .25, .25]
    logits = 2 * torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.5, 0.25, 0.25]]))
    p = torch.tensor([[0.25, 0.25, 0.5], [1.0, 0.0, 0.0]])
    # KL = .25 ln 2 and ln 2 (a zero target entry contributes 0); mean .625 ln 2.
    torch.testing.assert_close(kl_div(p, logits, temperature=2.0), torch.tensor(0.625 * LN2))
    torch.testing.assert_close(kl_div(p, logits / 2), torch.tensor(0.625 * LN2))


def test_mix_labels_by_hand():
    probs = torch.tensor([[0.2, 0.3, 0.5], [0.6, 0.3, 0.1]])
    y = torch.tensor([2, 0])
    expected = torch.tensor([[0.05, 0.075, 0.875], [0.9, 0.075, 0.025]])
    torch.testing.assert_close(mix_labels(probs, y, 0.25), expected)
    assert torch.equal(mix_labels(probs, y, 1.0), probs)
    assert torch.equal(mix_labels(probs, y, 0.0), F.one_hot(y, 3).float())


def test_ensemble_target_mixing_by_hand():
    """The guideline's target: alpha * sum_k beta_k p_k + (1 - alpha) onehot, with beta = (1/4, 3/4)."""
    p1 = torch.tensor([[1.0, 0.0, 0.0]])
    p2 = torch.tensor([[0.0, 0.5, 0.5]])
    # [.25, .375, .375]
    ensemble = 0.25 * p1 + 0.75 * p2
    torch.testing.assert_close(mix_labels(ensemble, torch.tensor([1]), 0.5), torch.tensor([[0.125, 0.6875, 0.1875]]))


def test_iad_trust_and_introspection_by_hand():
    probs = torch.tensor([[0.2, 0.3, 0.5], [0.6, 0.3, 0.1]])
    trust = iad_trust(probs, torch.tensor([2, 1]), beta=0.5)
    torch.testing.assert_close(trust, torch.tensor([math.sqrt(0.5), math.sqrt(0.3)]))
    clean = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.5, 0.25, 0.25]]))
    adv = torch.log(torch.tensor([[0.25, 0.25, 0.5], [0.25, 0.25, 0.5]]))
    # KL([.5,.25,.25] || [.25,.25,.5]) = .5 ln 2 + 0 - .25 ln 2 = .25 ln 2; weights (1 - a) = (.5, 0).
    value = iad_introspection(clean, adv, torch.tensor([0.5, 1.0]))
    torch.testing.assert_close(value, torch.tensor(0.0625 * LN2))


# ---------------------------------------------------------------- each method against its formula


def kl(p, logits, tau=1.0):
    """KL(p || softmax(logits / tau)), batch mean, written out (test targets have no zeros)."""
    return (p * (p.log() - F.log_softmax(logits / tau, dim=1))).sum(1).mean()


def softmax(z):
    return F.softmax(z, dim=1)


class FakeTeacher:
    """A fixed random linear teacher (so p_T(x') differs from p_T(x)); records what it saw."""

    def __init__(self, seed: int = 123):
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(SHAPE), K))
        self.calls: list[torch.Tensor] = []
        # what each call said its inputs were (it picks the service's cache mode)
        self.adversarial: list[bool] = []

    def __call__(self, x: torch.Tensor, *, adversarial: bool) -> torch.Tensor:
        assert not x.requires_grad and float(x.min()) >= 0 and float(x.max()) <= 1
        self.calls.append(x.clone())
        self.adversarial.append(adversarial)
        return softmax(self.net(x))

    def probs(self, x):
        with torch.no_grad():
            return softmax(self.net(x))


def refuse_teacher(x, *, adversarial):
    raise AssertionError("the teacher must not be called")


def student(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(SHAPE), K)).train()


def data(n: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, *SHAPE, generator=g), torch.randint(0, K, (n,), generator=g)


ATTACK = PGD(eps=0.1, step_size=0.03, steps=3)
NO_ATTACK = PGD(eps=0.1, step_size=0.03, steps=0, random_start=False)


def run(name, cfg=TrainConfig(), teacher=None, attack=ATTACK, epoch=0, seed=5, model=None):
    model = student() if model is None else model
    x, y = data()
    result = get_method(name)(Step(model, x, y, attack, cfg, teacher, epoch, torch.Generator().manual_seed(seed)))
    return result, model, x, y


def test_standard():
    r, model, x, y = run("standard")
    assert torch.equal(r.x_adv, x)
    torch.testing.assert_close(r.loss, F.cross_entropy(model(x), y))


def test_at_attacks_with_ce_and_trains_on_x_adv():
    r, model, x, y = run("at")
    expected_x = ATTACK.perturb(model, x, ce_loss(y), torch.Generator().manual_seed(5))
    assert torch.equal(r.x_adv, expected_x)
    assert not torch.equal(r.x_adv, x)
    torch.testing.assert_close(r.loss, F.cross_entropy(model(r.x_adv), y))
    assert r.logits_clean is None


def test_trades():
    cfg = TrainConfig(trades_beta=2.5)
    r, model, x, y = run("trades", cfg)
    with torch.no_grad():
        target = softmax(model(x))
    expected_x = replace(ATTACK, start="normal").perturb(model, x, kl_loss(target), torch.Generator().manual_seed(5))
    assert torch.equal(r.x_adv, expected_x)
    s_clean, s_adv = model(x), model(r.x_adv)
    torch.testing.assert_close(r.loss, F.cross_entropy(s_clean, y) + 2.5 * kl(softmax(s_clean), s_adv))


def test_trades_always_starts_normal_even_when_the_attack_has_no_random_start():
    r, _, x, _ = run("trades", attack=replace(ATTACK, random_start=False, steps=1, step_size=0.0))
    delta = r.x_adv - x
    # the 0.001 * N(0, 1) nudge, nothing more
    assert 0 < float(delta.abs().max()) < 0.01


def test_akd_teacher_on_x_adv_with_label_mixing():
    teacher, cfg = FakeTeacher(), TrainConfig(alpha=0.7)
    r, model, x, y = run("akd", cfg, teacher)
    assert len(teacher.calls) == 1 and torch.equal(teacher.calls[0], r.x_adv) and teacher.adversarial == [True]
    q = 0.7 * teacher.probs(r.x_adv) + 0.3 * F.one_hot(y, K).float()
    torch.testing.assert_close(r.loss, -(q * F.log_softmax(model(r.x_adv), 1)).sum(1).mean())


def test_akd_with_alpha_zero_is_at_and_never_calls_the_teacher():
    akd, *_ = run("akd", TrainConfig(alpha=0.0), refuse_teacher)
    at, *_ = run("at")
    assert torch.equal(akd.x_adv, at.x_adv)
    assert torch.equal(akd.loss, at.loss)
    assert torch.equal(akd.logits_adv, at.logits_adv)
    # no teacher needed at all
    run("akd", TrainConfig(alpha=0.0), None)


def test_ard_teacher_on_clean_x():
    teacher, cfg = FakeTeacher(), TrainConfig(alpha=0.7, temperature=3.0)
    r, model, x, y = run("ard", cfg, teacher)
    assert len(teacher.calls) == 1 and torch.equal(teacher.calls[0], x) and teacher.adversarial == [False]
    assert torch.equal(r.x_adv, ATTACK.perturb(model, x, ce_loss(y), torch.Generator().manual_seed(5)))
    expected = 0.7 * 9 * kl(teacher.probs(x), model(r.x_adv), tau=3.0) + 0.3 * F.cross_entropy(model(x), y)
    torch.testing.assert_close(r.loss, expected)


@pytest.mark.parametrize("alpha", [1.0, 0.6])
def test_rslad_with_mixed_target(alpha):
    teacher = FakeTeacher()
    r, model, x, y = run("rslad", TrainConfig(alpha=alpha), teacher)
    assert len(teacher.calls) == 1 and torch.equal(teacher.calls[0], x) and teacher.adversarial == [False]
    target = alpha * teacher.probs(x) + (1 - alpha) * F.one_hot(y, K).float()
    expected_x = replace(ATTACK, start="normal").perturb(model, x, kl_loss(target), torch.Generator().manual_seed(5))
    assert torch.equal(r.x_adv, expected_x)
    expected = 5 / 6 * kl(target, model(r.x_adv)) + 1 / 6 * kl(target, model(x))
    torch.testing.assert_close(r.loss, expected)
    if alpha < 1:
        unmixed = 5 / 6 * kl(teacher.probs(x), model(r.x_adv)) + 1 / 6 * kl(teacher.probs(x), model(x))
        assert abs(float(r.loss.detach() - unmixed.detach())) > 1e-3


@pytest.mark.parametrize("epoch", [0, 1, 2, 3])
def test_iad_warmup_and_trust(epoch):
    teacher, cfg = FakeTeacher(), TrainConfig(alpha=0.8, temperature=2.0, iad_beta=0.5, iad_warmup_epochs=2)
    r, model, x, y = run("iad", cfg, teacher, epoch=epoch)
    assert torch.equal(r.x_adv, ATTACK.perturb(model, x, ce_loss(y), torch.Generator().manual_seed(5)))
    s_clean, s_adv = model(x), model(r.x_adv)
    expected = 0.8 * 4 * kl(teacher.probs(x), s_adv, tau=2.0) + 0.2 * F.cross_entropy(s_clean, y)
    if epoch >= 2:
        a = teacher.probs(r.x_adv)[torch.arange(len(y)), y] ** 0.5
        per_sample = (softmax(s_clean) * (F.log_softmax(s_clean, 1) - F.log_softmax(s_adv, 1))).sum(1)
        expected = expected + 0.8 * ((1 - a) * per_sample).mean()
        assert len(teacher.calls) == 2
        assert torch.equal(teacher.calls[0], x) and torch.equal(teacher.calls[1], r.x_adv)
        assert teacher.adversarial == [False, True]
    else:
        assert len(teacher.calls) == 1 and torch.equal(teacher.calls[0], x)
    torch.testing.assert_close(r.loss, expected)


def test_iad_introspection_backpropagates_through_the_clean_side():
    """As in the official IAD-I code, p(S(x)) in the introspection term is not detached."""
    teacher = FakeTeacher()
    r, model, x, y = run("iad", TrainConfig(alpha=1.0, iad_beta=0.5), teacher)
    params = list(model.parameters())
    s_clean, s_adv = model(x), model(r.x_adv)
    a = teacher.probs(r.x_adv)[torch.arange(len(y)), y] ** 0.5

    def formula(p_clean):
        per_sample = (p_clean * (p_clean.log() - F.log_softmax(s_adv, 1))).sum(1)
        return kl(teacher.probs(x), s_adv) + ((1 - a) * per_sample).mean()

    got = torch.autograd.grad(r.loss, params)
    attached = torch.autograd.grad(formula(softmax(s_clean)), params, retain_graph=True)
    detached = torch.autograd.grad(formula(softmax(s_clean).detach()), params)
    for g, e in zip(got, attached):
        torch.testing.assert_close(g, e)
    assert any(not torch.allclose(g, d) for g, d in zip(got, detached))


def test_methods_with_no_attack_reduce_to_their_clean_losses():
    teacher = FakeTeacher()
    r, model, x, y = run("ard", TrainConfig(alpha=0.5), teacher, attack=NO_ATTACK)
    assert torch.equal(r.x_adv, x)
    s = model(x)
    torch.testing.assert_close(r.loss, 0.5 * kl(teacher.probs(x), s) + 0.5 * F.cross_entropy(s, y))


def test_teacher_methods_need_a_teacher():
    for name in ("akd", "ard", "rslad", "iad"):
        with pytest.raises(ValueError, match="teacher"):
            run(name, TrainConfig(alpha=0.5), None)


def test_unknown_method_names_the_known_ones():
    with pytest.raises(ValueError) as info:
        get_method("nope")
    assert all(name in str(info.value) for name in ("standard", "at", "trades", "akd", "ard", "rslad", "iad"))


def test_every_listed_method_has_a_step_and_no_other():
    """methods.py's list is what the config accepts: each name on it trains, in the same order error messages use."""
    assert tuple(METHODS) == METHOD_NAMES


def test_the_methods_knobs_are_validated_with_the_run_config():
    for bad in ({"alpha": 1.5}, {"temperature": 0.0}, {"trades_beta": -1.0}, {"iad_warmup_epochs": -1}):
        with pytest.raises(ValueError):
            TrainConfig(**bad)


# How many times each method asks its teacher in one step (IAD: on x and, past its warm-up, on x').
TEACHER_CALLS = {"standard": 0, "at": 0, "trades": 0, "akd": 1, "ard": 1, "rslad": 1, "iad": 2}


def tiny_cnn(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, K))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_backprops_on_a_cnn(name):
    model, teacher_net = tiny_cnn(0).train(), tiny_cnn(1).eval()
    x, y = data(8)
    calls = []

    def teacher(inputs, *, adversarial):
        calls.append(inputs)
        return softmax(teacher_net(inputs))

    method = get_method(name)
    r = method(Step(model, x, y, ATTACK, TrainConfig(alpha=0.5), teacher, 0, torch.Generator().manual_seed(0)))
    assert method.name == name
    assert len(calls) == TEACHER_CALLS[name] and method.distils == (TEACHER_CALLS[name] > 0)
    assert r.loss.dim() == 0 and torch.isfinite(r.loss)
    assert r.logits_adv.shape == (8, K) and not r.logits_adv.requires_grad
    assert r.logits_clean is None or (r.logits_clean.shape == (8, K) and not r.logits_clean.requires_grad)
    assert r.x_adv.shape == x.shape and not r.x_adv.requires_grad
    assert float(r.x_adv.min()) >= 0 and float(r.x_adv.max()) <= 1
    # the attack left no gradients behind
    assert all(p.grad is None for p in model.parameters())
    assert model.training
    r.loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    # the teacher's outputs are constants
    assert all(p.grad is None for p in teacher_net.parameters())


def test_small_cnn_student_with_a_teacher():
    """The project's own architecture through the heaviest method (IAD: two teacher calls, two terms)."""
    torch.manual_seed(0)
    model, teacher_net = build_model("small_cnn", 10, (1, 28, 28)).train(), build_model("small_cnn", 10, (1, 28, 28))
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(2, 1, 28, 28, generator=g), torch.randint(0, 10, (2,), generator=g)
    r = get_method("iad")(
        Step(model, x, y, replace(ATTACK, steps=1), TrainConfig(), lambda z, adversarial: softmax(teacher_net(z)))
    )
    r.loss.backward()
    assert torch.isfinite(r.loss) and r.logits_adv.shape == (2, 10)
    assert all(p.grad is not None for p in model.parameters())
