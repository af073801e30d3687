"""The wire protocol of POST /soft-targets: the one place both sides read names from.

Bodies are safetensors files in both directions (see `shared.codec`): a binary
format any language can write, with dtype and shape in the header, so a row can
be hashed and cached exactly as it was sent.
"""

from __future__ import annotations

from enum import Enum

from pydantic import BaseModel, Field

# re-exported: both sides read every name of the protocol from here
from shared.wire import (  # noqa: F401
    FOUND_KEY,
    HEADER_AFFINITY,
    HEADER_CACHE_HITS,
    HEADER_TEACHER,
    HEADER_TEACHER_VERSIONS,
    INPUT_DTYPES,
    INPUTS_KEY,
    KEYS_FIRST,
    KEYS_KEY,
    NON_FINITE_OUTPUT,
    SHARED_MEMORY,
    SOFT_TARGET_KEYS_PATH,
    SOFT_TARGETS_PATH,
    TEACHERS_PATH,
    Aggregate,
    CacheMode,
)

# Liveness: the process answers (at once, whatever it is doing). Readiness: it takes queries now (every teacher loaded,
# the cache verified, not shutting down); 503 with the reason otherwise. Both open, without the token.
HEALTH_PATH = "/healthz"
READY_PATH = "/readyz"
METRICS_PATH = "/metrics"

MEDIA_TYPE = "application/octet-stream"


class Output(str, Enum):
    """Tensors a client may ask for; `probs` is the distillation target."""

    # (B, K) float32: the aggregated, tempered distribution
    probs = "probs"
    # (B, K) float32: weighted mean of member logits
    logits = "logits"
    # (M, B, K) float32: raw, unweighted
    member_logits = "member_logits"


def parse_outputs(text: str) -> list[Output]:
    """Parse the `outputs` query parameter; raises ValueError naming the known names."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise ValueError("an empty list")
    known = {o.value: o for o in Output}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown output(s) {', '.join(map(repr, unknown))}")
    return list(dict.fromkeys(known[n] for n in names))


class AnswerQuery(BaseModel):
    """What to answer, and how: the query of POST /soft-targets/keys, and the part POST /soft-targets shares."""

    teacher: str | None = Field(None, description="Teacher name; optional when only one is served.")
    temperature: float | None = Field(None, gt=0, allow_inf_nan=False, description="Default: the teacher's.")
    outputs: str = Field(Output.probs.value, description="Comma list of `probs`, `logits`, `member_logits`.")


class SoftTargetsQuery(AnswerQuery):
    """The query of POST /soft-targets: an AnswerQuery, and what the cache does with the rows."""

    cache: CacheMode = CacheMode.use


class ErrorDetail(BaseModel):
    code: str = Field(description="Stable machine-readable error code, e.g. `bad_shape`.")
    message: str
    expected: str | None = None
    received: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


class MemberInfo(BaseModel):
    source: str = Field(description="`checkpoint`, `export` or `robustbench`.")
    path: str
    weight: float = Field(description="beta_k, normalised so the members' weights sum to 1.")
    version: str = Field(description="Hash of the member's weights file: the cache namespace.")
    arch: str | None = None
    metadata: dict = Field(default_factory=dict)


class TeacherInfo(BaseModel):
    name: str
    num_classes: int
    input_shape: tuple[int, int, int]
    aggregate: Aggregate
    temperature: float
    members: list[MemberInfo]


class TeachersResponse(BaseModel):
    teachers: list[TeacherInfo]
    features: list[str] = Field(
        default_factory=list, description=f"Optional paths this service offers: {KEYS_FIRST!r}, {SHARED_MEMORY!r}."
    )
