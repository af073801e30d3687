"""The service's teachers in this process: no HTTP, no cache, no batching, the same numbers.

The one public in-process entry to the service, for what runs without one (a trainer's local teacher, a
benchmark's reference): a teacher-service config read as the service reads it, its members run through the
service's own forward path (TeacherRunner.forward: device, autocast, memory format) and combined by the shared
ensemble formula, so on one device both give the same soft targets.
"""

from __future__ import annotations

from pathlib import Path

import torch

from shared.protocol import TeacherInfo
from teacher_service.config import load_config
from teacher_service.ensemble import aggregate_probs
from teacher_service.inference import TeacherRunner
from teacher_service.metrics import Metrics
from teacher_service.registry import load_teachers


class InProcessTeacher:
    def __init__(self, config_path: str | Path, name: str | None, device: torch.device):
        """`name` may be left out when the config declares one teacher."""
        config = load_config(config_path, environ={})
        teachers = load_teachers(config, device)
        if name is None and len(teachers) == 1:
            name = next(iter(teachers))
        if name not in teachers:
            raise ValueError(f"{config_path} declares teachers {sorted(teachers)}, not {name!r}: set teacher.name")
        self.name = name
        self._teacher = teachers[name]
        self._runner = TeacherRunner(
            self._teacher, None, device, Metrics(), config.server.autocast, config.server.channels_last
        )

    @property
    def default_temperature(self) -> float:
        """The temperature the service applies when a request names none."""
        return self._teacher.config.temperature

    def info(self) -> TeacherInfo:
        return self._teacher.info()

    def probs(self, x: torch.Tensor, temperature: float) -> torch.Tensor:
        """Tempered, ensemble-aggregated probabilities (B, K) on the CPU, as POST /soft-targets answers them."""
        member_logits = torch.stack([self._runner.forward(member, x.detach()) for member in self._teacher.members])
        return aggregate_probs(member_logits, self._teacher.weights, temperature, self._teacher.config.aggregate)
