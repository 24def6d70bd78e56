"""Admin sessions of the dashboard: signed cookies and their CSRF tokens.

A browser signs in once with the admin token and then carries a cookie instead of the
token. The cookie is ``v1.<issued>.<nonce>.<mac>``: when it was issued (Unix seconds), 128
random bits, and an HMAC-SHA256 over both under a key derived from the admin token. A cookie
is a session only while all of these hold:

* its MAC verifies: changing the admin token changes the key and signs every browser out;
* it is younger than ``session_ttl_s`` (the issue time is signed);
* the server still has its row (:mod:`api.services.sessions`, keyed by the nonce's
  SHA-256): signing out deletes the row, so a copy of the cookie taken earlier stops working
  at once, on every API process; "sign out everywhere" deletes them all.

This module is the stateless half (format, MAC, expiry, CSRF); the row is checked by the
caller (:func:`api.deps.admin_session`).

Requests authenticated by the cookie that change state must also carry the session's CSRF
token (a form field or the ``X-CSRF-Token`` header): a MAC of the session's nonce, which
another site can neither read nor forge. Requests with a bearer token need none.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

COOKIE = "fedsrd_session"
CSRF_HEADER = "x-csrf-token"
CSRF_FIELD = "csrf_token"
_VERSION = "v1"


def _key(admin_token: str, purpose: str) -> bytes:
    return hmac.new(admin_token.encode(), f"fedsrd/{purpose}/v1".encode(), hashlib.sha256).digest()


def _mac(key: bytes, message: str) -> str:
    digest = hmac.new(key, message.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


@dataclass(frozen=True)
class Session:
    issued: int
    nonce: str

    def csrf_token(self, admin_token: str) -> str:
        return _mac(_key(admin_token, "csrf"), self.nonce)

    def cookie(self, admin_token: str) -> str:
        """The cookie value that names this session."""
        body = f"{_VERSION}.{self.issued}.{self.nonce}"
        return f"{body}.{_mac(_key(admin_token, 'session'), body)}"

    @property
    def key(self) -> str:
        """What the server stores for this session: the nonce's SHA-256 (hex), so that the
        table alone, read from a backup, names no usable cookie."""
        return hashlib.sha256(self.nonce.encode()).hexdigest()


@dataclass(frozen=True)
class Actor:
    """Who did an admin action, as the audit trail records it: ``admin-token`` (a bearer
    request), ``session:<first 12 hex digits of the session key>`` (a dashboard browser), or
    ``anonymous`` (a refused sign-in); and the address the request came from."""

    who: str
    address: str | None

    @classmethod
    def of_session(cls, session: Session, address: str | None) -> Actor:
        return cls(f"session:{session.key[:12]}", address)


def new_session(now: float | None = None) -> Session:
    """A fresh session: the issue time and 128 random bits."""
    return Session(issued=int(time.time() if now is None else now), nonce=secrets.token_urlsafe(16))


def verify(value: str | None, admin_token: str, ttl_s: int, now: float | None = None) -> Session:
    """The session a cookie value names; ``ValueError`` saying why if it is not valid."""
    if not value:
        raise ValueError("not signed in")
    parts = value.split(".")
    if len(parts) != 4 or parts[0] != _VERSION:
        raise ValueError("malformed session cookie")
    _, issued_s, nonce, mac = parts
    expected = _mac(_key(admin_token, "session"), f"{_VERSION}.{issued_s}.{nonce}")
    # Constant-time: the comparison's duration says nothing about how much of it matched.
    if not hmac.compare_digest(mac.encode(), expected.encode()):
        raise ValueError("invalid session (forged, or the admin token changed)")
    try:
        issued = int(issued_s)
    except ValueError:
        raise ValueError("malformed session cookie") from None
    age = (time.time() if now is None else now) - issued
    if age > ttl_s or age < -60:  # a minute of clock skew between API processes
        raise ValueError("session expired; sign in again")
    return Session(issued=issued, nonce=nonce)


def check_csrf(session: Session, admin_token: str, token: str | None) -> bool:
    return token is not None and hmac.compare_digest(
        token.encode(), session.csrf_token(admin_token).encode()
    )
