"""The service's configuration: one TOML file, validated by pydantic.

`[server]` has its own keys (host, port, token, device, ...) and sections: [server.cache], [server.limits],
[server.timeouts], [server.batching]. Precedence: command-line flag (--host, --port, --cache-dir) > `--set key=value`
> environment variable (`AKD_PORT`, `AKD_CACHE_DIR`: ENV_NAMES) > the config file > the default.
Relative member paths resolve against the config file's folder.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from shared.configfile import (
    BearerToken,
    ConfigError,
    Count,
    Positive,
    StrictConfig,
    apply_sets,
    existing_folder_or_new,
    merged,
    read_toml,
    validated,
)
from shared.protocol import Aggregate
from teacher_service.cache.location import cache_location
from teacher_service.cache.row_formats import row_format
from teacher_service.cache.settings import CHUNK_ROWS, MEMORY_BYTES, RESIDENT_BYTES, CacheSettings

__all__ = ["ConfigError", "MemberConfig", "ServerConfig", "ServiceConfig", "TeacherConfig", "load_config"]

log = logging.getLogger("akd.config")

ENV_PREFIX = "AKD_"
# The flat name of each key that lives in a [server] section, and its place there ("section.key"). The one table for
# both uses of the flat names: the environment variables (AKD_CACHE_DIR sets cache.dir: ENV_NAMES, kept for good),
# and a config file's flat keys (cache_dir = "..." in [server]: moved into their section by `sectioned`, deprecated,
# accepted for one release).
FLAT_NAMES = {
    "cache_dir": "cache.dir",
    "cache_slots": "cache.slots",
    "cache_max_bytes": "cache.max_bytes",
    "cache_when_full": "cache.when_full",
    "cache_memory_bytes": "cache.memory_bytes",
    "cache_index_memory_bytes": "cache.index_memory_bytes",
    "cache_chunk_rows": "cache.chunk_rows",
    "cache_flush_s": "cache.flush_s",
    "cache_durable": "cache.durable",
    "max_body_bytes": "limits.body_bytes",
    "max_inflight_bytes": "limits.inflight_bytes",
    "max_connections": "limits.connections",
    "max_header_bytes": "limits.header_bytes",
    "max_queue_rows": "limits.queue_rows",
    "timeout_header_s": "timeouts.header_s",
    "timeout_body_s": "timeouts.body_s",
    "timeout_keep_alive_s": "timeouts.keep_alive_s",
    "timeout_drain_s": "timeouts.drain_s",
    "batching": "batching.enabled",
    "max_batch_rows": "batching.max_rows",
    "max_wait_ms": "batching.max_wait_ms",
    "shm_enabled": "shared_memory.enabled",
    "shm_max_regions": "shared_memory.max_regions",
    "shm_max_bytes": "shared_memory.max_bytes",
    "shm_sweep_s": "shared_memory.sweep_s",
}
SECTIONS = frozenset(dotted.split(".")[0] for dotted in FLAT_NAMES.values())


def sectioned(server: Any, source: str, table: str = "server") -> Any:
    """`server`, a raw [server] table, with each key it spells flat (FLAT_NAMES) moved into its section, each logged
    as deprecated with its sectioned name; anything but a table comes back as it is, for validation to refuse. Both
    spellings of one key is a ConfigError naming both: neither silently wins."""
    if not isinstance(server, dict):
        return server
    flat = [old for old in FLAT_NAMES if old in server and not (old in SECTIONS and isinstance(server[old], dict))]
    out = {key: value for key, value in server.items() if key not in flat}
    for old in flat:
        section, key = FLAT_NAMES[old].split(".")
        part = out.get(section, {})
        if not isinstance(part, dict):
            raise ConfigError(f"{source}: [{table}] {old} goes in [{table}.{section}], but {section} is {part!r}")
        if key in part:
            raise ConfigError(
                f"{source}: [{table}] {old} and [{table}.{section}] {key} are one setting, given twice; "
                f"keep [{table}.{section}] {key} only"
            )
        new = f"[{table}.{section}] {key}"
        log.warning(f"{source}: [{table}] {old} is deprecated and goes in the next release; write it as {new}")
        out[section] = {**part, key: server[old]}
    return out


class MemberConfig(StrictConfig):
    """One model of an ensemble: a project checkpoint, a `.pt2` export, or a RobustBench id."""

    path: Path | None = Field(None, description="A project checkpoint (.pt) or a torch.export file (.pt2).")
    robustbench: str | None = Field(None, description="A RobustBench model id, loaded from `robustbench_dir` only.")
    robustbench_dir: Path = Path("models")
    dataset: str = "cifar10"
    threat_model: str = "Linf"
    weight: Positive = 1.0

    @model_validator(mode="after")
    def _one_source(self) -> MemberConfig:
        if (self.path is None) == (self.robustbench is None):
            raise ValueError("a member needs exactly one of `path` or `robustbench`")
        return self


class TeacherConfig(StrictConfig):
    num_classes: Annotated[int, Field(ge=2)]
    input_shape: tuple[Count, Count, Count]
    aggregate: Aggregate = Aggregate.probs
    temperature: Positive = 1.0
    store: Literal["float32", "float16", "topk"] = Field(
        "float32",
        description="How the cache stores each member's rows: float32 exactly as computed, float16 at half the "
        "bytes (hits then serve each logit rounded to float16), or topk: the `topk` largest logits and the others' "
        "total mass (teacher_service.cache.row_formats). The ensemble is always formed from the member rows.",
    )
    topk: Count | None = Field(None, description="With store = 'topk': how many logits a row keeps.")
    members: Annotated[list[MemberConfig], Field(min_length=1)]

    @model_validator(mode="after")
    def _topk_with_its_k(self) -> TeacherConfig:
        if (self.store == "topk") != (self.topk is not None):
            raise ValueError(
                f"topk = k goes with store = 'topk' and only with it; got store = {self.store!r}, topk = {self.topk!r}"
            )
        row_format(self.row_format).check(self.num_classes)
        return self

    @property
    def row_format(self) -> str:
        """The cache's name for this teacher's row format (row_formats.row_format): float32, float16, top<k>."""
        return f"top{self.topk}" if self.store == "topk" else self.store


class CacheSection(StrictConfig):
    """[server.cache]: where the service keeps the member rows it computed, and how much of them."""

    dir: str | None = Field(None, description="zarr store (a folder or a zarr store URL); none disables the cache.")
    slots: Count | None = Field(
        None,
        description="Replicas started from one config (a scaled compose service) share `dir`, a local folder: each "
        "claims the first `replica-<i>` folder in it (i < slots) that no running replica holds, so each keeps one "
        "writer, and a restarted replica takes a free folder back with its rows.",
    )
    max_bytes: Annotated[int, Field(ge=0)] = Field(2 << 30, description="Per replica (each has its own folder).")
    when_full: Literal["evict", "stop"] = Field(
        "evict",
        description="Past max_bytes: evict the least recently used chunks of the served member versions to make "
        "room, or stop storing new rows (they are still served).",
    )
    memory_bytes: Annotated[int, Field(ge=0)] = Field(
        MEMORY_BYTES,
        description="Per served member version: decoded chunks kept in memory to serve hits from; the store may hold "
        "any number of rows more. A hit on a row beyond it reads its chunk back from the store.",
    )
    index_memory_bytes: Annotated[int, Field(ge=0)] = Field(
        RESIDENT_BYTES,
        description="Of each served member version's key index (64 to 128 bytes a row, in a file-backed table), the "
        "most kept resident; past it, its pages go back to the kernel's page cache after batches, and lookups fault "
        "them in again (slower).",
    )
    chunk_rows: Count = CHUNK_ROWS
    flush_s: Positive = 10.0
    durable: bool = Field(
        False,
        description="fsync each chunk (and its folder) before committing it, and the commit after: survives power "
        "loss, costs write speed.",
    )

    @model_validator(mode="after")
    def _slots_need_a_folder(self) -> CacheSection:
        if self.slots is not None and (self.dir is None or "://" in self.dir):
            raise ValueError(
                f"slots needs dir to be a local folder (replicas claim folders in it with a lock), got dir={self.dir!r}"
            )
        return self

    @property
    def settings(self) -> CacheSettings:
        """How each store this section opens is kept (the one in `dir`, or a replica's slot in it)."""
        return CacheSettings(
            max_bytes=self.max_bytes,
            chunk_rows=self.chunk_rows,
            durable=self.durable,
            memory_bytes=self.memory_bytes,
            when_full=self.when_full,
            index_memory_bytes=self.index_memory_bytes,
        )


class LimitsSection(StrictConfig):
    """[server.limits]: the most a request, and all requests together, may hold of the service."""

    body_bytes: Count = 256 << 20
    inflight_bytes: Count = Field(
        1 << 30, description="Request bytes held by all requests in flight together; past it, 503 with Retry-After."
    )
    connections: Count = Field(
        256, description="Open connections; a request on a connection past this gets 503 and the connection is closed."
    )
    header_bytes: Annotated[int, Field(ge=1024)] = Field(65536, description="Request line plus headers; past it, 400.")
    queue_rows: Count = 16384

    @model_validator(mode="after")
    def _one_body_fits_in_flight(self) -> LimitsSection:
        if self.inflight_bytes < self.body_bytes:
            raise ValueError(
                f"inflight_bytes ({self.inflight_bytes}) must be at least body_bytes ({self.body_bytes}):"
                " a body the service accepts must also fit in flight, or it would get 503 forever"
            )
        return self


class TimeoutsSection(StrictConfig):
    """[server.timeouts]: how long a connection may take over each part of a request, and stay idle."""

    header_s: Positive = Field(
        10.0,
        description="A connection must deliver a complete request head this soon after it opens or after its last "
        "response.",
    )
    body_s: Positive = Field(
        60.0,
        description="The whole request body must arrive this soon after its head; else 408 and the connection closes.",
    )
    keep_alive_s: Positive = Field(
        5.0, description="An idle keep-alive connection closes after this long without a new request."
    )
    drain_s: float = Field(
        0.0,
        ge=0,
        description="After a stop signal (SIGTERM, Ctrl-C), keep serving this long with GET /readyz answering 503, so "
        "that a balancer or orchestrator polling readiness takes the service out before it stops listening; then "
        "the requests in flight finish. 0: stop listening at once. A second signal stops it at once.",
    )


class BatchingSection(StrictConfig):
    """[server.batching]: how rows of concurrent requests share a forward pass (teacher_service.batcher)."""

    enabled: bool = Field(True, description="false: every request runs alone (for benchmarks).")
    max_rows: Count = 512
    max_wait_ms: Annotated[float, Field(ge=0)] = 2.0


class SharedMemorySection(StrictConfig):
    """[server.shared_memory]: the Open Inference Protocol's system shared-memory regions, which clients on the
    service's host register so that a request's tensors need not travel in its body (teacher_service/shared_memory.py).
    """

    enabled: bool = True
    max_regions: Count = Field(64, description="Regions registered at once, by every client together; past it, 429.")
    max_bytes: Count = Field(1 << 30, description="Bytes of every registered region together; past it, 429.")
    sweep_s: Positive = Field(
        5.0, description="How often regions whose client is gone (or whose segment was unlinked) are dropped."
    )


class ServerConfig(StrictConfig):
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8000
    token: BearerToken | None = Field(
        None,
        description="When set, every request but /healthz and /readyz needs `Authorization: Bearer <token>` (the "
        "scheme in any case). Visible ASCII only, and not empty: refused at start-up otherwise "
        "(shared.configfile.bearer_token).",
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    devices: Annotated[list[str], Field(min_length=1)] | None = Field(
        None,
        description="Several devices, each with its own copy of the teachers and its own inference worker (e.g. "
        '["cuda:0", "cuda:1"], or ["cpu", "cpu"]; AKD_DEVICES=cuda:0,cuda:1); a formed batch goes to an idle one. '
        "Replaces `device`.",
    )
    autocast: Literal["none", "bf16", "fp16"] = "none"
    channels_last: bool = False
    log_level: str = "info"
    cache: CacheSection = CacheSection()
    limits: LimitsSection = LimitsSection()
    timeouts: TimeoutsSection = TimeoutsSection()
    batching: BatchingSection = BatchingSection()
    shared_memory: SharedMemorySection = SharedMemorySection()

    @model_validator(mode="before")
    @classmethod
    def _flat_keys_sectioned(cls, value: Any) -> Any:
        """A [server] table validated as it is (a demo plan's, a benchmark's): its flat keys too, with their notice."""
        return sectioned(value, "config")

    @field_validator("devices", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        """AKD_DEVICES=cuda:0,cuda:1 (an environment variable is a string)."""
        return [part.strip() for part in value.split(",")] if isinstance(value, str) else value


class ServiceConfig(StrictConfig):
    server: ServerConfig = ServerConfig()
    teachers: Annotated[dict[str, TeacherConfig], Field(min_length=1)]


# Each environment variable that sets a [server] key: AKD_<KEY> for the keys of [server] itself (AKD_PORT), and
# AKD_<FLAT NAME> for those in sections (AKD_CACHE_DIR -> cache.dir), so the variables keep their flat names.
ENV_NAMES = {
    ENV_PREFIX + name.upper(): dotted
    for name, dotted in [*((key, key) for key in ServerConfig.model_fields if key not in SECTIONS), *FLAT_NAMES.items()]
}


def load_config(
    path: str | Path,
    overrides: dict[str, Any] | None = None,
    environ: dict[str, str] | None = None,
    sets: list[str] | None = None,
) -> ServiceConfig:
    """Read and validate a config file, with what is given outside it on top, each over the one before: the
    environment (ENV_NAMES), `sets` (`--set key=value`, keys dotted from the config's root: server.limits.body_bytes,
    teachers.mnist.temperature), and `overrides`, the command line's own flags as {dotted [server] key: value}
    (e.g. {"port": 8001, "cache.dir": "c"}; None values ignored)."""
    path = Path(path)
    raw = read_toml(path)
    if not isinstance(raw.get("server", {}), dict):
        raise ConfigError(f"invalid config {path}: server must be a table ([server]), got {raw['server']!r}")
    base = path.resolve().parent
    raw["server"] = _with_store(sectioned(raw.get("server", {}), f"config {path}"), base)
    environ = os.environ if environ is None else environ
    env = {dotted: environ[name] for name, dotted in ENV_NAMES.items() if name in environ}
    given = {key: value for key, value in (overrides or {}).items() if value is not None}
    for layer in (_server_layer(env), _set_layer(sets or []), _server_layer(given)):
        if "server" in layer:
            # Values given on the command line or in the environment are relative to the working directory.
            layer["server"] = _with_store(layer["server"], Path.cwd())
        raw = merged(raw, layer)
    config = validated(ServiceConfig, raw, str(path))
    _check_cache_folder(config.server.cache.dir)
    return _resolve_member_paths(config, base)


def _server_layer(values: dict[str, Any]) -> dict:
    """{dotted [server] key: value} as a raw config: {"cache.dir": "c"} -> {"server": {"cache": {"dir": "c"}}}."""
    server: dict = {}
    for dotted, value in values.items():
        *sections, key = dotted.split(".")
        node = server
        for section in sections:
            node = node.setdefault(section, {})
        node[key] = value
    return {"server": server}


def _set_layer(sets: list[str]) -> dict:
    """`--set key=value` as a raw config; a flat [server] key (server.cache_dir) is taken as its file spelling is."""
    layer = apply_sets({}, sets, Path.cwd())
    if "server" in layer:
        layer["server"] = sectioned(layer["server"], "--set")
    return layer


def _with_store(server: Any, base: Path) -> Any:
    """`server` with its cache.dir as _absolute_store makes it against `base`, where it has one."""
    cache = server.get("cache") if isinstance(server, dict) else None
    if not isinstance(cache, dict) or "dir" not in cache:
        return server
    return {**server, "cache": {**cache, "dir": _absolute_store(cache["dir"], base)}}


def _check_cache_folder(store: str | None) -> None:
    """A local cache.dir must be a folder, or one that can be made: said at start-up, not as a traceback."""
    if store and "://" not in store:
        existing_folder_or_new(store, "server.cache.dir:")


def _absolute_store(store: Any, base: Path) -> Any:
    """Every spelling of a local folder (a relative path, `..`, a symlink, `file:`/`local:` URLs in any case, behind
    fsspec cache layers) becomes the real folder, so that one folder is one lock (cache_location); a remote store
    URL passes, its scheme in lower case; anything else is a ConfigError."""
    if not isinstance(store, str) or not store:
        return store
    return str(cache_location(store, base))


def _resolve_member_paths(config: ServiceConfig, base: Path) -> ServiceConfig:
    for teacher in config.teachers.values():
        for member in teacher.members:
            if member.path is not None and not member.path.is_absolute():
                member.path = base / member.path
            if not member.robustbench_dir.is_absolute():
                member.robustbench_dir = base / member.robustbench_dir
    return config
