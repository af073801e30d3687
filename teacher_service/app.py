"""The FastAPI app factory: `create_app(config)` loads the teachers and wires the pieces.

Teachers load eagerly (a bad config fails before the server binds a port); the
batchers and the periodic cache flush start with the app, and a clean shutdown
flushes the cache.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from shared import codec, protocol
from shared.ensemble import aggregate_probs, mean_logits
from shared.hashing import row_keys
from shared.protocol import CacheMode, ErrorBody, ErrorDetail, Output, TeachersResponse
from teacher_service.batcher import Batcher, QueueFull
from teacher_service.cache import LogitCache
from teacher_service.config import ServiceConfig
from teacher_service.inference import Rows, RowsResult, TeacherRunner
from teacher_service.metrics import CONTENT_TYPE, Metrics
from teacher_service.registry import Teacher, load_teachers, resolve_device

log = logging.getLogger("akd.service")


class ServiceError(Exception):
    """A request the service refuses: becomes a JSON error saying what was expected and what came."""

    def __init__(self, status: int, code: str, message: str, expected: str | None = None, received: str | None = None, headers=None):
        super().__init__(message)
        self.status, self.headers = status, headers
        self.detail = ErrorDetail(code=code, message=message, expected=expected, received=received)


@dataclass
class Service:
    config: ServiceConfig
    teachers: dict[str, Teacher]
    runners: dict[str, TeacherRunner]
    cache: LogitCache | None
    metrics: Metrics
    executor: ThreadPoolExecutor
    device: str
    batchers: dict[str, Batcher] | None = None

    def teacher(self, name: str | None) -> Teacher:
        if name is None:
            if len(self.teachers) == 1:
                return next(iter(self.teachers.values()))
            raise ServiceError(400, "teacher_required", "several teachers are served: name one with ?teacher=", f"one of {sorted(self.teachers)}", "no teacher")
        if name not in self.teachers:
            raise ServiceError(404, "unknown_teacher", f"no teacher named {name!r}", f"one of {sorted(self.teachers)}", repr(name))
        return self.teachers[name]


def build_service(config: ServiceConfig) -> Service:
    device = resolve_device(config.server.device)
    teachers = load_teachers(config, device)
    server = config.server
    cache = LogitCache(server.cache_dir, server.cache_max_bytes, server.cache_chunk_rows) if server.cache_dir else None
    metrics = Metrics()
    runners = {
        name: TeacherRunner(t, cache, device, metrics, server.autocast, server.channels_last) for name, t in teachers.items()
    }
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="akd-inference")
    service = Service(config, teachers, runners, cache, metrics, executor, str(device))
    metrics.on_collect(lambda: _refresh_cache_gauges(service))
    return service


def _refresh_cache_gauges(service: Service) -> None:
    if service.cache is None:
        return
    m, cache = service.metrics, service.cache
    for ns in cache.namespaces:
        m.cache_rows.labels(ns.version).set(ns.rows)
        m.cache_committed_rows.labels(ns.version).set(ns.committed)
        m.cache_write_errors.labels(ns.version).set(ns.write_errors)
    m.cache_bytes.set(cache.budget.used_bytes)
    m.cache_max_bytes.set(cache.budget.max_bytes)
    m.cache_full.set(int(cache.budget.full))


async def _flush_periodically(service: Service, every_s: float) -> None:
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(every_s)
        # submitted from the inference thread, which owns the cache's in-memory state
        await loop.run_in_executor(service.executor, lambda: [ns.flush() for ns in service.cache.namespaces])


def create_app(config: ServiceConfig) -> FastAPI:
    service = build_service(config)
    server = config.server

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.batchers = {
            name: Batcher(
                name, runner.run, service.executor, service.metrics,
                server.max_batch_rows, server.max_wait_ms, server.max_queue_rows, coalesce=server.batching,
            )
            for name, runner in service.runners.items()
        }
        for b in service.batchers.values():
            b.start()
        flusher = asyncio.create_task(_flush_periodically(service, server.cache_flush_s)) if service.cache else None
        log.info("serving %s on %s", ", ".join(service.teachers), service.device)
        try:
            yield
        finally:
            if flusher:
                flusher.cancel()
            for b in service.batchers.values():
                await b.close()
            if service.cache:
                await asyncio.get_running_loop().run_in_executor(service.executor, service.cache.close)
                log.info("cache flushed")
            service.executor.shutdown(wait=True)

    app = FastAPI(
        title="AKD teacher service",
        summary="Soft targets of robust teachers and teacher ensembles, cached in zarr, shared by many trainers.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.service = service
    _install_error_handlers(app)
    _add_routes(app, service)
    return app


def _install_error_handlers(app: FastAPI) -> None:
    def respond(request: Request, status: int, detail: ErrorDetail, headers=None) -> JSONResponse:
        service: Service = request.app.state.service
        service.metrics.request(request.query_params.get("teacher", "-"), status)
        return JSONResponse(ErrorBody(error=detail).model_dump(), status_code=status, headers=headers)

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError):
        return respond(request, exc.status, exc.detail, exc.headers)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        log.exception("request failed: %s", exc)
        detail = ErrorDetail(code="internal_error", message=f"the service failed on this request: {type(exc).__name__}: {exc}")
        return respond(request, 500, detail)

    @app.exception_handler(RequestValidationError)
    async def query_error(request: Request, exc: RequestValidationError):
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"][1:]) or str(err["loc"][0])
        detail = ErrorDetail(
            code="bad_parameter", message=f"{where}: {err['msg']}", expected=err["msg"], received=repr(err.get("input"))
        )
        return respond(request, 422, detail)


def _check_token(request: Request) -> None:
    token = request.app.state.service.config.server.token
    if token is None:
        return
    given = request.headers.get("authorization", "")
    if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
        received = "no Authorization header" if not given else "a different token"
        raise ServiceError(401, "unauthorized", "this service needs a bearer token", "Authorization: Bearer <token>", received,
                           headers={"WWW-Authenticate": "Bearer"})


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
            protocol.HEADER_CACHE_HITS: {"description": "Rows for which every member came from the cache.", "schema": {"type": "integer"}},
            protocol.HEADER_TEACHER_VERSIONS: {"description": "Member versions (weight hashes), comma-separated.", "schema": {"type": "string"}},
        },
    },
    400: {"model": ErrorBody, "description": "The body is not a safetensors file, or a query parameter is wrong."},
    401: {"model": ErrorBody, "description": "A bearer token is configured and was not given."},
    404: {"model": ErrorBody, "description": "Unknown teacher."},
    413: {"model": ErrorBody, "description": "The body (or its row count) is over the configured limit."},
    422: {"model": ErrorBody, "description": "The `inputs` tensor has the wrong dtype, shape, range, or non-finite values."},
    503: {"model": ErrorBody, "description": "The queue is full; retry after `Retry-After` seconds."},
}


def _add_routes(app: FastAPI, service: Service) -> None:
    limits = service.config.server

    @app.post(
        protocol.SOFT_TARGETS_PATH,
        response_class=Response,
        responses=_RESPONSES,
        openapi_extra=_REQUEST_DOC,
        dependencies=[Depends(_check_token)],
        summary="Soft targets of a teacher (ensemble) for a batch of inputs",
    )
    async def soft_targets(
        request: Request,
        teacher: str | None = Query(None, description="Teacher name; optional when only one is served."),
        temperature: float | None = Query(None, gt=0, allow_inf_nan=False, description="Default: the teacher's."),
        outputs: str = Query("probs", description="Comma list of `probs`, `logits`, `member_logits`."),
        cache: CacheMode = Query(CacheMode.use),
    ) -> Response:
        t = service.teacher(teacher)
        try:
            wanted = protocol.parse_outputs(outputs)
        except ValueError as exc:
            raise ServiceError(400, "bad_outputs", f"outputs: {exc}", f"a comma list of {', '.join(o.value for o in Output)}", repr(outputs)) from None
        batcher = service.batchers[t.name]
        async with batcher.arrival():  # a batch forming meanwhile may wait for these rows
            body = await _read_body(request, limits.max_body_bytes)
            rows = await _off_loop_if_large(len(body), _prepare_rows, body, t.config.input_shape, cache)
            if len(rows.keys) > limits.max_queue_rows:
                raise ServiceError(413, "too_many_rows", "the request has more rows than the queue holds",
                                   f"at most {limits.max_queue_rows} rows", f"{len(rows.keys)} rows")
            try:
                queued = batcher.enqueue(rows)
            except QueueFull as exc:
                raise ServiceError(503, "queue_full", "the service is saturated; retry shortly",
                                   f"fewer than {exc.limit} queued rows", f"{exc.queued} queued rows", headers={"Retry-After": "1"}) from None
        result = await queued
        tau = t.config.temperature if temperature is None else temperature
        payload = await _off_loop_if_large(result.member_logits.numel() * 4, _encode_result, result, t, tau, wanted)
        service.metrics.request(t.name, 200, len(rows.keys))
        return Response(payload, media_type=protocol.MEDIA_TYPE, headers={
            protocol.HEADER_CACHE_HITS: str(result.cache_hits),
            protocol.HEADER_TEACHER_VERSIONS: ",".join(t.versions),
            protocol.HEADER_TEACHER: t.name,
        })

    @app.get(protocol.TEACHERS_PATH, response_model=TeachersResponse, dependencies=[Depends(_check_token)])
    async def teachers() -> TeachersResponse:
        return TeachersResponse(teachers=[t.info() for t in service.teachers.values()])

    @app.get(protocol.HEALTH_PATH)
    async def healthz() -> dict:
        return {"status": "ok", "device": service.device, "teachers": sorted(service.teachers)}

    @app.get(protocol.METRICS_PATH, response_class=Response, dependencies=[Depends(_check_token)])
    async def metrics() -> Response:
        return Response(service.metrics.render(), media_type=CONTENT_TYPE)


# Below this many bytes, decoding or encoding on the event loop costs less than the hop to a worker thread
# (about 0.1 ms per 32 KiB here), and the loop stays free for other requests.
INLINE_BYTES = 128 << 10


async def _off_loop_if_large(size: int, fn, *args):
    return fn(*args) if size <= INLINE_BYTES else await run_in_threadpool(fn, *args)


async def _read_body(request: Request, limit: int) -> bytes:
    """Stop reading past `limit`: a huge body costs the server nothing."""
    def too_large(size: str) -> ServiceError:
        return ServiceError(413, "body_too_large", "the request body is over the configured limit", f"at most {limit} bytes", size)

    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large(f"{declared} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(f"more than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _prepare_rows(body: bytes, input_shape: tuple[int, int, int], cache: CacheMode) -> Rows:
    try:
        x = codec.validate_inputs(codec.decode(body), input_shape)
    except codec.CodecError as exc:
        status = 400 if exc.code == "bad_body" else 422
        raise ServiceError(status, exc.code, exc.message, exc.expected, exc.received) from None
    return Rows(x, row_keys(x), cache)  # scaled to [0, 1] on the inference thread


def _encode_result(result: RowsResult, teacher: Teacher, temperature: float, wanted: list[Output]) -> bytes:
    member_logits = result.member_logits
    tensors = {}
    if Output.probs in wanted:
        tensors["probs"] = aggregate_probs(member_logits, teacher.weights, temperature, teacher.config.aggregate)
    if Output.logits in wanted:
        tensors["logits"] = mean_logits(member_logits, teacher.weights)
    if Output.member_logits in wanted:
        tensors["member_logits"] = member_logits
    return codec.encode(tensors)
