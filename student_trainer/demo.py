"""`akd demo`: the paper's pipeline end to end, as separate processes sharing one teacher service.

Stages, each also runnable alone (that is how docker compose runs them, one service each):

  teachers  train the robust teachers (PGD-AT seeds and a weakly trained one), then write the
            service config serving their early-stopped checkpoints (best.pt: highest
            validation PGD accuracy), as an ensemble and one by one
  serve     run the teacher service on that config (with its zarr cache)
  students  train every student for every seed, concurrently, against the one service
  evaluate  clean, PGD and AutoAttack accuracy and ECE of every teacher and student, all under the
            plan's one evaluation threat model (`eval_attack`), whatever each was trained with
  report    RESULTS.md, results.json, the pictures; prints the table

Everything lands in one output folder; a re-run reuses finished runs and evaluations
(and resumes interrupted runs) unless --fresh. What a stage measured stays on disk for the report of
any later invocation: service/stats.json (merge_service_stats) and stages.json (add_stage_time).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated, Literal

import httpx
import tomli_w
import tomllib
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from shared.atomic import replaced_atomically
from shared.checkpoint import load_checkpoint
from shared.configfile import ConfigError, read_toml, validation_error
from shared.health import free_port, wait_healthy
from student_trainer.config import DISTILLATION_METHODS, EVAL_ATTACK, AttackConfig, TrainConfig, apply_sets, resolve_file_paths
from student_trainer.data import TEST_IMAGES, TRAIN_IMAGES, default_val_size

STAGES = ("teachers", "serve", "students", "evaluate", "report")
MARKER = ".akd-demo"
ENSEMBLE = "ensemble"
LAST = "-last"


class DemoConfig(BaseModel):
    """The demo's plan: runs as TrainConfig tables ([common] first, then each run's own keys)."""

    model_config = ConfigDict(extra="forbid")
    seeds: Annotated[list[int], Field(min_length=1)]
    jobs: Annotated[int, Field(ge=1)] = 2
    threads_per_job: Annotated[int, Field(ge=1)] = 1
    autoattack_limit: Annotated[int, Field(ge=0)] = 100
    autoattack_version: Literal["standard", "apgd"] = "standard"  # apgd: the APGD-CE + APGD-T subset (cheap enough for 500+ images on a CPU)
    eval_limit: Annotated[int, Field(ge=1)] | None = None
    # The one threat model every teacher and student is evaluated under; keys left out come from the standard
    # evaluation attack (config.EVAL_ATTACK: PGD-10), except norm and eps, which default to [common]'s training attack.
    eval_attack: AttackConfig | None = None
    # The service's [server] settings beyond where it listens and caches, e.g. { autocast = "bf16", max_batch_rows = 1024 }.
    service: dict = {}
    common: dict = {}
    teachers: Annotated[list[dict], Field(min_length=1)]
    students: Annotated[list[dict], Field(min_length=1)]

    @model_validator(mode="after")
    def _runs_are_valid(self) -> DemoConfig:
        names = [r.get("name") for r in self.teachers + self.students]
        if None in names or len(set(names)) != len(names):
            raise ValueError(f"every teacher and student needs a unique `name`, got {names}")
        served = set(served_teacher_names([t["name"] for t in self.teachers]))
        for student in self.students:
            uses = student.get("uses")
            if (uses is not None) != (student.get("method") in DISTILLATION_METHODS):
                raise ValueError(f"student {student['name']!r}: distillation methods need `uses`, the others must not have it")
            if uses is not None and uses not in served:
                raise ValueError(f"student {student['name']!r} uses {uses!r}; served teachers: {sorted(served)}")
        _check_service_settings(self.service)
        for run in self.teachers + self.students:
            planned_run(self.common, run)
        return self


def _check_service_settings(settings: dict) -> None:
    from teacher_service.config import ServerConfig

    taken = sorted({"cache_dir", "host", "port"} & set(settings))
    if taken:
        raise ValueError(f"[service] cannot set {', '.join(taken)}: the demo chooses where the service listens and caches")
    ServerConfig.model_validate(settings)


def served_teacher_names(teachers: list[str]) -> list[str]:
    """What the service serves: the early-stopped checkpoints (best.pt) as `ensemble` and one by one, and the last
    epochs' (last.pt) as `ensemble-last` and `<name>-last`, for the early-stopped vs last-epoch comparison."""
    return [ENSEMBLE, *teachers, ENSEMBLE + LAST, *(name + LAST for name in teachers)]


def planned_run(common: dict, spec: dict) -> TrainConfig:
    """A run of the plan as a validated TrainConfig, before any service exists (a placeholder stands in for its URL)."""
    teacher = {"url": "http://127.0.0.1:1", "name": spec["uses"]} if spec.get("uses") else None
    return TrainConfig.model_validate(merge(common, {**strip(spec), "teacher": teacher}))


def strip(run: dict) -> dict:
    return {k: v for k, v in run.items() if k not in ("name", "uses")}


def merge(base: dict, top: dict) -> dict:
    """Deep merge of TOML tables: `top` wins, sub-tables merge."""
    merged = dict(base)
    for key, value in top.items():
        merged[key] = merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return {k: v for k, v in merged.items() if v is not None}


# The built-in plans (`akd demo --plan NAME`), in student_trainer/presets/.
PLANS = {"default": "demo.toml", "quick": "demo-quick.toml", "overfit": "demo-overfit.toml", "cifar10": "demo-cifar10.toml"}


def load_demo_config(path: str | Path | None, plan: str = "default", sets: list[str] | None = None) -> DemoConfig:
    """A plan file, or the built-in plan named `plan`; `--set key=value` on top (e.g. common.data_dir=..., common.epochs=1)."""
    if path is None:
        if plan not in PLANS:
            raise ConfigError(f"unknown plan {plan!r}; built-in plans: {', '.join(PLANS)} (or --config your-plan.toml)")
        text = resources.files("student_trainer.presets").joinpath(PLANS[plan]).read_text()
        raw, source = tomllib.loads(text), f"plan {plan} ({PLANS[plan]})"
        _resolve_plan_paths(raw, Path.cwd())  # a built-in plan's relative paths (cifar10's data_dir) mean the user's folder
    else:
        raw, source = read_toml(path), str(path)
        _resolve_plan_paths(raw, Path(path).resolve().parent)
    raw = apply_sets(raw, sets or [], Path.cwd())
    try:
        return DemoConfig.model_validate(raw)
    except ValidationError as exc:
        raise validation_error(exc, source) from None


def _resolve_plan_paths(raw: dict, base: Path) -> None:
    """Paths written in a plan file mean the plan's folder, as in every other config file."""
    for table in [raw.get("common"), *(raw.get("teachers") or []), *(raw.get("students") or [])]:
        if isinstance(table, dict):
            resolve_file_paths(table, base)


def relative_to_file(target: Path, file: Path) -> str:
    """`target` as a path relative to `file`'s folder: a generated config stays right when its folder moves."""
    return os.path.relpath(target, file.parent)


def write_toml(path: Path, raw: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# Written by akd demo. Relative paths resolve against this file's folder.\n" + tomli_w.dumps(raw))
    return path


@dataclass(frozen=True)
class Layout:
    """Where everything lives inside the demo's output folder."""

    root: Path  # absolute: subprocesses and generated files must not depend on a working directory

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(os.path.abspath(self.root)))

    def teacher(self, name: str) -> Path:
        return self.root / "teachers" / name

    def student(self, name: str, seed: int) -> Path:
        return self.root / "students" / f"{name}-s{seed}"

    @property
    def service_config(self) -> Path:
        return self.root / "service" / "teachers.toml"

    @property
    def cache(self) -> Path:
        return self.root / "service" / "cache"

    @property
    def service_stats(self) -> Path:
        return self.root / "service" / "stats.json"

    @property
    def stage_times(self) -> Path:
        return self.root / "stages.json"


class DemoError(RuntimeError):
    pass


# -- running processes ---------------------------------------------------------------------


@dataclass
class Job:
    name: str
    argv: list[str]
    log: Path
    run_dir: Path | None = None  # a training run, whose metrics.jsonl shows its progress
    epochs: int = 0
    passes_per_unit: float = 1.0  # work per epoch (training) or per job (evaluation), in image passes: see `Work`

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

    cfg: DemoConfig

    def epoch(self, run: TrainConfig) -> float:
        n_val = default_val_size(run.dataset) if run.val_size is None else run.val_size
        n_train = min(run.limit_train or TRAIN_IMAGES[run.dataset], TRAIN_IMAGES[run.dataset] - n_val)
        return n_train * (run.train_attack.steps + 1) + n_val * (run.val_attack.steps + 1) / run.eval.every

    def evaluation(self, dataset: str, autoattack: bool = True) -> float:
        n = min(self.cfg.eval_limit or TEST_IMAGES[dataset], TEST_IMAGES[dataset])
        aa = min(self.cfg.autoattack_limit, n) * AUTOATTACK_PASSES[self.cfg.autoattack_version] if autoattack else 0
        return n * (self.cfg.eval_attack or EVAL_ATTACK).steps + 2 * n + aa  # PGD, and the clean passes before and after it


def say(text: str) -> None:
    print(text, flush=True)


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


def run_jobs(stage: str, jobs: list[Job], parallel: int, threads: int, later: float = 0.0, report_every_s: float = 15.0) -> None:
    """Run jobs `parallel` at a time; show which are running, how far, this stage's ETA and the whole demo's (`later`:
    the work of the stages after this one, in Job.passes_per_unit's unit); fail loudly with the log's tail."""
    running: dict[str, tuple[Job, subprocess.Popen]] = {}
    try:
        _run_jobs(stage, jobs, parallel, threads, later, report_every_s, running)
    finally:  # a failure, Ctrl-C or SIGTERM leaves no training running on: a re-run resumes it from its last epoch
        for _, proc in running.values():
            proc.terminate()
        for _, proc in running.values():
            proc.wait()


def _run_jobs(stage: str, jobs: list[Job], parallel: int, threads: int, later: float, report_every_s: float,
              running: dict[str, tuple[Job, subprocess.Popen]]) -> None:
    pending, finished = list(jobs), set()
    started = last = time.monotonic()
    done = lambda: sum(j.units_done(j.name in finished) * j.passes_per_unit for j in jobs)  # noqa: E731
    total, at_start = sum(j.units() * j.passes_per_unit for j in jobs), done()
    while pending or running:
        while pending and len(running) < parallel:
            job = pending.pop(0)
            job.log.parent.mkdir(parents=True, exist_ok=True)
            with open(job.log, "ab") as log:
                running[job.name] = (job, subprocess.Popen(job.argv, stdout=log, stderr=subprocess.STDOUT, env=job_env(threads)))
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
            say(f"[{stage}] {len(finished)}/{len(jobs)} done; running: {', '.join(progress)}; {elapsed / 60:.1f} min"
                + eta_text(done() - at_start, elapsed, total - done(), later))


ETA_AFTER = 0.05  # of a stage's work done: evaluations count only when they end, and a cheap one ending first says little


def eta_text(work_done: float, elapsed: float, stage_left: float, later: float) -> str:
    """", ETA 4.0 min (whole demo ~25 min)" from the rate measured so far in this stage; nothing before ETA_AFTER of it."""
    if work_done <= ETA_AFTER * (work_done + stage_left):
        return ""
    rate = work_done / elapsed
    text = f", ETA {stage_left / rate / 60:.1f} min"
    return text + (f" (whole demo ~{(stage_left + later) / rate / 60:.0f} min)" if later else "")


def module(*args: str) -> list[str]:
    return [sys.executable, "-m", *args]


# -- stages --------------------------------------------------------------------------------


class Demo:
    def __init__(self, cfg: DemoConfig, out: Path, command: str):
        self.cfg, self.layout, self.command = cfg, Layout(out), command

    def write_run_config(self, run_dir: Path, spec: dict, seed: int | None = None, teacher: dict | None = None) -> Path:
        raw = merge(self.cfg.common, strip(spec))
        raw["out_dir"] = "."  # the folder of run.toml itself
        if seed is not None:
            raw["seed"] = seed
        if teacher is not None:
            raw["teacher"] = teacher
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
        return Job(name, argv, run_dir / "train.log", run_dir, run.epochs, Work(self.cfg).epoch(run))

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

    def stage_teachers(self) -> None:
        runs = ((f"teacher {spec['name']}", run_dir, self.write_run_config(run_dir, spec))
                for spec in self.cfg.teachers for run_dir in [self.layout.teacher(spec["name"])])
        jobs = self.training_jobs("teachers", runs)
        say(f"== teachers: {len(jobs)} to train, {self.cfg.jobs} at a time ==")
        run_jobs("teachers", jobs, self.cfg.jobs, self.cfg.threads_per_job, later=self.students_left() + self.evaluations_left())
        self.write_service_config()

    def write_service_config(self) -> None:
        """The teachers as served_teacher_names says: early-stopped (best.pt) and last-epoch (last.pt), together and alone."""
        file = self.layout.service_config
        names = [t["name"] for t in self.cfg.teachers]
        first = load_checkpoint(self.layout.teacher(names[0]) / "best.pt")  # the checkpoint knows its classes and input shape
        shape = {"num_classes": first.num_classes, "input_shape": list(first.input_shape)}
        teachers = {}
        for suffix, checkpoint in (("", "best.pt"), (LAST, "last.pt")):
            members = {name: {"path": relative_to_file(self.layout.teacher(name) / checkpoint, file), "weight": 1.0} for name in names}
            teachers[ENSEMBLE + suffix] = {**shape, "members": list(members.values())}
            teachers.update({name + suffix: {**shape, "members": [m]} for name, m in members.items()})
        server = {**self.cfg.service, "cache_dir": relative_to_file(self.layout.cache, file)}  # host, port: when served
        config = {"server": server, "teachers": teachers}
        write_toml(file, config)
        for name in names:
            chosen = json.loads((self.layout.teacher(name) / "config.json").read_text())
            best = _best_epoch(self.layout.teacher(name))
            say(f"[teachers] {name}: early-stopped at epoch {best['epoch']}/{chosen['epochs']} "
                f"(validation PGD accuracy {best['val_robust_acc']:.3f})")

    @contextlib.contextmanager
    def service(self):
        """The teacher service as its own process on a free loopback port; yields its URL."""
        port = free_port()
        log = self.layout.root / "service" / "service.log"
        with open(log, "ab") as out:
            proc = subprocess.Popen(module("teacher_service", "--config", str(self.layout.service_config), "--port", str(port)),
                                    stdout=out, stderr=subprocess.STDOUT, env=job_env(self.cfg.threads_per_job),
                                    preexec_fn=_own_session_ending_with_parent)
        url = f"http://127.0.0.1:{port}"
        try:
            try:
                wait_healthy(url, alive=lambda: proc.poll() is None, timeout_s=600)  # a hang, not a slow start
            except (RuntimeError, TimeoutError) as exc:
                raise DemoError(f"{exc}; see {log}") from None
            say(f"[serve] teacher service up at {url} (log: {log})")
            try:
                yield url
            finally:  # also when a student failed: the rows this session served are part of the total
                try:
                    self.save_service_stats(url, cumulative=False)  # a service started here counts from zero
                except httpx.HTTPError as exc:
                    say(f"[serve] could not read the service's stats ({exc}); {self.layout.service_stats} keeps its record")
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
            say("[serve] teacher service stopped")

    def save_service_stats(self, url: str, cumulative: bool) -> None:
        """Fold the service's counters into service/stats.json (merge_service_stats says how; a session that served nothing changes nothing)."""
        text = httpx.get(f"{url}/metrics", timeout=30).text
        stats = {"rows": _metric_sum(text, "akd_rows_total"), "hits": _metric_sum(text, "akd_cache_hits_total"),
                 "misses": _metric_sum(text, "akd_cache_misses_total"), "largest_batch": _metric_max(text, "akd_batch_rows_max")}
        update_json(self.layout.service_stats, lambda old: merge_service_stats(old, stats, cumulative))

    def stage_students(self, teacher_url: str, seeds: list[int] | None = None) -> None:
        """Every student of the plan for `seeds` (the plan's seeds they name; all by default)."""
        def runs():
            for spec in self.cfg.students:  # every seed of one student before the next: the plan's first comparisons finish first
                for seed in [s for s in self.cfg.seeds if seeds is None or s in seeds]:
                    run_dir = self.layout.student(spec["name"], seed)
                    teacher = {"url": teacher_url, "name": spec["uses"]} if spec.get("uses") else None
                    yield f"student {spec['name']} seed {seed}", run_dir, self.write_run_config(run_dir, spec, seed, teacher)

        jobs = self.training_jobs("students", runs())
        say(f"== students: {len(jobs)} to train against {teacher_url}, {self.cfg.jobs} at a time ==")
        run_jobs("students", jobs, self.cfg.jobs, self.cfg.threads_per_job, later=self.evaluations_left())

    def dataset(self) -> str:
        return TrainConfig.model_validate({**self.cfg.common, "method": "standard", "teacher": None}).dataset

    def students_left(self) -> float:
        """The students' training still to do, in Work's unit (finished epochs of interrupted runs count as done)."""
        left = 0.0
        for spec in self.cfg.students:
            run = planned_run(self.cfg.common, spec)
            left += sum(run.epochs - epochs_done(self.layout.student(spec["name"], seed)) for seed in self.cfg.seeds) * Work(self.cfg).epoch(run)
        return left

    def evaluations_left(self) -> float:
        missing = [out for run_dir in self.all_runs() for out in EVALUATED.values() if not (run_dir / out).exists()]
        work = Work(self.cfg)  # AutoAttack runs in one of each run's two evaluations (AUTOATTACKED)
        dataset = self.dataset()
        return len(missing) / 2 * (work.evaluation(dataset, autoattack=False) + work.evaluation(dataset))

    def all_runs(self) -> list[Path]:
        teachers = [self.layout.teacher(t["name"]) for t in self.cfg.teachers]
        return teachers + [self.layout.student(s["name"], seed) for seed in self.cfg.seeds for s in self.cfg.students]

    def eval_attack(self) -> AttackConfig:
        """The plan's one evaluation threat model, spelled out (eps, step size) for [common]'s dataset.

        Its norm and eps default to [common]'s training attack, not to each run's: the weak teacher (trained at
        half the radius) is measured at the same radius as everyone else.
        """
        dataset = self.dataset()
        trained = {k: v for k, v in (self.cfg.common.get("attack") or {}).items() if k in ("norm", "eps")}
        chosen = self.cfg.eval_attack.model_dump(include=self.cfg.eval_attack.model_fields_set) if self.cfg.eval_attack else {}
        return EVAL_ATTACK.model_copy(update={**trained, **chosen}).resolved(dataset)

    def stage_evaluate(self) -> None:
        from student_trainer.evaluate import describe_threat_model, threat_model

        wanted = self.eval_attack().model_dump()
        sets = [arg for key, value in wanted.items() for arg in ("--set", f"attack.{key}={json.dumps(value)}")]  # TOML values
        limit = ["--limit", str(self.cfg.eval_limit)] if self.cfg.eval_limit else []
        autoattack = ["--autoattack-limit", str(self.cfg.autoattack_limit), "--autoattack-version", self.cfg.autoattack_version]
        teachers = {self.layout.teacher(t["name"]) for t in self.cfg.teachers}
        cost = {aa: Work(self.cfg).evaluation(self.dataset(), aa) for aa in (False, True)}  # per evaluation, for the ETA
        unfinished = [run_dir for run_dir in self.all_runs() if not trained(run_dir)]
        if unfinished:  # a plan run in parts: evaluate what is trained, and say what is not
            say(f"[evaluate] not trained yet, so not evaluated: {', '.join(r.name for r in unfinished)}")
        jobs = []
        for run_dir in (r for r in self.all_runs() if r not in unfinished):
            for checkpoint, out in EVALUATED.items():  # the best-validation epoch and the final one
                out = run_dir / out
                with_aa = bool(self.cfg.autoattack_limit) and checkpoint == AUTOATTACKED[run_dir in teachers]
                if _evaluation_current(out, run_dir / checkpoint, wanted, self.cfg.autoattack_version, with_aa):
                    continue
                attacks = "clean,pgd,autoattack" if with_aa else "clean,pgd"
                argv = module("student_trainer", "eval", "--checkpoint", str(run_dir / checkpoint), "--attacks", attacks,
                              *autoattack, *sets, *limit, "--out", str(out))
                jobs.append(Job(f"eval {run_dir.name} {checkpoint}", argv, out.with_suffix(".log"),
                                passes_per_unit=cost[with_aa]))
        threat = describe_threat_model(threat_model(wanted, self.cfg.autoattack_limit or None, False, self.cfg.autoattack_version))
        say(f"== evaluate: {len(jobs)} evaluations (each model's best-validation and final epoch; AutoAttack on the students' "
            f"final and the teachers' early-stopped), all under {threat}; {self.cfg.jobs} at a time ==")
        run_jobs("evaluate", jobs, self.cfg.jobs, self.cfg.threads_per_job)

    def stage_report(self) -> str:
        from student_trainer.report import write_report

        return write_report(self)


# Each run is evaluated twice: its best-validation checkpoint (what early stopping keeps; teachers are served from it)
# and its final epoch (the paper's point: what a run that trains to the end is left with).
EVALUATED = {"best.pt": "eval.json", "last.pt": "eval-final.json"}
# AutoAttack, the costly part, runs where the claims look: a student's final epoch, a teacher's early-stopped (served)
# checkpoint. Keyed by "is it a teacher".
AUTOATTACKED = {False: "last.pt", True: "best.pt"}


_PR_SET_PDEATHSIG = 1  # prctl(2)


def _own_session_ending_with_parent() -> None:
    """Run in the service's child before exec. Its own session: Ctrl-C or `timeout` signal the demo's process group,
    and the demo must still read the service's stats before it stops it. Yet it ends with the demo if that is killed
    outright (Linux's parent-death signal), so no service outlives its demo."""
    os.setsid()
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _evaluation_current(eval_json: Path, checkpoint: Path, attack: dict, autoattack_version: str, autoattack: bool) -> bool:
    """Whether an existing evaluation is of this checkpoint as it is now, under this threat model and AutoAttack: one
    made under another (an older plan) or of an older checkpoint is redone, not mixed in."""
    try:
        if eval_json.stat().st_mtime < checkpoint.stat().st_mtime:
            return False
        recorded = json.loads(eval_json.read_text()).get("attack") or {}
    except (OSError, ValueError):
        return False
    aa = recorded.get("autoattack")
    if (aa is not None) != autoattack or (aa is not None and aa.get("version") != autoattack_version):
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


def _best_epoch(run_dir: Path) -> dict:
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return max((m for m in metrics if m.get("val_robust_acc") is not None), key=lambda m: m["val_robust_acc"])


def _metric_sum(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{") or line.startswith(name + " "))


def _metric_max(text: str, name: str) -> float:
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{")]
    return max(values, default=0.0)


def update_json(path: Path, change) -> dict:
    """Read-modify-write of a small JSON record, locked and atomic: concurrent stages (compose's trainers) lose no update."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        value = change(json.loads(path.read_text()) if path.exists() else {})
        with replaced_atomically(path) as tmp:
            tmp.write_text(json.dumps(value, indent=2))
    return value


def merge_service_stats(old: dict, new: dict, cumulative: bool) -> dict:
    """The service's record after one more session: never zeros over figures a re-run did not redo.

    A session that served no rows (a re-run reusing every student) leaves the record as it was. A service the demo
    started itself counts from zero, so its session adds to the record (an interrupted session plus its resume is the
    whole); an external one (--teacher-url, compose) counts since it started, across trainers, so the higher count
    is the later one and replaces the record.
    """
    if not new.get("rows") or not old:
        return old or new
    if cumulative:
        return new if new["rows"] >= old.get("rows", 0) else old
    summed = {k: old.get(k, 0) + new.get(k, 0) for k in ("rows", "hits", "misses")}
    return {**summed, "largest_batch": max(old.get("largest_batch", 0), new.get("largest_batch", 0))}


def add_stage_time(layout: Layout, stage: str, seconds: float) -> dict:
    """stages.json: each stage's wall time summed over every invocation on this folder (a reused stage adds its seconds).

    The report runs in a later invocation than the training more often than not, so the time behind the results has to be
    on disk; summing keeps an interrupted run's work and its resume, and --fresh starts the record over.
    """
    def add(times: dict) -> dict:
        before = times.get(stage, {"seconds": 0.0, "runs": 0})
        return {**times, stage: {"seconds": before["seconds"] + seconds, "runs": before["runs"] + 1}}

    return update_json(layout.stage_times, add)


def read_stage_times(layout: Layout) -> dict[str, dict]:
    return json.loads(layout.stage_times.read_text()) if layout.stage_times.exists() else {}


def prepare_out(out: Path, fresh: bool) -> None:
    """--fresh empties the folder, but only one this command made (it carries a marker)."""
    if fresh and out.exists() and any(out.iterdir()):
        if not (out / MARKER).exists():
            raise DemoError(f"--fresh would delete {out}, which akd demo did not create (no {MARKER} in it); pick another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).touch()


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)


def run_demo(cfg: DemoConfig, out: Path, stages: list[str], fresh: bool, teacher_url: str | None, seeds: list[int] | None,
             command: str) -> str | None:
    prepare_out(out, fresh)
    demo = Demo(cfg, out, command)
    say(f"akd demo -> {out} (stages: {', '.join(stages)})")
    # SIGTERM (kill, docker stop) ends the demo the way Ctrl-C does: the running jobs and the service stop, and the stage's
    # time and the service's counts are recorded; without this, Python dies at once and the jobs run on, orphaned.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)

    @contextlib.contextmanager
    def timed(stage: str):
        started = time.monotonic()
        try:
            yield
        finally:  # a failed or interrupted stage's time counts too: its finished runs are reused, not redone
            add_stage_time(demo.layout, stage, time.monotonic() - started)

    if "teachers" in stages:
        with timed("teachers"):
            demo.stage_teachers()
    if "students" in stages:
        with timed("students"):
            if teacher_url:
                demo.stage_students(teacher_url, seeds)
                demo.save_service_stats(teacher_url, cumulative=True)  # its counters run since it started, across trainers
            else:
                with demo.service() as url:
                    demo.stage_students(url, seeds)
    if "evaluate" in stages:
        with timed("evaluate"):
            demo.stage_evaluate()
    if "report" in stages:
        return demo.stage_report()  # its own seconds are not counted: the report is written before they end
    return None


def serve_stage(out: Path, host: str, port: int) -> int:
    """The compose `teacher` service: serve the config the teachers stage wrote, in the foreground."""
    config = Layout(out).service_config
    if not config.exists():
        raise DemoError(f"{config} does not exist: run the teachers stage first")
    from teacher_service.cli import main as serve_main

    return serve_main(["--config", str(config), "--host", host, "--port", str(port)])


__all__ = ["ConfigError", "DemoConfig", "DemoError", "STAGES", "load_demo_config", "run_demo", "serve_stage"]
