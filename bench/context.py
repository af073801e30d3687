"""What every benchmark gets: its config, the device, the teachers on disk, and servers started on demand."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench import servers
from bench.config import BenchConfig, TeacherSpec


@dataclass
class Context:
    cfg: BenchConfig
    device: torch.device
    workdir: Path
    service_config: Path = field(init=False)
    _servers: dict[str, servers.ServerProcess] = field(default_factory=dict)
    _started: float = field(default_factory=time.perf_counter)

    def __post_init__(self) -> None:
        self.service_config = servers.write_teachers(self.workdir, self.cfg, self.cfg.max_wait_ms)

    def teacher(self, name: str) -> TeacherSpec:
        return self.cfg.teachers[name]

    def service(self, batching: bool = True) -> servers.ServerProcess:
        """`akd serve` with the zarr cache (batching on) or without either (batching off)."""
        name = "service" if batching else "service-no-batching"
        if name not in self._servers:
            self.progress(f"starting {name}")
            cache = self.workdir / "cache" if batching else None
            self._servers[name] = servers.teacher_service(
                name, self.service_config, self.workdir / "logs", self.device.type, batching, cache
            )
        return self._servers[name]

    def litserve(self, teacher: str, max_batch_size: int) -> servers.ServerProcess:
        name = f"litserve-{teacher}"
        if name not in self._servers:
            self.progress(f"starting {name}")
            self._servers[name] = servers.litserve_peer(
                name,
                self.service_config,
                teacher,
                self.workdir / "logs",
                self.device.type,
                max_batch_size,
                self.cfg.max_wait_ms / 1000,
            )
        return self._servers[name]

    def floor(self, kind: str) -> servers.ServerProcess:
        """A floor of bench/floors.py: `starlette` (the framework's) or `socket` (the machine's)."""
        name = f"floor-{kind}"
        if name not in self._servers:
            self.progress(f"starting {name}")
            self._servers[name] = servers.floor(kind, self.workdir / "logs")
        return self._servers[name]

    def stop(self, name: str) -> None:
        if name in self._servers:
            self._servers.pop(name).stop()

    def close(self) -> None:
        for name in list(self._servers):
            self.stop(name)

    def progress(self, message: str) -> None:
        print(f"[bench {time.perf_counter() - self._started:6.0f}s] {message}", file=sys.stderr, flush=True)
