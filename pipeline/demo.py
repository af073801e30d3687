"""The demo's stages, each also runnable alone (that is how docker compose runs them, one service each):

  teachers  train the robust teachers (PGD-AT seeds and a weakly trained one), then write the
            service config serving their early-stopped checkpoints (best.pt: highest
            validation PGD accuracy), as an ensemble and one by one
  serve     run the teacher service on that config (with its zarr cache)
  students  train every student for every seed, concurrently, against the one service
  evaluate  clean, PGD and AutoAttack accuracy and ECE of every teacher and student, all under the
            plan's one evaluation threat model (`eval_attack`), whatever each was trained with
  report    RESULTS.md, results.json, the pictures; prints the table

Everything lands in one output folder (layout.Layout); a re-run reuses finished runs and evaluations
(and resumes interrupted runs) unless --fresh.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
from pydantic import ValidationError

from pipeline import DemoError
from pipeline.health import free_port, wait_healthy
from pipeline.jobs import Job, Work, end_with_parent, epochs_done, job_env, module, run_jobs, say
from pipeline.layout import Layout, PlanRecord, add_stage_time, merge_service_stats, prepare_out, update_json
from pipeline.plan import ENSEMBLE, LAST, Plan, PlannedTeacher, relative_to_file, write_toml
from shared.checkpoint import load_checkpoint
from shared.configfile import ConfigError, merged, read_toml
from shared.protocol import METRICS_PATH
from student_trainer.config import EVAL_ATTACK, AttackConfig, TrainConfig
from teacher_service import scrape

STAGES = ("teachers", "serve", "students", "evaluate", "report")

# Each run is evaluated twice: its best-validation checkpoint (what early stopping keeps; teachers are served from it)
# and its final epoch (the paper's point: what a run that trains to the end is left with).
EVALUATED = {"best.pt": "eval.json", "last.pt": "eval-final.json"}
# AutoAttack, the costly part, runs where the claims look: a student's final epoch, a teacher's early-stopped (served)
# checkpoint. Keyed by "is it a teacher".
AUTOATTACKED = {False: "last.pt", True: "best.pt"}


class Demo:
    def __init__(self, plan: Plan, out: Path, command: str):
        self.plan, self.layout, self.command = plan, Layout(out), command

    def write_run_config(
        self, run_dir: Path, run: PlannedTeacher, seed: int | None = None, teacher: dict | None = None
    ) -> Path:
        # out_dir: the folder of run.toml itself
        raw = self.plan.raw_run(run, out_dir=".", seed=seed, teacher=teacher)
        TrainConfig.model_validate(raw)
        return write_toml(run_dir / "run.toml", raw)

    def train_job(self, name: str, run_dir: Path, config: Path) -> Job | None:
        """None when the run is complete; a resume when it was interrupted."""
        run = TrainConfig.model_validate(read_toml(config))
        done = epochs_done(run_dir) if (run_dir / "last.pt").exists() else 0
        if done >= run.epochs:
            return None
        resume = ["--resume", str(run_dir)] if (run_dir / "last.pt").exists() else []
        argv = module("student_trainer", "train", "--config", str(config), *resume)
        return Job(name, argv, run_dir / "train.log", run_dir, run.epochs, Work(self.plan).epoch(run))

    def training_jobs(self, stage: str, runs) -> list[Job]:
        """Jobs for the runs (name, run_dir, config) still to do; finished runs are reused."""
        jobs = []
        for name, run_dir, config in runs:
            job = self.train_job(name, run_dir, config)
            if job:
                jobs.append(job)
            else:
                say(f"[{stage}] reusing {run_dir}")
        return jobs

    # -- teachers ---------------------------------------------------------------------------

    def stage_teachers(self) -> None:
        runs = (
            (f"teacher {teacher.name}", run_dir, self.write_run_config(run_dir, teacher))
            for teacher in self.plan.teachers
            for run_dir in [self.layout.teacher(teacher.name)]
        )
        jobs = self.training_jobs("teachers", runs)
        say(f"== teachers: {len(jobs)} to train, {self.plan.jobs} at a time ==")
        run_jobs(
            "teachers",
            jobs,
            self.plan.jobs,
            self.plan.threads_per_job,
            later=self.students_left() + self.evaluations_left(),
        )
        self.write_service_config()

    def write_service_config(self) -> None:
        """The teachers as served_teacher_names says: early-stopped (best.pt) and last-epoch (last.pt), together and
        alone."""
        file = self.layout.service_config
        names = self.plan.teacher_names
        # the checkpoint knows its classes and input shape
        first = load_checkpoint(self.layout.teacher(names[0]) / "best.pt")
        shape = {"num_classes": first.num_classes, "input_shape": list(first.input_shape)}
        teachers = {}
        for suffix, checkpoint in (("", "best.pt"), (LAST, "last.pt")):
            members = {
                name: {"path": relative_to_file(self.layout.teacher(name) / checkpoint, file), "weight": 1.0}
                for name in names
            }
            teachers[ENSEMBLE + suffix] = {**shape, "members": list(members.values())}
            teachers.update({name + suffix: {**shape, "members": [m]} for name, m in members.items()})
        # the cache's folder only: host and port are chosen when it is served
        server = merged(self.plan.service, {"cache": {"dir": relative_to_file(self.layout.cache, file)}})
        write_toml(file, {"server": server, "teachers": teachers})
        for name in names:
            chosen = json.loads((self.layout.teacher(name) / "config.json").read_text())
            best = best_epoch(self.layout.teacher(name))
            say(
                f"[teachers] {name}: early-stopped at epoch {best['epoch']}/{chosen['epochs']} "
                f"(validation PGD accuracy {best['val_robust_acc']:.3f})"
            )

    # -- serve ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def service(self):
        """The teacher service as its own process on a free loopback port; yields its URL."""
        port = free_port()
        log = self.layout.service_log
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                module("teacher_service", "--config", str(self.layout.service_config), "--port", str(port)),
                stdout=out,
                stderr=subprocess.STDOUT,
                env=job_env(self.plan.threads_per_job),
                preexec_fn=_own_session_ending_with_parent,
            )
        url = f"http://127.0.0.1:{port}"
        try:
            try:
                # long enough for a slow start: only a hang runs past it
                wait_healthy(url, alive=lambda: proc.poll() is None, timeout_s=600)
            except (RuntimeError, TimeoutError) as exc:
                raise DemoError(f"{exc}; see {log}") from None
            say(f"[serve] teacher service up at {url} (log: {log})")
            try:
                yield url
            finally:
                # also when a student failed: the rows this service served are part of the total
                try:
                    # a service started here counts from zero
                    self.save_service_stats(url, cumulative=False)
                except httpx.HTTPError as exc:
                    say(
                        f"[serve] could not read the service's stats ({exc}); {self.layout.service_stats} keeps its "
                        "record"
                    )
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
            say("[serve] teacher service stopped")

    def save_service_stats(self, url: str, cumulative: bool) -> None:
        """Fold the service's counters into service/stats.json (merge_service_stats says how; a service that served
        nothing changes nothing)."""
        text = httpx.get(url + METRICS_PATH, timeout=30).text
        stats = {
            "rows": scrape.total(text, "akd_rows_total"),
            "hits": scrape.total(text, "akd_cache_hits_total"),
            "misses": scrape.total(text, "akd_cache_misses_total"),
            "largest_batch": scrape.largest(text, "akd_batch_rows_max"),
        }
        update_json(self.layout.service_stats, lambda old: merge_service_stats(old, stats, cumulative))

    # -- students ---------------------------------------------------------------------------

    def stage_students(self, teacher_url: str, seeds: list[int] | None = None) -> None:
        """Every student of the plan for `seeds` (the plan's seeds they name; all by default)."""

        def runs():
            # every seed of one student before the next: the plan's first comparisons finish first
            for student in self.plan.students:
                for seed in [s for s in self.plan.seeds if seeds is None or s in seeds]:
                    run_dir = self.layout.student(student.name, seed)
                    teacher = {"url": teacher_url, "name": student.uses} if student.uses else None
                    yield (
                        f"student {student.name} seed {seed}",
                        run_dir,
                        self.write_run_config(run_dir, student, seed, teacher),
                    )

        jobs = self.training_jobs("students", runs())
        say(f"== students: {len(jobs)} to train against {teacher_url}, {self.plan.jobs} at a time ==")
        run_jobs("students", jobs, self.plan.jobs, self.plan.threads_per_job, later=self.evaluations_left())

    def students_left(self) -> float:
        """The students' training still to do, in Work's unit (finished epochs of interrupted runs count as done)."""
        left = 0.0
        for student in self.plan.students:
            run = self.plan.train_config(student)
            epochs = sum(run.epochs - epochs_done(self.layout.student(student.name, seed)) for seed in self.plan.seeds)
            left += epochs * Work(self.plan).epoch(run)
        return left

    # -- evaluate ---------------------------------------------------------------------------

    def evaluations_left(self) -> float:
        missing = [out for run_dir in self.all_runs() for out in EVALUATED.values() if not (run_dir / out).exists()]
        work = Work(self.plan)
        dataset = self.plan.dataset
        # AutoAttack runs in one of each run's two evaluations (AUTOATTACKED)
        return len(missing) / 2 * (work.evaluation(dataset, autoattack=False) + work.evaluation(dataset))

    def teacher_runs(self) -> list[Path]:
        return [self.layout.teacher(name) for name in self.plan.teacher_names]

    def all_runs(self) -> list[Path]:
        students = [self.layout.student(s.name, seed) for seed in self.plan.seeds for s in self.plan.students]
        return self.teacher_runs() + students

    def eval_attack(self) -> AttackConfig:
        """The plan's one evaluation threat model, spelled out (eps, step size) for [common]'s dataset.

        Its norm and eps default to [common]'s training attack, not to each run's: the weak teacher (trained at
        half the radius) is measured at the same radius as everyone else.
        """
        trained = {k: v for k, v in (self.plan.common.get("attack") or {}).items() if k in ("norm", "eps")}
        chosen = (
            self.plan.eval_attack.model_dump(include=self.plan.eval_attack.model_fields_set)
            if self.plan.eval_attack
            else {}
        )
        return EVAL_ATTACK.model_copy(update={**trained, **chosen}).resolved(self.plan.dataset)

    def stage_evaluate(self) -> None:
        from student_trainer.evaluate import describe_threat_model, threat_model

        wanted = self.eval_attack().model_dump()
        unfinished = [run_dir for run_dir in self.all_runs() if not trained(run_dir)]
        # a plan run in parts: evaluate what is trained, and say what is not
        if unfinished:
            say(f"[evaluate] not trained yet, so not evaluated: {', '.join(r.name for r in unfinished)}")
        jobs = [
            job
            for run_dir in self.all_runs()
            if run_dir not in unfinished
            for job in self.evaluation_jobs(run_dir, wanted)
        ]
        plan = self.plan
        threat = describe_threat_model(
            threat_model(wanted, plan.autoattack_limit or None, False, plan.autoattack_version)
        )
        attacked = "the students' final" + (" and the teachers' early-stopped" if plan.autoattack_teachers else "")
        say(
            f"== evaluate: {len(jobs)} evaluations (each model's best-validation and final epoch; AutoAttack on "
            f"{attacked}), all under {threat}; {plan.jobs} at a time =="
        )
        run_jobs("evaluate", jobs, plan.jobs, plan.threads_per_job)

    def evaluation_jobs(self, run_dir: Path, wanted: dict) -> list[Job]:
        """`akd eval` of a run's best-validation and final checkpoints, where no current evaluation exists."""
        plan = self.plan
        # --set takes TOML values: json.dumps spells these numbers, strings and booleans as TOML does
        sets = [arg for key, value in wanted.items() for arg in ("--set", f"attack.{key}={json.dumps(value)}")]
        limit = ["--limit", str(plan.eval_limit)] if plan.eval_limit else []
        autoattack = ["--autoattack-limit", str(plan.autoattack_limit), "--autoattack-version", plan.autoattack_version]
        jobs = []
        for checkpoint, out in EVALUATED.items():
            out = run_dir / out
            teacher = run_dir in self.teacher_runs()
            with_aa = (
                bool(plan.autoattack_limit)
                and checkpoint == AUTOATTACKED[teacher]
                and (plan.autoattack_teachers or not teacher)
            )
            aa_limit = plan.autoattack_limit if with_aa else None
            if evaluation_current(out, run_dir / checkpoint, wanted, plan.autoattack_version, aa_limit):
                continue
            argv = module(
                "student_trainer",
                "eval",
                "--checkpoint",
                str(run_dir / checkpoint),
                "--attacks",
                "clean,pgd,autoattack" if with_aa else "clean,pgd",
                *autoattack,
                *sets,
                *limit,
                "--out",
                str(out),
            )
            # for the ETA
            cost = Work(plan).evaluation(plan.dataset, with_aa)
            jobs.append(Job(f"eval {run_dir.name} {checkpoint}", argv, out.with_suffix(".log"), passes_per_unit=cost))
        return jobs

    # -- report -----------------------------------------------------------------------------

    def stage_report(self) -> str:
        from pipeline.report import ReportInputs, write_report

        return write_report(ReportInputs(plan=self.plan, layout=self.layout, command=self.command))


def _own_session_ending_with_parent() -> None:
    """Run in the service's child before exec. Its own session: Ctrl-C or `timeout` signal the demo's process group,
    and the demo must still read the service's stats before it stops it. Yet it ends with the demo if that is killed
    outright (Linux's parent-death signal), so no service outlives its demo."""
    os.setsid()
    end_with_parent()


def evaluation_current(
    eval_json: Path, checkpoint: Path, attack: dict, autoattack_version: str, autoattack_limit: int | None
) -> bool:
    """Whether an existing evaluation is of this checkpoint as it is now, under this threat model and AutoAttack
    (`autoattack_limit`: the plan's image bound, None where this evaluation runs no AutoAttack): one made under
    another (an older plan, another AutoAttack image count) or of an older checkpoint is redone, not mixed in.

    AutoAttack runs on the first min(limit, evaluated images) images, so its recorded count says which limit made it.
    """
    try:
        if eval_json.stat().st_mtime < checkpoint.stat().st_mtime:
            return False
        record = json.loads(eval_json.read_text())
        recorded = record.get("attack") or {}
    except (OSError, ValueError):
        return False
    aa = recorded.get("autoattack")
    if (aa is not None) != (autoattack_limit is not None):
        return False
    if aa is not None and (
        aa.get("version") != autoattack_version or aa.get("n") != min(autoattack_limit, record.get("n", 0))
    ):
        return False
    return all(recorded.get(key) == value for key, value in attack.items())


def trained(run_dir: Path) -> bool:
    """Whether a run has trained, and committed, every epoch its run.toml asks for (the trainer appends an epoch's
    metrics line first and commits the epoch by writing last.pt after it, so a newer last.pt means it is done)."""
    try:
        epochs = TrainConfig.model_validate(read_toml(run_dir / "run.toml")).epochs
        committed = (run_dir / "last.pt").stat().st_mtime >= (run_dir / "metrics.jsonl").stat().st_mtime
    except (OSError, ConfigError, ValidationError):
        return False
    return committed and epochs_done(run_dir) >= epochs


def best_epoch(run_dir: Path) -> dict:
    """The metrics line of a run's best validation PGD accuracy: the epoch early stopping kept."""
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return max((m for m in metrics if m.get("val_robust_acc") is not None), key=lambda m: m["val_robust_acc"])


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)


def run_demo(
    plan: Plan,
    out: Path,
    stages: list[str],
    fresh: bool,
    teacher_url: str | None,
    seeds: list[int] | None,
    command: str,
    made_by: PlanRecord,
    force: bool = False,
) -> str | None:
    """The stages asked for, in order, on `out` made this plan's first (layout.prepare_out: a folder another plan
    made is refused before any work); the report's table when the report stage ran."""
    prepare_out(out, fresh, made_by, force)
    demo = Demo(plan, out, command)
    say(f"akd demo -> {out} (stages: {', '.join(stages)})")
    # SIGTERM (kill, docker stop) ends the demo the way Ctrl-C does: the running jobs and the service stop, and the
    # stage's time and the service's counts are recorded; without this, Python dies at once and the jobs run on,
    # orphaned.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)

    @contextlib.contextmanager
    def timed(stage: str):
        started = time.monotonic()
        try:
            yield
        finally:
            # a failed or interrupted stage's time counts too: its finished runs are reused, not redone
            add_stage_time(demo.layout, stage, time.monotonic() - started)

    if "teachers" in stages:
        with timed("teachers"):
            demo.stage_teachers()
    if "students" in stages:
        with timed("students"):
            if teacher_url:
                demo.stage_students(teacher_url, seeds)
                # an external service's counters run since it started, across trainers
                demo.save_service_stats(teacher_url, cumulative=True)
            else:
                with demo.service() as url:
                    demo.stage_students(url, seeds)
    if "evaluate" in stages:
        with timed("evaluate"):
            demo.stage_evaluate()
    if "report" in stages:
        # its own seconds are not counted: the report is written before they end
        return demo.stage_report()
    return None


def serve_stage(out: Path, host: str, port: int) -> int:
    """The compose `teacher` service: serve the config the teachers stage wrote, in the foreground."""
    config = Layout(out).service_config
    if not config.exists():
        raise DemoError(f"{config} does not exist: run the teachers stage first")
    from teacher_service.cli import add_arguments, run

    # `akd serve`'s own arguments and defaults; `akd demo` has set the allocator up already
    parser = argparse.ArgumentParser(prog="akd serve")
    add_arguments(parser)
    return run(parser.parse_args(["--config", str(config), "--host", host, "--port", str(port)]))
