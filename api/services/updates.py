"""Accepting a client's update for a round: the one path for HTTP agents and simulated
clients alike (the only writer of ``updates``).

Order of work, so a rejection never leaves anything behind and never holds a lock while
parsing: (1) cheap checks against the database (run, round, base round, duplicate);
(2) the blob is streamed to a temporary file with a size cap and hashed; (3) it is fully
decoded and validated against the run's upload layout (names, shapes, finite values, wire
dtype); (4) the blob is renamed into the store; (5) one transaction locks the run and round,
re-checks, inserts the row and applies the closing rule; the aggregation task is sent after
commit.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from api.blobstore import BlobRef, BlobWriter
from api.errors import Conflict, Gone, InvalidInput, TooLarge
from api.models import Client, Round, Run, Update
from api.runtime import Runtime
from api.services import clients as client_service
from api.services import rounds as round_service
from api.services.states import upload_shapes, upload_size_cap, value_dtype_of
from fedsrd_core.codec import WireFormatError, decode, inspect


@dataclass(frozen=True)
class Accepted:
    round: int
    client_id: int
    sha256: str
    size: int
    base_round: int
    num_samples: int
    round_complete: bool


@dataclass(frozen=True)
class Precheck:
    """What the cheap checks found: ``existing`` is set for an already accepted update."""

    run: Run
    round_id: int
    size_cap: int
    existing: Accepted | None


def _accepted(u: Update, rnd: Round) -> Accepted:
    return Accepted(
        round=rnd.number,
        client_id=u.client_id,
        sha256=u.blob,
        size=u.size,
        base_round=u.base_round,
        num_samples=u.num_samples,
        round_complete=rnd.status != "open",
    )


def _check(
    s: Session, client: Client, number: int, base_round: int, sha256: str
) -> tuple[Run, Round, Accepted | None]:
    run = s.get(Run, client.run_id)
    assert run is not None
    rnd = s.scalar(select(Round).where(Round.run_id == run.id, Round.number == number))
    if rnd is not None:
        prior = s.scalar(
            select(Update).where(Update.round_id == rnd.id, Update.client_id == client.id)
        )
        if prior is not None:
            if prior.blob == sha256 and prior.base_round == base_round:
                return run, rnd, _accepted(prior, rnd)  # an identical retry: same answer
            raise Conflict(
                f"client {client.name!r} already uploaded a different update for round {number}"
            )
    if run.status in ("completed", "cancelled"):
        raise Gone(f"run {run.id} is {run.status}")
    if run.status != "running":
        raise Conflict(f"run {run.id} is {run.status}, not running")
    if rnd is None or number != run.current_round:
        raise Conflict(
            f"round {number} is not the open round (the run is at round {run.current_round})"
        )
    if rnd.status != "open":
        raise Conflict(f"round {number} is {rnd.status}; it no longer takes updates")
    if client.id not in rnd.expected:
        raise Conflict(f"client {client.name!r} was not selected for round {number}")
    if base_round != number - 1:
        raise Conflict(
            f"stale update: trained from round {base_round}, round {number} needs the state "
            f"after round {number - 1}"
        )
    return run, rnd, None


def precheck(rt: Runtime, client_id: int, number: int, base_round: int, sha256: str) -> Precheck:
    with rt.sessions() as s:
        client = s.get(Client, client_id)
        assert client is not None
        run, rnd, existing = _check(s, client, number, base_round, sha256)
        return Precheck(run, rnd.id, upload_size_cap(run), existing)


def validate_blob(run: Run, data: bytes | bytearray | memoryview) -> None:
    """Decode ``data`` completely against the run's upload layout; 422 naming the problem."""
    want_vd = value_dtype_of(run)
    try:
        infos = inspect(data)
        for info in infos:
            if info.value_dtype != want_vd:
                raise InvalidInput(
                    f"tensor {info.name!r}: values are {info.value_dtype}, this run uses {want_vd}"
                )
        decode(data, expected_shapes=upload_shapes(run))
    except WireFormatError as e:
        raise InvalidInput(f"invalid update blob: {e}") from e


def validate_and_commit(run: Run, writer: BlobWriter, sha256: str) -> BlobRef:
    """Check the streamed body against its declared SHA-256 and the run's upload layout,
    then commit it (complete in the store before any row names it: fsynced and renamed
    into place locally, uploaded whole to S3). On any failure the writer's context discards
    the temporary file."""
    if writer.sha256 != sha256:
        raise InvalidInput(
            f"X-Content-SHA256 is {sha256} but the body's SHA-256 is {writer.sha256} "
            f"({writer.size} bytes received)"
        )
    with writer.spooled() as view:
        validate_blob(run, view)
    return writer.commit(sha256)


def store(rt: Runtime, run: Run, data: bytes, sha256: str) -> BlobRef:
    """:func:`validate_and_commit` for a body already in memory (simulated clients)."""
    with rt.blobs.writer() as writer:
        writer.write(data)
        return validate_and_commit(run, writer, sha256)


def record(
    rt: Runtime,
    client_id: int,
    number: int,
    base_round: int,
    num_samples: int,
    blob: BlobRef,
    train_loss: float | None = None,
) -> Accepted:
    """Insert the update row (the blob is already in the store) and apply the closing rule."""
    with rt.transaction() as tx:
        s = tx.session
        client = s.get(Client, client_id)
        assert client is not None
        run = round_service.lock_run(s, client.run_id)
        assert run is not None
        # Re-check under the lock: the round may have closed while the blob streamed in.
        _, checked, existing = _check(s, client, number, base_round, blob.sha256)
        if existing is not None:
            return existing
        rnd = s.scalar(select(Round).where(Round.id == checked.id).with_for_update())
        assert rnd is not None
        u = Update(
            round_id=rnd.id,
            client_id=client.id,
            blob=blob.sha256,
            size=blob.size,
            base_round=base_round,
            num_samples=num_samples,
            train_loss=train_loss,
        )
        s.add(u)
        client_service.record_upload(s, client, blob.size)
        s.flush()
        closed = round_service.maybe_close(tx, rt, run, rnd)
        return Accepted(
            round=number,
            client_id=client.id,
            sha256=blob.sha256,
            size=blob.size,
            base_round=base_round,
            num_samples=num_samples,
            round_complete=closed,
        )


def submit_bytes(
    rt: Runtime,
    client_id: int,
    number: int,
    base_round: int,
    num_samples: int,
    data: bytes,
    train_loss: float | None = None,
) -> Accepted:
    """The whole upload path for an in-memory blob (simulated clients use it)."""
    sha = hashlib.sha256(data).hexdigest()
    pre = precheck(rt, client_id, number, base_round, sha)
    if pre.existing is not None:
        return pre.existing
    if len(data) > pre.size_cap:
        raise TooLarge(f"update of {len(data)} bytes exceeds this run's cap of {pre.size_cap}")
    ref = store(rt, pre.run, data, sha)
    return record(rt, client_id, number, base_round, num_samples, ref, train_loss)
