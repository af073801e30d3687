"""A design: one claim decided over independent teacher sets, its size chosen by a power analysis before any run.

A design file (pipeline/designs/*.toml, or the user's own) names the primary claim (a student against its baseline on
one metric at the final epoch, the smallest effect worth finding, the power wanted), the variances the power analysis
starts from, the design chosen (sets, seeds per set) and the stopping rule, all written before the first run. Set i is
the base plan with its own teachers (seeds teacher_seed_base + 10 i + j: nothing is copied between sets), its own
baseline runs, and its own student seeds, run as an `akd demo` folder `set-NN` under the design's folder, so a design
runs in parts: each `akd design` resumes where the last stopped.

Validation refuses a design that does not reach its stated power, so the file cannot claim more than it plans.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, model_validator

from pipeline import designs as built_in
from pipeline.plan import Plan, built_in_plan
from pipeline.power import Variance, designs, power, sets_needed
from pipeline.report import CLAIMS
from shared.configfile import ConfigError, Count, Positive, StrictConfig, read_toml, validated

SET_FOLDER = "set-{:02d}"
# set i's teachers are seeded teacher_seed_base + SEEDS_PER_SET_STEP * i + j
SEEDS_PER_SET_STEP = 10
CLAIM_KEYS = {key: (label, expected) for key, label, expected in CLAIMS}


class Claim(StrictConfig):
    """The primary claim: `student` minus `baseline` on `metric` at the final epoch, tested two-sided at the verdict
    rule's alpha (pipeline/verdicts.py), powered to find `effect` (in the metric's units) with probability `power`."""

    student: str
    baseline: str
    metric: str
    effect: Positive
    power: Annotated[float, Field(gt=0, lt=1)]

    @model_validator(mode="after")
    def _known_metric(self) -> Claim:
        if self.metric not in CLAIM_KEYS:
            raise ValueError(f"metric must be one of {', '.join(CLAIM_KEYS)}, got {self.metric!r}")
        return self


class Variances(StrictConfig):
    """The paired difference's SDs the power analysis uses, and where they were measured."""

    between_sets: Annotated[float, Field(ge=0, allow_inf_nan=False)]
    within_set: Annotated[float, Field(ge=0, allow_inf_nan=False)]
    source: str

    @model_validator(mode="after")
    def _some_spread(self) -> Variances:
        if self.between_sets == 0 and self.within_set == 0:
            raise ValueError("between_sets and within_set cannot both be 0: a difference with no spread needs no test")
        return self


class RunMinutes(StrictConfig):
    """What one run takes on the machine the design is run on (training and evaluation), for the cost column."""

    teacher: Positive
    student: Positive


class Design(StrictConfig):
    plan: str
    students: Annotated[list[str], Field(min_length=2)]
    claim: Claim
    variance: Variances
    sets: Count
    seeds_per_set: Count
    teacher_seed_base: Annotated[int, Field(ge=0)]
    autoattack_version: Literal["standard", "apgd"] = "standard"
    autoattack_limit: Annotated[int, Field(ge=0)] = 1000
    run_minutes: RunMinutes
    stopping_rule: str
    # set by load_design: where the design came from
    source: str = ""

    @model_validator(mode="after")
    def _reaches_its_power(self) -> Design:
        missing = {self.claim.student, self.claim.baseline} - set(self.students)
        if missing:
            raise ValueError(f"students must include the claim's {sorted(missing)}; got {self.students}")
        needed = sets_needed(self.seeds_per_set, self.claim.effect, self.variances, self.claim.power)
        if self.sets < needed:
            raise ValueError(
                f"{self.sets} sets of {self.seeds_per_set} seeds reach power "
                f"{self.planned_power:.3f}, below the claim's {self.claim.power}: it needs {needed} sets"
            )
        return self

    @property
    def variances(self) -> Variance:
        return Variance(self.variance.between_sets, self.variance.within_set)

    @property
    def planned_power(self) -> float:
        return power(self.sets, self.seeds_per_set, self.claim.effect, self.variances)

    def power_with(self, sets: int) -> float:
        """The power the claim's test has with only `sets` sets finished."""
        return power(sets, self.seeds_per_set, self.claim.effect, self.variances)

    @property
    def teachers_per_set(self) -> int:
        return len(built_in_plan(self.plan, f"{self.source}: `plan`")["teachers"])

    def alternatives(self):
        return designs(self.claim.effect, self.variances, self.claim.power, self.teachers_per_set)

    def student_seeds(self, index: int) -> list[int]:
        """Set `index`'s student seeds: its own, so no two sets share a run."""
        return [index * self.seeds_per_set + s for s in range(self.seeds_per_set)]

    def set_plan(self, index: int) -> Plan:
        """Set `index` as the plan `akd demo` runs: the base plan's teachers with this set's seeds, only the design's
        students, this set's student seeds, and the design's AutoAttack on the students' final epochs only."""
        raw = built_in_plan(self.plan, f"{self.source}: `plan`")
        if len(raw["teachers"]) > SEEDS_PER_SET_STEP:
            # set i's seeds would run into set i + 1's
            raise ConfigError(f"{self.source}: plan {self.plan!r} has more than {SEEDS_PER_SET_STEP} teachers")
        raw["teachers"] = [
            {**teacher, "name": _seeded_name(teacher["name"], seed), "seed": seed}
            for j, teacher in enumerate(raw["teachers"])
            for seed in [self.teacher_seed_base + SEEDS_PER_SET_STEP * index + j]
        ]
        by_name = {student["name"]: student for student in raw["students"]}
        unknown = [name for name in self.students if name not in by_name]
        if unknown:
            raise ConfigError(f"{self.source}: students {unknown} are not in plan {self.plan!r} ({sorted(by_name)})")
        raw["students"] = [by_name[name] for name in self.students]
        raw["seeds"] = self.student_seeds(index)
        raw.update(
            autoattack_version=self.autoattack_version,
            autoattack_limit=self.autoattack_limit,
            autoattack_teachers=False,
        )
        return validated(Plan, raw, f"{self.source}, set {index}")


def _seeded_name(name: str, seed: int) -> str:
    """`at-s10` for seed 1000 becomes `at-s1000`: a teacher's name says its seed, as in the built-in plans."""
    return re.sub(r"-s\d+$", "", name) + f"-s{seed}"


def load_design(path: str | Path | None, name: str = "primary") -> Design:
    """A design file, or the built-in design `name`; ConfigError for anything a user must fix."""
    if path is None:
        if name not in built_in.NAMES:
            raise ConfigError(f"unknown design {name!r}; built-in designs: {', '.join(built_in.NAMES)}")
        source = f"design {name} (pipeline/designs/{name}.toml)"
        raw = tomllib.loads(built_in.design_text(name))
    else:
        source, raw = str(path), read_toml(path)
    return validated(Design, {**raw, "source": source}, source)


def set_folder(out: Path, index: int) -> Path:
    return out / SET_FOLDER.format(index)
