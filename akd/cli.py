"""The `akd` command: one entry point, a subcommand per job, each imported only when it runs.

The subcommands are named here as data, with the module that implements each, so that `akd serve` imports the
service and nothing else: an image or a machine that holds only what serving needs still runs it, and `akd --help`
imports no side at all. Each module declares `COMMANDS = {name: (add_arguments, run)}`. `python -m akd`, and each
side's `python -m`, run `main`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import NamedTuple

from shared.allocator import keep_freed_memory_at_start
from shared.openmp_spin import idle_openmp_workers_sleep, serves
from shared.version import NAME, VERSION


class Subcommand(NamedTuple):
    module: str
    help: str


SUBCOMMANDS = {
    "serve": Subcommand("teacher_service.cli", "serve teacher soft targets over HTTP (POST /soft-targets)"),
    "train": Subcommand("student_trainer.cli", "train one model (PGD-AT, TRADES, AKD, ARD, RSLAD, IAD)"),
    "warm": Subcommand(
        "student_trainer.cli", "fill the teacher service's cache with a run's clean inputs, every augmented view"
    ),
    "eval": Subcommand("student_trainer.cli", "robust evaluation of a checkpoint on the test split"),
    "compare": Subcommand(
        "student_trainer.cli", "compare runs: validation accuracy, curves, forgetting on the hardest samples"
    ),
    "demo": Subcommand(
        "pipeline.cli", "the paper's pipeline end to end: teachers, service, students, evaluation, report"
    ),
    "design": Subcommand(
        "pipeline.cli", "one claim decided over independent teacher sets, sized by a power analysis before the runs"
    ),
    "bench": Subcommand("bench.cli", "benchmarks: what the service costs and saves, measured side by side"),
    "cache": Subcommand(
        "teacher_service.cache.tools",
        "a teacher service's cache: stats, verify its rows, gc stale member versions (and `akd cache warm`)",
    ),
}
# `akd cache warm` is `akd warm`: warming needs a run's data and augmentation, so it lives on the trainer's side.
ALIASES = {("cache", "warm"): ["warm"]}


def main(argv: list[str] | None = None, prog: str = "akd", commands: tuple[str, ...] = tuple(SUBCOMMANDS)) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # before the subcommand's module imports torch, and with it libgomp
    if serves(argv):
        idle_openmp_workers_sleep()
    if status := keep_freed_memory_at_start(prog):
        return status
    for alias, command in ALIASES.items():
        if tuple(argv[: len(alias)]) == alias:
            argv = [*command, *argv[len(alias) :]]
    parser = argparse.ArgumentParser(
        prog=prog, description="Adversarial knowledge distillation with a shared teacher service."
    )
    parser.add_argument("--version", action="version", version=f"{NAME} {VERSION}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parsers = {
        name: sub.add_parser(name, help=SUBCOMMANDS[name].help, description=SUBCOMMANDS[name].help) for name in commands
    }
    chosen = argv[0] if argv else None
    # anything else (no command, --help, a typo) is argparse's to answer
    if chosen in parsers:
        add_arguments, run = importlib.import_module(SUBCOMMANDS[chosen].module).COMMANDS[chosen]
        add_arguments(parsers[chosen])
        parsers[chosen].set_defaults(run=run)
    args = parser.parse_args(argv)
    # after the subcommand: how a run records its command
    args.argv = argv[1:]
    return args.run(args)
