"""A training loss that is not finite never fails a run: long examples train to finite
losses, a NaN from a worker is stored as missing, round metrics hold no NaN, and a run's
status never quotes SQL. On SQLite and on PostgreSQL (whose JSON refuses NaN)."""

from __future__ import annotations

import json
import math

import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import DBAPIError

from api.models import Update
from api.services import rounds as round_service
from api.services import updates as update_service
from tests.api_support import Api, FakeAgent, database_url, make_api


@pytest.fixture(params=["sqlite", "postgresql"])
def api(request, tmp_path, model_cache):
    with make_api(tmp_path / "data", database_url(request, tmp_path), model_cache) as a:
        yield a


def test_a_simulated_run_whose_prompts_overflow_seq_len_completes(api: Api):
    """seq_len 160 (the tiny model's template needs 141) is shorter than each of these
    clients' prompts: cut at the end, no response token was left, every step's loss was NaN,
    and on PostgreSQL the aggregation failed the run."""
    created = api.create_run(
        launch=True,
        rounds=1,
        train={"steps": 1, "batch_size": 2, "seq_len": 160},
        simulation={"clients": 2, "domains": ["arithmetic", "code"], "examples_per_client": 2},
    )
    run = api.run(created["id"])
    assert run["status"] == "completed", run["status_reason"]
    (rnd,) = api.rounds(created["id"])
    assert math.isfinite(rnd["metrics"]["train_loss"]) and rnd["metrics"]["train_loss"] > 0
    for c in api.admin("GET", f"/api/v1/runs/{created['id']}/clients").json()["data"]:
        assert math.isfinite(c["progress"]["loss"])


def test_a_non_finite_loss_from_a_worker_is_stored_as_missing(api: Api):
    created = api.create_run(launch=True, rounds=1)
    run_id = created["id"]
    agents = []
    for i in range(3):
        cid, token = api.enroll(run_id, f"site-{i}")
        agents.append((cid, FakeAgent(api.agent(run_id, token), seed=i)))
    # Launched before the enrollments: all three joined round 1.
    blobs = []
    for _, agent in agents:
        agent.apply(agent.poll()["sync"])
        blobs.append(agent.make_update(1))
    # The worker's path (simulated clients): no route in front to refuse the NaN.
    (c0, _), (c1, _), (c2, _) = agents
    update_service.submit_bytes(api.rt, c0, 1, 0, 4, blobs[0], train_loss=math.nan)
    update_service.submit_bytes(api.rt, c1, 1, 0, 4, blobs[1], train_loss=2.0)
    with api.rt.transaction() as tx:
        rows = {u.client_id: u for u in tx.session.scalars(select(Update))}
        assert rows[c0].train_loss is None
        # A row stored before losses were sanitised (PostgreSQL kept the NaN).
        rows[c1].train_loss = math.nan
    update_service.submit_bytes(api.rt, c2, 1, 0, 4, blobs[2], train_loss=4.0)
    run = api.run(run_id)
    assert run["status"] == "completed", run["status_reason"]
    (rnd,) = api.rounds(run_id)
    assert rnd["metrics"]["train_loss"] == 4.0  # the mean of the finite losses


def test_round_metrics_and_progress_are_stored_without_nan(api: Api):
    created = api.create_run(launch=True, rounds=1)
    cid, _ = api.enroll(created["id"], "site")
    from api.services import clients as client_service

    client_service.report_progress(
        api.rt, created["id"], cid, {"round": 1, "step": 1, "loss": math.nan}
    )
    round_service.record_evaluation(
        api.rt, created["id"], 1, {"arithmetic": {"loss": math.inf, "tokens": 3.0}}
    )
    (rnd,) = api.rounds(created["id"])
    assert rnd["metrics"]["eval"] == {"arithmetic": {"loss": None, "tokens": 3.0}}
    mine = api.admin("GET", f"/api/v1/runs/{created['id']}/clients").json()["data"][0]
    assert mine["progress"]["loss"] is None and mine["progress"]["step"] == 1


def test_a_database_error_is_named_without_its_sql(api: Api):
    """What failed a run on PostgreSQL: psycopg's DataError quotes the statement and its
    parameters, and it became the run's status_reason word for word."""
    # A statement each database refuses: a NaN as JSON (PostgreSQL), a missing table.
    if api.rt.engine.dialect.name == "postgresql":
        sql, params = "SELECT CAST(:v AS json)", {"v": '{"train_loss": NaN}'}
    else:
        sql, params = "SELECT secret_column FROM no_such_table WHERE x = :v", {"v": 1}
    with api.rt.sessions() as s, pytest.raises(DBAPIError) as caught:
        s.execute(text(sql), params)
    assert "SELECT" in str(caught.value)
    reason = round_service.failure_reason(caught.value)
    assert "SELECT" not in reason and "NaN" not in reason and "secret" not in reason
    assert reason.startswith("database error (") and len(reason) < 100
    assert round_service.failure_reason(ValueError("x" * 1000)).endswith("...")


# -- the agent -------------------------------------------------------------------------------
def test_the_agent_survives_heartbeats_and_uploads_with_non_finite_numbers(api: Api):
    """Two agents died on ``ValueError: Out of range float values are not JSON compliant``
    in a heartbeat; a third had its upload refused (422) for ``train_loss=NaN``."""
    created = api.create_run(launch=True, rounds=1)
    cid, token = api.enroll(created["id"], "site")
    client = api.agent(created["id"], token)
    assert client.heartbeat(1, 1, steps=2, loss=math.nan, samples_per_second=math.inf)
    assert client.report_progress(1, 2, steps=2, loss=-math.inf)
    mine = api.admin("GET", f"/api/v1/runs/{created['id']}/clients").json()["data"][0]
    assert mine["progress"]["step"] == 2 and mine["progress"]["loss"] is None
    # A refused heartbeat (round 0 is invalid) is logged, never raised.
    assert client.heartbeat(0, 1) is False
    agent = FakeAgent(client)
    agent.apply(agent.poll()["sync"])
    accepted = client.upload(1, 0, agent.make_update(1), num_samples=4, train_loss=math.nan)
    assert accepted["round_complete"]
    with api.rt.sessions() as s:
        assert s.scalar(select(Update.train_loss).where(Update.client_id == cid)) is None


def _strict_json(path) -> dict:
    def refuse(name: str) -> None:
        raise AssertionError(f"{name} in {path}")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_the_agent_state_file_never_keeps_a_nan(tmp_path):
    from agent.state import AgentState, Pending, StateDir

    store = StateDir(tmp_path / "state")
    # What an older agent wrote: Python's json writes NaN.
    doc = {
        "run_id": 1,
        "client_id": 2,
        "have_round": -1,
        "digest": None,
        "pending": {
            "round": 1, "base_round": 0, "num_samples": 4, "train_loss": math.nan, "sha256": "a"
        },
        "rounds_trained": [],
    }  # fmt: skip
    (tmp_path / "state" / "state.json").write_text(json.dumps(doc))
    st, _ = store.load(1, 2, {}, 4)
    assert st.pending is not None and st.pending.train_loss is None
    # And it is never written: not even when a caller hands one over.
    store.save(AgentState(1, 2, pending=Pending(1, 0, 4, math.inf, "a")))
    assert _strict_json(tmp_path / "state" / "state.json")["pending"]["train_loss"] is None


def test_the_agent_json_log_has_no_nan():
    import logging

    from agent.cli import _JsonFormatter

    record = logging.LogRecord("fedsrd-agent", logging.INFO, __file__, 1, "step", (), None)
    record.fields = {"loss": math.nan, "round": 1}
    line = json.loads(_JsonFormatter().format(record), parse_constant=pytest.fail)
    assert line["loss"] is None and line["round"] == 1
