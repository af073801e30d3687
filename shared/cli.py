"""The `akd` command: one entry point, a subcommand per job."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    from bench import cli as bench
    from student_trainer import cli as trainer
    from teacher_service import cli as serve

    parser = argparse.ArgumentParser(prog="akd", description="Adversarial knowledge distillation with a shared teacher service.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve_parser = sub.add_parser("serve", help="serve teacher soft targets over HTTP (POST /soft-targets)")
    serve.add_arguments(serve_parser)
    serve_parser.set_defaults(run=serve.run)
    trainer.register(sub)
    bench_parser = sub.add_parser("bench", help="benchmarks: what the service costs and saves, measured side by side")
    bench.add_arguments(bench_parser)
    bench_parser.set_defaults(run=bench.run)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    args.argv = argv[1:]  # after the subcommand: how a run records its command
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
