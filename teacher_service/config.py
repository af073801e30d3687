"""The service's configuration: one TOML file, validated by pydantic.

Precedence for `[server]` fields: command-line flag > environment variable
`AKD_<FIELD>` (e.g. `AKD_PORT`, `AKD_CACHE_DIR`) > the config file > the default.
Relative member paths resolve against the config file's folder.
"""

from __future__ import annotations

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
    existing_folder_or_new,
    read_toml,
    validated,
)
from shared.protocol import Aggregate
from teacher_service.cache.location import cache_location
from teacher_service.cache.row_formats import row_format
from teacher_service.cache.settings import MEMORY_BYTES, RESIDENT_BYTES

__all__ = ["ConfigError", "MemberConfig", "ServerConfig", "ServiceConfig", "TeacherConfig", "load_config"]

ENV_PREFIX = "AKD_"


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
        "total mass (teacher_service.row_formats). The ensemble is always formed from the member rows.",
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


class ServerConfig(StrictConfig):
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8000
    cache_dir: str | None = Field(
        None, description="zarr store (a folder or a zarr store URL); none disables the cache."
    )
    cache_slots: Count | None = Field(
        None,
        description="Replicas started from one config (a scaled compose service) share cache_dir, a local folder: "
        "each claims the first `replica-<i>` folder in it (i < cache_slots) that no running replica holds, so each "
        "keeps one writer, and a restarted replica takes a free folder back with its rows.",
    )
    cache_max_bytes: Annotated[int, Field(ge=0)] = Field(2 << 30, description="Per replica (each has its own folder).")
    cache_when_full: Literal["evict", "stop"] = Field(
        "evict",
        description="Past cache_max_bytes: evict the least recently used chunks of the served member versions to make "
        "room, or stop storing new rows (they are still served).",
    )
    cache_memory_bytes: Annotated[int, Field(ge=0)] = Field(
        MEMORY_BYTES,
        description="Per served member version: decoded chunks kept in memory to serve hits from; the store may hold "
        "any number of rows more. A hit on a row beyond it reads its chunk back from the store.",
    )
    cache_index_memory_bytes: Annotated[int, Field(ge=0)] = Field(
        RESIDENT_BYTES,
        description="Of each served member version's key index (64 to 128 bytes a row, in a file-backed table), the "
        "most kept resident; past it, its pages go back to the kernel's page cache after batches, and lookups fault "
        "them in again (slower).",
    )
    cache_chunk_rows: Count = 1024
    cache_flush_s: Positive = 10.0
    cache_durable: bool = Field(
        False,
        description="fsync each chunk (and its folder) before committing it, and the commit after: survives power "
        "loss, costs write speed.",
    )
    max_batch_rows: Count = 512
    max_wait_ms: Annotated[float, Field(ge=0)] = 2.0
    batching: bool = True
    max_queue_rows: Count = 16384
    max_body_bytes: Count = 256 << 20
    max_inflight_bytes: Count = Field(
        1 << 30, description="Request bytes held by all requests in flight together; past it, 503 with Retry-After."
    )
    max_connections: Count = Field(
        256, description="Open connections; a request on a connection past this gets 503 and the connection is closed."
    )
    max_header_bytes: Annotated[int, Field(ge=1024)] = Field(
        65536, description="Request line plus headers; past it, 400."
    )
    timeout_header_s: Positive = Field(
        10.0,
        description="A connection must deliver a complete request head this soon after it opens or after its last "
        "response.",
    )
    timeout_body_s: Positive = Field(
        60.0,
        description="The whole request body must arrive this soon after its head; else 408 and the connection closes.",
    )
    timeout_keep_alive_s: Positive = Field(
        5.0, description="An idle keep-alive connection closes after this long without a new request."
    )
    token: BearerToken | None = Field(
        None,
        description="When set, every request but /healthz needs `Authorization: Bearer <token>` (the scheme in any "
        "case). Visible ASCII only, and not empty: refused at start-up otherwise (shared.configfile.bearer_token).",
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

    @field_validator("devices", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        """AKD_DEVICES=cuda:0,cuda:1 (an environment variable is a string)."""
        return [part.strip() for part in value.split(",")] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _slots_need_a_folder(self) -> ServerConfig:
        if self.cache_slots is not None and (self.cache_dir is None or "://" in self.cache_dir):
            raise ValueError(
                f"cache_slots needs cache_dir to be a local folder (replicas claim folders in it with a lock), "
                f"got cache_dir={self.cache_dir!r}"
            )
        return self

    @model_validator(mode="after")
    def _one_body_fits_in_flight(self) -> ServerConfig:
        if self.max_inflight_bytes < self.max_body_bytes:
            raise ValueError(
                f"max_inflight_bytes ({self.max_inflight_bytes}) must be at least max_body_bytes "
                f"({self.max_body_bytes}):"
                " a body the service accepts must also fit in flight, or it would get 503 forever"
            )
        return self


class ServiceConfig(StrictConfig):
    server: ServerConfig = ServerConfig()
    teachers: Annotated[dict[str, TeacherConfig], Field(min_length=1)]


def env_overrides(environ: dict[str, str] | None = None) -> dict[str, str]:
    environ = os.environ if environ is None else environ
    return {
        name: environ[ENV_PREFIX + name.upper()]
        for name in ServerConfig.model_fields
        if ENV_PREFIX + name.upper() in environ
    }


def load_config(
    path: str | Path,
    overrides: dict[str, Any] | None = None,
    environ: dict[str, str] | None = None,
) -> ServiceConfig:
    """Read and validate a config file; `overrides` are CLI flags (None values ignored)."""
    path = Path(path)
    raw = read_toml(path)
    if not isinstance(raw.get("server", {}), dict):
        raise ConfigError(f"invalid config {path}: server must be a table ([server]), got {raw['server']!r}")
    base = path.resolve().parent
    server = {**raw.get("server", {})}
    if "cache_dir" in server:
        server["cache_dir"] = _absolute_store(server["cache_dir"], base)
    # Values given on the command line or in the environment are relative to the working directory.
    outside = {**env_overrides(environ), **{k: v for k, v in (overrides or {}).items() if v is not None}}
    if "cache_dir" in outside:
        outside["cache_dir"] = _absolute_store(outside["cache_dir"], Path.cwd())
    raw["server"] = {**server, **outside}
    config = validated(ServiceConfig, raw, str(path))
    _check_cache_folder(config.server.cache_dir)
    return _resolve_member_paths(config, base)


def _check_cache_folder(store: str | None) -> None:
    """A local cache_dir must be a folder, or one that can be made: said at start-up, not as a traceback."""
    if store and "://" not in store:
        existing_folder_or_new(store, "server.cache_dir:")


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
