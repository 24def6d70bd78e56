"""Admin endpoint: the audit trail of admin actions, newest first."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from api.deps import AdminDep, RuntimeDep
from api.schemas import MAX_INT, AuditEventPublic, AuditEventsPublic
from api.services import audit

router = APIRouter(prefix="/api/v1/audit", tags=["audit"], dependencies=[AdminDep])


@router.get("")
def list_events(
    rt: RuntimeDep,
    offset: Annotated[int, Query(ge=0, le=MAX_INT)] = 0,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    run_id: Annotated[int | None, Query(ge=1, le=MAX_INT)] = None,
) -> AuditEventsPublic:
    """Who did which admin action, when and from where (optionally for one run)."""
    rows, count = audit.events(rt, offset, limit, run_id)
    return AuditEventsPublic(
        data=[AuditEventPublic.model_validate(r, from_attributes=True) for r in rows], count=count
    )
