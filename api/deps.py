"""Dependencies: the runtime, admin authentication, and the calling agent."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Path, Request

from api import auth
from api.errors import Forbidden, Unauthorized
from api.gate import ADMIN_KEY, AGENT_KEY
from api.runtime import Runtime
from api.schemas import MAX_INT
from api.services import sessions
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


_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def admin_session(request: Request, rt: Runtime) -> auth.Session | None:
    """The dashboard session of the request's cookie, or None (absent, expired, forged,
    signed out). Reads the database when the cookie verifies: call it off the event loop."""
    try:
        session = auth.verify(
            request.cookies.get(auth.COOKIE),
            rt.settings.resolved_admin_token,
            rt.settings.session_ttl_s,
        )
    except ValueError:
        return None
    return session if sessions.is_open(rt, session) else None


def client_address(request: Request) -> str | None:
    """The address a request came from, as the server saw it (behind a proxy: the proxy's,
    unless uvicorn is told to trust its forwarding headers)."""
    return request.client.host if request.client else None


def require_admin(request: Request, rt: RuntimeDep) -> auth.Actor:
    """The admin token as a bearer token, or a dashboard session cookie (which must bring
    its CSRF token in ``X-CSRF-Token`` on requests that change state); returns who it is,
    for the audit trail."""
    known = request.scope.get(ADMIN_KEY)
    if isinstance(known, auth.Actor):  # api.gate checked this request before its body
        return known
    admin_token = rt.settings.resolved_admin_token
    token = bearer(request)
    if token is None:
        session = admin_session(request, rt)
        if session is None:
            raise Unauthorized("missing admin token (Authorization: Bearer <token>)")
        if request.method not in _SAFE_METHODS and not auth.check_csrf(
            session, admin_token, request.headers.get(auth.CSRF_HEADER)
        ):
            raise Forbidden("missing or invalid X-CSRF-Token for a cookie-authenticated request")
        return auth.Actor.of_session(session, client_address(request))
    # Constant-time: the comparison's duration says nothing about how much of it matched.
    if not hmac.compare_digest(token.encode(), admin_token.encode()):
        raise Unauthorized("invalid admin token")
    return auth.Actor("admin-token", client_address(request))


AdminDep = Depends(require_admin)
#: The admin making the request (FastAPI runs ``require_admin`` once per request, however
#: many times it is declared).
AdminActor = Annotated[auth.Actor, Depends(require_admin)]


def current_agent(
    request: Request, rt: RuntimeDep, run_id: Annotated[int, Path(ge=1, le=MAX_INT)]
) -> AgentIdentity:
    known = request.scope.get(AGENT_KEY)
    if isinstance(known, AgentIdentity) and known.run_id == run_id:
        return known  # api.gate checked this request before its body
    return authenticate(rt, bearer(request), run_id)


AgentDep = Annotated[AgentIdentity, Depends(current_agent)]
