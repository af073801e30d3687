"""The Open Inference Protocol's JSON shapes (shared/oip.py has its names and what the service makes of it): pydantic
models, read by the service and written into its OpenAPI spec."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from shared.oip import MODEL_VERSION

Parameters = dict[str, bool | int | float | str]


class _Message(BaseModel):
    # what other clients add is ignored; what is read is checked
    model_config = ConfigDict(extra="ignore")


class RequestInput(_Message):
    name: str
    shape: list[int]
    datatype: str
    parameters: Parameters = Field(default_factory=dict)
    # JSON tensor data: row-major, flat or nested; absent where the bytes come binary or in shared memory
    data: list[Any] | None = None


class RequestOutput(_Message):
    name: str
    parameters: Parameters = Field(default_factory=dict)


class InferRequest(_Message):
    id: str | None = None
    parameters: Parameters = Field(default_factory=dict)
    inputs: list[RequestInput]
    outputs: list[RequestOutput] | None = None


class ResponseOutput(_Message):
    name: str
    datatype: str
    shape: list[int]
    parameters: Parameters | None = None
    data: list[float] | None = None


class InferResponse(_Message):
    model_name: str
    model_version: str = MODEL_VERSION
    id: str | None = None
    parameters: Parameters | None = None
    outputs: list[ResponseOutput]


class TensorMetadata(_Message):
    name: str
    datatype: str
    # -1 where any size is taken (the rows)
    shape: list[int]


class ModelMetadata(_Message):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class ServerMetadata(_Message):
    name: str
    version: str
    extensions: list[str]


class RegisterRegion(_Message):
    """POST /v2/systemsharedmemory/region/{name}/register: a POSIX shared-memory object (`key`, as shm_open names
    it) and the part of it that is the region."""

    key: str
    offset: int = 0
    byte_size: int


class RegionStatus(_Message):
    name: str
    key: str
    offset: int
    byte_size: int


class ErrorResponse(_Message):
    """The protocol's error: `{"error": "..."}`. The service adds its stable `code`, and the expected and received
    values its native errors carry, which a v2 client ignores."""

    error: str
    code: str | None = None
    expected: str | None = None
    received: str | None = None
