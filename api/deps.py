"""Dependencies: the runtime, admin authentication, and the calling agent."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Path, Request

from api.errors import Unauthorized
from api.runtime import Runtime
from api.schemas import MAX_INT
from api.services.agent import AgentIdentity, authenticate


def get_runtime(request: Request) -> Runtime:
    rt: Runtime = request.app.state.runtime
    return rt


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


def bearer(request: Request) -> str | None:
    value = request.headers.get("authorization", "")
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def require_admin(request: Request, rt: RuntimeDep) -> None:
    token = bearer(request)
    if token is None:
        raise Unauthorized("missing admin token (Authorization: Bearer <token>)")
    # Constant-time: the comparison's duration says nothing about how much of it matched.
    if not hmac.compare_digest(token.encode(), rt.settings.resolved_admin_token.encode()):
        raise Unauthorized("invalid admin token")


AdminDep = Depends(require_admin)


def current_agent(
    request: Request, rt: RuntimeDep, run_id: Annotated[int, Path(ge=1, le=MAX_INT)]
) -> AgentIdentity:
    return authenticate(rt, bearer(request), run_id)


AgentDep = Annotated[AgentIdentity, Depends(current_agent)]
