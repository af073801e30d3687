"""The architecture registry both the teacher service and the student trainer build from.

Every model built here takes images in [0, 1] and normalises them itself, so a
state dict is the whole model: weights and normalisation statistics together.
"""

from collections import OrderedDict
from collections.abc import Callable, Sequence

from torch import nn

from .linear import ChannelMeanFirst, ChannelMeanLinear
from .normalize import Normalize
from .preact_resnet import PreActResNet18
from .resnet import ResNet18
from .small_cnn import SmallCNN, TinyCNN
from .wide_resnet import WideResNet

__all__ = ["ARCHITECTURES", "build_model"]

# Each constructor takes (num_classes, in_channels) and expects normalised input.
ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "small_cnn": SmallCNN,
    "tiny_cnn": TinyCNN,
    "preact_resnet18": PreActResNet18,
    "resnet18": ResNet18,
    "wrn34_10": WideResNet,
    "linear": ChannelMeanLinear,
}

# The (H, W) sizes each architecture was designed for; any channel count works.
_SPATIAL_SIZES: dict[str, tuple[tuple[int, int], ...]] = {
    "small_cnn": ((28, 28), (32, 32)),
    "tiny_cnn": ((28, 28), (32, 32)),
    "preact_resnet18": ((32, 32),),
    "resnet18": ((32, 32),),
    "wrn34_10": ((32, 32),),
    "linear": ((28, 28), (32, 32)),
}

# how an architecture composes with its normalisation, where not Sequential(normalize, net) run in order
_CONTAINERS: dict[str, type[nn.Sequential]] = {"linear": ChannelMeanFirst}

_DEFAULT_MEAN = 0.5
_DEFAULT_STD = 0.5


def build_model(
    arch: str,
    num_classes: int,
    input_shape: tuple[int, int, int],
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> nn.Module:
    """Build `arch` as Sequential(normalize=Normalize, net=<architecture>).

    `input_shape` is (C, H, W) of one image; mean/std default to 0.5 per channel.
    Raises ValueError for an unknown architecture, an input shape it does not
    fit, or mean/std that do not match the channel count.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int; got {num_classes!r}")
    channels = _check_input_shape(arch, input_shape)
    mean = [_DEFAULT_MEAN] * channels if mean is None else list(mean)
    std = [_DEFAULT_STD] * channels if std is None else list(std)
    if len(mean) != channels or len(std) != channels:
        raise ValueError(
            f"mean and std need one value per channel ({channels}); got {len(mean)} means and {len(std)} stds"
        )
    return _CONTAINERS.get(arch, nn.Sequential)(
        OrderedDict(
            normalize=Normalize(mean, std),
            net=ARCHITECTURES[arch](num_classes, channels),
        )
    )


def _check_input_shape(arch: str, input_shape: Sequence[int]) -> int:
    """Return the channel count after checking (C, H, W) against what `arch` expects."""
    sizes = _SPATIAL_SIZES[arch]
    expected = " or ".join(f"(C, {h}, {w})" for h, w in sizes)
    shape = tuple(input_shape)
    fits = len(shape) == 3 and all(isinstance(d, int) and d > 0 for d in shape) and shape[1:] in sizes
    if not fits:
        raise ValueError(f"{arch} expects input_shape {expected}; got {shape}")
    return shape[0]
