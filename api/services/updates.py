"""Accepting a client's update for a round: the one path for HTTP agents and simulated
clients alike (the only writer of ``updates``).

Order of work, so a rejection never leaves anything behind and never holds a lock while
parsing: (1) cheap checks against the database (run, round, base round, duplicate);
(2) the blob is streamed to a temporary file with a size cap, hashed, and validated against
the run's upload layout (names, shapes, finite values, wire dtype) as it arrives, batch by
batch (:class:`UploadSink`), so that little is left to check after the last byte; (3) the
hash is compared, the validation finished, and the blob is fsynced and renamed into the
store; (4) one transaction locks the run and round, re-checks, inserts the row and applies
the closing rule; the aggregation task is sent after commit.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from types import TracebackType
from typing import Self

from sqlalchemy import select
from sqlalchemy.orm import Session

from api.blobstore import BlobRef, BlobWriter, BytesLike
from api.errors import Conflict, Gone, InvalidInput, TooLarge
from api.models import Client, Round, Run, Update, utcnow
from api.runtime import Runtime
from api.services import clients as client_service
from api.services import rounds as round_service
from api.services import storage
from api.services.states import upload_shapes, upload_size_cap, value_dtype_of
from fedsrd_core.codec import EntryInfo, StreamValidator, WireFormatError
from fedsrd_core.finite import finite_or_none

log = logging.getLogger(__name__)


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
    """What the cheap checks found: ``existing`` is set for an already accepted update;
    ``shapes`` is what the upload must carry (names and shapes)."""

    run: Run
    round_id: int
    size_cap: int
    existing: Accepted | None
    shapes: dict[str, tuple[int, ...]]


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


def releasable_uploads(s: Session, run_id: int, newest: int, keep: int) -> list[Update]:
    """The updates whose blobs closing round ``newest`` releases: those of the run's closed
    rounds before the newest ``keep`` (-1: none; 0: ``newest``'s own too) that are still
    kept. Never an open, aggregating or failed round's: a resumed run aggregates it again."""
    if keep < 0:
        return []
    return list(
        s.scalars(
            select(Update)
            .join(Round, Update.round_id == Round.id)
            .where(
                Round.run_id == run_id,
                Round.status == "closed",
                Round.number <= newest - keep,
                Update.blob_released_at.is_(None),
            )
        )
    )


def release_uploads(rt: Runtime, run_id: int, newest: int) -> int:
    """After round ``newest`` closed: stop keeping the blobs of the run's updates past
    ``FEDSRD_KEEP_UPLOADS`` (:func:`releasable_uploads`); how many. The rows stay, with the
    SHA-256 of what was accepted; garbage collection may remove the blobs unless another
    row names the same content. Idempotent, and it catches up on earlier rounds (a worker
    that died between a round's close and this)."""
    keep = rt.settings.keep_uploads
    if keep < 0:
        return 0
    with rt.sessions() as s:
        shas = {u.blob for u in releasable_uploads(s, run_id, newest, keep)}
    # Renewed first, outside the transaction (on S3 a renewal copies the object): garbage
    # collection leaves each blob for its grace period from here (a backup's dump taken just
    # before still finds it). The set cannot grow meanwhile: those rounds are closed.
    for sha in shas:
        rt.blobs.renew(sha)
    with rt.transaction() as tx:
        released = releasable_uploads(tx.session, run_id, newest, keep)
        now = utcnow()
        for u in released:
            u.blob_released_at = now
        return len(released)


def precheck(rt: Runtime, client_id: int, number: int, base_round: int, sha256: str) -> Precheck:
    with rt.sessions() as s:
        client = s.get(Client, client_id)
        assert client is not None
        run, rnd, existing = _check(s, client, number, base_round, sha256)
        return Precheck(run, rnd.id, upload_size_cap(run), existing, upload_shapes(run))


def _check_value_dtype(want: str, infos: list[EntryInfo]) -> None:
    """The run fixes the wire dtype of its uploads (one per blob; named with its first entry)."""
    for info in infos:
        if info.value_dtype != want:
            raise InvalidInput(
                f"tensor {info.name!r}: values are {info.value_dtype}, this run uses {want}"
            )


class UploadSink:
    """One update's body on its way into the blob store: each batch is written to the
    store's temporary file, hashed, and checked against the run's upload layout
    (:class:`~fedsrd_core.codec.StreamValidator`: exactly what a full decode checks) as it
    arrives. When the last byte is in, only the last entry's check, the hash comparison and
    the rest of the fsync are left, instead of decoding the whole blob again.

    Use it as a context manager; leaving the block without :meth:`commit` (an exception
    included) discards the temporary file, so nothing is ever half-stored. :meth:`write`
    and :meth:`commit` block (disk, hashing, decoding): call them from the thread pool,
    one at a time and in order.

    Args:
        rt: the runtime (its blob store takes the body).
        run: the run whose wire dtype the body must use.
        shapes: the names and shapes the body must carry (:func:`upload_shapes`).
        size_cap: the most bytes accepted (past it the store's writer refuses).
        declared_size: the body's announced length (Content-Length), if any: with it, an
            invalid blob is recognised as soon as its first bad section is in, and from then
            on the body is only stored and hashed (the error is reported after the hash,
            as before).
    """

    def __init__(
        self,
        rt: Runtime,
        run: Run,
        shapes: dict[str, tuple[int, ...]],
        size_cap: int | None,
        declared_size: int | None = None,
    ) -> None:
        self._declared = declared_size
        self._validator = StreamValidator(
            expected_shapes=shapes,
            total_size=declared_size,
            check_headers=partial(_check_value_dtype, value_dtype_of(run)),
        )
        self._error: InvalidInput | None = None
        self._writer: BlobWriter = rt.blobs.writer(max_bytes=size_cap)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._writer.abort()  # a no-op after commit

    def write(self, batch: BytesLike) -> None:
        """Store, hash and check the body's next bytes."""
        self._writer.write(batch)
        if self._error is not None:
            return  # already invalid: keep storing and hashing only
        if self._declared is not None and self._writer.size > self._declared:
            self._error = InvalidInput(
                f"the body is longer than its Content-Length of {self._declared} bytes"
            )
            return
        try:
            self._validator.feed(batch)
        except WireFormatError as e:
            self._error = InvalidInput(f"invalid update blob: {e}")
        except InvalidInput as e:
            self._error = e

    def commit(self, sha256: str) -> BlobRef:
        """Check the body against its declared SHA-256 (first, as a client's first concern
        is whether its bytes arrived intact), then against the run's layout, then make it
        durable in the store (complete before any row names it: fsynced and renamed into
        place locally, uploaded whole to S3). Raises InvalidInput (422) naming the problem."""
        writer = self._writer
        if writer.sha256 != sha256:
            raise InvalidInput(
                f"X-Content-SHA256 is {sha256} but the body's SHA-256 is {writer.sha256} "
                f"({writer.size} bytes received)"
            )
        if self._error is None and self._declared is not None and writer.size != self._declared:
            self._error = InvalidInput(
                f"the body has {writer.size} bytes, its Content-Length said {self._declared}"
            )
        if self._error is not None:
            raise self._error
        try:
            self._validator.finish()
        except WireFormatError as e:
            raise InvalidInput(f"invalid update blob: {e}") from e
        return writer.commit(sha256)


def store(rt: Runtime, run: Run, data: bytes, sha256: str) -> BlobRef:
    """Validate and commit a body already in memory (simulated clients): the same checks
    and the same store as an HTTP upload."""
    with UploadSink(rt, run, upload_shapes(run), None, len(data)) as sink:
        sink.write(data)
        return sink.commit(sha256)


def finish(
    rt: Runtime,
    sink: UploadSink,
    sha256: str,
    client_id: int,
    number: int,
    base_round: int,
    num_samples: int,
    train_loss: float | None = None,
) -> Accepted:
    """The end of a streamed upload, in one trip to the thread pool: commit the blob
    (:meth:`UploadSink.commit`), then record it (:func:`record`)."""
    return _store_and_record(
        rt, sha256, lambda: sink.commit(sha256), client_id, number, base_round, num_samples,
        train_loss,
    )  # fmt: skip


def _store_and_record(
    rt: Runtime,
    sha256: str,
    commit: Callable[[], BlobRef],
    client_id: int,
    number: int,
    base_round: int,
    num_samples: int,
    train_loss: float | None,
) -> Accepted:
    """``commit()`` the blob, then :func:`record` it; if the record is refused (a
    concurrent upload of the same client for the same round won, the round closed while
    the blob streamed in), remove the blob this call stored at once instead of leaving it
    to garbage collection's grace period: an update can leak training data, and a client
    can send many. Only a blob this call created is removed, and only if no row names it
    and no writer stored it again since (:meth:`BlobStore.collect` decides under the same
    rule as garbage collection); a store that cannot collect safely (S3 without
    versioning) leaves it to the collector."""
    store = rt.blobs
    fresh = store.can_collect() and not store.exists(sha256)
    ref = commit()
    stored_until = time.time()
    try:
        return record(rt, client_id, number, base_round, num_samples, ref, train_loss)
    except BaseException:
        if fresh:
            _discard_unnamed(rt, ref.sha256, stored_until)
        raise


def _discard_unnamed(rt: Runtime, sha256: str, stored_until: float) -> None:
    def still_needed(stored_at: float) -> bool:
        if stored_at > stored_until:
            return True  # stored again since: a writer of the same content is in flight
        with rt.sessions() as s:
            return storage.is_named(s, sha256)

    try:
        rt.blobs.collect(sha256, still_needed)
    except Exception:  # the refusal matters to the client; the collector gets it later
        log.warning("could not remove refused upload blob %s", sha256, exc_info=True)


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
            # Simulated clients come here without the route's check: a diverged loss is
            # missing, as the HTTP path makes the agent send it (fedsrd_core.finite).
            train_loss=finite_or_none(train_loss),
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
    return _store_and_record(
        rt, sha, lambda: store(rt, pre.run, data, sha), client_id, number, base_round,
        num_samples, train_loss,
    )  # fmt: skip
