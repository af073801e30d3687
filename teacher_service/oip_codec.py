"""Open Inference Protocol bodies (shared/oip.py): an infer request read into the native route's rows and query, and
its answer written as JSON, binary tensors or into shared-memory regions.

Every refusal is a `ServiceError` as the native route's are (400 for a request the protocol cannot read, 422 for an
`inputs` tensor the teacher cannot take, with the native codes), so both routes refuse a request alike; the errors
answer in the protocol's `{"error": "..."}` form (errors.py).
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass

import numpy as np
import torch
from pydantic import ValidationError

from shared import codec, oip, oip_models
from shared.protocol import INPUTS_KEY, CacheMode, Output, SoftTargetsQuery
from teacher_service.errors import ServiceError
from teacher_service.shared_memory import SharedMemoryRegions

_OUTPUT_NAMES = [o.value for o in Output]


@dataclass
class InferCall:
    """An infer request read: what it asks (`request`), its rows as sent, and the query the native route would read."""

    request: oip_models.InferRequest
    # None once queued: the batch holds the rows from there (they may be a view of a region)
    inputs: torch.Tensor | None
    query: SoftTargetsQuery


def header_length(value: str | None, body_bytes: int | None) -> int | None:
    """The Inference-Header-Content-Length header: the JSON part's length, None for an all-JSON body."""
    if value is None:
        return None
    if not value.isdigit() or (body_bytes is not None and int(value) > body_bytes):
        raise _bad(
            f"{oip.HEADER_INFER_LENGTH} is not the length of the body's JSON part",
            f"a byte count of at most the body's {body_bytes} bytes" if body_bytes is not None else "a byte count",
            repr(value),
        )
    return int(value)


def read_call(
    body: np.ndarray,
    json_length: int | None,
    input_shape: tuple[int, int, int],
    regions: SharedMemoryRegions | None,
    cached: bool,
    held: contextlib.ExitStack,
) -> InferCall:
    """The request of `body` (its first `json_length` bytes JSON, the rest the binary tensors), checked throughout.

    Rows in a shared-memory region are read where they lie, the region held in `held` (which the caller keeps until
    the rows are answered), unless a cache reads or stores them (`cached`, the service's, and the request's mode not
    `bypass`): then they are copied first, since a row is hashed for its cache key before it is computed, and a
    client rewriting its region in between must not store one row's logits under another's key."""
    json_part = body if json_length is None else body[:json_length]
    request = _parse_request(json_part)
    binary = body[len(json_part) :]
    query = _query(request.parameters)
    if len(request.inputs) != 1 or request.inputs[0].name != INPUTS_KEY:
        names = [i.name for i in request.inputs]
        raise _bad("the teacher takes one input", f"one input named {INPUTS_KEY!r}", f"inputs {names}")
    in_place = None if cached and query.cache is not CacheMode.bypass else held
    x = _input_tensor(request.inputs[0], binary, regions, in_place)
    try:
        return InferCall(request, codec.validate_inputs({INPUTS_KEY: x}, input_shape), query)
    except codec.CodecError as exc:
        raise ServiceError(422, exc.code, exc.message, exc.expected, exc.received) from None


def _parse_request(json_part: np.ndarray) -> oip_models.InferRequest:
    try:
        return oip_models.InferRequest.model_validate(json.loads(json_part.tobytes()))
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "the request"
        expected = "an inference request (Open Inference Protocol)"
        raise _bad(f"{where}: {err['msg']}", expected, repr(err.get("input"))) from None
    except (ValueError, RecursionError) as exc:
        raise _bad(
            f"the request's JSON does not parse: {exc}", "a JSON inference request", f"{len(json_part)} bytes"
        ) from None


def _query(parameters: oip_models.Parameters) -> SoftTargetsQuery:
    """The request parameters `temperature` and `cache`, checked as the native route checks its query."""
    asked = {k: v for k, v in parameters.items() if k in (oip.TEMPERATURE, oip.CACHE)}
    try:
        return SoftTargetsQuery.model_validate(asked)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise ServiceError(
            400, "bad_parameter", f"parameters.{where}: {err['msg']}", err["msg"], repr(err.get("input"))
        ) from None


def _input_tensor(
    given: oip_models.RequestInput,
    binary: np.ndarray,
    regions: SharedMemoryRegions | None,
    in_place: contextlib.ExitStack | None,
) -> torch.Tensor:
    """The input's values as sent, from exactly one of: the binary part, a shared-memory region, JSON `data`."""
    dtype = _dtype(given.datatype)
    if any(n < 0 for n in given.shape):
        raise _bad("an input's shape has a negative size", "sizes >= 0", str(given.shape))
    nbytes = math.prod(given.shape) * dtype.itemsize
    params = given.parameters
    sources = [oip.BINARY_DATA_SIZE in params, oip.SHM_REGION in params, given.data is not None]
    if sum(sources) != 1:
        raise _bad(
            "an input's values come from one place",
            f"one of `data`, parameters.{oip.BINARY_DATA_SIZE}, parameters.{oip.SHM_REGION}",
            f"{sum(sources)} of them",
        )
    if sources[0]:
        values = _binary_values(params[oip.BINARY_DATA_SIZE], binary, nbytes, dtype)
    elif len(binary):
        raise _bad("binary data after the JSON, but no input says so", f"parameters.{oip.BINARY_DATA_SIZE}", "none")
    elif sources[1]:
        values = _shm_values(params, regions, nbytes, dtype, in_place)
    else:
        values = _json_values(given.data, math.prod(given.shape), dtype)
    return torch.from_numpy(values.reshape(given.shape))


def _dtype(datatype: str) -> np.dtype:
    if datatype not in oip.INPUT_DATATYPES:
        raise ServiceError(
            422,
            "bad_dtype",
            f"inputs of datatype {datatype} are not taken",
            f"one of {', '.join(oip.INPUT_DATATYPES)}",
            datatype,
        )
    return np.dtype(oip.INPUT_DATATYPES[datatype])


def _binary_values(size: object, binary: np.ndarray, nbytes: int, dtype: np.dtype) -> np.ndarray:
    if type(size) is not int or size != nbytes or len(binary) != nbytes:
        raise _bad(
            "the binary data does not match the input's shape and datatype",
            f"{oip.BINARY_DATA_SIZE} = {nbytes} and as many bytes after the JSON",
            f"{oip.BINARY_DATA_SIZE} = {size!r} and {len(binary)} bytes",
        )
    # viewed where it lies: the body was laid out with these bytes aligned (codec.assemble)
    return binary.view(dtype)


def _shm_values(
    params: oip_models.Parameters,
    regions: SharedMemoryRegions | None,
    nbytes: int,
    dtype: np.dtype,
    in_place: contextlib.ExitStack | None,
) -> np.ndarray:
    name, offset, size = _region_of(params, regions)
    if size != nbytes:
        raise _bad(
            "the shared-memory input does not match the input's shape and datatype",
            f"{oip.SHM_BYTE_SIZE} = {nbytes}",
            f"{oip.SHM_BYTE_SIZE} = {size}",
        )
    if in_place is not None:
        # viewed where they lie, the region held until the rows are answered (read_call)
        return np.frombuffer(in_place.enter_context(regions.use(name, offset, size)).buffer, dtype=dtype)
    values = np.empty(nbytes // dtype.itemsize, dtype=dtype)
    with regions.use(name, offset, size) as region:
        values.view(np.uint8)[:] = np.frombuffer(region.buffer, dtype=np.uint8)
    return values


def _region_of(params: oip_models.Parameters, regions: SharedMemoryRegions | None) -> tuple[str, int, int]:
    if regions is None:
        raise _bad(
            "this service takes no shared-memory regions ([server.shared_memory] enabled = false)",
            "tensors in the body",
            f"region {params.get(oip.SHM_REGION)!r}",
        )
    name, offset, size = params.get(oip.SHM_REGION), params.get(oip.SHM_OFFSET, 0), params.get(oip.SHM_BYTE_SIZE)
    if type(name) is not str or type(offset) is not int or type(size) is not int:
        raise _bad(
            "a shared-memory tensor names its region, offset and size",
            f"{oip.SHM_REGION} (string), {oip.SHM_BYTE_SIZE} and {oip.SHM_OFFSET} (integers)",
            f"{name!r}, {size!r}, {offset!r}",
        )
    return name, offset, size


def _json_values(data: list, count: int, dtype: np.dtype) -> np.ndarray:
    try:
        values = np.asarray(data).reshape(-1)
    except (ValueError, TypeError, RecursionError):
        values = None
    if values is None or values.dtype.kind not in "iuf" or values.size != count:
        raise _bad(
            "the input's JSON data does not match its shape and datatype",
            f"{count} numbers, row-major",
            "ragged or non-numeric data" if values is None or values.dtype.kind not in "iuf" else f"{values.size}",
        )
    if dtype == np.uint8 and (values.dtype.kind == "f" or values.min() < 0 or values.max() > 255):
        raise ServiceError(422, "bad_dtype", "UINT8 data are integers 0..255", "integers in 0..255", "other numbers")
    return values.astype(dtype)


@dataclass
class Answer:
    body: bytes
    # the JSON part's length where binary tensors follow it
    json_length: int | None


def requested_outputs(request: oip_models.InferRequest) -> list[oip_models.RequestOutput]:
    """The outputs asked for, each known; every output when none is named, binary where the request says so."""
    if request.outputs is None:
        binary = request.parameters.get(oip.BINARY_DATA_OUTPUT) is True
        return [oip_models.RequestOutput(name=n, parameters={oip.BINARY_DATA: binary}) for n in _OUTPUT_NAMES]
    unknown = [o.name for o in request.outputs if o.name not in _OUTPUT_NAMES]
    if unknown or not request.outputs:
        raise _bad("unknown outputs asked for", f"some of {', '.join(_OUTPUT_NAMES)}", str(unknown or "none"))
    return request.outputs


def write_answer(
    tensors: dict[str, torch.Tensor],
    asked: list[oip_models.RequestOutput],
    call: InferCall,
    model: str,
    regions: SharedMemoryRegions | None,
) -> Answer:
    """The response: each output as JSON data, binary data after the JSON, or written into its region."""
    binary_default = call.request.parameters.get(oip.BINARY_DATA_OUTPUT) is True
    outputs, parts = [], []
    for wanted in asked:
        t = tensors[wanted.name].contiguous()
        out = oip_models.ResponseOutput(name=wanted.name, datatype=oip.OUTPUT_DATATYPE, shape=list(t.shape))
        if oip.SHM_REGION in wanted.parameters:
            out.parameters = _write_to_region(t, wanted.parameters, regions)
        elif wanted.parameters.get(oip.BINARY_DATA, binary_default) is True:
            parts.append(t.numpy().tobytes())
            out.parameters = {oip.BINARY_DATA_SIZE: len(parts[-1])}
        else:
            out.data = t.reshape(-1).tolist()
        outputs.append(out)
    response = oip_models.InferResponse(model_name=model, id=call.request.id, outputs=outputs)
    head = response.model_dump_json(exclude_none=True).encode()
    if not parts:
        return Answer(head, None)
    return Answer(b"".join([head, *parts]), len(head))


def _write_to_region(
    t: torch.Tensor, params: oip_models.Parameters, regions: SharedMemoryRegions | None
) -> oip_models.Parameters:
    name, offset, size = _region_of(params, regions)
    values = t.numpy().view(np.uint8).reshape(-1)
    if size < len(values):
        raise _bad(
            "the shared-memory output is smaller than the output",
            f"{oip.SHM_BYTE_SIZE} >= {len(values)}",
            f"{oip.SHM_BYTE_SIZE} = {size}",
        )
    with regions.use(name, offset, size) as region:
        np.frombuffer(region.buffer, dtype=np.uint8)[: len(values)] = values
        if not region.live:
            raise _bad(
                "the output's shared-memory region was unregistered during the request",
                f"region {name!r} registered until the answer",
                "unregistered",
                code="region_unregistered",
            )
    return {oip.SHM_REGION: name, oip.SHM_BYTE_SIZE: len(values)}


def _bad(message: str, expected: str, received: str, code: str = "bad_request") -> ServiceError:
    return ServiceError(400, code, message, expected, received)
