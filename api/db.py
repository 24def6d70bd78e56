"""Engine and session factory. Built per application (no module-level engine), so tests and
processes choose their database explicitly."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

#: Execution option that marks a connection's transaction as a write (SQLite: IMMEDIATE).
WRITE_OPTION = "fedsrd_write"


def make_engine(
    url: str,
    *,
    connect_timeout_s: int | None = None,
    statement_timeout_s: float | None = None,
    **kwargs: Any,
) -> Engine:
    """An engine for ``url``; SQLite gets WAL, foreign keys and a busy timeout, because the
    API and the worker are separate processes writing the same file.

    PostgreSQL gets ``connect_timeout_s`` (libpq's ``connect_timeout``: a server that
    accepts the TCP connection and then says nothing no longer holds a thread for ever) and
    ``statement_timeout_s`` (the server cancels any statement, lock waits included, that runs
    longer; 0 or None: no limit), both sent when each connection opens. Migrations build
    their engine without them: an index build may rightly take long."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            # The driver's own transaction handling would BEGIN DEFERRED, and a deferred
            # transaction that reads, then writes after another process committed, fails at
            # once with "database is locked" instead of waiting; BEGIN IMMEDIATE below waits.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        @event.listens_for(engine, "begin")
        def _begin(conn: Any) -> None:
            # Write transactions (Runtime.transaction) take the write lock up front; reads
            # stay deferred so they never queue behind a writer (WAL readers don't block).
            write = conn.get_execution_options().get(WRITE_OPTION, False)
            conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

        return engine
    # No ping before each checkout (a round trip on every request): a connection that a
    # database restart broke fails once, SQLAlchemy then discards the whole pool, and the
    # API answers that request 503 (agents retry 5xx); see api.main.
    kwargs.setdefault("pool_pre_ping", False)
    kwargs.setdefault("pool_recycle", 1800)
    # As many pooled connections as the API's worker threads (anyio's default limit is 40):
    # a smaller pool opens and closes overflow connections under load, which costs
    # PostgreSQL a third of a core at 200 polls/s.
    kwargs.setdefault("pool_size", 40)
    kwargs.setdefault("max_overflow", 10)
    connect_args: dict[str, Any] = dict(kwargs.pop("connect_args", {}))
    if connect_timeout_s:
        connect_args["connect_timeout"] = int(connect_timeout_s)
    if statement_timeout_s:
        # In the startup packet: no extra round trip per connection, and every statement of
        # every session (autocommit reads included) is covered.
        ms = max(1, round(statement_timeout_s * 1000))
        connect_args["options"] = f"-c statement_timeout={ms}"
    return create_engine(url, connect_args=connect_args, **kwargs)


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    # expire_on_commit=False: services return rows that routers serialise after commit.
    return sessionmaker(engine, expire_on_commit=False)
