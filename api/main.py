"""The FastAPI application: ``create_app(settings)``; ``api.main:app`` for uvicorn.

Errors have one shape everywhere, ``{"error": code, "detail": ...}``: domain errors from
the services map to their 4xx status here, request validation to 422 naming the field, and
anything unexpected to a 500 that names nothing internal (and is logged).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from sqlalchemy.exc import DBAPIError, OperationalError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api import openapi
from api.errors import ApiError, InvalidInput
from api.gate import RequestGate
from api.metrics import LATENCY, REQUESTS
from api.migrate import check_schema
from api.routes import agent, audit, health, runs, sessions
from api.runtime import Runtime, make_runtime
from api.services import reconcile
from api.services import rounds as round_service
from api.settings import Settings
from api.watch import RunWatcher
from web import pages

log = logging.getLogger("api")


def _error(
    status: int, code: str, detail: Any, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse({"error": code, "detail": detail}, status_code=status, headers=headers)


#: Why FastAPI could not read a JSON body, by the exception it caught.
_UNPARSABLE: dict[type[BaseException], str] = {
    UnicodeDecodeError: "it is not UTF-8",
    RecursionError: "it is nested too deeply",
}


def _validation_detail(exc: RequestValidationError) -> list[dict[str, Any]]:
    out = []
    for e in exc.errors():
        loc = [str(p) for p in e.get("loc", ())]
        out.append(
            {
                "field": ".".join(
                    loc[1:] if loc and loc[0] in ("body", "query", "path", "header") else loc
                ),
                "in": loc[0] if loc else "",
                "message": e.get("msg", ""),
            }
        )
    return out


def _freeze_heavy_imports() -> None:
    """Import torch, transformers and peft now and move everything alive into the garbage
    collector's permanent generation: their ~500k objects would otherwise be rescanned by
    every full collection, a 200 ms pause every few seconds under load."""
    import fedsrd_core.export
    import fedsrd_core.modeling  # noqa: F401

    gc.collect()
    gc.freeze()


async def _sweeper(rt: Runtime, stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            await run_in_threadpool(round_service.sweep, rt)
        except Exception:
            log.exception("deadline sweep failed")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), rt.settings.sweep_interval)


class _Observe:
    """Request counts and latencies per route template, as a plain ASGI middleware
    (Starlette's ``BaseHTTPMiddleware`` costs about a millisecond a request)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = 500

        async def _send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, _send)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", "unmatched")
            method = scope.get("method", "")
            LATENCY.labels(method, path).observe(time.perf_counter() - t0)
            REQUESTS.labels(method, path, str(status)).inc()


def create_app(settings: Settings | None = None, runtime: Runtime | None = None) -> FastAPI:
    settings = settings or Settings()
    rt = runtime or make_runtime(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Refuse to serve on a database an upgrade forgot to migrate (SchemaBehindError).
        if await run_in_threadpool(check_schema, rt.engine) == "ahead":
            log.warning("the database was migrated by a newer version of FedSRD than this one")
        # Reconcile first: a round a crashed worker left aggregating is re-sent.
        try:
            n = await run_in_threadpool(reconcile.reconcile, rt)
            if n:
                log.info("reconciled on start: %d task(s) re-sent", n)
        except Exception:
            log.exception("reconciliation failed")
        rt.blobs.cleanup_temp()
        _freeze_heavy_imports()
        watcher = RunWatcher(rt)
        watcher.start()
        app.state.watcher = watcher
        stop = asyncio.Event()
        sweeper = asyncio.create_task(_sweeper(rt, stop))
        try:
            yield
        finally:
            stop.set()
            await sweeper
            await watcher.stop()

    app = FastAPI(
        title="FedSRD federation orchestrator",
        version="0.1.0",
        description="Control plane of communication-efficient federated LoRA fine-tuning.",
        lifespan=lifespan,
    )
    app.state.runtime = rt
    app.state.watcher = RunWatcher(
        rt
    )  # replaced at start-up; lets TestClient without lifespan work

    # The dashboard's pages get the same errors as pages (pages.wants_html); the API, JSON.
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> Response:
        if pages.wants_html(request):
            return await run_in_threadpool(pages.error_page, request, exc.status, str(exc.detail))
        detail = exc.detail
        if isinstance(exc, InvalidInput) and isinstance(detail, dict):
            # A service's verdict on one body field: the same list as a validation error's.
            detail = [{"field": detail["field"], "in": "body", "message": detail["message"]}]
        return _error(exc.status, exc.code, detail, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        if pages.wants_html(request):
            # Pages only validate path and query parameters: a bad one names no page.
            fields = ", ".join(d["field"] for d in _validation_detail(exc))
            message = f"no such page (bad {fields})"
            return await run_in_threadpool(pages.error_page, request, 404, message)
        return _error(422, "invalid", _validation_detail(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        if pages.wants_html(request):
            message = "no such page" if exc.status_code == 404 else str(exc.detail)
            return await run_in_threadpool(pages.error_page, request, exc.status_code, message)
        if exc.status_code == 400 and exc.__cause__ is not None:
            # FastAPI's answer to a body it could not parse (not UTF-8, nested too deep):
            # malformed JSON like any other, so the same 422 naming the body.
            why = _UNPARSABLE.get(type(exc.__cause__), "it could not be parsed")
            message = f"the body is not valid JSON: {why}"
            return _error(422, "invalid", [{"field": "", "in": "body", "message": message}])
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405:
            named = {m.strip() for m in (headers or {}).get("Allow", "").split(",") if m.strip()}
            allow = named | openapi.allowed_methods(app, request.url.path)
            headers = {**(headers or {}), "Allow": ", ".join(sorted(allow))}
        return _error(exc.status_code, code, exc.detail, headers)

    @app.exception_handler(DBAPIError)
    async def _database(request: Request, exc: DBAPIError) -> JSONResponse:
        if exc.connection_invalidated or isinstance(exc, OperationalError):
            # The database went away (restart, failover): retryable, not a bug.
            log.warning("database unavailable on %s: %s", request.url.path, exc.orig)
            return _error(503, "unavailable", "database unavailable; retry", {"Retry-After": "2"})
        log.exception("database error on %s %s", request.method, request.url.path)
        return _error(500, "internal", "internal error (logged on the server)")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return _error(500, "internal", "internal error (logged on the server)")

    # Uploads' writing threads come from a limiter of their own (api.streaming.pump), as
    # many as the uploads the gate admits at once: never the shared pool's tokens.
    app.state.upload_threads = anyio.CapacityLimiter(rt.settings.max_uploads)
    # Added first, so inside _Observe: its refusals are counted too.
    app.add_middleware(RequestGate, runtime=rt)
    app.add_middleware(_Observe)

    app.include_router(health.router)
    app.include_router(runs.router)
    app.include_router(sessions.router)
    app.include_router(audit.router)
    app.include_router(agent.me_router)
    app.include_router(agent.router)
    pages.install(app)
    openapi.install(app)
    return app


def app_from_env() -> FastAPI:
    """Factory for ``uvicorn --factory api.main:app_from_env``: settings from the
    environment, logging to stderr. Importing this module connects to nothing."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return create_app()
