"""The machine a result was measured on, recorded beside it (a benchmark's figures, a demo's report)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: torch.device | None = None) -> dict:
    """The hardware and software behind a figure; `device`: what ran it (default: the GPU if torch sees one)."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return {
        "arch": platform.machine(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


# the packages a result's numbers depend on (the model's kernels, the attacks, the statistics)
MEASURING_PACKAGES = ("torch", "numpy", "scipy", "pyautoattack")


def software() -> dict[str, str]:
    """The measuring packages' versions ("not installed" where one is absent)."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in MEASURING_PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


def machine_line(info: dict) -> str:
    """ "x86_64, 2 cores, CPU only, torch 2.13.0+cpu, Python 3.11.7": one line for a report's header."""
    device = info["device_name"] if info["device"].startswith("cuda") else "CPU only"
    return f"{info['arch']}, {info['cores']} cores, {device}, torch {info['torch']}, Python {info['python']}"
