"""Small CNNs for 28x28 grey images, cheap enough to train adversarially on a CPU.

The layout follows the MNIST model of Madry et al. (2018): two 5x5 conv + max-pool stages, then a hidden layer.
`SmallCNN` has their widths (32, 64, 1024; about 3.3M parameters, 14M multiply-adds per image); `TinyCNN` halves the
channels and quarters the hidden layer (about 4x cheaper), cheap enough for the demo to train and AutoAttack a dozen
models on a CPU.
"""

from functools import partial

from torch import nn

# Feature-map side after the two pools on a 28x28 input; larger inputs are
# pooled down to it so the classifier head keeps the same size.
_FEATURE_SIDE = 7


class SmallCNN(nn.Sequential):
    """conv(c1)-5x5 -> pool -> conv(c2)-5x5 -> pool -> fc(hidden) -> fc K; Madry's widths by default."""

    def __init__(self, num_classes: int, in_channels: int, c1: int = 32, c2: int = 64, hidden: int = 1024) -> None:
        super().__init__(
            nn.Conv2d(in_channels, c1, kernel_size=5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, kernel_size=5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(_FEATURE_SIDE),
            nn.Flatten(),
            nn.Linear(c2 * _FEATURE_SIDE * _FEATURE_SIDE, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )


TinyCNN = partial(SmallCNN, c1=16, c2=32, hidden=256)
