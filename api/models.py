"""The control plane's tables (SQLAlchemy 2, typed).

One name per concept: a *run* has *clients* and *rounds*; a client's upload for a round is
an *update*; the server's result of a round is its *global delta* (and a *snapshot* of the
whole global state after it). Blobs live in the blob store; rows hold their SHA-256 keys,
and a row naming a blob commits only after the blob is completely written.

Each table has one write path: ``runs`` and ``rounds`` in :mod:`api.services.rounds` /
:mod:`api.services.runs`, ``clients`` in :mod:`api.services.clients`, ``updates`` in
:mod:`api.services.updates`, ``admin_sessions`` in :mod:`api.services.sessions`,
``audit_events`` in :mod:`api.services.audit`.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

SHA_LEN = 64


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class UTCDateTime(TypeDecorator[dt.datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite keeps no zone; PostgreSQL
    ``timestamptz`` does): stored as UTC, always returned aware."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(dt.UTC)

    def process_result_value(
        self, value: dt.datetime | None, dialect: Dialect
    ) -> dt.datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


class Base(DeclarativeBase):
    # Named constraints, so Alembic migrations are identical on SQLite and PostgreSQL.
    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(column_0_label)s",
            "uq": "uq_%(table_name)s_%(column_0_name)s",
            "ck": "ck_%(table_name)s_%(constraint_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
            "pk": "pk_%(table_name)s",
        }
    )
    type_annotation_map = {  # noqa: RUF012 - SQLAlchemy reads it as a class attribute
        dict[str, Any]: JSON,
        list[int]: JSON,
        dt.datetime: UTCDateTime,
    }


class Run(Base):
    """A federation: one base model, one adapter layout, one strategy, ``total_rounds``."""

    __tablename__ = "runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    #: created -> running -> completed | failed | cancelled (failed can be resumed).
    status: Mapped[str] = mapped_column(String(16), index=True)
    status_reason: Mapped[str | None] = mapped_column(Text)
    #: The validated ``RunCreate`` document: everything that defines the run.
    config: Mapped[dict[str, Any]]
    base_model: Mapped[str] = mapped_column(String(500))
    model_fingerprint: Mapped[str] = mapped_column(String(SHA_LEN))
    #: module -> [d_out, d_in] of every adapted layer.
    layout: Mapped[dict[str, Any]]
    total_rounds: Mapped[int] = mapped_column(Integer)
    #: Number of the newest round (0 before the first opens).
    current_round: Mapped[int] = mapped_column(Integer, default=0)
    #: Snapshot of the initial global state (round 0), written at launch.
    initial_blob: Mapped[str | None] = mapped_column(String(SHA_LEN))
    initial_size: Mapped[int | None] = mapped_column(BigInteger)
    initial_digest: Mapped[str | None] = mapped_column(String(SHA_LEN))
    #: Traffic of the closed rounds (see :func:`api.services.rounds.round_traffic`): bytes
    #: uploaded, bytes of global deltas delivered to the participants, and what FedAvg's
    #: dense fp32 exchange of the same adapter would have moved for the same participants.
    bytes_up: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    bytes_down: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    fedavg_bytes: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    #: Bumped on every change agents wait for (round opened/closed, run finished), so
    #: long polls can watch one integer.
    version: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    started_at: Mapped[dt.datetime | None]
    finished_at: Mapped[dt.datetime | None]

    clients: Mapped[list[Client]] = relationship(back_populates="run")
    rounds: Mapped[list[Round]] = relationship(back_populates="run", order_by="Round.number")


class Client(Base):
    """A client site enrolled in one run, authenticated by its token (stored hashed)."""

    __tablename__ = "clients"
    __table_args__ = (UniqueConstraint("run_id", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    #: SHA-256 of the token; tokens are 256-bit random, so a plain hash is enough.
    token_hash: Mapped[str] = mapped_column(String(SHA_LEN), unique=True)
    #: active | revoked
    status: Mapped[str] = mapped_column(String(16))
    #: Played by a worker in a simulated federation.
    simulated: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    last_seen_at: Mapped[dt.datetime | None]
    rounds_done: Mapped[int] = mapped_column(Integer, default=0)
    bytes_up: Mapped[int] = mapped_column(BigInteger, default=0)
    bytes_down: Mapped[int] = mapped_column(BigInteger, default=0)
    #: Last progress report: round, step, steps, loss, samples_per_second.
    progress: Mapped[dict[str, Any] | None] = mapped_column(JSON)

    run: Mapped[Run] = relationship(back_populates="clients")


class Round(Base):
    """One round of a run: open -> aggregating -> closed (or failed, below quorum)."""

    __tablename__ = "rounds"
    __table_args__ = (UniqueConstraint("run_id", "number"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    number: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), index=True)
    #: Client ids selected when the round opened.
    expected: Mapped[list[int]]
    opened_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    deadline_at: Mapped[dt.datetime]
    closed_at: Mapped[dt.datetime | None]
    #: When the last update was accepted (the round's aggregation can start).
    collected_at: Mapped[dt.datetime | None]
    delta_blob: Mapped[str | None] = mapped_column(String(SHA_LEN))
    delta_size: Mapped[int | None] = mapped_column(BigInteger)
    snapshot_blob: Mapped[str | None] = mapped_column(String(SHA_LEN))
    snapshot_size: Mapped[int | None] = mapped_column(BigInteger)
    #: State digest of the global factors after this round's delta.
    digest: Mapped[str | None] = mapped_column(String(SHA_LEN))
    #: participants, bytes, losses, durations (see api.schemas.RoundPublic).
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    #: Times aggregation started (a crashed worker's round is re-run).
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)

    run: Mapped[Run] = relationship(back_populates="rounds")
    updates: Mapped[list[Update]] = relationship(back_populates="round")


class Update(Base):
    """A client's accepted upload for a round (its blob is validated before this row)."""

    __tablename__ = "updates"
    __table_args__ = (UniqueConstraint("round_id", "client_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id", ondelete="CASCADE"), index=True)
    client_id: Mapped[int] = mapped_column(ForeignKey("clients.id", ondelete="CASCADE"))
    blob: Mapped[str] = mapped_column(String(SHA_LEN))
    size: Mapped[int] = mapped_column(BigInteger)
    base_round: Mapped[int] = mapped_column(Integer)
    num_samples: Mapped[int] = mapped_column(Integer)
    train_loss: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    #: When the blob stopped being kept (its round aggregated, past ``FEDSRD_KEEP_UPLOADS``):
    #: garbage collection may remove it; ``blob`` still records what was accepted.
    blob_released_at: Mapped[dt.datetime | None]

    round: Mapped[Round] = relationship(back_populates="updates")


class AdminSession(Base):
    """A signed-in dashboard browser: its cookie is a session only while this row exists
    (signing out deletes it; see :mod:`api.auth`)."""

    __tablename__ = "admin_sessions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    #: SHA-256 (hex) of the cookie's nonce, never the nonce itself.
    key: Mapped[str] = mapped_column(String(SHA_LEN), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    #: When the cookie expires (sign-in time + ``session_ttl_s``): rows past it are pruned.
    expires_at: Mapped[dt.datetime] = mapped_column(index=True)


class AuditEvent(Base):
    """An admin action, written in the same transaction as the action itself: it is recorded
    exactly when the action took effect. Never updated or deleted by the application."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(default=utcnow, index=True)
    #: ``admin-token``, ``session:<12 hex digits>`` or ``anonymous`` (:class:`api.auth.Actor`)
    actor: Mapped[str] = mapped_column(String(64))
    address: Mapped[str | None] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(40))
    # No foreign keys: the trail outlives whatever it names.
    run_id: Mapped[int | None] = mapped_column(Integer, index=True)
    client_id: Mapped[int | None] = mapped_column(Integer)
    detail: Mapped[dict[str, Any] | None]
