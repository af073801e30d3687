"""The OpenAPI spec as this service answers: FastAPI's, written from the routes, made true of the config.

What a request needs depends on the config as well as the routes, so the spec says it for the config it is served
with: the bearer token, when one is set, as an HTTP bearer security scheme on every operation but the probes, /healthz
and /readyz (what /docs' "Authorize" and OpenAPI tools send), with its 401; and `teacher`, one of the served names,
required when several are served and optional when one is (the service then answers for it).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from shared import oip
from shared.protocol import HEALTH_PATH, READY_PATH
from teacher_service.config import ServiceConfig

# the security scheme's name in components.securitySchemes
BEARER = "bearerToken"
# the probes, answered without the token
OPEN_PATHS = (HEALTH_PATH, READY_PATH, oip.LIVE_PATH, oip.READY_PATH)
_ERROR_BODY = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
# the Open Inference Protocol's routes answer in its error shape
_V2_ERROR_BODY = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}


def install_spec(app: FastAPI, config: ServiceConfig) -> None:
    """`app.openapi()` (what /openapi.json and /docs serve) returns the spec for `config`, written once."""
    fastapi_spec = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = describe_config(fastapi_spec(), config)
        return app.openapi_schema

    app.openapi = openapi


def describe_config(spec: dict[str, Any], config: ServiceConfig) -> dict[str, Any]:
    """`spec` (FastAPI's, changed in place and returned) with the token and the `teacher` parameter as `config` has
    them."""
    operations = [(path, op) for path, ops in spec["paths"].items() for op in ops.values()]
    for _, op in operations:
        for param in op.get("parameters", []):
            if param["in"] == "query" and param["name"] == "teacher":
                _describe_teacher(param, sorted(config.teachers))
    if config.server.token is not None:
        spec.setdefault("components", {})["securitySchemes"] = {
            BEARER: {
                "type": "http",
                "scheme": "bearer",
                "description": "The service's token, sent as `Authorization: Bearer <token>`.",
            }
        }
        for path, op in operations:
            if path not in OPEN_PATHS:
                _guard(op, _V2_ERROR_BODY if path.startswith(oip.V2) else _ERROR_BODY)
    return spec


def _describe_teacher(param: dict[str, Any], names: list[str]) -> None:
    several = len(names) > 1
    param["required"] = several
    param["schema"] = {"type": "string", "enum": names, "title": "Teacher"}
    param["description"] = (
        f"Teacher name: required, as this service serves several ({', '.join(names)})."
        if several
        else f"Teacher name: may be left out, as this service serves one ({names[0]})."
    )


def _guard(op: dict[str, Any], error_body: dict[str, Any]) -> None:
    op["security"] = [{BEARER: []}]
    op.setdefault("responses", {}).setdefault(
        "401", {"description": "No bearer token, or a different one.", "content": error_body}
    )
