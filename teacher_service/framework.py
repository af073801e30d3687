"""Where the service bends its frameworks: the one module that relies on FastAPI's, Starlette's and uvicorn's
internals rather than on their documented use. Each bend is kept because it was measured to matter, and is tested
against the framework's own way (tests/service/test_hot_route.py, tests/service/test_limits.py) on the versions in
`TESTED_VERSIONS`, which pyproject.toml pins (tests/service/test_framework_versions.py holds the three together).

`TeacherApp` overrides `FastAPI.__call__` to serve a few declared routes (POST /soft-targets and its keys-first
POST /soft-targets/keys, every trainer's requests, and the Open Inference Protocol's POST /v2/models/{model}/infer)
directly, past FastAPI's per-request layers: on a cached small request, its telemetry, Starlette's middleware stack,
the router's match over every route and dependency solving are a sizeable share of the event loop's CPU, and that
loop bounds how many trainers one teacher serves (measured: docs/design/teacher-service.md). It relies on:

- `FastAPI.__call__(scope, receive, send)` being the app's whole way in, which sets `scope["root_path"]` from
  `FastAPI.root_path` (unset here) and, through `Starlette.__call__`, `scope["app"]`, the app `Request.app` reads;
  every request it does not serve directly still goes through it;
- the `APIRoute` an `APIRouter` registered for the endpoint (`APIRouter.routes`): its `endpoint`, `path`,
  `methods`, `name` and `dependencies` (the router's `Depends` with the route's, which FastAPI awaits in order
  before the endpoint's own `Depends` parameters, and those before it validates the query), its `path_regex` and
  `param_convertors` (a `str` path parameter's value is its match, which Starlette's routing sets in
  `scope["path_params"]`), and the router included in the app without a prefix (`url_path_for` gives the route's
  own path) or dependencies of its own;
- how FastAPI reads a query model (a parameter `Annotated[Model, Query()]`): the model validated from the query
  string, the last value of a repeated name, a failure raised as `RequestValidationError` whose errors' `loc` start
  with "query";
- FastAPI returning an endpoint's `Response` as it is, and answering every exception through the app's exception
  handlers, which are `errors.error_response` for every class (errors.install_error_handlers): the direct route
  calls it itself.

`GuardedProtocol` subclasses `HttpToolsProtocol` (uvicorn.protocols.http.httptools_impl, not uvicorn's public API),
what uvicorn's `http="auto"` picks when httptools is installed, for server.py's head deadline, head size bound and
connection limit: uvicorn alone holds a connection forever until its request head is complete, and enough idle or
trickling sockets make good requests fail; only the server's protocol sees a connection before its head is in. It
relies on:

- `uvicorn.Config(http=<class>)` making one instance of the class per connection;
- the methods it extends, each calling uvicorn's: `connection_made`, `data_received`, `on_response_complete`
  (called when a response is done), `connection_lost`, `send_400_response`, and the httptools parser callbacks
  `on_message_begin`, `on_url`, `on_header`;
- the attributes `connections` (the server's set of open connections, this one added by `connection_made`), `app`
  (the ASGI app the connection's next request runs, read when its head is complete), `cycle` (a new
  `RequestResponseCycle` at each complete head, with `response_complete`), `transport` and `loop`;
- an exception raised in a parser callback surfacing from the parser as `httptools.HttpParserError`, which
  `data_received` answers with `send_400_response`;
- the cycle's body buffer (`RequestResponseCycle.body`): `on_body` appends each parsed piece to it with `+=` and
  reads its `len`, and `receive` hands the app `bytes(cycle.body)`, then sets it to a new `bytearray()`. uvicorn's
  bytearray copies every byte of a body twice on the event loop (appended, then copied out); `BodyPieces` keeps the
  pieces as the parser made them, so that a receive of one piece copies nothing.

`DrainingServer` subclasses `uvicorn.Server` for server.py's drain: a stopped service keeps serving, no longer
ready, for `[server.timeouts] drain_s` before uvicorn's own graceful shutdown, which closes the listening socket at
once. It relies on `Server.handle_exit(sig, frame)` being the handler uvicorn installs for SIGINT and SIGTERM while it
runs (on the main thread), and on it only recording the signal (re-raised after a graceful exit) and setting
`should_exit` (or `force_exit` for a second SIGINT), which the server's main loop polls: so it may be called later,
from another thread.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import re
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib.metadata import version
from typing import Annotated, Any, ClassVar, Protocol, get_args, get_origin, get_type_hints

from fastapi import APIRouter, FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.params import Depends, Query
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from starlette.convertors import StringConvertor
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send
from uvicorn import Config, Server

# What uvicorn's "auto" picks when httptools is installed (a dependency): its parser calls back at each
# request's first byte, URL and header, which the head deadline and size bound below hook into.
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from teacher_service.errors import error_response

log = logging.getLogger("akd.service")

# The minor versions this module is tested with, each "MAJOR.MINOR"; pyproject.toml pins each to it.
TESTED_VERSIONS = {"fastapi": "0.165", "starlette": "1.10", "uvicorn": "0.55"}


def untested_versions() -> list[str]:
    """One line for each framework whose installed minor version is not the tested one, naming both."""
    return [
        f"{package} {version(package)} is installed, but teacher_service/framework.py is tested with {package} "
        f"{tested}.x"
        for package, tested in TESTED_VERSIONS.items()
        if version(package).split(".")[:2] != tested.split(".")
    ]


def warn_if_untested() -> None:
    """A warning at start-up for each untested framework: the service still runs, its framework bends unproven."""
    for line in untested_versions():
        log.warning("%s; the service relies on its internals, which may have changed", line)


class TeacherApp(FastAPI):
    """The service's FastAPI app, with the routes of a few endpoints served directly (`serve_directly`)."""

    direct_routes: tuple[DirectRoute, ...] = ()

    def serve_directly(self, router: APIRouter, endpoint: Callable[..., Awaitable[Response]]) -> None:
        """Serve the route `router` declares for `endpoint` past FastAPI's per-request layers, as FastAPI would.

        `router` is included in this app without a prefix or dependencies of its own (the prefix is checked).
        """
        self.direct_routes = (*self.direct_routes, DirectRoute.of(self, router, endpoint))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        for direct in self.direct_routes:
            if direct.serves(scope):
                # what Starlette sets, and what request.app reads
                scope["app"] = self
                await direct(scope, receive, send)
                return
        await super().__call__(scope, receive, send)


Dependency = Callable[[Request], Awaitable[Any]]


@dataclass(frozen=True)
class DirectRoute:
    """A route FastAPI registered, served without FastAPI: what FastAPI would do for it, read from its declaration.

    `of` refuses a route that declares anything done here differently from FastAPI, so the declaration stays the
    one truth: the endpoint's parameters may be only the request, one query model, `Depends` of a one-argument
    `async def (request)`, and `str` path parameters (which any path segment matches, as FastAPI's `str` does), and
    the route's own dependencies the same.
    """

    path: str
    # the path's pattern where it has parameters (APIRoute.path_regex); None for a fixed path
    pattern: re.Pattern | None
    method: str
    endpoint: Callable[..., Awaitable[Response]]
    # the route's `dependencies` (the router's): awaited in order, values unused
    checks: tuple[Dependency, ...]
    # the endpoint's `Depends` parameters, by name
    dependencies: tuple[tuple[str, Dependency], ...]
    # the endpoint's query model parameter
    query: tuple[str, type[BaseModel]] | None
    # the endpoint's `Request` parameter
    request: str | None
    # the endpoint's path parameters, by name
    path_parameters: tuple[str, ...] = ()

    @classmethod
    def of(cls, app: FastAPI, router: APIRouter, endpoint: Callable[..., Awaitable[Response]]) -> DirectRoute:
        route = _route_of(app, router, endpoint)
        dependencies, query, request, in_path = [], None, None, []
        for name, hint, default in _parameters(endpoint):
            model = _query_model(hint)
            if isinstance(default, Depends):
                dependencies.append((name, _plain(default, endpoint)))
            elif isinstance(hint, type) and issubclass(hint, Request):
                request = name
            elif query is None and model is not None:
                query = (name, model)
            elif name in route.param_convertors and hint is str and default is inspect.Parameter.empty:
                in_path.append(name)
            else:
                raise TypeError(f"{endpoint.__name__}: a direct route cannot make parameter {name!r} as FastAPI would")
        if set(in_path) != set(route.param_convertors) or any(
            type(c) is not StringConvertor for c in route.param_convertors.values()
        ):
            raise TypeError(f"{endpoint.__name__}: a direct route's path parameters are `str` parameters of its own")
        (method,) = route.methods
        checks = tuple(_plain(d, endpoint) for d in route.dependencies)
        awaited = [*checks, *(fn for _, fn in dependencies)]
        if len(set(awaited)) < len(awaited):
            raise TypeError(f"{endpoint.__name__}: FastAPI awaits a repeated dependency once; a direct route would not")
        pattern = route.path_regex if in_path else None
        return cls(route.path, pattern, method, endpoint, checks, tuple(dependencies), query, request, tuple(in_path))

    def serves(self, scope: Scope) -> bool:
        """This route's requests, but under a root_path (which FastAPI's routing strips): those are FastAPI's."""
        if scope["type"] != "http" or scope["method"] != self.method or scope.get("root_path"):
            return False
        if self.pattern is None:
            return scope["path"] == self.path
        return self.pattern.match(scope["path"]) is not None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.pattern is not None:
            # what Starlette's routing sets, and what request.path_params reads
            scope["path_params"] = self.pattern.match(scope["path"]).groupdict()
        request = Request(scope, receive)
        try:
            response = await self.endpoint(**await self.arguments(request))
        except Exception as exc:
            response = error_response(request, exc)
        await response(scope, receive, send)

    async def arguments(self, request: Request) -> dict[str, Any]:
        """The endpoint's arguments, made and refused in FastAPI's order: the checks, the dependencies, the query."""
        for check in self.checks:
            await check(request)
        arguments = {}
        for name, dependency in self.dependencies:
            arguments[name] = await dependency(request)
        if self.query is not None:
            arguments[self.query[0]] = read_query(self.query[1], request)
        if self.request is not None:
            arguments[self.request] = request
        for name in self.path_parameters:
            arguments[name] = request.path_params[name]
        return arguments


def read_query(model: type[BaseModel], request: Request) -> BaseModel:
    """The query as FastAPI reads a query model (the last value of a repeated name), refused as FastAPI refuses it."""
    try:
        return model.model_validate(dict(request.query_params))
    except ValidationError as exc:
        raise RequestValidationError([{**e, "loc": ("query", *e["loc"])} for e in exc.errors()]) from None


def _route_of(app: FastAPI, router: APIRouter, endpoint: Callable) -> APIRoute:
    routes = [r for r in router.routes if isinstance(r, APIRoute) and r.endpoint is endpoint]
    if len(routes) != 1 or len(routes[0].methods) != 1:
        raise TypeError(f"{endpoint.__name__}: a direct route needs one route of one method")
    if not inspect.iscoroutinefunction(endpoint):
        raise TypeError(f"{endpoint.__name__}: a direct route's endpoint is an `async def`")
    placeholders = {name: f"{{{name}}}" for name in routes[0].param_convertors}
    if app.url_path_for(routes[0].name, **placeholders) != routes[0].path:
        raise TypeError(f"{endpoint.__name__}: a direct route's router is included without a prefix")
    return routes[0]


def _parameters(fn: Callable) -> list[tuple[str, Any, Any]]:
    """(name, type hint with its Annotated metadata, default) of each of `fn`'s parameters."""
    hints = get_type_hints(fn, include_extras=True)
    return [(p.name, hints.get(p.name), p.default) for p in inspect.signature(fn).parameters.values()]


def _query_model(hint: Any) -> type[BaseModel] | None:
    """The model of `Annotated[Model, Query()]`, a query read whole into one pydantic model; None for any other."""
    if get_origin(hint) is not Annotated:
        return None
    model, *metadata = get_args(hint)
    is_model = isinstance(model, type) and issubclass(model, BaseModel)
    return model if is_model and any(isinstance(m, Query) for m in metadata) else None


def _plain(depends: Depends, endpoint: Callable) -> Dependency:
    """`depends`' function, when FastAPI would only await it with the request: `async def f(request: Request)`."""
    fn = depends.dependency
    parameters = _parameters(fn) if fn is not None else []
    plain = (
        inspect.iscoroutinefunction(fn)
        and getattr(depends, "max_concurrency", None) is None
        and len(parameters) == 1
        and isinstance(parameters[0][1], type)
        and issubclass(parameters[0][1], Request)
    )
    if not plain:
        raise TypeError(f"{endpoint.__name__}: a direct route awaits only `async def f(request: Request)` dependencies")
    return fn


class ConnectionGuards(Protocol):
    """What GuardedProtocol enforces, as one server sets it (server.Guards): limits and the responses that say so."""

    max_connections: int
    timeout_header_s: float
    max_header_bytes: int
    head_timeout_response: bytes
    head_too_large_response: bytes

    async def over_limit(self, scope: Scope, receive: Receive, send: Send) -> None: ...


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, with the head deadline, head size bound and connection limit of `guards`."""

    # set on the subclass server.guarded_protocol makes for one server
    guards: ClassVar[ConnectionGuards]

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._head_timer: asyncio.TimerHandle | None = None
        # bytes of the current request head, counted by the parser's callbacks
        self._head_bytes = 0
        self._head_too_large = False
        if len(self.connections) > self.guards.max_connections:
            # counted once, when it opens: it stays refused for its one request
            self.app = self.guards.over_limit
        self._wait_for_head()

    def _wait_for_head(self) -> None:
        self._stop_waiting()
        # a complete head makes a new self.cycle
        self._waiting_cycle = self.cycle
        self._head_started = False
        self._head_timer = self.loop.call_later(self.guards.timeout_header_s, self._head_timed_out)

    def _stop_waiting(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        # a 408 only where part of a request came; an idle connection is just closed, as keep-alive closes one
        if self._head_started:
            self.transport.write(self.guards.head_timeout_response)
        self.transport.close()

    def data_received(self, data: bytes) -> None:
        waiting = self._head_timer is not None
        super().data_received(data)
        if waiting and self.cycle is not self._waiting_cycle:
            # the head is in: the app, and its body deadline, take over
            self._stop_waiting()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.cycle is not None and self.cycle.response_complete:
            # nothing pipelined behind it: the next head is on the clock
            self._wait_for_head()

    def connection_lost(self, exc) -> None:
        self._stop_waiting()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        if not self._head_too_large:
            return super().send_400_response(msg)
        self.transport.write(self.guards.head_too_large_response)
        self.transport.close()

    # httptools' parser callbacks
    def on_body(self, body: bytes) -> None:
        cycle = self.cycle
        # uvicorn's receive leaves a new, empty bytearray after each hand-over; a bytearray with bytes in it is kept
        if cycle is not None and type(cycle.body) is bytearray and not cycle.body:
            cycle.body = BodyPieces()
        super().on_body(body)

    def on_message_begin(self) -> None:
        self._head_bytes, self._head_started = 0, True
        super().on_message_begin()

    def on_url(self, url: bytes) -> None:
        self._count_head(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head(len(name) + len(value) + 4)
        super().on_header(name, value)

    def _count_head(self, n: int) -> None:
        self._head_bytes += n
        if self._head_bytes > self.guards.max_header_bytes:
            self._head_too_large = True
            # httptools raises it as a parser error, which uvicorn answers with send_400_response (here, the 431)
            raise ValueError(f"request head over {self.guards.max_header_bytes} bytes")


class BodyPieces:
    """A request body's pieces as the parser delivered them, in place of uvicorn's bytearray (`cycle.body`): `+=`
    keeps a piece, `len` counts the bytes, and `bytes()` hands them over, joined only when there are several, so
    that a piece reaches the app as the parser made it."""

    __slots__ = ("pieces", "size")

    def __init__(self) -> None:
        self.pieces: list[bytes] = []
        self.size = 0

    def __iadd__(self, piece: bytes) -> BodyPieces:
        self.pieces.append(piece)
        self.size += len(piece)
        return self

    def __len__(self) -> int:
        return self.size

    def __bytes__(self) -> bytes:
        pieces = self.pieces
        return pieces[0] if len(pieces) == 1 and type(pieces[0]) is bytes else b"".join(pieces)


class DrainingServer(Server):
    """uvicorn's server with a drain: the first stop signal calls `on_stop` at once (the service is then no longer
    ready) and passes the signal on to uvicorn `drain_s` later, its requests served meanwhile; a second signal passes
    on at once. With `drain_s` 0 every signal passes on at once, as in uvicorn alone."""

    def __init__(self, config: Config, drain_s: float, on_stop: Callable[[], None]):
        super().__init__(config)
        self._drain_s, self._on_stop = drain_s, on_stop
        self._drain: threading.Timer | None = None

    def handle_exit(self, sig: int, frame) -> None:
        self._on_stop()
        if self._drain is not None or not self._drain_s:
            if self._drain is not None:
                self._drain.cancel()
            super().handle_exit(sig, frame)
            return
        log.info("stop signal: draining for %g s ([server.timeouts] drain_s), then shutting down", self._drain_s)
        self._drain = threading.Timer(self._drain_s, super().handle_exit, (sig, frame))
        self._drain.daemon = True
        self._drain.start()
