"""Dashboard sessions: the server-side half of :mod:`api.auth` (the only writer of the
``admin_sessions`` table).

A signed cookie proves who issued it; its row says it has not been signed out. The row is
keyed by the SHA-256 of the cookie's nonce (:attr:`api.auth.Session.key`), so neither a
database backup nor the table's contents name a usable cookie (and without the admin token
no MAC can be made anyway).
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import delete, func, select

from api import auth
from api.models import AdminSession, utcnow
from api.runtime import Runtime
from api.services import audit


def sign_in(rt: Runtime, address: str | None, now: dt.datetime | None = None) -> str:
    """Open a session (for a browser at ``address``) and return its cookie value; rows of
    expired sessions go with it."""
    now = now or utcnow()
    session = auth.new_session(now.timestamp())
    expires = now + dt.timedelta(seconds=rt.settings.session_ttl_s)
    with rt.transaction() as tx:
        # Pruned here rather than by a periodic job: a sign-in is the only thing that adds
        # rows, so the table never holds more than one lifetime's sign-ins.
        tx.session.execute(delete(AdminSession).where(AdminSession.expires_at <= now))
        tx.session.add(AdminSession(key=session.key, created_at=now, expires_at=expires))
        audit.record(tx.session, auth.Actor.of_session(session, address), "sign_in")
    return session.cookie(rt.settings.resolved_admin_token)


def is_open(rt: Runtime, session: auth.Session, now: dt.datetime | None = None) -> bool:
    """Whether ``session`` (its cookie already verified) is still signed in."""
    assert rt.reads is not None
    with rt.reads() as s:
        found = s.scalar(
            select(AdminSession.id).where(
                AdminSession.key == session.key, AdminSession.expires_at > (now or utcnow())
            )
        )
    return found is not None


def sign_out(rt: Runtime, session: auth.Session, actor: auth.Actor) -> None:
    """End ``session``: its cookie, and every copy of it, stops working at once."""
    with rt.transaction() as tx:
        tx.session.execute(delete(AdminSession).where(AdminSession.key == session.key))
        audit.record(tx.session, actor, "sign_out")


def sign_out_everywhere(rt: Runtime, actor: auth.Actor) -> int:
    """End every dashboard session (the admin token itself keeps working); returns how many
    unexpired sessions there were."""
    now = utcnow()
    with rt.transaction() as tx:
        count = int(
            tx.session.scalar(
                select(func.count()).select_from(AdminSession).where(AdminSession.expires_at > now)
            )
            or 0
        )
        tx.session.execute(delete(AdminSession))
        audit.record(tx.session, actor, "sign_out_everywhere", detail={"sessions": count})
    return count
