"""Celery tasks: thin wrappers that take IDs and call :mod:`workers.jobs`.

Each job re-reads the state it needs and is idempotent, so a redelivered task (acks late, a
worker killed mid-way, reconciliation re-sending it) does the same thing or nothing.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery
from celery.signals import worker_init, worker_process_init, worker_ready

import workers.jobs as jobs
from api.db import make_engine
from api.dispatch import AGGREGATE, EVALUATE, TRAIN
from api.migrate import SchemaBehindError, check_schema
from api.runtime import Runtime, make_runtime
from api.settings import Settings

log = logging.getLogger(__name__)
_runtime: Runtime | None = None


def runtime() -> Runtime:
    """This process's runtime, made lazily (after a prefork worker forks, never before:
    database connections and CUDA must not cross a fork)."""
    global _runtime
    if _runtime is None:
        _runtime = make_runtime(Settings())
    return _runtime


@worker_process_init.connect  # type: ignore[untyped-decorator]
def _fresh_runtime(**_: Any) -> None:
    global _runtime
    _runtime = None


@worker_init.connect  # type: ignore[untyped-decorator]
def _check_schema(**_: Any) -> None:
    """Refuse to start on a database an upgrade forgot to migrate (in the parent process,
    before any fork: a throwaway engine, disposed)."""
    settings = Settings()
    engine = make_engine(
        settings.resolved_database_url, connect_timeout_s=settings.database_connect_timeout_s
    )
    try:
        check_schema(engine)
    except SchemaBehindError as e:
        log.error("%s", e)
        # SystemExit, not an exception: Celery logs and ignores exceptions in receivers.
        raise SystemExit(f"fedsrd worker: {e}") from None
    finally:
        engine.dispose()


@worker_ready.connect  # type: ignore[untyped-decorator]
def _reconcile(**_: Any) -> None:
    from api.services import reconcile

    n = reconcile.reconcile(runtime())
    log.info("reconciled on start: %d task(s) re-sent", n)


def register(app: Celery) -> None:
    @app.task(name=AGGREGATE)  # type: ignore[untyped-decorator]
    def aggregate_round(round_id: int) -> None:
        jobs.aggregate_round(runtime(), round_id)

    @app.task(name=TRAIN)  # type: ignore[untyped-decorator]
    def train_client(run_id: int, client_id: int, round_number: int) -> None:
        jobs.train_client(runtime(), run_id, client_id, round_number)

    @app.task(name=EVALUATE)  # type: ignore[untyped-decorator]
    def evaluate_round(run_id: int, round_number: int) -> None:
        jobs.evaluate_round(runtime(), run_id, round_number)
