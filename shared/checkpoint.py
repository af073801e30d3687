"""The project's checkpoint file: architecture + weights + metadata, loadable without pickled code.

The trainer writes it, the teacher service serves it; `torch.load(weights_only=True)`
is enough to read one, so a checkpoint from anyone cannot run code on the server.
"""

from __future__ import annotations

import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shared.atomic import replaced_atomically
from shared.models import build_model
from shared.safe_load import not_a_model_file, refused_pickle

FORMAT = "akd-checkpoint/1"


@dataclass
class Checkpoint:
    arch: str
    num_classes: int
    input_shape: tuple[int, int, int]
    state_dict: dict[str, torch.Tensor]
    # epoch, metrics, config...
    metadata: dict[str, Any] = field(default_factory=dict)
    # optimiser/scheduler/RNG state for resuming
    extra: dict[str, Any] = field(default_factory=dict)

    def build(self) -> nn.Module:
        model = build_model(self.arch, self.num_classes, self.input_shape)
        model.load_state_dict(self.state_dict)
        return model.eval()


def save_checkpoint(path: str | Path, ckpt: Checkpoint) -> None:
    """Write atomically (temp file + rename): a reader never sees half a checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT,
        "arch": ckpt.arch,
        "num_classes": ckpt.num_classes,
        "input_shape": list(ckpt.input_shape),
        "state_dict": ckpt.state_dict,
        "metadata": ckpt.metadata,
        "extra": ckpt.extra,
    }
    with replaced_atomically(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    # A regular file that is not a zip archive (a text file, say) is not a checkpoint: said so, rather than reported
    # as the refused "pickled objects" torch.load would make of it.
    if not_a_model_file(Path(path)) is None and not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not a readable checkpoint: it is not the zip archive torch.save writes")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        # a pickled object other than tensors and plain containers
        raise refused_pickle(path, exc) from exc
    except Exception as exc:
        # torch raises many types for a bad file
        raise ValueError(f"{path} is not a readable checkpoint: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(f"{path} is not an {FORMAT} file (found format {found!r})")
    return Checkpoint(
        arch=payload["arch"],
        num_classes=int(payload["num_classes"]),
        input_shape=tuple(payload["input_shape"]),
        state_dict=payload["state_dict"],
        metadata=payload.get("metadata", {}),
        extra=payload.get("extra", {}),
    )
