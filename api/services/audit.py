"""The audit trail of admin actions (the only writer of the ``audit_events`` table).

:func:`record` is called inside the transaction of the action it records, so a row exists
exactly when the action took effect: a refused or rolled-back action leaves none. Details
name things (a run's name, a client's name, a count), never a secret: tokens and cookies
are not written here in any form.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from api.auth import Actor
from api.models import AuditEvent
from api.runtime import Runtime


def record(
    s: Session,
    actor: Actor,
    action: str,
    *,
    run_id: int | None = None,
    client_id: int | None = None,
    detail: dict[str, Any] | None = None,
) -> None:
    """Add one event to the transaction of ``s``."""
    s.add(
        AuditEvent(
            actor=actor.who,
            address=actor.address,
            action=action,
            run_id=run_id,
            client_id=client_id,
            detail=detail,
        )
    )


def events(
    rt: Runtime, offset: int, limit: int, run_id: int | None = None
) -> tuple[list[AuditEvent], int]:
    """Events newest first (optionally of one run), and how many there are in all."""
    query = select(AuditEvent)
    count = select(func.count()).select_from(AuditEvent)
    if run_id is not None:
        query = query.where(AuditEvent.run_id == run_id)
        count = count.where(AuditEvent.run_id == run_id)
    with rt.sessions() as s:
        rows = s.scalars(query.order_by(AuditEvent.id.desc()).offset(offset).limit(limit))
        return list(rows), int(s.scalar(count) or 0)
