"""Where a CPU forward pass's time goes, in the service and in the caller's own process, with and without
`shared.allocator.keep_freed_memory`.

python scripts/forward_profile.py --out runs/forward-profile          # both allocator settings, perf if present
python scripts/forward_profile.py --out DIR --modes keep --calls 12 --arch small_cnn --batch 32

For each setting (`AKD_MALLOC` = system, keep) a fresh child process serves a teacher (`--arch`, random weights) with
`python -m teacher_service` under that setting, sets its own allocator the same way, and then alternates the same
float32 batch through the service (`cache=bypass`) and through `LocalTeacher` in its own process (the overhead
benchmark's two sides). Per call: wall time, the service's own forward time (its `akd_compute_seconds`), and the
minor page faults of the process that ran the forward (/proc/<pid>/stat, getrusage). With `perf` on the machine,
each side is also sampled (`perf record -e cpu-clock`) over the same calls, and the share of its time in the kernel,
in libgomp and in the rest is written beside the table, with perf's top symbols, in `DIR/perf-<setting>-<side>.txt`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODES = ("system", "keep")
CLASSES = 10
# the benchmarks' inputs
SHAPES = {"preact_resnet18": (3, 32, 32), "small_cnn": (1, 28, 28), "tiny_cnn": (1, 28, 28)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--modes", default=",".join(MODES), help="comma list of AKD_MALLOC settings")
    parser.add_argument("--arch", default="preact_resnet18", choices=sorted(SHAPES))
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--calls", type=int, default=8, help="timed calls a side, alternated")
    # one setting, in its own process
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.arch, args.batch, args.calls, args.out)))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for mode in args.modes.split(","):
        print(f"AKD_MALLOC={mode}: a service and this side, {args.calls} calls each ...", flush=True)
        child = subprocess.run(
            [sys.executable, __file__, "--child", mode, "--out", str(args.out), "--batch", str(args.batch)]
            + ["--calls", str(args.calls), "--arch", args.arch],
            env=os.environ | {"AKD_MALLOC": mode},
            capture_output=True,
            text=True,
            check=True,
        )
        results.append(json.loads(child.stdout.strip().splitlines()[-1]))
    table = markdown(results, args.arch, args.batch)
    (args.out / "forward-profile.md").write_text(table)
    (args.out / "forward-profile.json").write_text(json.dumps(results, indent=1))
    print(table)
    return 0


def measure(mode: str, arch: str, batch: int, calls: int, out: Path) -> dict:
    import tomli_w
    import torch

    from bench import servers
    from bench.overhead import server_compute
    from shared.allocator import keep_freed_memory
    from shared.checkpoint import Checkpoint, save_checkpoint
    from shared.models import build_model
    from shared.protocol import CacheMode
    from student_trainer.teacher_client import LocalTeacher, RemoteTeacher

    # AKD_MALLOC decides, as it does for the service
    kept = keep_freed_memory()
    home = Path(tempfile.mkdtemp(prefix="forward-profile-"))
    torch.manual_seed(0)
    shape = SHAPES[arch]
    model = build_model(arch, CLASSES, shape)
    save_checkpoint(home / "t.pt", Checkpoint(arch, CLASSES, shape, model.state_dict(), {}))
    teacher = {"num_classes": CLASSES, "input_shape": list(shape), "members": [{"path": str(home / "t.pt")}]}
    config = home / "t.toml"
    config.write_text(tomli_w.dumps({"server": {"log_level": "warning"}, "teachers": {"t": teacher}}))
    service = servers.teacher_service("forward-profile", config, home / "logs", "cpu", True, None)
    remote = RemoteTeacher(service.url, "t", temperature=1.0, clean_cache=CacheMode.bypass)
    local = LocalTeacher(config, "t", temperature=1.0, device=torch.device("cpu"))
    # float32: never cached
    x = torch.rand(batch, *shape, generator=torch.Generator().manual_seed(batch))
    pid = service.process.pid
    sides = {
        "service": (lambda: remote(x), lambda: proc_minflt(pid), pid),
        "in-process": (lambda: local(x), lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt, os.getpid()),
    }
    try:
        for _ in range(2):
            remote(x), local(x)
        samples: dict[str, list[tuple[float, int]]] = {side: [] for side in sides}
        before = server_compute(service.url, "t")
        for _ in range(calls):
            for side, (call, faults, _) in sides.items():
                samples[side].append(timed(call, faults))
        after = server_compute(service.url, "t")
        profiles = {}
        if shutil.which("perf"):
            for side, (call, _, profiled) in sides.items():
                profiles[side] = perf_profile(profiled, call, calls, out / f"perf-{mode}-{side}.txt")
    finally:
        remote.close()
        service.stop()
        shutil.rmtree(home, ignore_errors=True)
    return {
        "malloc": mode,
        "kept": kept,
        "service forward ms": 1e3 * (after[0] - before[0]) / max(after[1] - before[1], 1),
        **{f"{side} ms": 1e3 * statistics.median(s for s, _ in v) for side, v in samples.items()},
        **{f"{side} faults": statistics.median(f for _, f in v) for side, v in samples.items()},
        "profiles": profiles,
    }


def proc_minflt(pid: int) -> int:
    """Minor faults of a process so far (/proc/<pid>/stat, field 10)."""
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[7])


def timed(call, faults) -> tuple[float, int]:
    before, started = faults(), time.perf_counter()
    call()
    return time.perf_counter() - started, faults() - before


def perf_profile(pid: int, call, calls: int, report: Path) -> dict[str, float]:
    """Sample process `pid` with perf while `call` runs `calls` times; its time by library (kernel, libgomp, ...),
    in percent, and perf's top symbols written to `report`."""
    data = report.with_suffix(".data")
    recorder = subprocess.Popen(
        ["perf", "record", "-q", "-e", "cpu-clock", "-g", "-p", str(pid), "-o", str(data)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    # give perf time to attach before the calls
    time.sleep(0.5)
    for _ in range(calls):
        call()
    recorder.send_signal(2)
    recorder.wait(timeout=60)
    by_dso = perf_report(data, "dso")
    report.write_text(perf_report_text(data, "dso") + "\n" + perf_report_text(data, "sym")[:20000])
    data.unlink(missing_ok=True)
    return by_dso


def perf_report_text(data: Path, key: str) -> str:
    command = ["perf", "report", "-i", str(data), "--no-children", "--sort", key, "--stdio", "-g", "none"]
    return subprocess.run(command, capture_output=True, text=True, check=False).stdout


def perf_report(data: Path, key: str) -> dict[str, float]:
    """Percent of samples by `key`, from perf report's lines ("  27.46%  [kernel.kallsyms]")."""
    shares: dict[str, float] = {}
    for line in perf_report_text(data, key).splitlines():
        parts = line.split(None, 1)
        if len(parts) == 2 and parts[0].endswith("%") and not line.startswith("#"):
            name = "JIT code (oneDNN)" if parts[1].startswith("[JIT]") else parts[1].strip()
            shares[name] = shares.get(name, 0.0) + float(parts[0].rstrip("%"))
    return shares


def markdown(results: list[dict], arch: str, batch: int) -> str:
    lines = [
        f"{arch}, batch {batch}, float32 inputs, `cache=bypass`; medians of the alternated calls.",
        "",
        "| AKD_MALLOC | service ms | of it its forward ms | in-process ms | service / in-process | faults a call, "
        "service | faults a call, in-process | kernel time, service | kernel time, in-process |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        kernel = {side: r["profiles"].get(side, {}).get("[kernel.kallsyms]") for side in ("service", "in-process")}
        shown = {side: "-" if v is None else f"{v:.1f}%" for side, v in kernel.items()}
        lines.append(
            f"| {r['malloc']} | {r['service ms']:.1f} | {r['service forward ms']:.1f} | {r['in-process ms']:.1f} | "
            f"{r['service ms'] / r['in-process ms']:.3f} | {r['service faults']:,.0f} | {r['in-process faults']:,.0f} "
            f"| {shown['service']} | {shown['in-process']} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
