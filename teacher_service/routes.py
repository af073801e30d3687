"""The HTTP API: POST /soft-targets, GET /teachers, /healthz, /readyz and /metrics, as one router over the app's
Service.

A request's body is refused as early as its bytes allow (body.py); its rows go to the teacher's batcher, and the
answer is a safetensors file of the tensors asked for. Each route is declared here once, and what /openapi.json
documents is what runs. FastAPI serves every route but two: POST /soft-targets and POST /soft-targets/keys, every
trainer's requests, are served past FastAPI's per-request layers by the app (`framework.TeacherApp.serve_directly`,
set in app.py), which reads each declaration (its path and method, the router's token check, the endpoint's query
model and service) and calls the endpoint itself, answering as FastAPI would (tests/service/test_hot_route.py).
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable
from typing import Annotated

import numpy as np
import torch
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response

from shared import codec, protocol
from shared.protocol import (
    AnswerQuery,
    CacheMode,
    ErrorBody,
    ErrorDetail,
    Output,
    SoftTargetsQuery,
    TeachersResponse,
)
from teacher_service.batcher import Batcher, QueueFull
from teacher_service.body import (
    INLINE_ANSWER_BYTES,
    INLINE_BODY_BYTES,
    check_rows,
    header_check,
    keys_header_check,
    off_loop_if_large,
    prepare_keys,
    prepare_rows,
    read_body,
)
from teacher_service.ensemble import aggregate_probs, mean_logits
from teacher_service.errors import ServiceError
from teacher_service.inference import Rows, RowsResult
from teacher_service.metrics import CONTENT_TYPE
from teacher_service.registry import Teacher
from teacher_service.service import Service

# The dependencies are `async def` though they never await: FastAPI runs a plain `def` dependency on a worker thread,
# two thread hand-offs a request, a large share of the event loop's time under many small requests
# (docs/design/teacher-service.md).


async def current_service(request: Request) -> Service:
    return request.app.state.service


async def require_token(request: Request) -> None:
    """Every route but /healthz and /readyz: the bearer token, when the config sets one.

    The scheme is matched in any case (RFC 9110 section 11.1), the token byte for byte in constant time: a header
    value is Latin-1 bytes, and the config admits only visible-ASCII tokens (shared.configfile.bearer_token).
    """
    token = request.app.state.service.config.server.token
    if token is None:
        return
    given = request.headers.get("authorization", "")
    if not hmac.compare_digest(bearer_credentials(given), token.encode("ascii")):
        received = "no Authorization header" if not given else "a different token"
        raise ServiceError(
            401,
            "unauthorized",
            "this service needs a bearer token",
            "Authorization: Bearer <token>",
            received,
            headers={"WWW-Authenticate": "Bearer"},
        )


def bearer_credentials(header: str) -> bytes:
    """The token of `Bearer <token>` (the scheme in any case, one or more spaces after it) as the bytes sent; b""
    for any other header, which no configured token equals."""
    scheme, _, credentials = header.partition(" ")
    if scheme.lower() != "bearer":
        return b""
    return credentials.lstrip(" ").encode("latin-1")


_BINARY = {"schema": {"type": "string", "format": "binary"}}
_REQUEST_DOC = {
    "requestBody": {
        "required": True,
        "description": (
            "A safetensors file (https://github.com/huggingface/safetensors) holding one tensor named `inputs` "
            "of shape (B, C, H, W) matching the teacher's `input_shape`, with dtype uint8 (0..255, scaled by 1/255 "
            "on the server), float16 or float32 (already in [0, 1]). Python: "
            "`safetensors.torch.save({'inputs': x})` or `shared.codec.encode_inputs(x)`."
        ),
        "content": {protocol.MEDIA_TYPE: _BINARY},
    }
}
_RESPONSES = {
    200: {
        "description": (
            "A safetensors file with the requested tensors: `probs` (B, K) float32, `logits` (B, K) float32 "
            "(weighted mean of member logits), `member_logits` (M, B, K) float32 (raw, unweighted). "
            "Read it with `safetensors.torch.load(response.content)`."
        ),
        "content": {protocol.MEDIA_TYPE: _BINARY},
        "headers": {
            protocol.HEADER_CACHE_HITS: {
                "description": "Rows for which every member came from the cache.",
                "schema": {"type": "integer"},
            },
            protocol.HEADER_TEACHER_VERSIONS: {
                "description": "Member versions (weight hashes), comma-separated.",
                "schema": {"type": "string"},
            },
        },
    },
    400: {"model": ErrorBody, "description": "The body is not a safetensors file, or a query parameter is wrong."},
    404: {"model": ErrorBody, "description": "Unknown teacher."},
    413: {"model": ErrorBody, "description": "The body (or its row count) is over the configured limit."},
    422: {
        "model": ErrorBody,
        "description": "The `inputs` tensor has the wrong dtype, shape, range, or non-finite values.",
    },
    503: {"model": ErrorBody, "description": "The queue is full; retry after `Retry-After` seconds."},
}


router = APIRouter(dependencies=[Depends(require_token)])
# /healthz and /readyz: what a load balancer, compose or an orchestrator probes, without the token
open_router = APIRouter()


@router.post(
    protocol.SOFT_TARGETS_PATH,
    response_class=Response,
    responses=_RESPONSES,
    openapi_extra=_REQUEST_DOC,
    summary="Soft targets of a teacher (ensemble) for a batch of inputs",
    description="The teacher's outputs for each row of the body, as a safetensors file (below); every error is JSON, "
    '`{"error": {"code", "message", "expected", "received"}}`.',
)
async def soft_targets(
    request: Request, query: Annotated[SoftTargetsQuery, Query()], service: Service = Depends(current_service)
) -> Response:
    """Every trainer's traffic: called by the app's direct route (framework.py) as FastAPI would call it, and by
    FastAPI itself only under a root_path (as is soft_target_keys)."""
    t = service.teacher(query.teacher)
    server = service.config.server
    wanted = _wanted(query.outputs)
    cache = query.cache
    batcher = service.batchers[t.name]
    with service.inflight.hold() as held:
        # a batch forming meanwhile may wait for these rows
        async with batcher.arrival():
            body = await read_body(request, server, held, header_check(t.config.input_shape, server.limits.queue_rows))
            # hashed only where a cache reads or stores the rows
            keyed = service.cache is not None and cache is not CacheMode.bypass
            rows = await off_loop_if_large(
                service.coding_executor,
                len(body),
                INLINE_BODY_BYTES,
                prepare_rows,
                body,
                t.config.input_shape,
                cache,
                keyed,
            )
            # from here only the decoded rows are held
            del body
            # the header check refuses a declared row count over the bound; this one holds whatever was declared
            check_rows(len(rows), server.limits.queue_rows)
            queued = enqueue(batcher, rows)
        result = await queued
        tau = t.config.temperature if query.temperature is None else query.temperature
        payload = await off_loop_if_large(
            service.coding_executor,
            result.member_logits.numel() * 4,
            INLINE_ANSWER_BYTES,
            _encode_result,
            result,
            t,
            tau,
            wanted,
        )
    service.metrics.request(t.name, 200, len(rows))
    return Response(payload, media_type=protocol.MEDIA_TYPE, headers=answer_headers(t, result.cache_hits))


@router.post(
    protocol.SOFT_TARGET_KEYS_PATH,
    response_class=Response,
    summary="Keys first: the soft targets of the rows the cache holds, by their keys",
    description=(
        f"Body: a safetensors file with one uint8 tensor `{protocol.KEYS_KEY}` of shape (N, 16), each row the "
        "blake2b-128 content hash of an input row as it would be sent (`shared.hashing.row_keys`). Answer: the "
        f"requested outputs for the rows every member has cached, in order, and `{protocol.FOUND_KEY}` (N,) uint8 "
        f"saying which rows those are; send the others to {protocol.SOFT_TARGETS_PATH}. Offered when /teachers "
        f"lists `{protocol.KEYS_FIRST}` in `features`."
    ),
    openapi_extra={"requestBody": {"required": True, "content": {protocol.MEDIA_TYPE: _BINARY}}},
    responses={
        **_RESPONSES,
        200: {
            "description": f"The requested tensors for the found rows only, and `{protocol.FOUND_KEY}` (N,) uint8.",
            "content": {protocol.MEDIA_TYPE: _BINARY},
            "headers": _RESPONSES[200]["headers"],
        },
        404: {"model": ErrorBody, "description": "Unknown teacher, or a service without a cache (`no_cache`)."},
        422: {"model": ErrorBody, "description": f"The body is not one uint8 `{protocol.KEYS_KEY}` tensor (N, 16)."},
    },
)
async def soft_target_keys(
    request: Request, query: Annotated[AnswerQuery, Query()], service: Service = Depends(current_service)
) -> Response:
    t = service.teacher(query.teacher)
    if protocol.KEYS_FIRST not in service.features:
        raise ServiceError(
            404,
            "no_cache",
            "this service has no cache, so it offers no keys-first path",
            f"POST {protocol.SOFT_TARGETS_PATH} with the rows",
            "a keys-first request",
        )
    server = service.config.server
    wanted = _wanted(query.outputs)
    with service.inflight.hold() as held:
        body = await read_body(request, server, held, keys_header_check(server.limits.queue_rows))
        keys = prepare_keys(body)
        check_rows(len(keys), server.limits.queue_rows)
        member_logits, found = await service.cached(t.name, keys)
    tau = t.config.temperature if query.temperature is None else query.temperature
    tensors = outputs_of(member_logits, t, tau, wanted)
    tensors[protocol.FOUND_KEY] = torch.from_numpy(found.astype(np.uint8))
    payload = await off_loop_if_large(
        service.coding_executor, member_logits.numel() * 4, INLINE_ANSWER_BYTES, codec.encode, tensors
    )
    service.metrics.request(t.name, 200, int(found.sum()))
    return Response(payload, media_type=protocol.MEDIA_TYPE, headers=answer_headers(t, int(found.sum())))


@router.get(protocol.TEACHERS_PATH, response_model=TeachersResponse)
async def teachers(service: Service = Depends(current_service)) -> TeachersResponse:
    return TeachersResponse(teachers=[t.info() for t in service.teachers.values()], features=service.features)


@open_router.get(protocol.HEALTH_PATH)
async def healthz(service: Service = Depends(current_service)) -> dict:
    return {"status": "ok", "device": service.device, "teachers": sorted(service.teachers)}


@open_router.get(
    protocol.READY_PATH,
    responses={503: {"model": ErrorBody, "description": "Not ready: the error's `received` says what is not."}},
)
async def readyz(service: Service = Depends(current_service)) -> Response:
    """Readiness, where /healthz is liveness: 200 only while the service takes queries (Service.not_ready says
    when); else 503 in the service's error shape, saying what is not ready. A probe's answer, not a refused
    request: not counted in akd_requests_total."""
    reasons = service.not_ready()
    if not reasons:
        return JSONResponse({"status": "ready", "teachers": sorted(service.teachers)})
    detail = ErrorDetail(
        code="not_ready",
        message="the service is not ready for queries: " + "; ".join(reasons),
        expected="every teacher's members loaded, the cache verified, the service not shutting down",
        received="; ".join(reasons),
    )
    return JSONResponse(ErrorBody(error=detail).model_dump(), status_code=503)


@router.get(protocol.METRICS_PATH, response_class=Response)
async def metrics(service: Service = Depends(current_service)) -> Response:
    return Response(service.metrics.render(), media_type=CONTENT_TYPE)


def enqueue(batcher: Batcher, rows: Rows) -> Awaitable[RowsResult]:
    """The rows queued for the teacher's next batches, or 503 with Retry-After when its queue is full."""
    try:
        return batcher.enqueue(rows)
    except QueueFull as exc:
        raise ServiceError(
            503,
            "queue_full",
            "the service is saturated; retry shortly",
            f"fewer than {exc.limit} queued rows",
            f"{exc.queued} queued rows",
            headers={"Retry-After": "1"},
        ) from None


def answer_headers(teacher: Teacher, hits: int) -> dict[str, str]:
    return {
        protocol.HEADER_CACHE_HITS: str(hits),
        protocol.HEADER_TEACHER_VERSIONS: ",".join(teacher.versions),
        protocol.HEADER_TEACHER: teacher.name,
    }


def _wanted(outputs: str) -> list[Output]:
    try:
        return protocol.parse_outputs(outputs)
    except ValueError as exc:
        raise ServiceError(
            400,
            "bad_outputs",
            f"outputs: {exc}",
            f"a comma list of {', '.join(o.value for o in Output)}",
            repr(outputs),
        ) from None


def outputs_of(
    member_logits: torch.Tensor, teacher: Teacher, temperature: float, wanted: list[Output]
) -> dict[str, torch.Tensor]:
    tensors = {}
    if Output.probs in wanted:
        tensors["probs"] = aggregate_probs(member_logits, teacher.weights, temperature, teacher.config.aggregate)
    if Output.logits in wanted:
        tensors["logits"] = mean_logits(member_logits, teacher.weights)
    if Output.member_logits in wanted:
        tensors["member_logits"] = member_logits
    return tensors


def _encode_result(result: RowsResult, teacher: Teacher, temperature: float, wanted: list[Output]) -> bytes:
    return codec.encode(outputs_of(result.member_logits, teacher, temperature, wanted))
