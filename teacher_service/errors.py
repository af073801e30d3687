"""The service's refusals: every error a client gets is JSON saying what was expected and what came (ErrorBody).

`ServiceError` is raised anywhere a request is refused; `error_response` turns it, a wrong query parameter, the
router's refusals (no such path, a method the path does not answer), a client that hung up and any unexpected failure
into responses, and counts each in the metrics. FastAPI's exception handlers (installed here) and the app's direct
route (framework.py) both answer through it, so both ways of serving a request refuse it alike.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from shared import oip, oip_models
from shared.protocol import ErrorBody, ErrorDetail

log = logging.getLogger("akd.service")


class ServiceError(Exception):
    """A request the service refuses: becomes a JSON error saying what was expected and what came."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        expected: str | None = None,
        received: str | None = None,
        headers=None,
    ):
        super().__init__(message)
        self.status, self.headers = status, headers
        self.detail = ErrorDetail(code=code, message=message, expected=expected, received=received)


class ClientGone(Exception):
    """The client hung up before its body was in: its doing, not the server's (counted as 499, logged in one line)."""

    def __init__(self, received: int, declared: str | None):
        super().__init__(f"the client went away after {received} of {declared or 'an undeclared number of'} body bytes")


def install_error_handlers(app: FastAPI) -> None:
    """The app's error responses, as `error_response` writes them."""

    async def handle(request: Request, exc: Exception) -> Response:
        return error_response(request, exc)

    for exc_class in (ClientGone, ServiceError, RequestValidationError, HTTPException, Exception):
        app.add_exception_handler(exc_class, handle)


def error_response(request: Request, exc: Exception) -> Response:
    """What a failed request gets, counted in the metrics under its teacher label (Service.label).

    Written once for both ways a request is served: FastAPI's exception handlers and the direct route (framework.py).
    """
    service = request.app.state.service
    if isinstance(exc, ClientGone):
        # nginx's "client closed request": not a server error
        service.metrics.request(service.label(request), 499)
        log.info("%s %s: %s", request.method, request.url.path, exc)
        # nobody reads this response: uvicorn drops it, the connection being gone
        return Response(status_code=499)
    if isinstance(exc, ServiceError):
        status, detail, headers = exc.status, exc.detail, exc.headers
    elif isinstance(exc, RequestValidationError):
        status, detail, headers = 400, _bad_parameter(exc), None
    elif isinstance(exc, HTTPException):
        # the router's own: no such path (404), not this method (405, with Allow)
        status, detail, headers = exc.status_code, _routing_refusal(request, exc), exc.headers
    else:
        log.exception("request failed: %s", exc, exc_info=exc)
        detail = ErrorDetail(
            code="internal_error", message=f"the service failed on this request: {type(exc).__name__}: {exc}"
        )
        status, headers = 500, None
    service.metrics.request(service.label(request), status)
    return JSONResponse(_body(request, detail), status_code=status, headers=headers)


def _body(request: Request, detail: ErrorDetail) -> dict:
    """The native ErrorBody; under /v2, the Open Inference Protocol's `{"error": "..."}`, with the same fields."""
    if not request.url.path.startswith(oip.V2 + "/") and request.url.path != oip.V2:
        return ErrorBody(error=detail).model_dump()
    said = [
        f"expected {detail.expected}" if detail.expected else "",
        f"received {detail.received}" if detail.received else "",
    ]
    message = detail.message + (f" ({'; '.join(s for s in said if s)})" if any(said) else "")
    return oip_models.ErrorResponse(
        error=message, code=detail.code, expected=detail.expected, received=detail.received
    ).model_dump()


def _bad_parameter(exc: RequestValidationError) -> ErrorDetail:
    """A wrong query parameter is a 400, like a wrong `outputs`; 422 is kept for a wrong `inputs` tensor."""
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"][1:]) or str(err["loc"][0])
    return ErrorDetail(
        code="bad_parameter", message=f"{where}: {err['msg']}", expected=err["msg"], received=repr(err.get("input"))
    )


def _routing_refusal(request: Request, exc: HTTPException) -> ErrorDetail:
    """Starlette's refusals before any route runs, in the service's error shape rather than its `{"detail": ...}`."""
    asked = f"{request.method} {request.url.path}"
    if exc.status_code == 405:
        allowed = (exc.headers or {}).get("Allow", "")
        return ErrorDetail(
            code="method_not_allowed",
            message=f"{request.url.path} does not answer {request.method}",
            expected=f"{allowed} {request.url.path}",
            received=asked,
        )
    if exc.status_code == 404:
        return ErrorDetail(
            code="not_found",
            message=f"no such path: {request.url.path}",
            expected="a path this service serves (GET /openapi.json lists them)",
            received=asked,
        )
    return ErrorDetail(code=f"http_{exc.status_code}", message=str(exc.detail), received=asked)
