"""Which torch device a setting names, decided the same way by the service, the trainer and the benchmarks."""

from __future__ import annotations

import torch

from shared.configfile import ConfigError

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str, setting: str = "device") -> torch.device:
    """'auto' is the GPU when torch sees one, else the CPU; 'cuda' (or 'cuda:N') without that GPU is a ConfigError
    naming `setting` (the config key or flag the user wrote), rather than a failure at the first tensor moved."""
    kind, _, index = name.partition(":")
    if kind not in DEVICES or (index and (kind != "cuda" or not index.isdigit())):
        raise ConfigError(f"{setting} = {name!r}: expected one of {', '.join(DEVICES)} (or cuda:N for GPU N)")
    if kind == "auto":
        kind = name = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"{setting} = {name!r}, but torch {torch.__version__} sees no CUDA GPU here; "
            f"set {setting} = 'cpu' or 'auto'"
        )
    if index and int(index) >= torch.cuda.device_count():
        raise ConfigError(f"{setting} = {name!r}, but torch sees {torch.cuda.device_count()} GPUs here (cuda:0 ...)")
    return torch.device(name)
