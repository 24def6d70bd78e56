"""Every migration, run on an empty database, yields exactly the models' schema."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from fastapi.testclient import TestClient
from sqlalchemy import inspect, text

from api.db import make_engine
from api.launcher import api_service, free_port, worker_service
from api.main import create_app
from api.migrate import (
    SchemaBehindError,
    alembic_config,
    check_schema,
    head_revision,
    schema_state,
    upgrade,
)
from api.models import Base
from api.runtime import make_runtime
from api.settings import Settings
from tests.api_support import ADMIN


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


def test_0002_fills_in_the_traffic_of_existing_runs(empty_db: str):
    """Runs made before 0002 get the totals their closed rounds add up to, by the rule the
    application applies to new rounds (api.services.rounds.round_traffic)."""
    from api.services.rounds import round_traffic

    command.upgrade(alembic_config(empty_db), "0001")
    layout = {"m.q": [16, 8], "m.v": [8, 8]}
    params = 2 * ((16 + 8) + (8 + 8))  # rank 2
    engine = make_engine(empty_db)
    rows = [  # (status, delta_size, bytes_up, participants)
        ("closed", 1000, 5000, [1, 2, 3]),
        ("closed", 700, 2500, [1, 2]),
        ("open", None, 0, []),
    ]
    try:
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO runs (id, name, status, config, base_model, model_fingerprint,"
                    " layout, total_rounds, current_round, version, created_at) VALUES (1, 'r',"
                    " 'running', :config, 'tiny', :fp, :layout, 5, 3, 0, CURRENT_TIMESTAMP)"
                ),
                {
                    "config": json.dumps({"lora": {"rank": 2}}),
                    "fp": "0" * 64,
                    "layout": json.dumps(layout),
                },
            )
            for number, (status, delta, up, who) in enumerate(rows, start=1):
                conn.execute(
                    text(
                        "INSERT INTO rounds (run_id, number, status, expected, opened_at,"
                        " deadline_at, delta_size, metrics, attempts) VALUES (1, :n, :s, '[]',"
                        " CURRENT_TIMESTAMP, CURRENT_TIMESTAMP, :d, :m, 0)"
                    ),
                    {
                        "n": number,
                        "s": status,
                        "d": delta,
                        "m": json.dumps({"bytes_up": up, "participants": who}),
                    },
                )
    finally:
        engine.dispose()
    upgrade(empty_db)
    expected = [round_traffic(params, len(who), up, d) for s, d, up, who in rows if s == "closed"]
    engine = make_engine(empty_db)
    try:
        with engine.connect() as conn:
            got = conn.execute(text("SELECT bytes_up, bytes_down, fedavg_bytes FROM runs")).one()
    finally:
        engine.dispose()
    assert tuple(got) == (
        sum(t["up"] for t in expected),
        sum(t["down"] for t in expected),
        sum(t["fedavg"] for t in expected),
    )
    assert tuple(got) == (7500, 3 * 1000 + 2 * 700, 2 * 5 * params * 4)


def _services_env(url: str, tmp_path: Path, model_cache: Path) -> dict[str, str]:
    return {
        **os.environ,
        "FEDSRD_DATA_DIR": str(tmp_path / "data"),
        "FEDSRD_DATABASE_URL": url,
        "FEDSRD_BROKER_URL": "filesystem://",
        "FEDSRD_TASK_MODE": "celery",
        "FEDSRD_ADMIN_TOKEN": ADMIN,
        "FEDSRD_MODEL_CACHE": str(model_cache),
    }


def test_processes_refuse_a_database_an_upgrade_forgot_to_migrate(
    empty_db: str, tmp_path: Path, model_cache: Path
):
    engine = make_engine(empty_db)
    try:
        assert schema_state(engine) == ("behind", None)
        with pytest.raises(SchemaBehindError, match="not migrated"):
            check_schema(engine)
        command.upgrade(alembic_config(empty_db), "0003")
        assert schema_state(engine) == ("behind", "0003")
        needs = f"at revision 0003; this version needs revision {head_revision()}"
        with pytest.raises(SchemaBehindError, match=needs):
            check_schema(engine)

        # The API: /readyz says what to run, and the process does not start.
        settings = Settings(
            data_dir=tmp_path / "data", database_url=empty_db, task_mode="inline",
            admin_token=ADMIN, model_cache=model_cache,
        )  # fmt: skip
        rt = make_runtime(settings)
        app = create_app(settings, rt)
        try:
            r = TestClient(app).get("/readyz")  # no lifespan: the readiness check alone
            assert r.status_code == 503 and "fedsrd migrate" in r.json()["checks"]["schema"]
            with pytest.raises(SchemaBehindError, match=needs), TestClient(app):
                pass
        finally:
            rt.close()
        env = _services_env(empty_db, tmp_path, model_cache)
        api = api_service(env, free_port(), tmp_path / "logs").start()
        worker = worker_service(env, tmp_path / "logs").start()
        try:
            for service in (api, worker):
                assert service.proc is not None
                assert service.proc.wait(timeout=120) != 0, service.tail()
                assert "this version needs revision" in service.tail(), service.tail()
        finally:
            api.stop()
            worker.stop()

        # Migrated: current. Migrated by a newer version (a rolling upgrade): still served.
        upgrade(empty_db)
        assert check_schema(engine) == "current"
        with engine.begin() as conn:
            conn.execute(text("UPDATE alembic_version SET version_num = '9999_newer'"))
        assert schema_state(engine) == ("ahead", "9999_newer")
        assert check_schema(engine) == "ahead"
        rt = make_runtime(settings)
        try:
            with TestClient(create_app(settings, rt)) as client:
                r = client.get("/readyz")
                assert r.status_code == 200 and r.json()["checks"]["schema"] == "ok"
        finally:
            rt.close()
    finally:
        engine.dispose()
