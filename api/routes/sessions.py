"""Admin endpoint: end every dashboard session (after a lost laptop, say), without changing
the admin token that agents' operators and scripts use."""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import AdminActor, AdminDep, RuntimeDep
from api.schemas import SessionsSignedOut
from api.services import sessions

router = APIRouter(prefix="/api/v1/sessions", tags=["sessions"], dependencies=[AdminDep])


@router.delete("")
def sign_out_everywhere(rt: RuntimeDep, actor: AdminActor) -> SessionsSignedOut:
    """Sign every dashboard browser out; the admin token keeps working."""
    return SessionsSignedOut(signed_out=sessions.sign_out_everywhere(rt, actor))
