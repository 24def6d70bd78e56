"""Liveness, readiness and Prometheus metrics (no authentication, no secrets)."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from api.deps import RuntimeDep
from api.migrate import SchemaBehindError, check_schema

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up. On the event loop itself: it answers even when every thread of
    the pool is busy."""
    return {"status": "ok"}


@router.get("/readyz")
def readyz(rt: RuntimeDep) -> JSONResponse:
    """Database and broker reachable, and the database at this version's schema or newer
    (503 naming what is not)."""
    checks: dict[str, str] = {}
    try:
        with rt.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
            checks["database"] = "ok"
            try:
                check_schema(conn)
                checks["schema"] = "ok"
            except SchemaBehindError as e:
                checks["schema"] = str(e)
    except Exception as e:
        checks["database"] = f"unreachable: {type(e).__name__}"
    try:
        rt.dispatcher.ping()
        checks["broker"] = "ok"
    except Exception as e:
        checks["broker"] = f"unreachable: {type(e).__name__}"
    ok = all(v == "ok" for v in checks.values())
    return JSONResponse(
        {"status": "ok" if ok else "unavailable", "checks": checks}, 200 if ok else 503
    )


@router.get("/metrics", response_class=Response)
def metrics(rt: RuntimeDep) -> Response:
    from api.metrics import REGISTRY, refresh

    refresh(rt)
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
