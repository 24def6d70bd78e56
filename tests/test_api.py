"""The REST API end to end in one process (inline tasks), on SQLite and on PostgreSQL."""

from __future__ import annotations

import datetime as dt
import io
import json
import time
import zipfile
from pathlib import Path

import pytest
import torch
from peft import AutoPeftModelForCausalLM, PeftModel

from agent.client import ServerError
from api.services import rounds as round_service
from fedsrd_core.modeling import load_causal_lm
from fedsrd_core.peft_lora import attach_lora, lora_config, state_to_peft
from fedsrd_core.snapshot import decode_snapshot
from tests.api_support import ADMIN, Api, FakeAgent, database_url, make_api


@pytest.fixture(params=["sqlite", "postgresql"])
def api(request, tmp_path, model_cache):
    with make_api(tmp_path / "data", database_url(request, tmp_path), model_cache) as a:
        yield a


def _three_clients(api: Api, **run) -> tuple[dict, list[FakeAgent]]:
    created = api.create_run(**run)
    agents = []
    for i in range(3):
        _, token = api.enroll(created["id"], f"site-{i}")
        agents.append(FakeAgent(api.agent(created["id"], token), seed=i))
    return created, agents


def test_run_lifecycle_digests_and_metrics(api: Api):
    created, agents = _three_clients(api, rounds=3)
    assert created["status"] == "created"
    assert created["lora_parameters"] > 0
    assert api.admin("POST", f"/api/v1/runs/{created['id']}/launch").status_code == 200
    for number in (1, 2, 3):
        answers = [a.play_round() for a in agents]
        assert all(x is not None and x["round"] == number for x in answers)
        assert [x["round_complete"] for x in answers] == [False, False, True]
        server = api.rounds(created["id"])[number - 1]
        assert server["status"] == "closed"
        for a in agents:
            a.catch_up()
            assert a.have_round == number
        assert server["digest"] is not None
    run = api.run(created["id"])
    assert run["status"] == "completed"
    assert run["current_round"] == 3
    rounds = api.rounds(created["id"])
    for r in rounds:
        m = r["metrics"]
        assert sorted(m["participants"]) == sorted(r["expected"])
        assert m["bytes_up"] > 0
        assert m["bytes_down"] == r["delta_size"]
        assert m["durations"]["aggregate_s"] > 0
        # Traffic: uploads, the delta to every participant, FedAvg's dense fp32 exchange.
        n = len(m["participants"])
        assert r["traffic"] == {
            "up": m["bytes_up"],
            "down": r["delta_size"] * n,
            "fedavg": 2 * n * run["lora_parameters"] * 4,
        }
    assert run["bytes_up"] == sum(r["traffic"]["up"] for r in rounds)
    assert run["bytes_down"] == sum(r["traffic"]["down"] for r in rounds)
    assert run["fedavg_equivalent_bytes"] == sum(r["traffic"]["fedavg"] for r in rounds)
    assert (
        run["bytes_saved"] == run["fedavg_equivalent_bytes"] - run["bytes_up"] - run["bytes_down"]
    )
    assert run["bytes_saved"] > 0 and run["clients"] == 3
    clients = api.admin("GET", f"/api/v1/runs/{created['id']}/clients").json()
    assert clients["count"] == 3
    for c in clients["data"]:
        assert c["rounds_done"] == 3
        assert c["bytes_up"] > 0
        assert c["bytes_down"] > 0
        assert "token" not in c


def test_exported_adapter_matches_server_state(api: Api, tiny_model: Path, tmp_path: Path):
    created, agents = _three_clients(api, rounds=2, lora={"rank": 4, "alpha": 16})
    api.admin("POST", f"/api/v1/runs/{created['id']}/launch")
    for _ in range(2):
        for a in agents:
            a.play_round()
    r = api.admin("GET", f"/api/v1/runs/{created['id']}/adapter")
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/zip"
    out = tmp_path / "adapter"
    zipfile.ZipFile(io.BytesIO(r.content)).extractall(out)
    base, _ = load_causal_lm(str(tiny_model))
    loaded = PeftModel.from_pretrained(base, out)
    # The server's state after the last round, from its snapshot blob.
    last = api.rounds(created["id"])[-1]
    layout = {k: tuple(v) for k, v in agents[0].info["layout"].items()}
    state = decode_snapshot(agents[0].agent.download(last_snapshot(api, created["id"])), layout, 4)
    assert last["digest"] is not None
    ref_base, _ = load_causal_lm(str(tiny_model))
    ref = attach_lora(ref_base, lora_config(rank=4, alpha=16))
    state_to_peft(state, ref)
    ids = torch.tensor([[5, 17, 99, 3, 42, 7]])
    with torch.no_grad():
        got = loaded(input_ids=ids).logits
        want = ref(input_ids=ids).logits
        plain = load_causal_lm(str(tiny_model))[0](input_ids=ids).logits
    torch.testing.assert_close(got, want)
    assert (got - plain).abs().max() > 1e-6  # the adapter changes the model
    # The run's model is "tiny": the export names its cached directory, so peft's one-call
    # loader finds the base model (it said "tiny", which nothing can load).
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_model.resolve())
    auto = AutoPeftModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(auto(input_ids=ids).logits, want)


def last_snapshot(api: Api, run_id: int) -> str:
    # An agent that holds nothing is sent the newest snapshot.
    from api.services.agent import AgentIdentity, sync_latest

    plan = sync_latest(api.rt, AgentIdentity(0, run_id, ""), None)
    assert plan.snapshot is not None
    return plan.snapshot.sha256


def test_sync_plan_prefers_deltas_then_snapshot(api: Api):
    created, agents = _three_clients(api, rounds=3)
    api.admin("POST", f"/api/v1/runs/{created['id']}/launch")
    for _ in range(2):
        for a in agents:
            a.play_round()
    fresh = agents[0].agent
    plan_new = fresh.sync(None)
    assert plan_new["snapshot"]["round"] == 2
    assert plan_new["deltas"] == []
    plan_behind = fresh.sync(0)
    assert plan_behind["snapshot"] is None
    assert [d["round"] for d in plan_behind["deltas"]] == [1, 2]
    assert plan_behind["bytes"] == sum(d["size"] for d in plan_behind["deltas"])
    assert fresh.sync(2)["deltas"] == []


def test_identical_retry_is_idempotent_and_conflicts_are_409(api: Api):
    created, agents = _three_clients(api, rounds=2)
    api.admin("POST", f"/api/v1/runs/{created['id']}/launch")
    a = agents[0]
    answer = a.poll()
    a.apply(answer["sync"])
    blob = a.make_update(1)
    first = a.agent.upload(1, 0, blob, num_samples=4)
    again = a.agent.upload(1, 0, blob, num_samples=4)
    assert again == first
    other = a.make_update(1)
    with pytest.raises(ServerError) as e:
        a.agent.upload(1, 0, other, num_samples=4)
    assert e.value.status == 409 and "already uploaded" in str(e.value.detail)
    b = agents[1]
    b.apply(b.poll()["sync"])
    with pytest.raises(ServerError) as e:
        b.agent.upload(2, 1, b.make_update(2), num_samples=4)
    assert e.value.status == 409 and "not the open round" in str(e.value.detail)
    with pytest.raises(ServerError) as e:
        b.agent.upload(1, 3, b.make_update(1), num_samples=4)
    assert e.value.status == 409 and "stale" in str(e.value.detail)
    # Nothing of the refused uploads was stored.
    assert api.rounds(created["id"])[0]["uploaded"] == [first["client_id"]]


def test_late_joiner_catches_up_and_takes_part(api: Api):
    created, agents = _three_clients(api, rounds=3)
    run_id = created["id"]
    api.admin("POST", f"/api/v1/runs/{run_id}/launch")
    for a in agents:
        a.play_round()
    _, token = api.enroll(run_id, "late")
    late = FakeAgent(api.agent(run_id, token), seed=9)
    assert late.play_round() is not None  # synced round 1's state, then trained round 2
    assert late.have_round == 1
    assert api.rounds(run_id)[1]["expected"][-1] == late.info["client_id"]
    for a in agents:
        a.play_round()
    assert api.rounds(run_id)[1]["status"] == "closed"


def test_missed_round_then_rejoin(api: Api):
    created, agents = _three_clients(api, rounds=3, quorum=2, client_timeout_s=0.5)
    run_id = created["id"]
    api.admin("POST", f"/api/v1/runs/{run_id}/launch")
    for a in agents:
        a.play_round()
    # Round 2: the third site is silent; once it counts as gone the round closes on quorum.
    agents[0].play_round()
    agents[1].play_round()
    assert api.rounds(run_id)[1]["status"] == "open"
    _age_last_seen(api, agents[2].info["client_id"], seconds=5)
    round_service.sweep(api.rt)
    r2 = api.rounds(run_id)[1]
    assert r2["status"] == "closed"
    assert "gone" in r2["metrics"]["close_reason"]
    assert len(r2["metrics"]["participants"]) == 2
    # It comes back: it catches up on round 2's delta and trains round 3.
    answer = agents[2].play_round()
    assert answer is not None and answer["round"] == 3
    assert agents[2].have_round == 2
    agents[0].play_round()
    agents[1].play_round()
    assert api.run(run_id)["status"] == "completed"
    _consistent(api, run_id)


def _consistent(api: Api, run_id: int) -> None:
    from tests.e2e_support import check_consistent

    check_consistent(api.settings.resolved_database_url, api.settings.data_dir, run_id)


def _age_last_seen(api: Api, client_id: int, seconds: float) -> None:
    from api.models import Client

    with api.rt.transaction() as tx:
        c = tx.session.get(Client, client_id)
        c.last_seen_at = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=seconds)


def _expire(api: Api, run_id: int) -> None:
    from sqlalchemy import update

    from api.models import Round

    with api.rt.transaction() as tx:
        tx.session.execute(
            update(Round)
            .where(Round.run_id == run_id, Round.status == "open")
            .values(deadline_at=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1))
        )


def test_deadline_below_quorum_fails_then_resume(api: Api):
    created, agents = _three_clients(api, rounds=1, quorum=2, below_quorum="fail")
    run_id = created["id"]
    api.admin("POST", f"/api/v1/runs/{run_id}/launch")
    first = agents[0].play_round()
    _expire(api, run_id)
    round_service.sweep(api.rt)
    run = api.run(run_id)
    assert run["status"] == "failed"
    assert "quorum is 2" in run["status_reason"]
    assert agents[1].poll()["action"] == "wait"
    r = api.admin("POST", f"/api/v1/runs/{run_id}/resume")
    assert r.status_code == 200 and r.json()["status"] == "running"
    rnd = api.rounds(run_id)[0]
    assert rnd["status"] == "open"
    assert rnd["uploaded"] == [first["client_id"]]  # no upload lost
    agents[1].play_round()
    agents[2].play_round()
    assert api.run(run_id)["status"] == "completed"
    _consistent(api, run_id)


def test_deadline_below_quorum_extends(api: Api):
    created, agents = _three_clients(api, rounds=1, quorum=2, below_quorum="extend")
    run_id = created["id"]
    api.admin("POST", f"/api/v1/runs/{run_id}/launch")
    agents[0].play_round()
    before = api.rounds(run_id)[0]["deadline_at"]
    _expire(api, run_id)
    round_service.sweep(api.rt)
    rnd = api.rounds(run_id)[0]
    assert rnd["status"] == "open"
    assert rnd["deadline_at"] > before or rnd["deadline_at"] != before
    agents[1].play_round()
    _expire(api, run_id)
    round_service.sweep(api.rt)  # quorum met at the deadline: closes without the third
    assert api.rounds(run_id)[0]["status"] == "closed"
    assert api.run(run_id)["status"] == "completed"
    _consistent(api, run_id)


def test_cancel_stops_agents(api: Api):
    created, agents = _three_clients(api, rounds=2)
    run_id = created["id"]
    api.admin("POST", f"/api/v1/runs/{run_id}/launch")
    assert api.admin("POST", f"/api/v1/runs/{run_id}/cancel").json()["status"] == "cancelled"
    answer = agents[0].poll()
    assert answer["action"] == "stop" and answer["run_status"] == "cancelled"
    assert api.admin("POST", f"/api/v1/runs/{run_id}/cancel").status_code == 409
    assert api.admin("POST", f"/api/v1/runs/{run_id}/resume").status_code == 409


def test_revoked_token_stops_at_once_and_round_stops_waiting(api: Api):
    created, agents = _three_clients(api, rounds=1)
    run_id = created["id"]
    api.admin("POST", f"/api/v1/runs/{run_id}/launch")
    agents[0].play_round()
    agents[1].play_round()
    cid = agents[2].info["client_id"]
    r = api.admin("POST", f"/api/v1/runs/{run_id}/clients/{cid}/revoke")
    assert r.status_code == 200 and r.json()["status"] == "revoked"
    with pytest.raises(ServerError) as e:
        agents[2].poll()
    assert e.value.status == 410
    assert api.run(run_id)["status"] == "completed"  # closed without the revoked client


def test_a_new_token_replaces_the_old_one_at_once(api: Api):
    created, agents = _three_clients(api, rounds=2)
    run_id = created["id"]
    api.admin("POST", f"/api/v1/runs/{run_id}/launch")
    for a in agents:
        a.play_round()
    leaked = agents[0].agent
    cid = agents[0].info["client_id"]
    before = {c["id"]: c for c in api.admin("GET", f"/api/v1/runs/{run_id}/clients").json()["data"]}

    r = api.admin("POST", f"/api/v1/runs/{run_id}/clients/{cid}/token")
    assert r.status_code == 200, r.text
    new_token = r.json()["token"]
    assert r.json()["id"] == cid and r.json()["status"] == "active"
    with pytest.raises(ServerError) as e:
        leaked.poll(1)
    assert e.value.status == 401
    # The same client, counters and all: it plays round 2 with the new token.
    agents[0].agent = api.agent(run_id, new_token)
    assert agents[0].agent.whoami()["client_id"] == cid
    after = api.admin("GET", f"/api/v1/runs/{run_id}/clients").json()["data"]
    for key in ("rounds_done", "bytes_up", "bytes_down", "name", "created_at"):
        assert next(c for c in after if c["id"] == cid)[key] == before[cid][key]
    for a in agents:
        assert a.play_round() is not None
    assert api.run(run_id)["status"] == "completed"
    assert [len(r["metrics"]["participants"]) for r in api.rounds(run_id)] == [3, 3]

    # A revoked client stays revoked: a new token is refused, not a way back in.
    api.admin("POST", f"/api/v1/runs/{run_id}/clients/{cid}/revoke")
    r = api.admin("POST", f"/api/v1/runs/{run_id}/clients/{cid}/token")
    assert r.status_code == 409 and "revoked" in r.json()["detail"]
    with pytest.raises(ServerError) as e:
        api.agent(run_id, new_token).poll(2)
    assert e.value.status == 410


def test_admin_actions_leave_an_audit_trail(api: Api):
    run_id = api.create_run()["id"]
    cid, token = api.enroll(run_id, "site-a")
    assert api.admin("POST", f"/api/v1/runs/{run_id}/launch").status_code == 200
    new_token = api.admin("POST", f"/api/v1/runs/{run_id}/clients/{cid}/token").json()["token"]
    assert api.admin("POST", f"/api/v1/runs/{run_id}/clients/{cid}/revoke").status_code == 200
    assert api.admin("POST", f"/api/v1/runs/{run_id}/cancel").status_code == 200
    # Refused actions leave nothing: the trail is written in the action's own transaction.
    for path in ("cancel", "launch", f"clients/{cid}/token", "resume"):
        assert api.admin("POST", f"/api/v1/runs/{run_id}/{path}").status_code == 409, path
    other = api.create_run(launch=True, name="other")["id"]

    trail = api.admin("GET", "/api/v1/audit").json()
    assert [(e["action"], e["run_id"], e["client_id"]) for e in trail["data"]] == [
        ("launch_run", other, None),
        ("create_run", other, None),
        ("cancel_run", run_id, None),
        ("revoke_client", run_id, cid),
        ("new_client_token", run_id, cid),
        ("launch_run", run_id, None),
        ("enroll_client", run_id, cid),
        ("create_run", run_id, None),
    ]
    assert trail["count"] == 8
    assert {(e["actor"], e["address"]) for e in trail["data"]} == {("admin-token", "testclient")}
    assert trail["data"][3]["detail"] == {"name": "site-a"}
    assert trail["data"][1]["detail"]["name"] == "other"
    times = [e["at"] for e in trail["data"]]
    assert times == sorted(times, reverse=True)
    text = json.dumps(trail)
    assert token not in text and new_token not in text and ADMIN not in text

    page = api.admin("GET", f"/api/v1/audit?run_id={run_id}&offset=1&limit=2").json()
    assert page["count"] == 6
    assert [e["action"] for e in page["data"]] == ["revoke_client", "new_client_token"]
    assert api.client.get("/api/v1/audit").status_code == 401


def test_heartbeat_marks_training(api: Api):
    created, agents = _three_clients(api, rounds=1)
    run_id = created["id"]
    api.admin("POST", f"/api/v1/runs/{run_id}/launch")
    agents[0].agent.heartbeat(1, 3, steps=10, loss=1.5, samples_per_second=12.0)
    rows = api.admin("GET", f"/api/v1/runs/{run_id}/clients").json()["data"]
    mine = next(c for c in rows if c["id"] == agents[0].info["client_id"])
    assert mine["liveness"] == "training"
    assert mine["progress"]["step"] == 3 and mine["progress"]["loss"] == 1.5
    other = next(c for c in rows if c["id"] == agents[1].info["client_id"])
    assert other["liveness"] == "idle"


def test_list_runs_paginates(api: Api):
    ids = [api.create_run(name=f"r{i}")["id"] for i in range(3)]
    page = api.admin("GET", "/api/v1/runs?offset=0&limit=2").json()
    assert page["count"] == 3
    assert [r["id"] for r in page["data"]] == sorted(ids, reverse=True)[:2]
    rest = api.admin("GET", "/api/v1/runs?offset=2&limit=2").json()
    assert [r["id"] for r in rest["data"]] == [min(ids)]


def test_simulated_run_completes_with_evaluation(api: Api):
    body = {
        "rounds": 2,
        "simulation": {"clients": 2, "domains": ["arithmetic", "code"], "examples_per_client": 8},
        "evaluation": {"domains": ["arithmetic"], "examples": 4},
    }
    created = api.create_run(launch=True, **body)
    run = api.run(created["id"])
    assert run["status"] == "completed"
    rounds = api.rounds(created["id"])
    assert [r["status"] for r in rounds] == ["closed", "closed"]
    for r in rounds:
        assert r["metrics"]["train_loss"] > 0
        assert r["metrics"]["eval"]["arithmetic"]["loss"] > 0
    assert rounds[0]["digest"] != rounds[1]["digest"]
    # Simulated clients report their local progress as agents do; the last is the last step.
    clients = api.admin("GET", f"/api/v1/runs/{created['id']}/clients").json()["data"]
    steps = run["config"]["train"]["steps"]
    for c in clients:
        assert c["progress"]["round"] == 2
        assert c["progress"]["step"] == c["progress"]["steps"] == steps
        assert c["progress"]["loss"] > 0


def test_participant_reports_progress_while_training(api: Api, tiny_model: Path):
    from agent.participant import Participant
    from fedsrd_core.data import generate

    created, agents = _three_clients(
        api, rounds=1, train={"steps": 3, "batch_size": 2, "seq_len": 384}
    )
    api.admin("POST", f"/api/v1/runs/{created['id']}/launch")
    client = agents[0].agent
    seen: list[tuple] = []
    send = client.report_progress

    def spy(number: int, step: int, **extra):
        taken = send(number, step, **extra)
        mine = api.admin("GET", f"/api/v1/runs/{created['id']}/clients").json()["data"][0]
        seen.append((number, step, extra["steps"], taken, mine["progress"]["step"]))
        return taken

    client.report_progress = spy  # type: ignore[method-assign]
    model, tok = load_causal_lm(str(tiny_model))
    p = Participant(
        client, model, tok, generate("code", 4, seed=0), agents[0].info, progress_interval=0.0
    )
    assert p.step(0.0) == "trained"
    # Every step but the last as it happens (the server has it at once); the last step
    # comes with the heartbeat after training.
    assert seen == [(1, 1, 3, True, 1), (1, 2, 3, True, 2)]
    mine = api.admin("GET", f"/api/v1/runs/{created['id']}/clients").json()["data"][0]
    assert mine["progress"]["step"] == 3 and mine["rounds_done"] == 0


def test_health_ready_metrics(api: Api):
    assert api.client.get("/healthz").json() == {"status": "ok"}
    ready = api.client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"]["database"] == "ok"
    api.create_run()
    text = api.client.get("/metrics").text
    assert 'fedsrd_runs{status="created"} 1.0' in text
    assert "fedsrd_http_request_seconds_bucket" in text


def test_readyz_reports_unreachable_broker(tmp_path, model_cache):
    # A real Celery dispatcher pointed at a port where nothing listens.
    with make_api(
        tmp_path / "d",
        f"sqlite:///{tmp_path / 'x.db'}",
        model_cache,
        task_mode="celery",
        broker_url="redis://127.0.0.1:1/0",
    ) as a:
        r = a.client.get("/readyz")
        assert r.status_code == 503
        assert r.json()["checks"]["broker"].startswith("unreachable")


def test_openapi_lists_every_endpoint(api: Api):
    paths = api.client.get("/openapi.json").json()["paths"]
    for p in (
        "/api/v1/runs",
        "/api/v1/runs/{run_id}",
        "/api/v1/runs/{run_id}/clients",
        "/api/v1/runs/{run_id}/rounds",
        "/api/v1/runs/{run_id}/adapter",
        "/api/v1/agent/runs/{run_id}/poll",
        "/api/v1/agent/runs/{run_id}/rounds/{number}/update",
        "/api/v1/agent/runs/{run_id}/blobs/{sha256}",
        "/healthz",
        "/readyz",
        "/metrics",
    ):
        assert p in paths, p


def test_clients_per_round_takes_a_seeded_subset(api: Api):
    created, agents = _three_clients(api, rounds=2, clients_per_round=2)
    run_id = created["id"]
    api.admin("POST", f"/api/v1/runs/{run_id}/launch")
    expected = api.rounds(run_id)[0]["expected"]
    assert len(expected) == 2
    for a in agents:
        answer = a.play_round()
        assert (answer is not None) == (a.info["client_id"] in expected)
    r1 = api.rounds(run_id)[0]
    assert r1["status"] == "closed"
    assert sorted(r1["metrics"]["participants"]) == sorted(expected)
    # A client left out of round 1 catches up when it is picked later.
    for a in agents:
        a.play_round()
    assert api.run(run_id)["status"] == "completed"
    for a in agents:
        a.catch_up()
        assert a.have_round == 2


def test_failed_aggregation_fails_the_run_and_resume_retries(api: Api):
    created, agents = _three_clients(api, rounds=1)
    run_id = created["id"]
    api.admin("POST", f"/api/v1/runs/{run_id}/launch")
    first = agents[0].play_round()
    kept = api.rt.blobs.read_bytes(first["sha256"])
    api.rt.blobs.delete(first["sha256"])  # the store lost an accepted update
    agents[1].play_round()
    agents[2].play_round()
    run = api.run(run_id)
    assert run["status"] == "failed"
    assert "aggregation failed" in run["status_reason"]
    assert "BlobNotFound" in run["status_reason"]
    assert api.rounds(run_id)[0]["status"] == "aggregating"
    api.rt.blobs.put_bytes(kept)  # restored from a backup
    assert api.admin("POST", f"/api/v1/runs/{run_id}/resume").status_code == 200
    assert api.run(run_id)["status"] == "completed"
    assert api.rounds(run_id)[0]["attempts"] == 2


def test_lost_database_connections_are_503_then_recover(tmp_path, model_cache, pg_database):
    from tests.conftest import _admin_sql

    with make_api(tmp_path / "data", pg_database, model_cache) as a:
        a.create_run()
        name = pg_database.rsplit("/", 1)[1]
        # What a database restart does to the API's pooled connections.
        _admin_sql(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            f"WHERE datname = '{name}' AND pid <> pg_backend_pid()"
        )
        r = a.admin("GET", "/api/v1/runs")
        assert r.status_code == 503, r.text
        assert r.json()["error"] == "unavailable"
        assert r.headers["Retry-After"] == "2"
        assert a.admin("GET", "/api/v1/runs").json()["count"] == 1


def test_participant_drops_a_state_whose_digest_differs(api: Api, tiny_model: Path):
    """A delta that does not lead to the published digest: the agent discards its copy and
    the next poll brings a snapshot."""
    from agent.participant import DigestMismatchError, Participant
    from fedsrd_core.data import generate

    created, agents = _three_clients(api, rounds=3)
    run_id = created["id"]
    api.admin("POST", f"/api/v1/runs/{run_id}/launch")
    for a in agents:
        a.play_round()  # round 1 closes; round 2 opens
    client = agents[0].agent
    model, tok = load_causal_lm(str(tiny_model))
    p = Participant(client, model, tok, generate("code", 4, seed=0), agents[0].info)
    layout = {k: (int(v[0]), int(v[1])) for k, v in agents[0].info["layout"].items()}

    def at_round_0() -> None:
        p.state = decode_snapshot(client.download(_initial_sha(api, run_id)), layout, 4)
        p.have_round = 0

    plan = client.sync(0)
    assert [d["round"] for d in plan["deltas"]] == [1]
    at_round_0()
    p.sync(plan)  # the genuine delta reaches the published digest
    assert p.have_round == 1
    at_round_0()
    tampered = {**plan, "deltas": [{**plan["deltas"][0], "digest": "0" * 64}]}
    with pytest.raises(DigestMismatchError):
        p.sync(tampered)
    assert p.state is None
    assert p.have_round == -1
    # What the agent does next: poll holding nothing, and get a snapshot.
    answer = client.poll(None)
    assert answer["action"] == "train"
    assert answer["sync"]["snapshot"]["round"] == 1


def _initial_sha(api: Api, run_id: int) -> str:
    from api.models import Run

    with api.rt.sessions() as s:
        run = s.get(Run, run_id)
        assert run is not None and run.initial_blob is not None
        return run.initial_blob


def test_resume_after_the_failed_round_closed_anyway_goes_on(api: Api):
    import workers.jobs as jobs

    created, agents = _three_clients(api, rounds=2)
    run_id = created["id"]
    api.admin("POST", f"/api/v1/runs/{run_id}/launch")
    first = agents[0].play_round()
    kept = api.rt.blobs.read_bytes(first["sha256"])
    api.rt.blobs.delete(first["sha256"])
    agents[1].play_round()
    agents[2].play_round()  # aggregation fails: the run fails, round 1 stays aggregating
    assert api.run(run_id)["status"] == "failed"
    # A redelivered copy of the task succeeds later: round 1 closes, the run stays failed.
    api.rt.blobs.put_bytes(kept)
    jobs.aggregate_round(api.rt, _round_id(api, run_id, 1))
    assert api.rounds(run_id)[0]["status"] == "closed"
    assert api.run(run_id)["current_round"] == 1
    # Resuming goes on with round 2 instead of stalling on a closed round.
    assert api.admin("POST", f"/api/v1/runs/{run_id}/resume").status_code == 200
    assert api.run(run_id)["current_round"] == 2
    for a in agents:
        a.play_round()
    assert api.run(run_id)["status"] == "completed"


def _round_id(api: Api, run_id: int, number: int) -> int:
    from sqlalchemy import select

    from api.models import Round

    with api.rt.sessions() as s:
        rid = s.scalar(select(Round.id).where(Round.run_id == run_id, Round.number == number))
        assert rid is not None
        return rid


def test_liveness_waiting_until_first_contact_and_finished_after_the_run(api: Api):
    """An enrolled client that never contacted the server is waiting, not gone; once the
    run completes its clients are finished (a revoked one stays revoked)."""
    created = api.create_run(rounds=1, quorum=1)
    run_id = created["id"]
    api.enroll(run_id, "never-seen")
    _, token = api.enroll(run_id, "active")
    revoked, _ = api.enroll(run_id, "revoked")
    api.admin("POST", f"/api/v1/runs/{run_id}/clients/{revoked}/revoke")
    agent = FakeAgent(api.agent(run_id, token), seed=0)

    def liveness() -> dict[str, str]:
        rows = api.admin("GET", f"/api/v1/runs/{run_id}/clients").json()["data"]
        return {c["name"]: c["liveness"] for c in rows}

    assert liveness() == {"never-seen": "waiting", "active": "idle", "revoked": "revoked"}
    api.admin("POST", f"/api/v1/runs/{run_id}/launch")
    assert liveness()["never-seen"] == "waiting"
    agent.play_round()
    # quorum 1 and the round's deadline not reached: it waits for the silent client.
    api.admin("POST", f"/api/v1/runs/{run_id}/cancel")
    assert liveness() == {"never-seen": "finished", "active": "finished", "revoked": "revoked"}


@pytest.mark.parametrize("grace", [None, 3600.0, 0.2])
def test_round_one_waits_for_every_site_through_the_start_grace(api: Api, grace: float | None):
    """Round 1 with its quorum (1) and a site silent past client_timeout_s (loading its
    model): not closed while the start grace (default: the round's deadline) lasts."""
    extra = {} if grace is None else {"start_grace_s": grace}
    created, agents = _three_clients(api, rounds=2, quorum=1, client_timeout_s=0.5, **extra)
    run_id = created["id"]
    api.admin("POST", f"/api/v1/runs/{run_id}/launch")
    agents[0].play_round()
    agents[1].play_round()
    _age_last_seen(api, agents[2].info["client_id"], seconds=5)
    time.sleep(0.3)
    round_service.sweep(api.rt)
    r1 = api.rounds(run_id)[0]
    if grace == 0.2:  # the grace is over: the silent site is gone, quorum closes the round
        assert r1["status"] == "closed" and "gone" in r1["metrics"]["close_reason"]
        return
    assert r1["status"] == "open"
    agents[2].play_round()
    r1 = api.rounds(run_id)[0]
    assert r1["status"] == "closed" and r1["metrics"]["close_reason"].startswith("all expected")
    # Round 2 has no grace: the same silence closes it on quorum.
    agents[0].play_round()
    agents[1].play_round()
    _age_last_seen(api, agents[2].info["client_id"], seconds=5)
    round_service.sweep(api.rt)
    assert "gone" in api.rounds(run_id)[1]["metrics"]["close_reason"]


def test_a_failing_simulated_client_fails_its_round_and_run_visibly(
    api: Api, monkeypatch: pytest.MonkeyPatch
):
    """A training task that cannot succeed (here: local_round raises, as a model the strategy
    cannot handle did) fails the round and the run with a short reason instead of leaving
    the run running for ever; once the cause is gone, resume completes it."""
    import workers.jobs as jobs

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("model factors differ from the state's")

    real = jobs.local_round
    monkeypatch.setattr(jobs, "local_round", broken)
    body = {"rounds": 1, "simulation": {"clients": 2, "domains": ["arithmetic", "code"],
                                       "examples_per_client": 4}}  # fmt: skip
    run_id = api.create_run(**body, launch=True)["id"]
    run = api.run(run_id)
    assert run["status"] == "failed"
    assert run["status_reason"].startswith("round 1: simulated client ")
    assert "RuntimeError: model factors differ" in run["status_reason"]
    (r1,) = api.rounds(run_id)
    assert r1["status"] == "failed" and "RuntimeError" in r1["error"]
    sign_in = api.client.post("/login", data={"token": ADMIN}, follow_redirects=False)
    assert sign_in.status_code in (302, 303)
    page = api.client.get(f"/runs/{run_id}", headers={"Accept": "text/html"}).text
    assert '<p class="alert">round 1: simulated client' in page
    monkeypatch.setattr(jobs, "local_round", real)
    assert api.admin("POST", f"/api/v1/runs/{run_id}/resume").status_code == 200
    assert api.run(run_id)["status"] == "completed"
