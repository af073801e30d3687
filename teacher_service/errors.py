"""The service's refusals: every error a client gets is JSON saying what was expected and what came (ErrorBody).

`ServiceError` is raised anywhere a request is refused; the handlers installed here turn it, a wrong query
parameter, a client that hung up and any unexpected failure into responses, and count each in the metrics.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

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
    """The app's error responses; each counts in the metrics under the request's teacher label (Service.label)."""

    def respond(request: Request, status: int, detail: ErrorDetail, headers=None) -> JSONResponse:
        service = request.app.state.service
        service.metrics.request(service.label(request), status)
        return JSONResponse(ErrorBody(error=detail).model_dump(), status_code=status, headers=headers)

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, exc: ClientGone):
        service = request.app.state.service
        service.metrics.request(service.label(request), 499)  # nginx's "client closed request": not a server error
        log.info("%s %s: %s", request.method, request.url.path, exc)
        return Response(status_code=499)  # nobody reads it; uvicorn drops it

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError):
        return respond(request, exc.status, exc.detail, exc.headers)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        log.exception("request failed: %s", exc)
        detail = ErrorDetail(
            code="internal_error", message=f"the service failed on this request: {type(exc).__name__}: {exc}"
        )
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
