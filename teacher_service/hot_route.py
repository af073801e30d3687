"""POST /soft-targets past FastAPI's per-request layers: the one route that carries every trainer's traffic.

FastAPI serves a request through its middleware (telemetry, a body limit, exception handling), a match over every
route, and dependency solving: about a fifth of the event loop's CPU on a cached 16-row request (bench/RESULTS.md
section 12). That loop bounds how many trainers one teacher serves: on a CPU host it takes its cores from the forward
pass, and on a GPU host it is the first thing to saturate (section 11). For this one route, `TeacherApp` does only
what those layers did for it: the bearer token (`routes.require_token`), the query's validation (raising the
RequestValidationError FastAPI raises), the endpoint (`routes.soft_targets`, the function FastAPI calls) and the
error responses (`errors.error_response`, which FastAPI's handlers call). A client cannot tell which way it was
served.

Every other request goes through FastAPI, as does this path under a root_path (which FastAPI's routing strips);
the route is declared to FastAPI too, so the OpenAPI schema documents it.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.requests import Request
from starlette.types import Receive, Scope, Send

from shared.protocol import SOFT_TARGETS_PATH, SoftTargetsQuery
from teacher_service.errors import error_response
from teacher_service.routes import require_token, soft_targets


class TeacherApp(FastAPI):
    """The service's FastAPI app, with POST /soft-targets served by `serve_soft_targets`."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if is_hot(scope):
            scope["app"] = self  # what Starlette sets, and what request.app reads
            await serve_soft_targets(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)


def is_hot(scope: Scope) -> bool:
    return (
        scope["type"] == "http"
        and scope["method"] == "POST"
        and scope["path"] == SOFT_TARGETS_PATH
        and not scope.get("root_path")
    )


async def serve_soft_targets(scope: Scope, receive: Receive, send: Send) -> None:
    request = Request(scope, receive)
    try:
        await require_token(request)
        response = await soft_targets(request, soft_targets_query(request), request.app.state.service)
    except Exception as exc:
        response = error_response(request, exc)
    await response(scope, receive, send)


def soft_targets_query(request: Request) -> SoftTargetsQuery:
    """The query as FastAPI reads a query model (the last value of a repeated name), refused as FastAPI refuses it."""
    try:
        return SoftTargetsQuery.model_validate(dict(request.query_params))
    except ValidationError as exc:
        raise RequestValidationError([{**e, "loc": ("query", *e["loc"])} for e in exc.errors()]) from None
