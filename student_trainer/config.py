"""A training run declared as data: one TOML file, validated by pydantic, `--set key=value` on top.

Every field has a default, so `akd train` with no config trains PGD-AT on mnist5k.
Paths written in the file resolve against the file's folder; paths given with
`--set` resolve against the working directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from shared.configfile import (
    BearerToken,
    Count,
    Fraction,
    Positive,
    StrictConfig,
    apply_sets,
    read_toml,
    resolve_file_paths,
    validated,
)
from shared.models import ARCHITECTURES
from shared.protocol import CacheMode
from student_trainer.data import DATASETS
from student_trainer.methods import DISTILLATION_METHODS, METHOD_NAMES

# The classic L-inf radius per dataset: 0.3 for MNIST (Madry et al.), 8/255 on colour images.
# mnist5k has 3,500 training images, so it defaults to the lighter 0.1.
DEFAULT_EPS = {"mnist5k": 0.1, "mnist": 0.3, "cifar10": 8 / 255, "cifar100": 8 / 255, "svhn": 8 / 255}


_REGISTRIES = {
    "dataset": ("dataset", DATASETS),
    "arch": ("architecture", tuple(ARCHITECTURES)),
    "method": ("method", METHOD_NAMES),
}


class AttackConfig(StrictConfig):
    """PGD. eps defaults to the dataset's; step_size to 2.5 * eps / steps (Madry et al.)."""

    norm: Literal["linf", "l2"] = "linf"
    eps: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None
    step_size: Positive | None = None
    steps: Annotated[int, Field(ge=0)] = 10
    random_start: bool = True
    # attack the model in eval mode (BatchNorm statistics untouched)
    eval_mode: bool = True

    def resolved(self, dataset: str) -> AttackConfig:
        eps = DEFAULT_EPS[dataset] if self.eps is None else self.eps
        step = self.step_size if self.step_size is not None else (2.5 * eps / self.steps if self.steps else eps)
        return self.model_copy(update={"eps": eps, "step_size": step})


# The standard evaluation threat model (docs/training.md): L-inf at the dataset's eps (DEFAULT_EPS), PGD-10 with
# step 2.5 * eps / steps from one uniform random start (this PGD has no restarts). `akd eval` and the demo use it
# unless told otherwise, so that models trained with different attacks (a weak teacher, a cheap PGD-5) are measured
# with the same ruler, not each with its own training attack. eps stays None: it follows the dataset.
EVAL_ATTACK = AttackConfig(norm="linf", steps=10, random_start=True)


class TeacherCache(StrictConfig):
    """The service's cache mode for each kind of query. Clean inputs repeat every epoch, so they are cached; fresh
    adversarial examples never repeat, so they bypass the cache by default: storing them would only fill it with rows
    nobody reads and crowd out the clean rows ARD and RSLAD hit from the second epoch on."""

    clean: CacheMode = CacheMode.use
    adversarial: CacheMode = CacheMode.bypass

    @model_validator(mode="before")
    @classmethod
    def _one_mode_for_both(cls, value: Any) -> Any:
        return {"clean": value, "adversarial": value} if isinstance(value, str | CacheMode) else value


class TeacherRef(StrictConfig):
    """Where soft targets come from: a teacher service (url + name) or a local teacher config."""

    # One service, or several replicas of it: requests are spread over them and fail over when one refuses or is full.
    url: str | Annotated[list[str], Field(min_length=1)] | None = None
    name: str | None = None
    # a teacher-service TOML, run in-process (no service)
    config: Path | None = None
    # the service's rule: not empty, visible ASCII (shared.configfile.bearer_token)
    token: BearerToken | None = None
    timeout_s: Positive = 60.0
    # how long the service may stay unreachable before the run fails
    give_up_after_s: Positive = 300.0
    # a table, or one mode for both kinds of input: cache = "use"
    cache: TeacherCache = TeacherCache()
    # Queries the cache keeps (clean inputs) ask a load balancer to keep them on one replica (X-AKD-Affinity), where
    # their rows hit; false spreads them over the replicas too: more throughput, fewer hits (docs/operations.md).
    affinity: bool = True
    # Clean queries ask by row keys first where the service offers it (a service with a cache): only the rows it has
    # not cached are uploaded. false: every row is uploaded whole.
    keys_first: bool = True
    # Rows and answers through a shared-memory region where the service offers it and sees this process's shared
    # memory (the same host, or containers sharing /dev/shm): a request then carries neither. Answers are the same bit
    # for bit. false: rows go in request bodies.
    shared_memory: bool = True
    # Ask the service while the student computes: a step sends its query as soon as its inputs are known (ARD, IAD:
    # the clean batch before the attack; AKD, IAD: the adversarial batch before the student's forward pass on it), and
    # the trainer asks about the next batch's clean inputs before this step runs (ARD, RSLAD, IAD). The trained
    # weights are the same bit for bit. false: each query is sent where its answer is needed, and waited for; the
    # faster setting where a CPU service shares the trainer's cores (docs/design/trainer.md).
    overlap: bool = True

    @model_validator(mode="after")
    def _one_source(self) -> TeacherRef:
        if (self.url is None) == (self.config is None):
            raise ValueError(
                "the teacher needs exactly one of `url` (a teacher service) or `config` (a local teacher TOML)"
            )
        for url in self.urls:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"teacher.url: expected http:// or https:// addresses, got {url!r}")
        return self

    @property
    def urls(self) -> list[str]:
        return [] if self.url is None else [self.url] if isinstance(self.url, str) else list(self.url)


class EvalConfig(StrictConfig):
    # validate every N epochs (and after the last)
    every: Count = 1
    # the validation attack: the keys given here, the rest from the training attack
    attack: AttackConfig | None = None
    batch_size: Count = 256


class TrainConfig(StrictConfig):
    dataset: str = "mnist5k"
    data_dir: Path | None = None
    val_size: Count | None = None
    limit_train: Count | None = None
    arch: str = "small_cnn"
    method: str = "at"
    epochs: Count = 10
    batch_size: Count = 128
    lr: Positive = 0.05
    momentum: Fraction = 0.9
    weight_decay: Annotated[float, Field(ge=0)] = 5e-4
    schedule: Literal["piecewise", "onecycle", "cosine", "constant"] = "piecewise"
    # piecewise: lr x0.1 at these fractions of training
    milestones: list[Fraction] = [0.5, 0.75]
    seed: int = 0
    out_dir: Path = Path("runs/run")
    save_every: Count = 1
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # weight of the teacher in the target (label mixing)
    alpha: Fraction = 1.0
    # tau, for the teacher (sent to the service) and the student-side KL terms
    temperature: Positive = 1.0
    trades_beta: Positive = 6.0
    iad_beta: Positive = 0.1
    iad_warmup_epochs: Annotated[int, Field(ge=0)] = 0
    # per-sample train correctness each epoch (forgetting events)
    track_dynamics: bool = True
    # The training radius ramps linearly from 0 to attack.eps over this many epochs (step by step), as MNIST recipes
    # at eps 0.3 do: from scratch, the full radius can leave training stuck at chance. Validation (and with it the
    # best checkpoint) always uses the full radius.
    eps_warmup_epochs: Annotated[int, Field(ge=0)] = 0
    # start from this checkpoint's weights (same architecture and shapes); optimiser fresh
    init_from: Path | None = None
    # bf16 autocast for training's forward passes (attack and loss) on a GPU; validation and evaluation stay float32.
    # bf16 keeps float32's range, so no loss scaling is needed.
    amp: Literal["none", "bf16"] = "none"
    attack: AttackConfig = AttackConfig()
    eval: EvalConfig = EvalConfig()
    teacher: TeacherRef | None = None

    @field_validator("dataset", "arch", "method")
    @classmethod
    def _known_name(cls, v: str, info) -> str:
        noun, known = _REGISTRIES[info.field_name]
        if v not in known:
            raise ValueError(f"unknown {noun} {v!r}; known: {', '.join(known)}")
        return v

    @model_validator(mode="after")
    def _teacher_when_distilling(self) -> TrainConfig:
        if self.method in DISTILLATION_METHODS and self.teacher is None:
            raise ValueError(
                f"method {self.method!r} distils a teacher: add a [teacher] table with `url` and `name` "
                "(a teacher service) or `config` (a local teacher TOML)"
            )
        return self

    @model_validator(mode="after")
    def _warmup_within_training(self) -> TrainConfig:
        if self.eps_warmup_epochs > self.epochs:
            raise ValueError(
                f"eps_warmup_epochs ({self.eps_warmup_epochs}) is longer than training ({self.epochs} epochs)"
            )
        return self

    @property
    def train_attack(self) -> AttackConfig:
        return self.attack.resolved(self.dataset)

    @property
    def val_attack(self) -> AttackConfig:
        """The validation attack: [eval.attack]'s keys over the training attack's, so a run trained at eps 0.3
        validates at 0.3 unless told otherwise."""
        chosen = self.eval.attack.model_dump(include=self.eval.attack.model_fields_set) if self.eval.attack else {}
        if "steps" in chosen and "step_size" not in chosen:
            # derived again for the validation's own number of steps
            chosen["step_size"] = None
        return self.attack.model_copy(update=chosen).resolved(self.dataset)


# Path keys given with `--set` (their last part: `teacher.config` too) resolve against the working directory.
PATH_KEYS = frozenset({"data_dir", "out_dir", "config", "init_from"})
# Path keys written in a run's file resolve against the file's folder.
FILE_PATH_KEYS = ("data_dir", "out_dir", "init_from", "teacher.config")


def load_train_config(
    path: str | Path | None = None, sets: list[str] | None = None, base: dict | None = None
) -> TrainConfig:
    """The file (if any) over `base` (e.g. a checkpoint's saved config), then `--set` on top."""
    raw: dict = dict(base or {})
    source = "(defaults)"
    if path is not None:
        path = Path(path)
        source = str(path)
        raw.update(resolve_file_paths(read_toml(path), path.resolve().parent, FILE_PATH_KEYS))
    raw = apply_sets(raw, sets or [], Path.cwd(), PATH_KEYS)
    return validated(TrainConfig, raw, source)
