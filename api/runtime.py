"""What the API process and a worker process share: settings, database, blob store, and the
dispatcher that sends tasks, plus the transaction helper that sends them only after commit.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from api.blobstore import BlobStore, open_blob_store
from api.db import WRITE_OPTION, make_engine, make_session_factory
from api.dispatch import Dispatcher, make_dispatcher
from api.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class Transaction:
    """A session plus callbacks that run only once the transaction has committed (Celery
    tasks are sent there: a task must never see state its sender might still roll back)."""

    session: Session
    _after: list[Callable[[], None]] = field(default_factory=list)

    def after_commit(self, fn: Callable[[], None]) -> None:
        self._after.append(fn)


@dataclass
class Runtime:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    blobs: BlobStore
    dispatcher: Dispatcher
    #: Sessions for single-statement reads on the hot paths (polls, authentication): on
    #: PostgreSQL in autocommit, which saves the BEGIN and ROLLBACK round trips around a
    #: lone SELECT; on SQLite the same as ``sessions``.
    reads: sessionmaker[Session] | None = None

    def __post_init__(self) -> None:
        if self.reads is None:
            if self.engine.dialect.name == "sqlite":
                self.reads = self.sessions
            else:
                self.reads = make_session_factory(
                    self.engine.execution_options(isolation_level="AUTOCOMMIT")
                )

    @contextmanager
    def transaction(self) -> Iterator[Transaction]:
        """``with rt.transaction() as tx:`` commits on success, rolls back on error, then
        runs ``tx.after_commit`` callbacks (a failing callback is logged, not raised: the
        state is committed, and reconciliation re-sends what a lost task would have done)."""
        with self.sessions() as session:
            tx = Transaction(session)
            with session.begin():
                session.connection(execution_options={WRITE_OPTION: True})
                yield tx
        for fn in tx._after:
            try:
                fn()
            except Exception:
                log.exception("after-commit action failed; reconciliation will retry it")

    @contextmanager
    def single_statement(self) -> Iterator[Session]:
        """A session for one self-contained write statement: autocommit on PostgreSQL (no
        BEGIN/COMMIT round trips), a normal write transaction on SQLite."""
        if self.reads is self.sessions or self.reads is None:
            with self.transaction() as tx:
                yield tx.session
            return
        with self.reads() as session:
            yield session

    def close(self) -> None:
        self.engine.dispose()


def make_runtime(settings: Settings, dispatcher: Dispatcher | None = None) -> Runtime:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(
        settings.resolved_database_url,
        connect_timeout_s=settings.database_connect_timeout_s,
        statement_timeout_s=settings.database_statement_timeout_s,
    )
    rt = Runtime(
        settings=settings,
        engine=engine,
        sessions=make_session_factory(engine),
        blobs=open_blob_store(
            settings.resolved_blob_url,
            spool_dir=settings.blob_spool_dir,
            s3_endpoint_url=settings.s3_endpoint_url or None,
            s3_region=settings.s3_region or None,
        ),
        dispatcher=dispatcher or make_dispatcher(settings),
    )
    if dispatcher is None:
        rt.dispatcher.bind(rt)
    return rt
