"""WideResNet (Zagoruyko & Komodakis 2016), by default WRN-34-10 as used as the
robust teacher by TRADES (Zhang et al. 2019) and ARD (Goldblum et al. 2020).

Dropout is 0 in those setups, so it is left out. The TRADES block is the
pre-activation block, so it is reused from `preact_resnet`.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .preact_resnet import PreActBlock
from .stages import make_stage


class WideResNet(nn.Module):
    """Stem conv 16, three groups of (depth-4)/6 blocks at 16k, 32k, 64k channels,
    final BN-ReLU, avgpool, fc."""

    def __init__(self, num_classes: int, in_channels: int, depth: int = 34, widen_factor: int = 10) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet depth must be 6n+4; got {depth}")
        blocks_per_group = (depth - 4) // 6
        widths = [16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.stem = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        self.group1 = make_stage(PreActBlock, 16, widths[0], blocks_per_group, stride=1)
        self.group2 = make_stage(PreActBlock, widths[0], widths[1], blocks_per_group, stride=2)
        self.group3 = make_stage(PreActBlock, widths[1], widths[2], blocks_per_group, stride=2)
        self.bn = nn.BatchNorm2d(widths[2])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[2], num_classes)
        _init_like_trades(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.group3(self.group2(self.group1(self.stem(x))))
        out = F.relu(self.bn(out))
        return self.fc(torch.flatten(self.pool(out), 1))


def _init_like_trades(model: nn.Module) -> None:
    """He-normal (fan-out) convs, unit BN, zero fc bias: the reference initialisation,
    kept so that training from scratch matches the published recipe."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.zeros_(module.bias)
