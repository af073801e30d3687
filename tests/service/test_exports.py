"""Ordinary torch.export files load and answer as the model they were exported from.

The `.pt2` check (shared/safe_load.py) refuses every graph node that does not call a registered torch operator; an
honest export calls many whose names start with `_` (`aten._to_copy` for a `.float()`, `aten._log_softmax` and
`aten._native_batch_norm_legit_no_training` after `run_decompositions()`). Each model below is exported both ways a
user makes a `.pt2` (the default export, and core ATen after `run_decompositions()`), saved, loaded through the
service's loader and served by a real service; its answers must be the eager model's within float32 tolerance.
"""

from __future__ import annotations

import httpx
import pytest
import torch
import torch.nn.functional as F
from conftest import HANG_S, MNIST_SHAPE, live_server, mnist_teacher, random_inputs, seeded_model, write_config
from torch import nn

from shared import codec
from shared.safe_load import load_export

CLASSES = 10


class Casts(nn.Module):
    """`.double()`, `.float()` and `.to()`: `aten._to_copy`, `aten._assert_tensor_metadata`."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(784, CLASSES)

    def forward(self, x):
        h = (x.double() * 2 - 1).float()
        return self.fc(h.flatten(1)).to(torch.float32)


class BatchNormEval(nn.Module):
    """Batch norm with running statistics, in eval mode: `aten._native_batch_norm_legit_no_training` in core ATen."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Linear(4 * 26 * 26, CLASSES)
        self.bn.running_mean.uniform_(-0.5, 0.5)
        self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        return self.fc(F.relu(self.bn(self.conv(x))).flatten(1))


class LogSoftmax(nn.Module):
    """`aten._log_softmax` in core ATen."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(784, CLASSES)

    def forward(self, x):
        return F.log_softmax(self.fc(x.flatten(1)), dim=-1)


class DropoutEval(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.drop, self.fc2 = nn.Linear(784, 32), nn.Dropout(0.5), nn.Linear(32, CLASSES)

    def forward(self, x):
        return self.fc2(self.drop(F.relu(self.fc1(x.flatten(1)))))


class View(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(1, 2, 3, stride=2), nn.Linear(2 * 13 * 13, CLASSES)

    def forward(self, x):
        h = self.conv(x)
        return self.fc(h.view(h.size(0), -1))


class AdaptivePool(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.pool, self.fc = nn.Conv2d(1, 8, 3), nn.AdaptiveAvgPool2d((2, 2)), nn.Linear(32, CLASSES)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(F.relu(self.conv(x))), 1))


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 28 * 28, CLASSES)

    def forward(self, x):
        h = F.relu(self.conv1(x))
        return self.fc(F.relu(self.conv2(h) + h).flatten(1))


def project_cnn() -> nn.Module:
    return seeded_model(7)


MODELS = {
    "casts": Casts,
    "batch_norm_eval": BatchNormEval,
    "log_softmax": LogSoftmax,
    "dropout_eval": DropoutEval,
    "view": View,
    "adaptive_avg_pool": AdaptivePool,
    "residual": Residual,
    "project_cnn": project_cnn,
}
FORMS = ("export", "core_aten")


def eager(name: str) -> nn.Module:
    torch.manual_seed(11)
    return MODELS[name]().eval()


def exported(name: str, form: str, path):
    """The model exported as a user would, with a dynamic batch, and saved to `path`."""
    program = torch.export.export(
        eager(name), (torch.rand(4, *MNIST_SHAPE),), dynamic_shapes=({0: torch.export.Dim("batch")},)
    )
    if form == "core_aten":
        program = program.run_decompositions()
    torch.export.save(program, path)
    return path


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_ordinary_export_loads_and_answers_as_the_eager_model(tmp_path, name, form):
    model = load_export(exported(name, form, tmp_path / f"{name}.pt2"))
    x = random_inputs(5)
    with torch.inference_mode():
        # float32, kernels may differ
        torch.testing.assert_close(model(x), eager(name)(x), rtol=1e-4, atol=1e-5)


def test_ordinary_exports_are_served_as_the_eager_models_answer(tmp_path):
    """Every core-ATen export as a teacher of a real service: its member logits are the eager model's."""
    names = sorted(MODELS)
    teachers = {name: mnist_teacher([(exported(name, "core_aten", tmp_path / f"{name}.pt2"), 1.0)]) for name in names}
    x = random_inputs(6, dtype=torch.uint8)
    with live_server(write_config(tmp_path / "t.toml", teachers)) as (base, _):
        for name in names:
            r = httpx.post(
                f"{base}/soft-targets",
                content=codec.encode_inputs(x),
                params={"teacher": name, "outputs": "member_logits"},
                timeout=HANG_S,
            )
            assert r.status_code == 200, f"{name}: {r.text}"
            with torch.inference_mode():
                want = eager(name)(x.float() / 255)
            got = codec.decode(r.content)["member_logits"][0]
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
