"""Clients: enrollment, tokens, authentication, revocation, and their counters (the only
writer of the ``clients`` table)."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from api.errors import Conflict, Gone, NotFound, Unauthorized
from api.models import Client, Round, Run, utcnow
from api.runtime import Runtime
from api.services.states import duration_of
from fedsrd_core.finite import json_finite

TOKEN_PREFIX = "fsc_"
#: last_seen_at is refreshed at most this often, so 200 polling agents do not mean 200
#: writes a second (liveness timeouts are minutes).
_SEEN_RESOLUTION = dt.timedelta(seconds=10)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def enroll(s: Session, run: Run, name: str, *, simulated: bool = False) -> tuple[Client, str]:
    """Add a client to ``run``; returns it and its token (shown once, stored hashed)."""
    if run.status in ("completed", "cancelled"):
        raise Conflict(f"run {run.id} is {run.status}; no more clients can join")
    if s.scalar(select(Client.id).where(Client.run_id == run.id, Client.name == name)):
        raise Conflict(f"run {run.id} already has a client named {name!r}")
    token = new_token()
    client = Client(
        run_id=run.id,
        name=name,
        token_hash=hash_token(token),
        status="active",
        simulated=simulated,
        rounds_done=0,
        bytes_up=0,
        bytes_down=0,
    )
    s.add(client)
    s.flush()
    return client, token


@dataclass(frozen=True)
class Credentials:
    """Who a token belongs to (a narrow read: every agent request pays for it)."""

    client_id: int
    run_id: int
    name: str
    last_seen_at: dt.datetime | None


def authenticate(s: Session, token: str | None) -> Credentials:
    """The active client holding ``token``; 401 if unknown, 410 if revoked."""
    if not token:
        raise Unauthorized("missing client token (Authorization: Bearer <token>)")
    digest = hash_token(token)
    row = s.execute(
        select(
            Client.id,
            Client.run_id,
            Client.name,
            Client.status.label("client_status"),
            Client.token_hash,
            Client.last_seen_at,
        ).where(Client.token_hash == digest)
    ).first()
    check_credentials(row, digest)
    assert row is not None
    return Credentials(row.id, row.run_id, row.name, row.last_seen_at)


def check_credentials(row: Any, digest: str) -> None:
    """Refuse a token lookup ``row`` (with ``token_hash``, ``client_status`` and ``name``;
    None if no client has the token): 401 unknown, 410 revoked."""
    # The lookup is by hash, so its timing says nothing about the token; compare anyway.
    if row is None or not hmac.compare_digest(row.token_hash, digest):
        raise Unauthorized("invalid client token")
    if row.client_status == "revoked":
        raise Gone(f"client {row.name!r} has been revoked")


def needs_touch(last_seen: dt.datetime | None, now: dt.datetime) -> bool:
    return last_seen is None or now - last_seen >= _SEEN_RESOLUTION


def mark_seen(s: Session, client_id: int, now: dt.datetime) -> None:
    s.execute(update(Client).where(Client.id == client_id).values(last_seen_at=now))


def get(s: Session, run_id: int, client_id: int) -> Client:
    client = s.get(Client, client_id)
    if client is None or client.run_id != run_id:
        raise NotFound(f"run {run_id} has no client {client_id}")
    return client


def revoke(s: Session, client: Client) -> None:
    client.status = "revoked"
    s.flush()


def rotate_token(s: Session, client: Client) -> str:
    """Give ``client`` a new token (returned, shown once) in place of its current one, which
    stops working at once; the client keeps its identity, counters and place in the run."""
    if client.status == "revoked":
        raise Conflict(f"client {client.name!r} is revoked; enroll a new client instead")
    if client.simulated:
        raise Conflict(f"client {client.name!r} is simulated: the workers play it, no agent")
    token = new_token()
    client.token_hash = hash_token(token)
    s.flush()
    return token


def record_progress(s: Session, client: Client, progress: dict[str, Any]) -> None:
    now = utcnow()
    # A JSON column: no NaN (the request schema refuses them; simulated clients' reports
    # come here directly).
    client.progress = {**json_finite(progress), "at": now.isoformat()}
    client.last_seen_at = now


def report_progress(rt: Runtime, run_id: int, client_id: int, progress: dict[str, Any]) -> None:
    """Local training progress (round, step, steps, loss, ...): the client is alive."""
    with rt.transaction() as tx:
        record_progress(tx.session, get(tx.session, run_id, client_id), progress)


def add_bytes_down(s: Session, client_id: int, size: int) -> None:
    # An SQL increment: concurrent downloads by one client must not lose counts.
    s.execute(
        update(Client).where(Client.id == client_id).values(bytes_down=Client.bytes_down + size)
    )


def record_upload(s: Session, client: Client, size: int) -> None:
    client.bytes_up = Client.bytes_up + size
    client.last_seen_at = utcnow()


def record_rounds_done(s: Session, client_ids: list[int]) -> None:
    if client_ids:
        s.execute(
            update(Client)
            .where(Client.id.in_(client_ids))
            .values(rounds_done=Client.rounds_done + 1)
        )


def liveness(client: Client, run: Run, current: Round | None, now: dt.datetime) -> str:
    """What a client is doing, for dashboards and the API: ``revoked``; ``finished`` once its
    run completed or was cancelled; ``waiting`` until its agent first contacts the server
    (enrolled is not gone); ``gone`` when silent for ``client_timeout_s``; ``training``
    while it reports steps of the open round; else ``idle``."""
    if client.status == "revoked":
        return "revoked"
    if run.status in ("completed", "cancelled"):
        return "finished"
    timeout = duration_of(run, "client_timeout_s", 300.0)
    if client.simulated:
        return "idle"
    seen = client.last_seen_at
    if seen is None:
        return "waiting"
    if now - seen > timeout:
        return "gone"
    p = client.progress
    if p and current is not None and current.status == "open" and p.get("round") == current.number:
        return "training"
    return "idle"
