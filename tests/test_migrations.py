"""Every migration, run on an empty database, yields exactly the models' schema."""

from __future__ import annotations

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from api.db import make_engine
from api.migrate import alembic_config, upgrade
from api.models import Base


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_db(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'm.db'}"
    return request.getfixturevalue("pg_database")


def _diff(url: str) -> list:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True})
            return list(compare_metadata(ctx, Base.metadata))
    finally:
        engine.dispose()


def test_migrations_match_models(empty_db: str):
    upgrade(empty_db)
    assert _diff(empty_db) == []


def test_downgrade_to_base_and_up_again(empty_db: str):
    upgrade(empty_db)
    command.downgrade(alembic_config(empty_db), "base")
    engine = make_engine(empty_db)
    try:
        assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    finally:
        engine.dispose()
    upgrade(empty_db)
    assert _diff(empty_db) == []


def test_the_check_can_fail(empty_db: str):
    # Guard against a vacuous comparison: a database missing a table must differ.
    upgrade(empty_db)
    engine = make_engine(empty_db)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql("DROP TABLE updates")
    finally:
        engine.dispose()
    assert any(d[0] == "add_table" for d in _diff(empty_db))
