"""A benchmark run declared as data: a preset TOML (`full`, `quick`, `tiny`) or your own, validated by pydantic."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from shared.configfile import ConfigError, Count, Positive, StrictConfig, read_toml, validated
from shared.models import ARCHITECTURES
from shared.protocol import INPUT_DTYPES
from teacher_service.cache.row_formats import row_format
from teacher_service.config import ServerConfig, sectioned

PRESETS = ("full", "quick", "tiny", "gpu")
# What each benchmark sets on its servers itself, as keys dotted below [server]: a `[server]` table in a benchmark
# config may not set them.
BENCH_OWNED_SERVER_FIELDS = (
    "device",
    "devices",
    "batching.enabled",
    "cache.dir",
    "batching.max_wait_ms",
    "host",
    "port",
    "log_level",
)
Sizes = Annotated[list[Count], Field(min_length=1)]


class TeacherSpec(StrictConfig):
    """A served teacher: one member of this architecture, random weights (speed does not depend on them)."""

    arch: str
    input_shape: tuple[Count, Count, Count]
    num_classes: Annotated[int, Field(ge=2)] = 10

    @model_validator(mode="after")
    def _known_arch(self) -> TeacherSpec:
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {self.arch!r}; known: {', '.join(ARCHITECTURES)}")
        return self


class RoundTripSpec(StrictConfig):
    """Benchmark 0: one request around a negligible forward pass, against the Starlette and raw-socket floors."""

    # a teacher of arch `linear`: its forward costs microseconds
    teacher: str
    rows: Sizes = [16, 128, 512]
    # timed calls per candidate per round
    requests: Count = 50
    # cached rows asked for by key
    keys_rows: Count = 512


class OverheadSpec(StrictConfig):
    teachers: list[str]
    batches: Sizes = [32, 128, 512]


class CacheSpec(StrictConfig):
    """Hits vs recomputation through the service; rows/s committed to the store, `[server.cache] durable` off vs on."""

    teachers: list[str]
    batches: Sizes = [128, 1024]
    # rows written per write measurement, inserted `batch` rows at a time
    write_rows: Count = 16384
    # the store's chunk (the service's default [server.cache] chunk_rows)
    write_chunk_rows: Count = 1024


class LoadSpec(StrictConfig):
    """Closed-loop clients, each sending `rows_per_client` rows, next request when the last is answered."""

    teachers: list[str]
    clients: Sizes = [1, 2, 4, 8]
    rows_per_client: Count = 16
    # one client sending this many rows: the yardstick
    reference_rows: Count = 128
    # per teacher: rows each round serves in total (default 2048)
    rows_per_round: dict[str, Count] = {}

    def round_rows(self, teacher: str) -> int:
        return self.rows_per_round.get(teacher, 2048)


class TransportSpec(StrictConfig):
    teachers: list[str]
    batch: Count = 128
    # cached rows asked for by key vs uploaded whole
    keys_batch: Count = 512
    dtypes: list[Literal[INPUT_DTYPES]] = list(INPUT_DTYPES)  # type: ignore[valid-type]


class EndToEndSpec(StrictConfig):
    """Distillation training steps on real data, the teacher behind the service (overlap on and off) vs in-process."""

    teacher: str
    dataset: str = "mnist5k"
    student_arch: str = "small_cnn"
    batch_size: Count = 128
    attack_steps: Count = 10
    # timed steps per side
    steps: Count = 10
    # the distillation methods timed, each through the service and in-process
    methods: Annotated[list[Literal["akd", "ard", "rslad", "iad"]], Field(min_length=1)] = ["akd", "ard"]

    @field_validator("methods")
    @classmethod
    def _each_once(cls, methods: list[str]) -> list[str]:
        if len(set(methods)) != len(methods):
            raise ValueError(f"each method once: got {methods}")
        return methods


class PeerSpec(LoadSpec):
    """LitServe and Triton serving the same teacher, each with its own batching, under the load of the sharing
    benchmark."""


class ScaleOutSpec(StrictConfig):
    """Benchmark 7: 1 vs 2 devices in one service, 1 vs 2 replicas behind nginx, 1 vs 2 DDP ranks, and a replica
    killed (kill -9) under load; all on the one machine the bench runs on, so its ratios are that machine's."""

    teacher: str
    # closed-loop clients
    clients: Count = 8
    # float32 rows per request, cache=bypass
    rows_per_client: Count = 16
    # per client and round
    requests_per_client: Count = 16
    # on CPUs, also measure with OMP_NUM_THREADS=1 (a device worker's service, 1 DDP rank)
    one_thread: bool = True
    # the DDP part's data: AKD training of a small_cnn student against `teacher` behind the service
    dataset: str = "mnist5k"
    # the training's limit_train: the same global batches for 1 and 2 ranks
    train_rows: Count = 512
    # the global batch, whatever the number of ranks
    train_batch: Count = 64
    train_attack_steps: Count = 3
    # timed epochs, between an untimed warm-up epoch and an untimed last one (which validates)
    train_epochs: Count = 2
    # how long the clients send while a replica is killed
    kill_load_s: Positive = 4.0
    # the kill comes this long after they start
    kill_after_s: Positive = 1.5
    # requests sent this soon after the kill (or in flight at it) are "around the kill"
    kill_window_s: Positive = 1.0

    @model_validator(mode="after")
    def _kill_during_load(self) -> ScaleOutSpec:
        if self.kill_after_s >= self.kill_load_s:
            raise ValueError(f"kill_after_s ({self.kill_after_s}) must be less than kill_load_s ({self.kill_load_s})")
        return self


class CacheScaleSpec(StrictConfig):
    """Benchmark 8: the service's memory against the rows its cache stores, hits read back from the store against
    hits held in memory and against recomputing, and each row format's bytes against its served error."""

    # the teacher served over stores pre-filled with random rows (its checkpoint names their namespace)
    teacher: str
    # the chunk cache's bound (`[server.cache] memory_bytes`)
    memory_bytes: Count = 8 << 20
    # `[server.cache] index_memory_bytes`; None: the default
    index_memory_bytes: Annotated[int, Field(ge=0)] | None = None
    # rows stored, as multiples of the rows the bound holds
    multiples: Sizes = [1, 10, 100]
    # the stores' chunks (the service's default `[server.cache] chunk_rows`)
    chunk_rows: Count = 1024
    # keys a request when every row is asked for, in stored order
    sweep_batch: Count = 4096
    # a store past this many rows: that many asked for, in evenly spread requests
    sweep_max_rows: Count | None = None
    # random rows asked for after the sweep
    sample_rows: Count = 8192
    # keys a request, hits timed from memory and from the store
    hit_batch: Count = 512
    # the store whose hits are read back from the store (one of `multiples`)
    disk_multiple: Count = 10
    # the teacher whose rows/s with `cache=bypass`, at `hit_batch` rows a request, are the hits' yardstick
    recompute_teacher: str
    # the teachers whose row-format errors are measured: random weights, built in-process
    error_teachers: Annotated[list[TeacherSpec], Field(min_length=1)]
    # random inputs whose served probabilities are compared
    error_rows: Count = 2000
    # against float32; a top-k of k classes or more is skipped
    formats: list[str] = ["float16", "top5", "top10"]
    temperatures: Annotated[list[Positive], Field(min_length=1)] = [1.0, 4.0]

    @model_validator(mode="after")
    def _stores_measured(self) -> CacheScaleSpec:
        if 1 not in self.multiples or self.disk_multiple not in self.multiples:
            raise ValueError(
                f"multiples {self.multiples} must hold 1 (hits from memory) and disk_multiple = {self.disk_multiple}"
            )
        if self.disk_multiple < 2:
            raise ValueError(f"disk_multiple must be at least 2 (a store past the bound), got {self.disk_multiple}")
        for name in self.formats:
            row_format(name)
        return self


class WarmSpec(StrictConfig):
    """Benchmark 9: `akd warm` over a run's augmentation space (rows/s), and an ARD epoch's time against the cold
    cache and against the warmed one."""

    # the served teacher, over the dataset's input (mnist5k: 1x28x28, 10 classes); its arch is [teachers.NAME]'s
    teacher: str
    dataset: str = "mnist5k"
    # the ARD student's architecture(s)
    students: Annotated[list[str], Field(min_length=1)] = ["small_cnn"]
    # the first N training images; None: the whole split (mnist5k: 3,500)
    limit_train: Count | None = None
    # held-out images the epoch validates on; None: the dataset's default
    val_size: Count | None = None
    batch_size: Count = 128
    # PGD steps against the student
    attack_steps: Count = 10
    # rows a warm request (`akd warm --batch-rows`)
    batch_rows: Count = 512
    # each round: a cold leg and a warmed leg, fresh services, in alternating order
    rounds: Count = 1

    @model_validator(mode="after")
    def _known_students(self) -> WarmSpec:
        unknown = [s for s in self.students if s not in ARCHITECTURES]
        if unknown:
            raise ValueError(f"unknown student architecture(s) {unknown}; known: {', '.join(ARCHITECTURES)}")
        return self


def _has_key(table: dict, dotted: str) -> bool:
    """Whether `table` sets `dotted` (a key below sub-tables: batching.enabled)."""
    *sections, key = dotted.split(".")
    for section in sections:
        table = table.get(section)
        if not isinstance(table, dict):
            return False
    return key in table


class BenchConfig(StrictConfig):
    # at least this many; fast measurements repeat until min_seconds are spent
    repetitions: Count = 5
    # per compared point (benchmarks 1, 2, 4)
    min_seconds: Annotated[float, Field(ge=0)] = 0.0
    warmup: Annotated[int, Field(ge=0)] = 1
    # both servers' batching window
    max_wait_ms: Annotated[float, Field(ge=0)] = 2.0
    # More `akd serve` [server] settings, for every side alike (the service, the in-process teacher, the peer all
    # read the same teachers.toml): autocast = "bf16", channels_last, [server.batching] max_rows, ...
    server: dict[str, Any] = {}
    teachers: dict[str, TeacherSpec]
    round_trip: RoundTripSpec
    overhead: OverheadSpec
    cache: CacheSpec
    sharing: LoadSpec
    transport: TransportSpec
    end_to_end: EndToEndSpec
    peer: PeerSpec
    scale_out: ScaleOutSpec
    cache_scale: CacheScaleSpec
    warm: WarmSpec

    @field_validator("server", mode="before")
    @classmethod
    def _server_sectioned(cls, value: Any) -> Any:
        """Deprecated flat [server] keys moved into their sections, each with a deprecation notice (`sectioned`)."""
        return sectioned(value, "bench config")

    @model_validator(mode="after")
    def _server_settings_valid(self) -> BenchConfig:
        owned = [key for key in BENCH_OWNED_SERVER_FIELDS if _has_key(self.server, key)]
        if owned:
            raise ValueError(f"[server] sets {owned}, which the benchmarks set themselves (max_wait_ms: at the top)")
        # a misspelt or wrong setting fails here, not in a server's log
        ServerConfig.model_validate(self.server)
        return self

    @model_validator(mode="after")
    def _teachers_declared(self) -> BenchConfig:
        named = [
            self.round_trip.teacher,
            *self.overhead.teachers,
            *self.cache.teachers,
            *self.sharing.teachers,
            *self.transport.teachers,
            *self.peer.teachers,
            self.end_to_end.teacher,
            self.scale_out.teacher,
            self.cache_scale.teacher,
            self.cache_scale.recompute_teacher,
            self.warm.teacher,
        ]
        unknown = sorted(set(named) - set(self.teachers))
        if unknown:
            raise ValueError(
                f"benchmarks name teachers {unknown} that [teachers] does not declare ({sorted(self.teachers)})"
            )
        return self


def load_bench_config(preset_or_path: str) -> BenchConfig:
    """A preset name (`full`, `quick`, `tiny`) or a path to a TOML file."""
    if preset_or_path in PRESETS:
        source = resources.files("bench") / "presets" / f"{preset_or_path}.toml"
        path = Path(str(source))
    else:
        path = Path(preset_or_path)
        if not path.exists():
            raise ConfigError(f"no benchmark config {path}: expected a file or one of the presets {', '.join(PRESETS)}")
    return validated(BenchConfig, read_toml(path), str(path))
