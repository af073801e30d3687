"""`akd train`, `warm`, `eval` and `compare`: thin shells over the configs, the Trainer, `warm` and `evaluate`."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from shared.configfile import ConfigError, add_set_argument, existing_folder_or_new, read_config_bytes
from student_trainer.attack_names import AUTOATTACK_VERSIONS, EVAL_ATTACKS
from student_trainer.markdown import markdown_table


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="run TOML (every field has a default)")
    add_set_argument(
        parser,
        "override any config key, e.g. --set attack.steps=3 (repeatable)",
    )
    parser.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last.pt")


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="a project checkpoint (.pt) or a torch.export file (.pt2)")
    parser.add_argument("--attacks", default="clean,pgd", help=f"comma list of {', '.join(EVAL_ATTACKS)}")
    add_set_argument(
        parser,
        "the threat model is the dataset's standard one (L-inf, its eps, PGD-10), not the checkpoint's "
        "training attack; override it with e.g. --set attack.eps=0.1 --set attack.steps=20, or the "
        "checkpoint's config with e.g. --set dataset=cifar10",
    )
    parser.add_argument("--limit", type=int, help="evaluate the first N test images only")
    parser.add_argument(
        "--autoattack-limit",
        type=int,
        help="run AutoAttack on the first N of those only (0: none; it is costly on a CPU)",
    )
    parser.add_argument(
        "--autoattack-version",
        choices=tuple(AUTOATTACK_VERSIONS),
        default="standard",
        help="standard: APGD-CE, APGD-T, FAB-T, Square; apgd: the APGD-CE + APGD-T subset (much cheaper on a CPU)",
    )
    parser.add_argument(
        "--out", required=True, help="JSON file for the results (a reliability diagram PNG goes beside it)"
    )


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # its progress: one line per attack and batch
    logging.getLogger("auto-attack").setLevel(logging.DEBUG)
    # not a line per soft-target request
    logging.getLogger("httpx").setLevel(logging.WARNING)


def run_train(args: argparse.Namespace) -> int:
    from student_trainer.config import load_train_config
    from student_trainer.teacher_client import TeacherRequestError, TeacherUnavailable
    from student_trainer.train import NonFiniteStep, Trainer

    _setup_logging()
    try:
        if args.resume:
            config_file = Path(args.resume) / "config.json"
            if not config_file.exists():
                raise ConfigError(f"--resume {args.resume}: no config.json there; is it a run folder?")
            cfg = load_train_config(args.config, args.sets, base=_saved_config(config_file))
            # the run lives where it is now, moved or not
            cfg = cfg.model_copy(update={"out_dir": Path(args.resume).absolute()})
        else:
            cfg = load_train_config(args.config, args.sets)
        # said now, not as a traceback after the data loads
        existing_folder_or_new(cfg.out_dir, "out_dir")
    except ConfigError as exc:
        print(f"akd train: {exc}", file=sys.stderr)
        return 2
    try:
        # set-up problems (data not there, teacher unreachable or unfit) are the user's to fix: no traceback
        trainer = Trainer(cfg)
        if args.resume:
            trainer.resume()
    except (TeacherUnavailable, TeacherRequestError) as exc:
        print(f"akd train: {exc}\n{_how_to_continue(cfg.out_dir, exc)}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as exc:
        print(f"akd train: {exc}", file=sys.stderr)
        return 2
    try:
        state = trainer.fit()
    except (
        TeacherUnavailable,
        # TeacherAnswerError too: an answer that is not soft targets
        TeacherRequestError,
        NonFiniteStep,
    ) as exc:
        # the service went away or answered wrongly mid-run, or a step diverged: the user's to fix, like at start-up
        print(f"akd train: {exc}\n{_how_to_continue(cfg.out_dir, exc)}", file=sys.stderr)
        return 2
    finally:
        trainer.close()
    if trainer.world.is_main:
        print(
            f"done: {cfg.out_dir} (best validation robust accuracy {state.best_val_robust:.4f} at epoch "
            f"{state.best_epoch})"
        )
    return 0


def _saved_config(config_file: Path) -> dict:
    """A run folder's config.json, read as any config file is (bounded, a regular file), as a dict."""
    try:
        saved = json.loads(read_config_bytes(config_file))
    except ValueError as exc:
        # not JSON, or not UTF-8
        raise ConfigError(f"{config_file} is not a run's saved config (JSON): {exc}") from None
    if not isinstance(saved, dict):
        raise ConfigError(
            f"{config_file} is not a run's saved config: expected a JSON object, got {type(saved).__name__}"
        )
    return saved


def _how_to_continue(out_dir: Path, cause: Exception) -> str:
    """How to go on once `cause` is mended: resume from the last finished epoch, or start again. A non-finite step
    would come back as it was (a resumed run replays it exactly), so that one needs a changed setting."""
    from student_trainer.teacher_client import TeacherAnswerError, TeacherUnavailable
    from student_trainer.train import NonFiniteStep

    if isinstance(cause, NonFiniteStep):
        when = "with a setting that does not diverge (a smaller lr, say: add --set lr=...)"
    elif isinstance(cause, TeacherUnavailable):
        when = "once the service is back" if (Path(out_dir) / "last.pt").exists() else "once the service is up"
    elif isinstance(cause, TeacherAnswerError):
        when = "once the teacher answers right"
    else:
        when = "once what the service refused is mended"
    if (Path(out_dir) / "last.pt").exists():
        return f"akd train: the last finished epoch is saved; {when}, continue with: akd train --resume {out_dir}"
    return f"akd train: no epoch of this run is saved yet; {when}, run the same command again"


def run_eval(args: argparse.Namespace) -> int:
    from student_trainer.evaluate import CheckpointEvaluation, describe_threat_model

    _setup_logging()
    attacks = [a.strip() for a in args.attacks.split(",") if a.strip()]
    try:
        if args.limit is not None:
            at_least(1, "--limit", args.limit)
        if args.autoattack_limit is not None:
            at_least(0, "--autoattack-limit", args.autoattack_limit, " (0: no AutoAttack)")
        # before the checkpoint loads, and well before the evaluation runs
        out = _eval_out(Path(args.out))
        job = CheckpointEvaluation.load(
            Path(args.checkpoint),
            attacks,
            args.sets,
            args.limit,
            autoattack_limit=args.autoattack_limit,
            autoattack_version=args.autoattack_version,
        )
    except (ConfigError, ValueError) as exc:
        print(f"akd eval: {exc}", file=sys.stderr)
        return 2
    origin = "the dataset's standard" if job.standard else "set with --set attack.*"
    print(f"threat model: {describe_threat_model(job.threat())} ({origin})", flush=True)
    # each progress line says how long this model has taken so far (the demo shows the last one)
    started = time.monotonic()
    report = job.run(
        out.with_suffix(".reliability.png"),
        progress=lambda text: logging.getLogger("akd.eval").info("%s (%.0fs)", text, time.monotonic() - started),
    )
    out.write_text(json.dumps(report, indent=2))
    print(format_table(report))
    print(f"wrote {out} and {out.with_suffix('.reliability.png')}")
    return 0


def at_least(least: int, flag: str, value: int, meaning: str = "") -> int:
    """A count given on the command line, refused below `least` with a ConfigError rather than passed on: `--limit 0`
    would evaluate nothing, and a negative count would slice the data from its end (`--limit -1`: every image but the
    last)."""
    if value < least:
        raise ConfigError(f"{flag} must be at least {least}{meaning}, got {value}")
    return value


def _eval_out(out: Path) -> Path:
    """`akd eval --out`: a file path, its folder made if missing (as most tools do). Checked, and the folder made,
    before the evaluation runs, so that its results always have somewhere to go."""
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; expected the path of a JSON file to write")
    existing_folder_or_new(out.parent, f"--out {out}: its folder")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--out {out}: cannot make its folder {out.parent}: {exc.strerror}") from None
    return out


def format_table(report: dict) -> str:
    rows = [
        ("clean accuracy", report["clean_acc"]),
        ("PGD accuracy", report.get("pgd_acc")),
        (f"AutoAttack accuracy ({report.get('autoattack_n')} images)", report.get("autoattack_acc")),
        ("ECE (clean)", report["ece"]),
        ("ECE (PGD)", report.get("ece_pgd")),
    ]
    a = report["attack"]
    lines = [
        f"{report['checkpoint']} on {report['dataset']} test ({report['n']} images), "
        f"{a['norm']} eps {a['eps']:.4g}, PGD-{a['steps']} step {a['step_size']:.4g}"
    ]
    lines.append(
        markdown_table(["metric", "value"], [[name, f"{value:.4f}"] for name, value in rows if value is not None])
    )
    return "\n".join(lines)


def add_compare_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", help="run folders (each with metrics.jsonl and dynamics.npz)")
    parser.add_argument("--out", required=True, help="folder for compare.md and curves.png")
    parser.add_argument(
        "--fraction", type=float, default=0.1, help="each run's hardest fraction of samples (default 0.1)"
    )


def run_compare(args: argparse.Namespace) -> int:
    """Training dynamics side by side: who forgets, who never learns, and how each ends on the hardest samples."""
    from student_trainer.dynamics import CorrectnessLog, compare_runs, summary_table
    from student_trainer.plots import read_metrics, training_curves

    runs = [Path(r) for r in args.runs]
    names = [r.name if [x.name for x in runs].count(r.name) == 1 else str(r) for r in runs]
    missing = [str(r / f) for r in runs for f in ("metrics.jsonl", "dynamics.npz") if not (r / f).exists()]
    if missing:
        print(f"akd compare: not run folders (missing {', '.join(missing)})", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logs = {name: CorrectnessLog.load(r / "dynamics.npz") for name, r in zip(names, runs)}
    try:
        tables = [summary_table(compare_runs(logs, kind, args.fraction)) for kind in ("adv", "clean")]
    except ValueError as exc:
        print(f"akd compare: {exc}", file=sys.stderr)
        return 2
    rows = []
    for name, r in zip(names, runs):
        evaluated = [m for m in read_metrics(r / "metrics.jsonl") if m.get("val_robust_acc") is not None]
        top = max(evaluated, key=lambda m: m["val_robust_acc"])
        rows.append([name, f"{top['val_robust_acc']:.4f}", str(top["epoch"]), f"{top['val_clean_acc']:.4f}"])
    best = [markdown_table(["run", "best val robust acc", "at epoch", "val clean acc there"], rows)]
    training_curves([r / "metrics.jsonl" for r in runs], out / "curves.png", labels=names)
    report = "\n".join(
        [
            "# Runs compared",
            "",
            *best,
            "",
            "## Adversarial training correctness",
            "",
            tables[0],
            "## Clean training correctness",
            "",
            tables[1],
            "![training curves](curves.png)",
            "",
        ]
    )
    (out / "compare.md").write_text(report)
    print(report)
    print(f"wrote {out / 'compare.md'} and {out / 'curves.png'}")
    return 0


def add_warm_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="the run TOML whose clean inputs to warm (dataset, split, teacher.url)")
    add_set_argument(parser, "override any config key, as for akd train (repeatable)")
    parser.add_argument("--batch-rows", type=int, default=512, help="rows per request (default 512)")


def run_warm(args: argparse.Namespace) -> int:
    from student_trainer.config import load_train_config
    from student_trainer.teacher_client import TeacherRequestError, TeacherUnavailable
    from student_trainer.warm import warm

    _setup_logging()
    try:
        rows = at_least(1, "--batch-rows", args.batch_rows)
        done = warm(load_train_config(args.config, args.sets), rows)
    except (ConfigError, TeacherUnavailable, TeacherRequestError, FileNotFoundError, ValueError) as exc:
        print(f"akd warm: {exc}", file=sys.stderr)
        return 2
    print(
        f"warmed {done.rows:,} rows in {done.seconds:.1f} s ({done.rows_per_s:,.0f} rows/s): {done.uploaded:,} "
        f"computed, {done.rows - done.uploaded:,} already cached"
    )
    return 0


# name: (add its arguments, run it); `akd` (akd/cli.py) names and describes them
COMMANDS = {
    "train": (add_train_arguments, run_train),
    "warm": (add_warm_arguments, run_warm),
    "eval": (add_eval_arguments, run_eval),
    "compare": (add_compare_arguments, run_compare),
}
