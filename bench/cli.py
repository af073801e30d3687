"""`akd bench`: run the benchmarks, write DIR/results.json, DIR/RESULTS.md and DIR/sharing.png."""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
import time

from shared.configfile import ConfigError, existing_folder_or_new

BENCHMARKS = (
    "round_trip",
    "overhead",
    "cache",
    "sharing",
    "transport",
    "end_to_end",
    "peer",
    "scale_out",
    "cache_scale",
    "warm",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--quick", action="store_true", help="the `quick` preset: every benchmark, fewer sizes (minutes)"
    )
    which.add_argument(
        "--config", default="full", help="a preset (full, quick, tiny) or a benchmark TOML (default: full)"
    )
    parser.add_argument(
        "--device", default="auto", choices=["auto", "cpu", "cuda"], help="where both sides compute (default: auto)"
    )
    parser.add_argument("--only", help=f"comma list of benchmarks to run (default: all of {', '.join(BENCHMARKS)})")
    parser.add_argument("--out", required=True, help="folder for results.json, RESULTS.md, sharing.png and logs")
    parser.add_argument(
        "--repeat",
        type=_at_least_one,
        default=1,
        metavar="N",
        help="run the chosen benchmarks N times over, each run whole in DIR/run-<i>, and judge each target on the "
        "median of the N, shown with its spread (default: 1)",
    )


def run(args: argparse.Namespace) -> int:

    from bench import (
        cache,
        cache_scale,
        end_to_end,
        overhead,
        peer,
        report,
        round_trip,
        scale_out,
        sharing,
        transport,
        warm,
    )
    from bench.config import load_bench_config
    from bench.context import Context
    from bench.sections import machine
    from shared.devices import resolve_device

    modules = {
        "round_trip": round_trip,
        "overhead": overhead,
        "cache": cache,
        "sharing": sharing,
        "transport": transport,
        "end_to_end": end_to_end,
        "peer": peer,
        "scale_out": scale_out,
        "cache_scale": cache_scale,
        "warm": warm,
    }
    preset = "quick" if args.quick else args.config
    try:
        cfg = load_bench_config(preset)
        chosen = _chosen(args.only)
        device = resolve_device(args.device, "--device")
        out = existing_folder_or_new(args.out, "--out")
    except ConfigError as exc:
        print(f"akd bench: {exc}", file=sys.stderr)
        return 2
    command = shlex.join(["akd", "bench", *args.argv])
    runs = []
    for r in range(1, args.repeat + 1):
        run_out = out if args.repeat == 1 else out / f"run-{r}"
        workdir = run_out.resolve() / "work"
        # the work folder holds this run's teachers, cache and logs, none of an earlier run's
        shutil.rmtree(workdir, ignore_errors=True)
        # a fresh context per run: every run starts its own services
        ctx = Context(cfg, device, workdir)
        where = machine(device)
        sections = []
        try:
            for i, key in enumerate(chosen, 1):
                ctx.progress(
                    f"{f'run {r}/{args.repeat}, ' if args.repeat > 1 else ''}benchmark {i}/{len(chosen)}: {key}"
                )
                started = time.perf_counter()
                section = modules[key].run(ctx)
                section.seconds = time.perf_counter() - started
                sections.append(section)
                report.write(run_out, sections, where, command, preset, cfg.repetitions, cfg.model_dump())
        finally:
            ctx.close()
        runs.append(sections)
    if args.repeat > 1:
        report.write_repeated(out, runs, machine(device), command, preset, cfg.repetitions)
    print((out / "RESULTS.md").read_text())
    return 0


# for `akd bench` (akd/cli.py)
COMMANDS = {"bench": (add_arguments, run)}


def _at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of runs, 1 or more; got {text!r}")
    return value


def _chosen(only: str | None) -> list[str]:
    if not only:
        return list(BENCHMARKS)
    names = [n.strip() for n in only.split(",") if n.strip()]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown or not names:
        raise ConfigError(f"--only {only!r}: expected a comma list of {', '.join(BENCHMARKS)}")
    return [b for b in BENCHMARKS if b in names]
