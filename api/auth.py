"""Admin sessions of the dashboard: signed cookies and their CSRF tokens.

A browser signs in once with the admin token and then carries a cookie instead of the
token. The cookie is ``v1.<issued>.<nonce>.<mac>``: when it was issued (Unix seconds), 128
random bits, and an HMAC-SHA256 over both under a key derived from the admin token. Nothing
is stored server-side, so:

* a session expires ``session_ttl_s`` after sign-in (the issue time is signed);
* changing the admin token changes the key and signs every browser out;
* logging out deletes the cookie; a copy taken before then stays valid until it expires
  (the price of keeping no session table; keep the lifetime short where that matters).

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


def issue(admin_token: str, now: float | None = None) -> str:
    """A new session cookie value."""
    issued = int(time.time() if now is None else now)
    nonce = secrets.token_urlsafe(16)
    body = f"{_VERSION}.{issued}.{nonce}"
    return f"{body}.{_mac(_key(admin_token, 'session'), body)}"


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
