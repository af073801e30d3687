"""The trainer's overlap (teacher.overlap) with the service on a core of its own, as on other hardware.

Run from the repository's root on a 2-core machine:

    taskset -c 0 .venv/bin/python bench/measurement-scripts/trainer-overlap/own_core.py 20 [SERVICE_CORES]

The service (`python -m teacher_service`, a seeded small_cnn teacher) runs under `taskset -c 1`, this script (the
trainers, and the in-process teacher) under `taskset -c 0`: unlike `akd bench`'s benchmark 5, where both share every
core, the service's forward pass competes with nothing of the student's. AKD and ARD steps (`Trainer.step`, batch 128,
PGD-5, small_cnn student on mnist5k; ARD's next batch asked ahead as the training loop asks it), each through the
service with overlap on and off (every row computed, the cache bypassed) and in-process, alternated by
bench.timing.alternate for ROUNDS rounds. Prints each trainer's median step and, per method, the median over rounds of
service / in-process. SERVICE_CORES (taskset's list, default 1) puts the service elsewhere: 0 shares this script's core.
"""

from __future__ import annotations

import itertools
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from bench.timing import alternate
from pipeline.health import free_port, wait_healthy
from shared.checkpoint import Checkpoint, save_checkpoint
from shared.codec import to_unit_float
from shared.models import build_model
from shared.protocol import CacheMode
from student_trainer.config import AttackConfig, TeacherCache, TeacherRef, TrainConfig
from student_trainer.data import iterate_batches
from student_trainer.train import Trainer


def teacher_config(folder: Path) -> Path:
    torch.manual_seed(1)
    model = build_model("small_cnn", 10, (1, 28, 28)).eval()
    save_checkpoint(folder / "t.pt", Checkpoint("small_cnn", 10, (1, 28, 28), model.state_dict(), {"epoch": 1}))
    config = folder / "teachers.toml"
    config.write_text(
        '[teachers.t]\nnum_classes = 10\ninput_shape = [1, 28, 28]\n\n[[teachers.t.members]]\npath = "t.pt"\n'
    )
    return config


def trainers(folder: Path, config: Path, url: str) -> dict[str, Trainer]:
    computed = TeacherCache(clean=CacheMode.bypass, adversarial=CacheMode.bypass)
    made = {}
    for method in ("akd", "ard"):
        refs = {
            "service, overlap on": TeacherRef(url=url, name="t", cache=computed, overlap=True),
            "service, overlap off": TeacherRef(url=url, name="t", cache=computed, overlap=False),
            "in-process": TeacherRef(config=config, name="t"),
        }
        for where, ref in refs.items():
            cfg = TrainConfig(
                method=method,
                batch_size=128,
                attack=AttackConfig(steps=5),
                device="cpu",
                out_dir=folder / f"{method} {where}",
                track_dynamics=False,
                teacher=ref,
                schedule="constant",
            )
            made[f"{method.upper()}, {where}"] = Trainer(cfg)
    return made


def main(rounds: int, service_cores: str) -> None:
    folder = Path(tempfile.mkdtemp())
    config, port = teacher_config(folder), free_port()
    command = [sys.executable, "-m", "teacher_service", "--config", str(config), "--port", str(port)]
    service = subprocess.Popen(
        ["taskset", "-c", service_cores, *command],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_healthy(f"http://127.0.0.1:{port}", alive=lambda: service.poll() is None, timeout_s=300)
        made = trainers(folder, config, f"http://127.0.0.1:{port}")
        first = next(iter(made.values()))
        batches = iterate_batches(first.data.train, 128, torch.Generator().manual_seed(0), False)
        data = [(to_unit_float(xb), yb) for _, (_, xb, yb) in zip(range(8), batches)]
        asked = {name: t.asked_ahead(itertools.cycle(data)) for name, t in made.items()}

        def stepper(name: str):
            def step() -> None:
                (x, y), clean_targets = next(asked[name])
                made[name].model.train()
                made[name].step(x, y, epoch=0, clean_targets=clean_targets)

            return step

        times = alternate({name: stepper(name) for name in made}, rounds, 1, torch.device("cpu"))
        for name in made:
            asked[name].close()
            made[name].close()
    finally:
        service.terminate()
        service.wait(timeout=60)
    for name, samples in times.items():
        print(f"{name}: median {statistics.median(samples) * 1e3:.0f} ms a step")
    for method in ("AKD", "ARD"):
        for overlap in ("on", "off"):
            service_s, local_s = times[f"{method}, service, overlap {overlap}"], times[f"{method}, in-process"]
            ratios = sorted(a / b for a, b in zip(service_s, local_s))
            quarter = len(ratios) // 4
            print(
                f"{method}, overlap {overlap}: service / in-process, median over rounds "
                f"{statistics.median(ratios):.3f} (interquartile {ratios[quarter]:.3f} to {ratios[-quarter - 1]:.3f})"
            )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 20, sys.argv[2] if len(sys.argv) > 2 else "1")
