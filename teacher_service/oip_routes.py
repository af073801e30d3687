"""The Open Inference Protocol's HTTP routes (shared/oip.py), beside the native API and over the same Service: the same
token, limits, batcher, cache and metrics as POST /soft-targets, so that tritonclient, KServe's probes and load tools
written for Triton drive a teacher unchanged.

An infer request goes the native route's way: its body read under the same limits (body.read_body), its rows queued
on the teacher's batcher while it counts as arriving, its answer made by the same ensemble code (routes.outputs_of);
only the reading and writing of bodies differ (oip_codec.py). The health probes are open, as /healthz and /readyz are;
every other route needs the token.
"""

from __future__ import annotations

import contextlib

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from shared import oip, oip_models
from shared.hashing import row_keys
from shared.protocol import CacheMode, Output
from shared.version import VERSION
from teacher_service import oip_codec
from teacher_service.body import INLINE_ANSWER_BYTES, INLINE_BODY_BYTES, check_rows, off_loop_if_large, read_body
from teacher_service.errors import ServiceError
from teacher_service.inference import Rows
from teacher_service.registry import Teacher
from teacher_service.routes import answer_headers, current_service, enqueue, outputs_of, require_token
from teacher_service.service import Service

# what the routes refuse with, in the protocol's error shape (FastAPI's own 422 is never sent; spec.py adds the 401
# where the config sets a token)
_ERRORS = {
    400: {"model": oip_models.ErrorResponse, "description": "A request the protocol cannot read, or a bad parameter."},
    404: {"model": oip_models.ErrorResponse, "description": "Unknown teacher, version or region."},
    422: {"model": oip_models.ErrorResponse, "description": "An `inputs` tensor the teacher cannot take."},
    503: {"model": oip_models.ErrorResponse, "description": "The queue is full; retry after `Retry-After` seconds."},
}
_TAGS = ["Open Inference Protocol (v2)"]
router = APIRouter(dependencies=[Depends(require_token)], tags=_TAGS, responses=_ERRORS)
open_router = APIRouter(tags=_TAGS, responses=_ERRORS)

_JSON = "application/json"


@open_router.get(oip.LIVE_PATH, summary="Liveness (v2): 200 while the process answers")
async def live() -> Response:
    return Response(status_code=200)


@open_router.get(oip.READY_PATH, summary="Readiness (v2): 200 while the service takes queries, else 503")
async def ready(service: Service = Depends(current_service)) -> Response:
    return Response(status_code=503 if service.not_ready() else 200)


@router.get(oip.V2, response_model=oip_models.ServerMetadata, summary="Server metadata (v2)")
async def server_metadata(service: Service = Depends(current_service)) -> oip_models.ServerMetadata:
    extensions = [e for e in oip.EXTENSIONS if e != "system_shared_memory" or service.regions is not None]
    return oip_models.ServerMetadata(name="akd", version=VERSION, extensions=extensions)


@router.get(oip.MODEL_PATH, response_model=oip_models.ModelMetadata, summary="A teacher's metadata (v2)")
async def model_metadata(model: str, service: Service = Depends(current_service)) -> oip_models.ModelMetadata:
    return _metadata(_teacher(service, model, oip.MODEL_VERSION))


@router.get(oip.MODEL_VERSION_PATH, response_model=oip_models.ModelMetadata, include_in_schema=False)
async def version_metadata(
    model: str, version: str, service: Service = Depends(current_service)
) -> oip_models.ModelMetadata:
    return _metadata(_teacher(service, model, version))


@router.get(oip.MODEL_PATH + "/ready", summary="A teacher's readiness (v2): 200 or 503")
async def model_ready(model: str, service: Service = Depends(current_service)) -> Response:
    return _ready(service, _teacher(service, model, oip.MODEL_VERSION))


@router.get(oip.MODEL_VERSION_PATH + "/ready", include_in_schema=False)
async def version_ready(model: str, version: str, service: Service = Depends(current_service)) -> Response:
    return _ready(service, _teacher(service, model, version))


def _ready(service: Service, t: Teacher) -> Response:
    return Response(status_code=503 if service.not_ready(t.name) else 200)


@router.post(oip.MODEL_VERSION_PATH + "/infer", include_in_schema=False)
async def infer_version(
    model: str, version: str, request: Request, service: Service = Depends(current_service)
) -> Response:
    _teacher(service, model, version)
    return await infer(model, request, service)


@router.post(oip.MODEL_PATH + "/infer", summary="Soft targets of a teacher (v2 infer: JSON, binary or shared memory)")
async def infer(model: str, request: Request, service: Service = Depends(current_service)) -> Response:
    """Called by the app's direct route (framework.py) as FastAPI would call it, as is POST /soft-targets."""
    t = _teacher(service, model, oip.MODEL_VERSION)
    server = service.config.server
    batcher = service.batchers[t.name]
    # `in_place`: the shared-memory regions whose rows are read where they lie, held until they are answered
    with service.inflight.hold() as held, contextlib.ExitStack() as in_place:
        async with batcher.arrival():
            declared = request.headers.get("content-length")
            json_length = oip_codec.header_length(
                request.headers.get(oip.HEADER_INFER_LENGTH), int(declared) if (declared or "").isdigit() else None
            )
            body = await read_body(request, server, held, lambda _: False, json_length)
            call, rows = await off_loop_if_large(
                service.coding_executor,
                len(body),
                INLINE_BODY_BYTES,
                _read_rows,
                service,
                t,
                body,
                json_length,
                in_place,
            )
            del body
            asked = oip_codec.requested_outputs(call.request)
            n = len(rows)
            check_rows(n, server.limits.queue_rows)
            queued = enqueue(batcher, rows)
            # from here only the batch holds the rows: nothing keeps a view of a region past its answer
            del rows
            call.inputs = None
        result = await queued
        tau = t.config.temperature if call.query.temperature is None else call.query.temperature
        wanted = [Output(o.name) for o in asked]
        answer = await off_loop_if_large(
            service.coding_executor,
            result.member_logits.numel() * 4,
            INLINE_ANSWER_BYTES,
            lambda: oip_codec.write_answer(
                outputs_of(result.member_logits, t, tau, wanted), asked, call, t.name, service.regions
            ),
        )
    service.metrics.request(t.name, 200, n)
    headers = answer_headers(t, result.cache_hits)
    if answer.json_length is None:
        return Response(answer.body, media_type=_JSON, headers=headers)
    headers[oip.HEADER_INFER_LENGTH] = str(answer.json_length)
    return Response(answer.body, media_type="application/octet-stream", headers=headers)


@router.get(oip.SHM_PATH + "/status", summary="Every registered shared-memory region")
@router.get(oip.SHM_PATH + "/region/{name}/status", summary="One registered shared-memory region")
async def shm_status(name: str | None = None, service: Service = Depends(current_service)) -> JSONResponse:
    return JSONResponse(_regions(service).status(name))


@router.post(oip.SHM_PATH + "/region/{name}/register", summary="Register a system shared-memory region")
async def shm_register(name: str, request: Request, service: Service = Depends(current_service)) -> Response:
    region = await _registration(request)
    _regions(service).register(name, region.key, region.offset, region.byte_size)
    return Response(status_code=200)


@router.post(oip.SHM_PATH + "/unregister", summary="Unregister every shared-memory region")
@router.post(oip.SHM_PATH + "/region/{name}/unregister", summary="Unregister a shared-memory region")
async def shm_unregister(name: str | None = None, service: Service = Depends(current_service)) -> Response:
    _regions(service).unregister(name)
    return Response(status_code=200)


# a registration is a few dozen bytes of JSON
REGISTRATION_BYTES = 4096


async def _registration(request: Request) -> oip_models.RegisterRegion:
    """The registration's JSON, whatever its Content-Type says (tritonclient sends none), read up to a bound."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > REGISTRATION_BYTES:
            raise ServiceError(
                413,
                "body_too_large",
                "a registration is a small JSON object",
                f"at most {REGISTRATION_BYTES} bytes",
                "more",
            )
    try:
        return oip_models.RegisterRegion.model_validate_json(body)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "the body"
        raise ServiceError(
            400,
            "bad_request",
            f"{where}: {err['msg']}",
            '{"key": "/<shm key>", "offset": <int>, "byte_size": <int>}',
            repr(err.get("input")),
        ) from None


def _read_rows(
    service: Service, t: Teacher, body, json_length: int | None, in_place: contextlib.ExitStack
) -> tuple[oip_codec.InferCall, Rows]:
    """The request and its rows, with their keys where a cache reads or stores them (as the native route hashes)."""
    cached = service.cache is not None
    call = oip_codec.read_call(body, json_length, t.config.input_shape, service.regions, cached, in_place)
    keyed = service.cache is not None and call.query.cache is not CacheMode.bypass
    return call, Rows(call.inputs, row_keys(call.inputs) if keyed else None, call.query.cache)


def _teacher(service: Service, model: str, version: str) -> Teacher:
    t = service.teacher(model)
    if version != oip.MODEL_VERSION:
        raise ServiceError(
            404,
            "unknown_version",
            f"teacher {model!r} has one version, {oip.MODEL_VERSION!r} (its members are not versions)",
            repr(oip.MODEL_VERSION),
            repr(version),
        )
    return t


def _metadata(t: Teacher) -> oip_models.ModelMetadata:
    k, m = t.config.num_classes, len(t.members)
    return oip_models.ModelMetadata(
        name=t.name,
        versions=[oip.MODEL_VERSION],
        platform="pytorch_akd_teacher",
        inputs=[oip_models.TensorMetadata(name="inputs", datatype="FP32", shape=[-1, *t.config.input_shape])],
        outputs=[
            oip_models.TensorMetadata(name=Output.probs.value, datatype=oip.OUTPUT_DATATYPE, shape=[-1, k]),
            oip_models.TensorMetadata(name=Output.logits.value, datatype=oip.OUTPUT_DATATYPE, shape=[-1, k]),
            oip_models.TensorMetadata(name=Output.member_logits.value, datatype=oip.OUTPUT_DATATYPE, shape=[m, -1, k]),
        ],
    )


def _regions(service: Service):
    if service.regions is None:
        raise ServiceError(
            404,
            "shared_memory_disabled",
            "this service takes no shared-memory regions",
            "[server.shared_memory] enabled = true",
            "enabled = false",
        )
    return service.regions
