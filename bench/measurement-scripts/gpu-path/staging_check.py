"""The GPU path of `TeacherRunner.compute` (teacher_service/staging.py) on its own, without HTTP: is it bit for bit
`TeacherRunner.forward`, and does it cost what the in-process forward costs? Run by gpu_path.sh before the benchmarks.

    python bench/measurement-scripts/gpu-path/staging_check.py --device cuda --out DIR/staging-check.json

1. Bits: a two-member PreActResNet-18 teacher (random weights); for float32, channels_last and bf16 autocast, batches
   of one float32 request, one uint8 request, several requests of every wire dtype, and rows missed by one member
   only: `compute` through the device worker's staging against what `compute` did before staging (the rows
   concatenated, each member through `forward`). Each case records whether every bit agrees.
2. Time, one member at `--batch` rows, median of `--reps` alternated calls, each timed to the device's last kernel:
   `forward` of rows already on the device (what benchmark 1's in-process side runs), `compute` as it was before
   staging, and `compute` through the staging, for float32 and uint8 requests.

`--device cpu --arch small_cnn --batch 16 --reps 3` runs the same in seconds, without a GPU (no pinning, no stream).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from shared.checkpoint import Checkpoint, save_checkpoint
from shared.codec import to_unit_float
from shared.models import build_model
from shared.protocol import CacheMode
from teacher_service.config import load_config
from teacher_service.inference import BatchWork, Rows, TeacherRunner
from teacher_service.metrics import Metrics
from teacher_service.registry import load_teachers
from teacher_service.staging import staging_for

SHAPES = {"small_cnn": (1, 28, 28), "preact_resnet18": (3, 32, 32), "wrn34_10": (3, 32, 32)}
# later settings change the shared models (channels_last converts them in place): float32 first
SETTINGS = {"float32": {}, "bf16": {"autocast": "bf16"}, "channels_last": {"channels_last": True}}


def teachers(arch: str, folder: Path, device: torch.device) -> dict:
    """Teacher `pair` (two members, random weights) and teacher `one` (its first member), loaded as the service does."""
    shape, paths = SHAPES[arch], []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = build_model(arch, 10, shape)
        paths.append(folder / f"{arch}-{seed}.pt")
        save_checkpoint(paths[-1], Checkpoint(arch, 10, shape, model.state_dict(), {"seed": seed}))
    lines = []
    for name, members in (("pair", paths), ("one", paths[:1])):
        lines += [f"[teachers.{name}]", "num_classes = 10", f"input_shape = {list(shape)}"]
        lines += [f'[[teachers.{name}.members]]\npath = "{p}"' for p in members]
    config = folder / "teachers.toml"
    config.write_text("\n".join(lines) + "\n")
    return load_teachers(load_config(config, environ={}), device)


def inputs(n: int, shape: tuple, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.uint8:
        return torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8)
    return torch.rand(n, *shape, generator=g).to(dtype)


def before(runner: TeacherRunner, work: BatchWork) -> BatchWork:
    """`compute` as it was before staging, verbatim: the rows concatenated, each member through `forward`."""
    x = torch.cat([to_unit_float(r.inputs) for r in work.batch])
    for m, (member, miss) in enumerate(zip(runner.teacher.members, work.misses)):
        if len(miss) == len(x):
            work.out[m] = runner.forward(member, x)
        elif len(miss):
            work.out[m][torch.from_numpy(miss)] = runner.forward(member, x[torch.from_numpy(miss)])
    return work


def looked_up(runner: TeacherRunner, batch: list[Rows], misses: list[np.ndarray]) -> BatchWork:
    """The batch after `lookup`, with these misses and a zeroed answer."""
    work = runner.lookup(batch)
    work.out.zero_()
    work.misses = misses
    return work


def bit_checks(pair, device: torch.device, batch: int) -> list[dict]:
    shape = tuple(pair.config.input_shape)
    big = inputs(batch + 8, shape, torch.float32, 9)
    batches = {
        "one float32 request": [inputs(batch, shape, torch.float32, 1)],
        "one uint8 request": [inputs(batch, shape, torch.uint8, 2)],
        "uint8 + float16 + float32 + a slice": [
            inputs(3, shape, torch.uint8, 3),
            inputs(5, shape, torch.float16, 4),
            inputs(7, shape, torch.float32, 5),
            big[2:6],
        ],
    }
    results = []
    for setting, options in SETTINGS.items():
        runner = TeacherRunner(pair, None, device, Metrics(), staging=staging_for(device), **options)
        for what, parts in batches.items():
            rows = [Rows(p, None, CacheMode.bypass) for p in parts]
            n = sum(len(p) for p in parts)
            for misses_what, misses in (
                ("every row missed", [np.arange(n), np.arange(n)]),
                ("3 rows missed by one member", [np.array([0, n // 2, n - 1]), np.array([], dtype=np.int64)]),
            ):
                got = runner.compute(looked_up(runner, rows, misses)).out
                expected = before(runner, looked_up(runner, rows, misses)).out
                same = torch.equal(got.view(torch.int32), expected.view(torch.int32))
                results.append(
                    {
                        "setting": setting,
                        "batch": what,
                        "misses": misses_what,
                        "bit_for_bit": same,
                        "max_abs_diff": float((got - expected).abs().max()),
                    }
                )
    return results


def timed(call, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    call()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def timings(one, device: torch.device, batch: int, reps: int) -> list[dict]:
    runner = TeacherRunner(one, None, device, Metrics(), staging=staging_for(device))
    member, shape = one.members[0], tuple(one.config.input_shape)
    rows_out = []
    for dtype in (torch.float32, torch.uint8):
        x = inputs(batch, shape, dtype, 7)
        rows = [Rows(x, None, CacheMode.bypass)]
        there = to_unit_float(x).to(device)
        calls = {
            "in-process forward, rows on the device": lambda there=there: runner.forward(member, there),
            "compute before staging": lambda rows=rows: before(runner, runner.lookup(rows)),
            "compute through the staging": lambda rows=rows: runner.compute(runner.lookup(rows)),
        }
        samples = {name: [] for name in calls}
        for rep in range(reps + 2):
            names = list(calls) if rep % 2 == 0 else list(reversed(calls))
            for name in names:
                seconds = timed(calls[name], device)
                # two warm-up rounds
                if rep >= 2:
                    samples[name].append(seconds)
        reference = statistics.median(samples["in-process forward, rows on the device"])
        for name, values in samples.items():
            seconds = statistics.median(values)
            rows_out.append(
                {
                    "dtype": str(dtype).removeprefix("torch."),
                    "path": name,
                    "ms": seconds * 1e3,
                    "vs in-process": seconds / reference,
                }
            )
    return rows_out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--arch", default="preact_resnet18", choices=sorted(SHAPES))
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as folder:
        loaded = teachers(args.arch, Path(folder), device)
    checks = bit_checks(loaded["pair"], device, args.batch)
    times = timings(loaded["one"], device, args.batch, args.reps)
    document = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "arch": args.arch,
        "batch": args.batch,
        "reps": args.reps,
        "bit_checks": checks,
        "timings": times,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=1))
    failed = [c for c in checks if not c["bit_for_bit"]]
    print(f"bits: {len(checks) - len(failed)} of {len(checks)} cases bit for bit")
    for c in failed:
        print(f"  differs: {c['setting']}, {c['batch']}, {c['misses']}: max |diff| {c['max_abs_diff']:.3g}")
    for t in times:
        print(f"{t['dtype']:>8}  {t['path']:<40} {t['ms']:8.3f} ms  {t['vs in-process']:.2f}x")


if __name__ == "__main__":
    main()
