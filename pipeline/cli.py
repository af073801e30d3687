"""`akd demo` and `akd design`: their arguments, and thin shells over pipeline.demo and pipeline.design_report (the
plans, designs and stages live there)."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from pipeline import plans
from shared.configfile import ConfigError, add_set_argument, existing_folder_or_new


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    env = os.environ
    parser.add_argument(
        "--out", default=env.get("AKD_DEMO_OUT"), help="the one folder everything goes to (or $AKD_DEMO_OUT)"
    )
    parser.add_argument(
        "--plan",
        default=env.get("AKD_DEMO_PLAN", "default"),
        help=f'a built-in plan: {", ".join(plans.NAMES)} (or $AKD_DEMO_PLAN); docs/demo.md, "The plans"',
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        default=env.get("AKD_DEMO_QUICK", "0") not in ("", "0"),
        help="the small CI plan, same as --plan quick: minutes, not a result (or $AKD_DEMO_QUICK=1)",
    )
    parser.add_argument(
        "--fresh", action="store_true", help="start over (remove --out's runs) instead of reusing finished runs"
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="use an --out that another plan made anyway (its finished runs of the same name are reused as they are)",
    )
    parser.add_argument("--config", help="a demo plan TOML instead of a built-in plan")
    add_set_argument(
        parser,
        "change the plan, e.g. common.data_dir=data/cifar10 or common.epochs=1 (repeatable)",
    )
    parser.add_argument(
        "--stage",
        default="all",
        help="comma list of teachers, serve, students, evaluate, report (default: all but serve, which "
        "the students stage starts itself unless --teacher-url is given)",
    )
    parser.add_argument(
        "--teacher-url",
        default=env.get("AKD_TEACHER_URL"),
        help="students: use this running teacher service (or $AKD_TEACHER_URL)",
    )
    parser.add_argument("--seeds", help="students: only these seeds (comma list), e.g. to split them across machines")
    parser.add_argument("--host", default=env.get("AKD_HOST", "127.0.0.1"), help="serve: bind address (or $AKD_HOST)")
    parser.add_argument("--port", type=int, default=int(env.get("AKD_PORT", 8000)), help="serve: port (or $AKD_PORT)")


def run_demo(args: argparse.Namespace) -> int:
    from pipeline import DemoError, demo
    from pipeline.layout import PlanRecord
    from pipeline.plan import load_plan

    stages = (
        [s for s in demo.STAGES if s != "serve"] if args.stage == "all" else [s.strip() for s in args.stage.split(",")]
    )
    unknown = sorted(set(stages) - set(demo.STAGES))
    try:
        if not args.out:
            raise ConfigError("--out (or AKD_DEMO_OUT) is required")
        # said now, not as a traceback when the first stage writes
        existing_folder_or_new(args.out, "--out")
        if unknown:
            raise ConfigError(f"--stage: unknown {unknown}; known: all, {', '.join(demo.STAGES)}")
        name = "quick" if args.quick else args.plan
        plan = load_plan(args.config, name, args.sets)
        made_by = PlanRecord(" ".join([args.config or name, *(f"--set {s}" for s in args.sets)]), plan.fingerprint())
        seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
        if stages == ["serve"]:
            return demo.serve_stage(Path(args.out), args.host, args.port)
        if "serve" in stages:
            raise ConfigError("--stage serve runs the service in the foreground: give it alone")
        # `akd demo ...`, whichever entry point started it
        command = "akd " + shlex.join(sys.argv[1:])
        table = demo.run_demo(
            plan, Path(args.out), stages, args.fresh, args.teacher_url, seeds, command, made_by, args.force
        )
    except (ConfigError, ValueError, DemoError) as exc:
        print(f"akd demo: {exc}", file=sys.stderr)
        return 2
    if table:
        print(table)
        print(f"\nwrote {Path(args.out) / 'RESULTS.md'}")
    return 0


def add_design_arguments(parser: argparse.ArgumentParser) -> None:
    from pipeline import designs

    parser.add_argument("--out", required=True, help="the design's folder: a set-NN demo folder per teacher set")
    parser.add_argument(
        "--design", default="primary", help=f"a built-in design: {', '.join(designs.NAMES)} (pipeline/designs/)"
    )
    parser.add_argument("--config", help="a design TOML instead of a built-in design")
    parser.add_argument(
        "--sets",
        type=int,
        help="run only the first N sets this time (the design runs in parts; each call resumes where the last stopped)",
    )
    parser.add_argument("--report", action="store_true", help="only write the report from the sets finished so far")


def run_design(args: argparse.Namespace) -> int:
    from pipeline import DemoError, design_report
    from pipeline.design import load_design

    command = "akd " + shlex.join(sys.argv[1:])
    try:
        if args.sets is not None and args.sets < 1:
            raise ConfigError(f"--sets: a number of sets from 1, got {args.sets}")
        existing_folder_or_new(args.out, "--out")
        design = load_design(args.config, args.design)
        out = Path(args.out)
        if args.report:
            design_report.claim_design(design, out)
            text = design_report.write_design_report(design, out, command)
        else:
            text = design_report.run_design(design, out, args.sets, command)
    except (ConfigError, ValueError, DemoError) as exc:
        print(f"akd design: {exc}", file=sys.stderr)
        return 2
    print(text)
    print(f"\nwrote {Path(args.out) / 'RESULTS.md'}")
    return 0


# `akd` (akd/cli.py) names and describes them
COMMANDS = {"demo": (add_demo_arguments, run_demo), "design": (add_design_arguments, run_design)}
