"""What a benchmark returns: a table, the targets it checks, and the machine it ran on."""

from __future__ import annotations

import subprocess
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import torch

from bench.servers import triton_version
from pipeline.machine import machine as describe_machine

OPS = {"<=": lambda a, b: a <= b, ">=": lambda a, b: a >= b}


@dataclass
class Target:
    """One of the benchmarks' targets, and what was measured against it."""

    # e.g. "service / in-process time, PreActResNet-18, batch 128"
    what: str
    # "<=" or ">="
    op: str
    threshold: float
    measured: float
    # the numbers behind the verdict, in words
    context: str = ""

    @property
    def met(self) -> bool:
        return OPS[self.op](self.measured, self.threshold)

    def to_dict(self) -> dict:
        return {**asdict(self), "met": self.met}


@dataclass
class Table:
    """A further table of a section, for a part whose figures are not the main table's columns."""

    title: str
    columns: list[str]
    rows: list[dict] = field(default_factory=list)


@dataclass
class Section:
    key: str
    title: str
    # what was compared, and how
    about: str
    columns: list[str]
    rows: list[dict] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # how long the benchmark took
    seconds: float = 0.0
    # further tables, after the main one, each under its title
    tables: list[Table] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {**asdict(self), "targets": [t.to_dict() for t in self.targets]}


def _git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parents[1]
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def machine(device: torch.device) -> dict:
    """pipeline.machine's record, and what a benchmark adds: the commit, the date, the peer's version."""
    info = {
        **describe_machine(device),
        "git_commit": _git_commit(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    try:
        import litserve

        info["litserve"] = litserve.__version__
    except ImportError:
        info["litserve"] = None
    info["pytriton"] = triton_version()
    return info
