"""The architecture registry: shapes, in-model normalisation, state-dict round trips."""

from collections import OrderedDict

import pytest
import torch

from shared.models import ARCHITECTURES, build_model

NUM_CLASSES = 10
BATCH = 2

# One input shape per architecture, plus the optional 32x32 RGB case of small_cnn.
CASES = [
    ("small_cnn", (1, 28, 28)),
    ("small_cnn", (3, 32, 32)),
    ("tiny_cnn", (1, 28, 28)),
    ("preact_resnet18", (3, 32, 32)),
    ("resnet18", (3, 32, 32)),
    ("wrn34_10", (3, 32, 32)),
]


def _inputs(shape: tuple[int, int, int]) -> torch.Tensor:
    return torch.rand(BATCH, *shape, generator=torch.Generator().manual_seed(0))


def test_registry_names():
    assert set(ARCHITECTURES) == {"small_cnn", "tiny_cnn", "preact_resnet18", "resnet18", "wrn34_10", "linear"}


@pytest.mark.parametrize(("arch", "shape"), CASES)
def test_normalisation_travels_with_the_state_dict(arch, shape):
    """One pass per architecture (WRN-34-10 is slow on a CPU): output shape, the
    Normalize buffers in the state dict, an exact round trip, and mean mattering."""
    channels = shape[0]
    torch.manual_seed(0)
    source = build_model(arch, NUM_CLASSES, shape, mean=[0.3] * channels, std=[0.2] * channels)
    target = build_model(arch, NUM_CLASSES, shape)
    state = source.state_dict()
    assert state["normalize.mean"].shape == (1, channels, 1, 1)
    assert state["normalize.std"].shape == (1, channels, 1, 1)

    target.load_state_dict(state)
    source.eval()
    target.eval()
    x = _inputs(shape)
    with torch.inference_mode():
        expected = source(x)
        assert expected.shape == (BATCH, NUM_CLASSES)
        assert torch.equal(target(x), expected)
        target.normalize.mean.fill_(0.7)
        assert not torch.allclose(target(x), expected)


def test_default_normalisation_is_half_per_channel():
    model = build_model("resnet18", NUM_CLASSES, (3, 32, 32))
    assert torch.equal(model.normalize.mean, torch.full((1, 3, 1, 1), 0.5))
    assert torch.equal(model.normalize.std, torch.full((1, 3, 1, 1), 0.5))


def test_gradients_reach_the_input():
    """Attacks work in [0, 1] pixel space, so the normalisation must be differentiable."""
    model = build_model("small_cnn", NUM_CLASSES, (1, 28, 28))
    x = _inputs((1, 28, 28)).requires_grad_()
    model(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_unknown_architecture_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown architecture 'vgg16'") as info:
        build_model("vgg16", NUM_CLASSES, (3, 32, 32))
    for name in ARCHITECTURES:
        assert name in str(info.value)


@pytest.mark.parametrize(
    ("arch", "shape", "expected"),
    [
        ("resnet18", (1, 28, 28), r"\(C, 32, 32\)"),
        ("preact_resnet18", (3, 64, 64), r"\(C, 32, 32\)"),
        ("wrn34_10", (32, 32), r"\(C, 32, 32\)"),
        ("small_cnn", (1, 64, 64), r"\(C, 28, 28\)"),
    ],
)
def test_wrong_input_shape_says_what_was_expected(arch, shape, expected):
    with pytest.raises(ValueError, match=expected) as info:
        build_model(arch, NUM_CLASSES, shape)
    assert str(shape) in str(info.value)


@pytest.mark.parametrize(
    ("mean", "std", "message"),
    [
        ([0.5, 0.5], [0.5, 0.5, 0.5], "one value per channel"),
        ([0.5] * 3, [0.5, 0.0, 0.5], "std must be > 0"),
    ],
)
def test_bad_normalisation_is_rejected(mean, std, message):
    with pytest.raises(ValueError, match=message):
        build_model("resnet18", NUM_CLASSES, (3, 32, 32), mean=mean, std=std)


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_the_linear_teacher_pools_first_and_computes_what_normalising_first_does(shape):
    """Its channel means are taken before the normalisation, which commutes with them: the modules and state dict of
    Sequential(normalize, net), its outputs within float rounding."""
    channels = shape[0]
    torch.manual_seed(0)
    model = build_model("linear", NUM_CLASSES, shape, mean=[0.3] * channels, std=[0.2] * channels)
    in_order = torch.nn.Sequential(OrderedDict(normalize=model.normalize, net=model.net))
    x = _inputs(shape)
    assert list(model.state_dict()) == list(in_order.state_dict())
    torch.testing.assert_close(model(x), in_order(x), rtol=1e-5, atol=1e-5)
