"""A demo plan as validated data: seeds, how many jobs at a time, the one evaluation threat model, and the teachers
and students as training runs over a shared [common] table.

The built-in plans are the TOML files in pipeline/plans/ (`akd demo --plan NAME`); a user's own is any such file
(`--config plan.toml`). Every run of a plan is validated as the TrainConfig it will train with before anything starts,
so a typo in the last student fails in a second, not after the teachers' hour.
"""

from __future__ import annotations

import hashlib
import json
import os
import tomllib
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipeline import plans
from shared.configfile import ConfigError, Count, StrictConfig, apply_sets, read_toml, resolve_file_paths, validated
from student_trainer.config import FILE_PATH_KEYS, PATH_KEYS, AttackConfig, TrainConfig
from student_trainer.methods import DISTILLATION_METHODS

ENSEMBLE = "ensemble"
LAST = "-last"
DEFAULT_METHOD = TrainConfig.model_fields["method"].default
# a student's teacher before any service runs: validation needs a URL, not a live one
PLACEHOLDER_URL = "http://127.0.0.1:1"
# How the work is scheduled, not what it is: a plan re-run with more jobs at a time is the same plan.
SCHEDULING = {"jobs", "threads_per_job"}


class PlannedTeacher(BaseModel):
    """A teacher of the plan: its name, and the TrainConfig keys it sets over [common] (checked in Plan)."""

    model_config = ConfigDict(extra="allow")
    name: str

    @property
    def overrides(self) -> dict:
        return dict(self.model_extra or {})


class PlannedStudent(PlannedTeacher):
    """A student of the plan; a distilling one names the served teacher it `uses` (served_teacher_names)."""

    uses: str | None = None


class Plan(StrictConfig):
    """The demo's plan: runs as TrainConfig tables ([common] first, then each run's own keys)."""

    seeds: Annotated[list[int], Field(min_length=1)]
    jobs: Count = 2
    threads_per_job: Count = 1
    autoattack_limit: Annotated[int, Field(ge=0)] = 100
    # apgd: the APGD-CE + APGD-T subset (cheap enough for 500+ images on a CPU)
    autoattack_version: Literal["standard", "apgd"] = "standard"
    # whether the teachers' early-stopped checkpoints are AutoAttacked too (a design's sets need only the students')
    autoattack_teachers: bool = True
    eval_limit: Count | None = None
    # The one threat model every teacher and student is evaluated under; keys left out come from the standard
    # evaluation attack (config.EVAL_ATTACK: PGD-10), except norm and eps, which default to [common]'s training attack.
    eval_attack: AttackConfig | None = None
    # The service's [server] settings beyond where it listens and caches,
    # e.g. { autocast = "bf16", batching = { max_rows = 1024 } }.
    service: dict = {}
    common: dict = {}
    teachers: Annotated[list[PlannedTeacher], Field(min_length=1)]
    students: Annotated[list[PlannedStudent], Field(min_length=1)]

    @field_validator("service", mode="before")
    @classmethod
    def _service_sectioned(cls, value: Any) -> Any:
        """The table's deprecated flat keys, moved into their sections (each logged as deprecated)."""
        from teacher_service.config import sectioned

        return sectioned(value, "plan", table="service")

    @model_validator(mode="after")
    def _runs_are_valid(self) -> Plan:
        names = [run.name for run in [*self.teachers, *self.students]]
        if len(set(names)) != len(names):
            raise ValueError(f"every teacher and student needs a unique `name`, got {names}")
        served = set(served_teacher_names(self.teacher_names))
        for student in self.students:
            if (student.uses is not None) != (
                self.raw_run(student).get("method", DEFAULT_METHOD) in DISTILLATION_METHODS
            ):
                raise ValueError(
                    f"student {student.name!r}: distillation methods need `uses`, the others must not have it"
                )
            if student.uses is not None and student.uses not in served:
                raise ValueError(f"student {student.name!r} uses {student.uses!r}; served teachers: {sorted(served)}")
        _check_service_settings(self.service)
        for run in [*self.teachers, *self.students]:
            self.train_config(run)
        return self

    def fingerprint(self) -> str:
        """The sha256 of what the plan asks for: the keys it sets (its file's, or its built-in plan's, and --set's),
        paths resolved, scheduling left out (SCHEDULING). Defaults are left out too, so that a new setting with a
        default does not make an old plan a different one."""
        asked = self.model_dump(mode="json", exclude_unset=True, exclude=SCHEDULING)
        return hashlib.sha256(json.dumps(asked, sort_keys=True).encode()).hexdigest()

    @property
    def teacher_names(self) -> list[str]:
        return [teacher.name for teacher in self.teachers]

    def raw_run(self, run: PlannedTeacher, **fields) -> dict:
        """A run's TOML table: [common], its own keys over it, then the `fields` given (seed, out_dir, teacher) over
        both."""
        return merge(
            self.common, {**run.overrides, **{key: value for key, value in fields.items() if value is not None}}
        )

    def train_config(self, run: PlannedTeacher, teacher_url: str = PLACEHOLDER_URL) -> TrainConfig:
        """A run of the plan as the TrainConfig it trains with (its teacher at `teacher_url`)."""
        uses = getattr(run, "uses", None)
        return TrainConfig.model_validate(
            self.raw_run(run, teacher={"url": teacher_url, "name": uses} if uses else None)
        )

    @cached_property
    def dataset(self) -> str:
        """[common]'s dataset, as TrainConfig validates it (its default where [common] names none)."""
        return TrainConfig.model_validate({**self.common, "method": "standard", "teacher": None}).dataset


def _check_service_settings(settings: dict) -> None:
    from teacher_service.config import ServerConfig

    cache = settings.get("cache")
    given = {*settings, *(f"cache.{key}" for key in cache)} if isinstance(cache, dict) else set(settings)
    taken = sorted({"cache.dir", "host", "port"} & given)
    if taken:
        raise ValueError(
            f"[service] cannot set {', '.join(taken)}: the demo chooses where the service listens and caches"
        )
    ServerConfig.model_validate(settings)


def served_teacher_names(teachers: list[str]) -> list[str]:
    """What the service serves: the early-stopped checkpoints (best.pt) as `ensemble` and one by one, and the last
    epochs' (last.pt) as `ensemble-last` and `<name>-last`, for the early-stopped vs last-epoch comparison."""
    return [ENSEMBLE, *teachers, ENSEMBLE + LAST, *(name + LAST for name in teachers)]


def merge(base: dict, top: dict) -> dict:
    """Deep merge of TOML tables: `top` wins, sub-tables merge, a None in `top` removes the key."""
    merged = dict(base)
    for key, value in top.items():
        merged[key] = (
            merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
        )
    return {k: v for k, v in merged.items() if v is not None}


def load_plan(path: str | Path | None, name: str = "default", sets: list[str] | None = None) -> Plan:
    """A plan file, or the built-in plan `name`; `--set key=value` on top (e.g. common.data_dir=...,
    common.epochs=1). A file with `base = "NAME"` changes that built-in plan: its tables merge over the plan's, and its
    lists (seeds, teachers, students) replace the plan's whole."""
    if path is None:
        raw, source = built_in_plan(name), f"plan {name} (pipeline/plans/{name}.toml)"
    else:
        raw, source = read_toml(path), str(path)
        _resolve_plan_paths(raw, Path(path).resolve().parent)
        base = raw.pop("base", None)
        if base is not None:
            if not isinstance(base, str):
                raise ConfigError(f"{path}: `base` names a built-in plan ({', '.join(plans.NAMES)}), got {base!r}")
            raw = merge(built_in_plan(base, f"{path}: `base`"), raw)
    return validated(Plan, apply_sets(raw, sets or [], Path.cwd(), PATH_KEYS), source)


def built_in_plan(name: str, where: str = "--plan") -> dict:
    """A built-in plan's raw tables; its relative paths (cifar10's data_dir) mean the user's folder."""
    if name not in plans.NAMES:
        raise ConfigError(
            f"{where}: unknown plan {name!r}; built-in plans: {', '.join(plans.NAMES)} (or --config your-plan.toml)"
        )
    raw = tomllib.loads(plans.plan_text(name))
    _resolve_plan_paths(raw, Path.cwd())
    return raw


def _resolve_plan_paths(raw: dict, base: Path) -> None:
    """Paths written in a plan file mean the plan's folder, as in every other config file."""
    for table in [raw.get("common"), *(raw.get("teachers") or []), *(raw.get("students") or [])]:
        if isinstance(table, dict):
            resolve_file_paths(table, base, FILE_PATH_KEYS)


def relative_to_file(target: Path, file: Path) -> str:
    """`target` as a path relative to `file`'s folder: a generated config stays right when its folder moves."""
    return os.path.relpath(target, file.parent)


def write_toml(path: Path, raw: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# Written by akd demo. Relative paths resolve against this file's folder.\n" + tomli_w.dumps(raw))
    return path
