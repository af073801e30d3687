"""Training and evaluation as child processes, a few at a time, with what each is doing and an ETA.

Each job is a command line of the trainer (`python -m student_trainer train|eval ...`) writing its own log; a
failure stops the stage with the end of that log, and an interrupted stage leaves nothing running (a re-run
resumes training from its last epoch).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline import DemoError
from pipeline.plan import Plan
from student_trainer.config import EVAL_ATTACK, TrainConfig
from student_trainer.data import TEST_IMAGES, TRAIN_IMAGES, default_val_size


@dataclass
class Job:
    name: str
    argv: list[str]
    log: Path
    # a training run, whose metrics.jsonl shows its progress
    run_dir: Path | None = None
    epochs: int = 0
    # work per epoch (training) or per job (evaluation), in image passes: see `Work`
    passes_per_unit: float = 1.0

    def units(self) -> int:
        return self.epochs or 1

    def units_done(self, finished: bool) -> int:
        return epochs_done(self.run_dir) if self.epochs else int(finished)


# Rough forward+backward image passes of AutoAttack per image (100 iterations per attack; APGD-T tries 9 target classes,
# FAB-T 9, Square 5,000 forward-only queries): an upper bound, since attacks stop on images already broken.
AUTOATTACK_PASSES = {"apgd": 100 * (1 + 9), "standard": 100 * (1 + 9 + 9) + 5000 // 3}


@dataclass(frozen=True)
class Work:
    """The demo's work in one unit, image passes (a forward and backward pass of one image), for an overall ETA.

    Different architectures cost different amounts per pass, so the estimate is re-made from each stage's own measured
    rate; it is a guide to the order of magnitude, not a promise.
    """

    plan: Plan

    def epoch(self, run: TrainConfig) -> float:
        n_val = default_val_size(run.dataset) if run.val_size is None else run.val_size
        n_train = min(run.limit_train or TRAIN_IMAGES[run.dataset], TRAIN_IMAGES[run.dataset] - n_val)
        return n_train * (run.train_attack.steps + 1) + n_val * (run.val_attack.steps + 1) / run.eval.every

    def evaluation(self, dataset: str, autoattack: bool = True) -> float:
        n = min(self.plan.eval_limit or TEST_IMAGES[dataset], TEST_IMAGES[dataset])
        aa = min(self.plan.autoattack_limit, n) * AUTOATTACK_PASSES[self.plan.autoattack_version] if autoattack else 0
        # PGD, and the clean passes before and after it
        return n * (self.plan.eval_attack or EVAL_ATTACK).steps + 2 * n + aa


def say(text: str) -> None:
    print(text, flush=True)


def module(*args: str) -> list[str]:
    """A command line running one of the project's packages with this interpreter."""
    return [sys.executable, "-m", *args]


# prctl(2)
_PR_SET_PDEATHSIG = 1


def end_with_parent() -> None:
    """Run in the service's child before exec: Linux's parent-death signal ends it with the demo. Not given to the
    training jobs: a `preexec_fn` makes Popen fork through Python's at-fork hooks, and a SIGTERM landing in one of
    them is swallowed ("Exception ignored"), so the demo would run on."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@contextlib.contextmanager
def sigterm_deferred():
    """A SIGTERM that comes inside the block is handled as it ends. The demo's handler raises SystemExit wherever the
    main thread is; raised inside Popen after the fork, or before the new process is recorded, it would leave that job
    running on, unknown to the cleanup (a student trainer retrying a stopped service long after its demo ended).
    Python-level only: a blocked signal mask would be inherited by the job, which could then not be terminated."""
    # only the main thread gets Python's handlers
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    came = []
    handler = signal.signal(signal.SIGTERM, lambda signum, frame: came.append(signum))
    try:
        yield
    finally:
        # a handler of None was set outside Python: restore the default
        signal.signal(signal.SIGTERM, signal.SIG_DFL if handler is None else handler)
        if came:
            # to the handler the block deferred it from
            os.kill(os.getpid(), signal.SIGTERM)


def job_env(threads: int) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}


def last_progress(log: Path) -> str | None:
    """The last progress line `akd eval` (or AutoAttack) wrote to a job's log, e.g. "pgd 3/4 batches (12s)"."""
    if not log.exists():
        return None
    for line in reversed(log.read_text(errors="replace").splitlines()):
        for logger in (" akd.eval: ", " auto-attack: "):
            if logger in line:
                return line.split(logger, 1)[1].strip()
    return None


def job_progress(job: Job) -> str:
    """A training job's epochs, or where an evaluation is (attack and batch), from its log."""
    if job.epochs:
        return f"{job.name} epoch {epochs_done(job.run_dir)}/{job.epochs}"
    where = last_progress(job.log)
    return f"{job.name} ({where})" if where else job.name


def epochs_done(run_dir: Path | None) -> int:
    metrics = run_dir / "metrics.jsonl" if run_dir else None
    return len(metrics.read_text().splitlines()) if metrics and metrics.exists() else 0


def run_jobs(
    stage: str, jobs: list[Job], parallel: int, threads: int, later: float = 0.0, report_every_s: float = 15.0
) -> None:
    """Run jobs `parallel` at a time; show which are running, how far, this stage's ETA and the whole demo's (`later`:
    the work of the stages after this one, in Job.passes_per_unit's unit); fail loudly with the log's tail."""
    running: dict[str, tuple[Job, subprocess.Popen]] = {}
    try:
        _run_jobs(stage, jobs, parallel, threads, later, report_every_s, running)
    finally:
        # a failure, Ctrl-C or SIGTERM leaves no training running on: a re-run resumes it from its last epoch
        for _, proc in running.values():
            proc.terminate()
        for _, proc in running.values():
            proc.wait()


def _run_jobs(
    stage: str,
    jobs: list[Job],
    parallel: int,
    threads: int,
    later: float,
    report_every_s: float,
    running: dict[str, tuple[Job, subprocess.Popen]],
) -> None:
    pending, finished = list(jobs), set()
    started = last = time.monotonic()
    done = lambda: sum(j.units_done(j.name in finished) * j.passes_per_unit for j in jobs)  # noqa: E731
    total, at_start = sum(j.units() * j.passes_per_unit for j in jobs), done()
    while pending or running:
        while pending and len(running) < parallel:
            job = pending.pop(0)
            job.log.parent.mkdir(parents=True, exist_ok=True)
            # a started job is in `running` before it unwinds
            with open(job.log, "ab") as log, sigterm_deferred():
                running[job.name] = (
                    job,
                    subprocess.Popen(job.argv, stdout=log, stderr=subprocess.STDOUT, env=job_env(threads)),
                )
            say(f"[{stage}] started {job.name} (log: {job.log})")
        time.sleep(0.5)
        for name, (job, proc) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[name]
            if proc.returncode != 0:
                tail = "\n".join(job.log.read_text(errors="replace").splitlines()[-15:])
                raise DemoError(f"[{stage}] {name} failed with exit code {proc.returncode}; end of {job.log}:\n{tail}")
            finished.add(name)
            say(f"[{stage}] finished {name} ({len(finished)}/{len(jobs)})")
        if running and time.monotonic() - last >= report_every_s:
            last = time.monotonic()
            progress = [job_progress(j) for j, _ in running.values()]
            elapsed = time.monotonic() - started
            say(
                f"[{stage}] {len(finished)}/{len(jobs)} done; running: {', '.join(progress)}; {elapsed / 60:.1f} min"
                + eta_text(done() - at_start, elapsed, total - done(), later)
            )


# The share of a stage's work done before it shows an ETA: evaluations count only when they end, and a cheap one
# ending first says little.
ETA_AFTER = 0.05


def eta_text(work_done: float, elapsed: float, stage_left: float, later: float) -> str:
    """ ", ETA 4.0 min (whole demo ~25 min)" from the rate measured so far in this stage; "" until ETA_AFTER of the
    stage's work is done."""
    if work_done <= ETA_AFTER * (work_done + stage_left):
        return ""
    rate = work_done / elapsed
    text = f", ETA {stage_left / rate / 60:.1f} min"
    return text + (f" (whole demo ~{(stage_left + later) / rate / 60:.0f} min)" if later else "")
