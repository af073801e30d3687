"""Which torch device a setting names, decided the same way by the service, the trainer and the benchmarks."""

from __future__ import annotations

import torch

from shared.configfile import ConfigError

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str, setting: str = "device") -> torch.device:
    """'auto' is the GPU when torch sees one, else the CPU; 'cuda' without one is a ConfigError naming `setting`
    (the config key or flag the user wrote), rather than a failure at the first tensor moved."""
    if name not in DEVICES:
        raise ConfigError(f"{setting} = {name!r}: expected one of {', '.join(DEVICES)}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"{setting} = 'cuda', but torch {torch.__version__} sees no CUDA GPU here; set {setting} = 'cpu' or 'auto'"
        )
    return torch.device(name)
