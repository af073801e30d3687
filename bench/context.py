"""What every benchmark gets: its config, the device, the teachers on disk, and servers started on demand."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench import servers, triton_client
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

    def triton(self, teacher: str) -> servers.ServerProcess:
        """Triton Inference Server serving `teacher` (servers.triton_peer: the same checkpoint and batching settings
        as the service), started once and checked before it is measured: its answer to a few random rows is the
        in-process teacher's, and tritonclient sends the same request bytes as bench/triton_client.py and reads the
        same answer. Stop it with `stop(server.name)`. Raises RuntimeError when Triton is missing
        (`servers.triton_missing()` says why) or fails either check."""
        name = f"triton-{teacher}"
        if name not in self._servers:
            self.progress(f"starting {name}")
            server = servers.triton_peer(name, self.service_config, teacher, self.workdir / "logs", self.device.type)
            self._servers[name] = server
            self._check_triton(server, teacher)
        return self._servers[name]

    def _check_triton(self, server: servers.ServerProcess, teacher: str) -> None:
        from student_trainer.teacher_client import LocalTeacher

        x = torch.rand(5, *self.teacher(teacher).input_shape, generator=torch.Generator().manual_seed(5))
        command, env = servers.triton_command()
        triton_client.check_against(command, env, server.url, teacher, x)
        client = triton_client.TritonTeacher(server.url, teacher)
        try:
            theirs = client(x)
        finally:
            client.close()
        ours = LocalTeacher(self.service_config, teacher, temperature=None, device=self.device)(x.to(self.device))
        try:
            torch.testing.assert_close(theirs, ours.cpu())
        except AssertionError as exc:
            raise RuntimeError(f"Triton's {teacher} answers otherwise than the in-process teacher: {exc}") from None

    def stop(self, name: str) -> None:
        if name in self._servers:
            self._servers.pop(name).stop()

    def close(self) -> None:
        for name in list(self._servers):
            self.stop(name)

    def progress(self, message: str) -> None:
        print(f"[bench {time.perf_counter() - self._started:6.0f}s] {message}", file=sys.stderr, flush=True)
