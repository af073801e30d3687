"""The FastAPI app factory: `create_app(config)` builds the service's state and assembles the app, in one place.

Teachers load eagerly (a bad config fails before the server binds a port); the batchers and the periodic cache flush
start with the app, and a clean shutdown flushes the cache. The routes are in routes.py, the error responses in
errors.py, and the app's one way past FastAPI's per-request layers in framework.py.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse

from shared.version import VERSION
from teacher_service import oip_routes
from teacher_service.batcher import Batcher
from teacher_service.config import ServiceConfig
from teacher_service.errors import install_error_handlers
from teacher_service.framework import TeacherApp, warn_if_untested
from teacher_service.openmp import serial_cpu_ops
from teacher_service.routes import open_router, require_token, router, soft_target_keys, soft_targets
from teacher_service.service import build_service, flush_periodically, sweep_regions_periodically
from teacher_service.spec import install_spec

log = logging.getLogger("akd.service")


def create_app(config: ServiceConfig) -> FastAPI:
    service = build_service(config)
    server = config.server

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.batchers = {
            name: Batcher(
                name,
                service.devices,
                service.metrics,
                server.batching.max_rows,
                server.batching.max_wait_ms,
                server.limits.queue_rows,
                coalesce=server.batching.enabled,
            )
            for name in service.teachers
        }
        for b in service.batchers.values():
            b.start()
        flusher = asyncio.create_task(flush_periodically(service, server.cache.flush_s)) if service.cache else None
        sweeper = (
            asyncio.create_task(sweep_regions_periodically(service, server.shared_memory.sweep_s))
            if service.regions is not None
            else None
        )
        warn_if_untested()
        log.info("serving %s on %s", ", ".join(service.teachers), service.device)
        try:
            # the event loop runs its own tensor work serially (openmp.py); its thread's setting is restored after
            with serial_cpu_ops():
                yield
        finally:
            # from here on it takes no new queries, and says so
            service.stop()
            for task in (flusher, sweeper):
                if task:
                    task.cancel()
            for b in service.batchers.values():
                await b.close()
            if service.cache:
                await asyncio.get_running_loop().run_in_executor(service.cache_executor, service.cache.close)
                log.info("cache flushed")
            service.shutdown()

    app = TeacherApp(
        title="AKD teacher service",
        summary="Soft targets of robust teachers and teacher ensembles, cached in zarr, shared by many trainers.",
        version=VERSION,
        lifespan=lifespan,
        # served by _add_docs_routes, behind the token like every route but /healthz and /readyz
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.service = service
    install_error_handlers(app)
    app.include_router(router)
    app.include_router(open_router)
    # the Open Inference Protocol (KServe v2) beside the native API
    app.include_router(oip_routes.router)
    app.include_router(oip_routes.open_router)
    # every trainer's request, native (rows, and keys first) and v2: each route as its module declares it, served
    # past FastAPI's per-request layers (framework.py)
    app.serve_directly(router, soft_targets)
    app.serve_directly(router, soft_target_keys)
    app.serve_directly(oip_routes.router, oip_routes.infer)
    _add_docs_routes(app)
    # /docs and /openapi.json serve the routes' spec as this config has them (spec.py)
    install_spec(app, config)
    return app


def _add_docs_routes(app: FastAPI) -> None:
    """/openapi.json and /docs, behind the token when one is set (FastAPI's own docs routes skip dependencies).

    The /docs page carries the spec inside it rather than fetching /openapi.json, because a browser that loaded the
    page with the token (a header extension, a proxy) would fetch the spec without it.
    """

    @app.get("/openapi.json", include_in_schema=False, dependencies=[Depends(require_token)])
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False, dependencies=[Depends(require_token)])
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json", title=f"{app.title} - docs", swagger_ui_parameters={"spec": app.openapi()}
        )
