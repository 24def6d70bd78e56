"""The prestart step: wait for the database, then ``alembic upgrade head``; and the check
that the API and the workers make before they start: is the database at the schema this
code needs?

Migrations never run at import; ``fedsrd up``, the compose stack and the tests call
:func:`upgrade`. A process started on a database that is behind (an upgrade whose
``fedsrd migrate`` was forgotten) refuses to start with :class:`SchemaBehindError` naming
both revisions, instead of failing request by request on a missing table or column.
"""

from __future__ import annotations

import time
from functools import cache
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, make_url, text

from api.db import make_engine

ROOT = Path(__file__).resolve().parent.parent


def alembic_config(url: str) -> Config:
    cfg = Config(str(ROOT / "alembic.ini"))
    cfg.set_main_option("script_location", str(ROOT / "migrations"))
    cfg.attributes["url"] = url
    return cfg


def wait_for_database(url: str, timeout: float = 60.0) -> None:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = make_engine(url)
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                with engine.connect() as conn:
                    conn.execute(text("SELECT 1"))
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
    finally:
        engine.dispose()


def upgrade(url: str, revision: str = "head") -> None:
    wait_for_database(url)
    command.upgrade(alembic_config(url), revision)


class SchemaBehindError(RuntimeError):
    """The database is not at the schema this code needs (message: what to run)."""


@cache
def _script() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config(""))


def head_revision() -> str:
    """The newest migration this code ships."""
    head = _script().get_current_head()
    assert head is not None
    return head


def schema_state(bind: Engine | Connection) -> tuple[str, str | None]:
    """``(state, revision)`` of the database: ``"current"`` (at this code's head),
    ``"behind"`` (an older revision, or none: never migrated) or ``"ahead"`` (a revision this
    code does not know: a newer version migrated it, as in a rolling upgrade)."""
    if isinstance(bind, Engine):
        with bind.connect() as conn:
            return schema_state(conn)
    revision = MigrationContext.configure(bind).get_current_revision()
    head = head_revision()
    if revision == head:
        return "current", revision
    if revision is None:
        return "behind", None
    known = {sc.revision for sc in _script().walk_revisions()}
    return ("behind" if revision in known else "ahead"), revision


def check_schema(bind: Engine | Connection) -> str:
    """Raise :class:`SchemaBehindError` unless the database is at this code's schema or newer;
    returns the state (``"current"`` or ``"ahead"``)."""
    state, revision = schema_state(bind)
    if state == "behind":
        at = f"at revision {revision}" if revision else "not migrated"
        raise SchemaBehindError(
            f"the database is {at}; this version needs revision {head_revision()}: "
            "run `fedsrd migrate` (or the compose stack's migrate service) first"
        )
    return state
