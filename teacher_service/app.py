"""The FastAPI app factory: `create_app(config)` loads the teachers and wires the pieces.

Teachers load eagerly (a bad config fails before the server binds a port); the
batchers and the periodic cache flush start with the app, and a clean shutdown
flushes the cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from shared import codec, protocol
from shared.devices import resolve_device
from shared.ensemble import aggregate_probs, mean_logits
from shared.hashing import row_keys
from shared.protocol import CacheMode, ErrorBody, ErrorDetail, Output, TeachersResponse
from teacher_service.batcher import Batcher, QueueFull
from teacher_service.cache import LogitCache
from teacher_service.config import ServerConfig, ServiceConfig
from teacher_service.inference import Rows, RowsResult, TeacherRunner
from teacher_service.metrics import CONTENT_TYPE, Metrics
from teacher_service.registry import Teacher, load_teachers

log = logging.getLogger("akd.service")


class ServiceError(Exception):
    """A request the service refuses: becomes a JSON error saying what was expected and what came."""

    def __init__(self, status: int, code: str, message: str, expected: str | None = None, received: str | None = None, headers=None):
        super().__init__(message)
        self.status, self.headers = status, headers
        self.detail = ErrorDetail(code=code, message=message, expected=expected, received=received)


class ClientGone(Exception):
    """The client hung up before its body was in: its doing, not the server's (counted as 499, logged in one line)."""

    def __init__(self, received: int, declared: str | None):
        super().__init__(f"the client went away after {received} of {declared or 'an undeclared number of'} body bytes")


class InflightBytes:
    """The request body bytes held by all requests in flight together, bounded by `max_inflight_bytes`.

    `max_body_bytes` and `max_queue_rows` bound one request; without a bound on their sum, a few large
    requests at once hold several times that, and enough of them exhaust memory. Bytes count as they
    arrive (a client that declares a size but sends nothing holds nothing) and stay counted until the
    request is answered, since its decoded tensor lives as long. All on the event loop: no lock.
    """

    def __init__(self, limit: int, metrics: Metrics):
        self.limit, self.used, self._metrics = limit, 0, metrics

    def check(self, n: int) -> None:
        """Refuse now if `n` more bytes would not fit (503 with Retry-After, like a full queue)."""
        if self.used + n > self.limit:
            raise ServiceError(503, "inflight_full", "the service holds as many request bytes as it may; retry shortly",
                               f"at most {self.limit} bytes held by requests in flight", f"{self.used} bytes in flight and {n} more",
                               headers={"Retry-After": "1"})

    @contextlib.contextmanager
    def hold(self):
        """The bytes one request holds, released when it is answered, however it ends."""
        held = _Held(self)
        try:
            yield held
        finally:
            self.used -= held.bytes
            self._metrics.inflight_bytes.set(self.used)


class _Held:
    def __init__(self, budget: InflightBytes):
        self.budget, self.bytes = budget, 0

    def add(self, n: int) -> None:
        self.budget.check(n)
        self.budget.used += n
        self.bytes += n
        self.budget._metrics.inflight_bytes.set(self.budget.used)


@dataclass
class Service:
    config: ServiceConfig
    teachers: dict[str, Teacher]
    runners: dict[str, TeacherRunner]
    cache: LogitCache | None
    metrics: Metrics
    executor: ThreadPoolExecutor
    device: str
    inflight: InflightBytes
    batchers: dict[str, Batcher] | None = None

    def teacher(self, name: str | None) -> Teacher:
        if name is None:
            if len(self.teachers) == 1:
                return next(iter(self.teachers.values()))
            raise ServiceError(400, "teacher_required", "several teachers are served: name one with ?teacher=", f"one of {sorted(self.teachers)}", "no teacher")
        if name not in self.teachers:
            raise ServiceError(404, "unknown_teacher", f"no teacher named {name!r}", f"one of {sorted(self.teachers)}", repr(name))
        return self.teachers[name]

    def label(self, request: Request) -> str:
        """The `teacher` label of a request's metrics: a served name, else "-".

        Never the raw query parameter: anyone, without a token, could make a new series per request.
        """
        name = request.query_params.get("teacher")
        return name if name in self.teachers else "-"


def build_service(config: ServiceConfig) -> Service:
    device = resolve_device(config.server.device, "server.device")
    teachers = load_teachers(config, device)
    server = config.server
    cache = LogitCache(server.cache_dir, server.cache_max_bytes, server.cache_chunk_rows, server.cache_durable) if server.cache_dir else None
    metrics = Metrics()
    runners = {
        name: TeacherRunner(t, cache, device, metrics, server.autocast, server.channels_last) for name, t in teachers.items()
    }
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="akd-inference")
    service = Service(config, teachers, runners, cache, metrics, executor, str(device), InflightBytes(server.max_inflight_bytes, metrics))
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
    for version, (rows, namespaces) in cache.damage_counts().items():
        m.cache_damaged_rows.labels(version).set(rows)
        m.cache_damaged_namespaces.labels(version).set(namespaces)
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
        # served by _add_docs_routes, behind the token like every route but /healthz
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.service = service
    _install_error_handlers(app)
    _add_routes(app, service)
    _add_docs_routes(app)
    return app


def _add_docs_routes(app: FastAPI) -> None:
    """/openapi.json and /docs, behind the token when one is set (FastAPI's own docs routes skip dependencies).

    The /docs page carries the spec inside it rather than fetching /openapi.json, because a browser that
    loaded the page with the token (a header extension, a proxy) would fetch the spec without it.
    """

    @app.get("/openapi.json", include_in_schema=False, dependencies=[Depends(_check_token)])
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False, dependencies=[Depends(_check_token)])
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{app.title} - docs", swagger_ui_parameters={"spec": app.openapi()})


def _install_error_handlers(app: FastAPI) -> None:
    def respond(request: Request, status: int, detail: ErrorDetail, headers=None) -> JSONResponse:
        service: Service = request.app.state.service
        service.metrics.request(service.label(request), status)
        return JSONResponse(ErrorBody(error=detail).model_dump(), status_code=status, headers=headers)

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, exc: ClientGone):
        service: Service = request.app.state.service
        service.metrics.request(service.label(request), 499)  # nginx's "client closed request": not a server error
        log.info("%s %s: %s", request.method, request.url.path, exc)
        return Response(status_code=499)  # nobody reads it; uvicorn drops it

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
        """A wrong query parameter is a 400, like a wrong `outputs`; 422 is kept for a wrong `inputs` tensor."""
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"][1:]) or str(err["loc"][0])
        detail = ErrorDetail(
            code="bad_parameter", message=f"{where}: {err['msg']}", expected=err["msg"], received=repr(err.get("input"))
        )
        return respond(request, 400, detail)


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
        with service.inflight.hold() as held:
            async with batcher.arrival():  # a batch forming meanwhile may wait for these rows
                body = await _read_body(request, limits, held, _header_check(t.config.input_shape, limits.max_queue_rows))
                rows = await _off_loop_if_large(len(body), _prepare_rows, body, t.config.input_shape, cache)
                del body  # the decoded rows are what stays
                _check_rows(len(rows.keys), limits.max_queue_rows)  # the header said so; this holds whatever it said
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


async def _read_body(request: Request, limits: ServerConfig, held: _Held, check_header: Callable[[bytes], bool]) -> bytes:
    """The body, refused as soon as the bytes so far allow, so a body that will be refused is never held whole.

    Past `max_body_bytes`: 413 (before reading, when Content-Length says so). Past what all requests may hold
    together: 503. When the safetensors header, the first bytes, already declares a tensor that will be
    refused (`check_header`): its 413/422 before the rest arrives. When the whole body has not arrived
    `timeout_body_s` after the head: 408, and the connection closes (a stalled or trickling client holds
    nothing longer). A client that hangs up: ClientGone.
    """
    limit = limits.max_body_bytes

    def too_large(size: str) -> ServiceError:
        return ServiceError(413, "body_too_large", "the request body is over the configured limit", f"at most {limit} bytes", size)

    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit():
        if int(declared) > limit:
            raise too_large(f"{declared} bytes")
        held.budget.check(int(declared))

    async def read() -> bytes:
        chunks, size, prefix = [], 0, bytearray()
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise too_large(f"more than {limit} bytes")
                held.add(len(chunk))
                chunks.append(chunk)
                if prefix is not None:  # the header's bytes, until it is complete
                    prefix += chunk
                    prefix = prefix if check_header(prefix) else None
        except ClientDisconnect:
            raise ClientGone(size, declared) from None
        return b"".join(chunks)

    try:
        return await asyncio.wait_for(read(), limits.timeout_body_s)  # one deadline for the whole body, on 3.10 too
    except TimeoutError:
        raise ServiceError(408, "body_timeout", "the request body did not arrive in time",
                           f"the whole body within {limits.timeout_body_s:g} s of the request head",
                           f"{held.bytes} of {declared or 'an undeclared number of'} bytes", headers={"Connection": "close"}) from None


HEADER_PEEK_BYTES = 1 << 20  # a header declaring a few tensors takes a few hundred bytes; this bounds the copy kept while it arrives


def _header_check(input_shape: tuple[int, int, int], max_rows: int) -> Callable[[bytes], bool]:
    """A check of the body's first bytes: refuses the `inputs` tensor its header declares, before it is read or decoded.

    Returns True while the header is incomplete. A header that does not parse, or is not complete within
    HEADER_PEEK_BYTES, is left for `codec.decode`, whose error names the body's size, known once it is all in.
    """
    def check(prefix: bytes) -> bool:
        try:
            tensors = codec.read_header(prefix)
        except codec.UnreadableHeader:
            return False
        if tensors is None:
            return len(prefix) <= HEADER_PEEK_BYTES
        try:
            shape = codec.check_inputs_declared(tensors, input_shape)
        except codec.CodecError as exc:
            raise ServiceError(422, exc.code, exc.message, exc.expected, exc.received) from None
        _check_rows(shape[0], max_rows)
        return False

    return check


def _check_rows(rows: int, max_rows: int) -> None:
    if rows > max_rows:
        raise ServiceError(413, "too_many_rows", "the request has more rows than the queue holds", f"at most {max_rows} rows", f"{rows} rows")


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
