"""What an agent sees: its run, the next thing to do, and how to reach the current state."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import select
from sqlalchemy.orm import Session, aliased

from api.errors import Conflict, Forbidden, NotFound, Unauthorized
from api.models import Client, Round, Run, Update, utcnow
from api.runtime import Runtime
from api.schemas import BlobPublic, PollResponse, RunStatus, SyncPlan
from api.services import clients as client_service
from api.services import rounds as round_service

#: Seconds an agent with nothing to do waits before polling again.
RETRY_AFTER = 2.0


@dataclass(frozen=True)
class AgentIdentity:
    client_id: int
    run_id: int
    name: str


def identify(rt: Runtime, token: str | None) -> AgentIdentity:
    """The client behind ``token``, whatever its run."""
    assert rt.reads is not None
    with rt.reads() as s:
        cred = client_service.authenticate(s, token)
    return AgentIdentity(cred.client_id, cred.run_id, cred.name)


def authenticate(rt: Runtime, token: str | None, run_id: int) -> AgentIdentity:
    """The client behind ``token``, which must belong to run ``run_id``.

    One narrow read; the last-seen time is written only when it is 10 s old or more, so
    hundreds of polling agents do not mean hundreds of writes a second."""
    assert rt.reads is not None
    with rt.reads() as s:
        cred = client_service.authenticate(s, token)
    if cred.run_id != run_id:
        raise Forbidden(f"this client token belongs to another run, not run {run_id}")
    now = utcnow()
    if client_service.needs_touch(cred.last_seen_at, now):
        with rt.single_statement() as ws:
            client_service.mark_seen(ws, cred.client_id, now)
    return AgentIdentity(cred.client_id, cred.run_id, cred.name)


def last_closed(run: Run, current: Round | None) -> int:
    """Number of the newest round whose delta exists (the global state's round)."""
    if current is None:
        return 0
    return current.number if current.status == "closed" else current.number - 1


def sync_plan(s: Session, run: Run, from_round: int | None, to_round: int) -> SyncPlan:
    """Snapshot or deltas, whichever is fewer bytes, from ``from_round`` to ``to_round``.

    ``from_round`` None (or -1) means the agent holds nothing: it needs a snapshot.
    """
    if from_round is not None and from_round > to_round:
        raise Conflict(
            f"you report the state of round {from_round}, but the run's newest state is "
            f"round {to_round}"
        )
    rounds = {
        r.number: r
        for r in s.scalars(select(Round).where(Round.run_id == run.id, Round.status == "closed"))
    }

    def snapshot() -> BlobPublic:
        if to_round == 0:
            assert run.initial_blob
            assert run.initial_digest
            assert run.initial_size is not None
            return BlobPublic(
                round=0, sha256=run.initial_blob, size=run.initial_size, digest=run.initial_digest
            )
        r = rounds[to_round]
        assert r.snapshot_blob
        assert r.snapshot_size is not None
        assert r.digest
        return BlobPublic(
            round=to_round, sha256=r.snapshot_blob, size=r.snapshot_size, digest=r.digest
        )

    if from_round is None or from_round < 0:
        snap = snapshot()
        return SyncPlan(from_round=-1, to_round=to_round, snapshot=snap, deltas=[], bytes=snap.size)
    deltas = []
    for n in range(from_round + 1, to_round + 1):
        r = rounds[n]
        assert r.delta_blob
        assert r.delta_size is not None
        assert r.digest
        deltas.append(BlobPublic(round=n, sha256=r.delta_blob, size=r.delta_size, digest=r.digest))
    delta_bytes = sum(d.size for d in deltas)
    if deltas:
        snap = snapshot()
        if snap.size < delta_bytes:
            return SyncPlan(
                from_round=from_round, to_round=to_round, snapshot=snap, deltas=[], bytes=snap.size
            )
    return SyncPlan(
        from_round=from_round, to_round=to_round, snapshot=None, deltas=deltas, bytes=delta_bytes
    )


_CURRENT = aliased(Round)
# Built once: composing this select costs more than running it.
_POLL_SELECT = (
    select(
        Client.id,
        Client.run_id,
        Client.name,
        Client.status.label("client_status"),
        Client.token_hash,
        Client.last_seen_at,
        Run.status.label("run_status"),
        Run.status_reason,
        Run.version,
        _CURRENT.id.label("round_id"),
        _CURRENT.number,
        _CURRENT.status.label("round_status"),
        _CURRENT.expected,
        _CURRENT.deadline_at,
        Update.id.label("update_id"),
    )
    .join(Run, Run.id == Client.run_id)
    .outerjoin(_CURRENT, (_CURRENT.run_id == Run.id) & (_CURRENT.number == Run.current_round))
    .outerjoin(Update, (Update.round_id == _CURRENT.id) & (Update.client_id == Client.id))
)


def _poll_row(s: Session, where: Any) -> Any:
    """Everything a poll needs in one query: the client, its run, the run's current round
    and whether the client already uploaded to it."""
    return s.execute(_POLL_SELECT.where(where)).first()


def _answer(s: Session, row: Any, have_round: int | None) -> PollResponse:
    status = cast(RunStatus, row.run_status)
    if row.client_status == "revoked":
        return PollResponse(action="stop", run_status=status, reason="client revoked")
    if status == "completed":
        return PollResponse(action="done", run_status="completed")
    if status == "cancelled":
        return PollResponse(action="stop", run_status="cancelled", reason=row.status_reason)
    wait = PollResponse(
        action="wait",
        run_status=status,
        retry_after=RETRY_AFTER,
        reason=row.status_reason if status == "failed" else None,
    )
    if (
        status != "running"
        or row.round_id is None
        or row.round_status != "open"
        or row.id not in row.expected
        or row.update_id is not None
    ):
        return wait
    base = int(row.number) - 1
    plan = None
    if have_round is None or have_round != base:
        run = s.get(Run, row.run_id)
        assert run is not None
        plan = sync_plan(s, run, have_round, base)
    return PollResponse(
        action="train",
        run_status="running",
        round=row.number,
        base_round=base,
        deadline_at=row.deadline_at,
        sync=plan,
    )


def poll_once(
    rt: Runtime, ident: AgentIdentity, have_round: int | None
) -> tuple[PollResponse, int]:
    """The agent's next action, and the run's version (long polls wait for it to change)."""
    assert rt.reads is not None
    with rt.reads() as s:
        row = _poll_row(s, Client.id == ident.client_id)
        assert row is not None
        return _answer(s, row, have_round), int(row.version)


def poll(
    rt: Runtime, token: str | None, run_id: int, have_round: int | None
) -> tuple[AgentIdentity, PollResponse, int]:
    """Authenticate and poll with one query (polls are the API's hottest path: hundreds of
    agents); the last-seen time is written only when it is 10 s old or more."""
    if not token:
        raise Unauthorized("missing client token (Authorization: Bearer <token>)")
    digest = client_service.hash_token(token)
    assert rt.reads is not None
    with rt.reads() as s:
        row = _poll_row(s, Client.token_hash == digest)
        client_service.check_credentials(row, digest)
        if row.run_id != run_id:
            raise Forbidden(f"this client token belongs to another run, not run {run_id}")
        answer = _answer(s, row, have_round)
    now = utcnow()
    if client_service.needs_touch(row.last_seen_at, now):
        with rt.single_statement() as ws:
            client_service.mark_seen(ws, row.id, now)
    return AgentIdentity(row.id, row.run_id, row.name), answer, int(row.version)


def sync_latest(rt: Runtime, ident: AgentIdentity, have_round: int | None) -> SyncPlan:
    """How to reach the newest global state (e.g. the final one, once the run completed)."""
    with rt.sessions() as s:
        run = s.get(Run, ident.run_id)
        assert run is not None
        if run.initial_blob is None:
            raise Conflict(f"run {run.id} has not been launched; there is no global state yet")
        newest = last_closed(run, round_service.current_round(s, run))
        return sync_plan(s, run, have_round, newest)


def check_download(rt: Runtime, ident: AgentIdentity, sha256: str) -> int:
    """Authorise a download: only the run's global blobs (initial state, global deltas,
    snapshots), never any client's update. Returns the blob's size."""
    assert rt.reads is not None
    with rt.reads() as s:
        run = s.get(Run, ident.run_id)
        assert run is not None
        if run.initial_blob == sha256:
            return int(run.initial_size or 0)
        r = s.scalar(
            select(Round)
            .where(
                Round.run_id == run.id,
                Round.status == "closed",
                (Round.delta_blob == sha256) | (Round.snapshot_blob == sha256),
            )
            .limit(1)
        )
        if r is None:
            raise NotFound(f"run {run.id} has no global blob {sha256}")
        size = r.delta_size if r.delta_blob == sha256 else r.snapshot_size
        return int(size or 0)
