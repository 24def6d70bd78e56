"""End to end with real processes: uvicorn, Celery workers, PostgreSQL and Redis (and the
embedded default: SQLite and the filesystem broker). Slow; run in CI."""

from __future__ import annotations

import io
import threading
import time
import zipfile
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load as safetensors_load

from agent.participant import Participant
from fedsrd_core.data import generate
from fedsrd_core.modeling import load_causal_lm
from fedsrd_core.peft_lora import attach_lora, lora_config, state_to_peft
from tests.api_support import FakeAgent
from tests.e2e_support import System, server_state, system

pytestmark = pytest.mark.slow


@pytest.fixture
def redis_broker(redis_server):
    import redis

    url = f"{redis_server}/11"
    redis.Redis.from_url(url).flushdb()
    return url


@pytest.fixture(params=["postgres+redis", "embedded"])
def stack(request, tmp_path, model_cache):
    if request.param == "embedded":
        db, broker = "", "filesystem://"
    else:
        db = request.getfixturevalue("pg_database")
        broker = request.getfixturevalue("redis_broker")
    with system(tmp_path, db, broker, model_cache) as s:
        s.start_worker()
        yield s


@pytest.fixture
def pg_stack(tmp_path, model_cache, pg_database, redis_broker):
    with system(tmp_path, pg_database, redis_broker, model_cache) as s:
        yield s


DOMAINS = ("arithmetic", "code", "facts")


def test_three_http_clients_train_three_rounds(stack: System, tiny_model: Path, tmp_path: Path):
    created = stack.create_run(
        rounds=3, lora={"rank": 4}, train={"steps": 2, "batch_size": 2, "seq_len": 384}
    )
    run_id = created["id"]
    participants = []
    for i, domain in enumerate(DOMAINS):
        model, tok = load_causal_lm(str(tiny_model))
        participants.append(
            Participant(
                stack.agent(run_id, stack.enroll(run_id, f"site-{i}")),
                model,
                tok,
                generate(domain, 16, seed=i, split="train"),
            )
        )
    assert stack.admin("POST", f"/api/v1/runs/{run_id}/launch").status_code == 200
    results: dict[int, str] = {}
    errors: list[BaseException] = []

    def play(i: int) -> None:
        try:
            results[i] = participants[i].run(wait=5.0)
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=play, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, f"{errors}\n{stack.logs()}"
    assert results == {0: "done", 1: "done", 2: "done"}
    stack.wait_run(run_id)
    rounds = stack.rounds(run_id)
    assert [r["status"] for r in rounds] == ["closed"] * 3
    for p in participants:
        assert p.rounds_trained == [1, 2, 3]
        p.catch_up()
        # Every client's state digest equals the server's after each round.
        assert [p.digests[n] for n in (1, 2, 3)] == [r["digest"] for r in rounds]
    # The exported adapter loads in peft and gives the server state's logits.
    z = stack.admin("GET", f"/api/v1/runs/{run_id}/adapter")
    assert z.status_code == 200
    out = tmp_path / "adapter"
    zipfile.ZipFile(io.BytesIO(z.content)).extractall(out)
    loaded = PeftModel.from_pretrained(load_causal_lm(str(tiny_model))[0], out)
    # The server's global state after the last round, from its own snapshot blob.
    state = server_state(stack.env["FEDSRD_DATABASE_URL"], stack.data_dir, run_id)
    ref = attach_lora(load_causal_lm(str(tiny_model))[0], lora_config(rank=4))
    state_to_peft(state, ref)
    ids = torch.tensor([[3, 50, 60, 70, 80, 90, 100]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, ref(input_ids=ids).logits)
    stack.check_consistent(run_id)


def _fake_agents(s: System, run_id: int, n: int = 3) -> list[FakeAgent]:
    return [FakeAgent(s.agent(run_id, s.enroll(run_id, f"site-{i}")), seed=i) for i in range(n)]


def test_worker_killed_during_aggregation(pg_stack: System):
    s = pg_stack
    slow = s.start_worker(FEDSRD_FAULT_AGGREGATE_DELAY_S="30")
    run_id = s.create_run(rounds=2)["id"]
    agents = _fake_agents(s, run_id)
    s.admin("POST", f"/api/v1/runs/{run_id}/launch")
    for a in agents:
        assert a.play_round(wait=30) is not None
    # The task has started (attempt counted) and sleeps: kill the worker mid-task.
    deadline = time.monotonic() + 60
    while s.rounds(run_id)[0]["attempts"] < 1:
        assert time.monotonic() < deadline, s.logs()
        time.sleep(0.05)
    slow.kill()
    assert s.rounds(run_id)[0]["status"] == "aggregating"
    s.start_worker()  # reconciles on start: the round is aggregated again
    r1 = s.wait_round(run_id, 1, "closed")
    assert r1["attempts"] == 2
    assert sorted(r1["metrics"]["participants"]) == sorted(a.info["client_id"] for a in agents)
    for a in agents:
        assert a.play_round(wait=30) is not None
    s.wait_run(run_id)
    for a in agents:
        a.catch_up()
        assert a.have_round == 2
    s.check_consistent(run_id)


def test_api_restarted_mid_round(pg_stack: System):
    s = pg_stack
    s.start_worker()
    run_id = s.create_run(rounds=2)["id"]
    agents = _fake_agents(s, run_id)
    s.admin("POST", f"/api/v1/runs/{run_id}/launch")
    agents[0].play_round(wait=30)
    agents[1].play_round(wait=30)
    s.api.kill()
    # The third agent's poll and upload fail, retry with backoff, and succeed once the API
    # is back (started 2 s later, in another thread).
    restarter = threading.Thread(target=s.restart_api, kwargs={"pause": 2.0})
    restarter.start()
    assert agents[2].play_round(wait=30) is not None
    restarter.join()
    for a in agents:
        a.play_round(wait=30)
    s.wait_run(run_id)
    rounds = s.rounds(run_id)
    assert all(len(r["metrics"]["participants"]) == 3 for r in rounds)  # no upload lost
    s.check_consistent(run_id)


def test_deadline_with_too_few_clients(pg_stack: System):
    s = pg_stack
    s.start_worker()
    run_id = s.create_run(rounds=1, quorum=2, round_deadline_s=2, below_quorum="fail")["id"]
    agents = _fake_agents(s, run_id)
    s.admin("POST", f"/api/v1/runs/{run_id}/launch")
    first = agents[0].play_round(wait=30)
    run = s.wait_run(run_id, "failed", timeout=30)  # the API's sweeper fails it
    assert "quorum is 2" in run["status_reason"]
    s.admin("POST", f"/api/v1/runs/{run_id}/resume")
    assert s.rounds(run_id)[0]["uploaded"] == [first["client_id"]]
    agents[1].play_round(wait=30)
    s.wait_run(run_id, timeout=60)  # quorum met at the next deadline (or all uploaded)
    s.check_consistent(run_id)


def test_the_worker_collects_old_snapshots(pg_stack: System):
    """Retention and collection in the real worker process: with one snapshot kept and no
    grace period, the worker's collection after each round leaves exactly the blobs rows
    name; clients and exports still reach every round."""
    from api.blobstore import LocalBlobStore
    from api.db import make_engine, make_session_factory
    from api.services.storage import named_blobs

    s = pg_stack
    s.start_worker(FEDSRD_KEEP_SNAPSHOTS="1", FEDSRD_BLOB_GRACE_S="0")
    run_id = s.create_run(rounds=3)["id"]
    agents = _fake_agents(s, run_id)
    s.admin("POST", f"/api/v1/runs/{run_id}/launch")
    for _ in range(3):
        for a in agents:
            assert a.play_round(wait=30) is not None
    s.wait_run(run_id)
    assert [r["snapshot_kept"] for r in s.rounds(run_id)] == [False, False, True]
    store = LocalBlobStore(s.data_dir / "blobs")
    engine = make_engine(s.env["FEDSRD_DATABASE_URL"])
    try:
        with make_session_factory(engine)() as session:
            named = named_blobs(session)
    finally:
        engine.dispose()
    deadline = time.monotonic() + 60  # the collection runs after the last round's commit
    while {b.sha256 for b in store.list_blobs()} != named:
        assert time.monotonic() < deadline, s.logs()
        time.sleep(0.2)
    late = FakeAgent(agents[0].agent, seed=9)
    late.catch_up()
    assert late.have_round == 3
    assert s.admin("GET", f"/api/v1/runs/{run_id}/adapter?round=1").status_code == 200
    s.check_consistent(run_id)


def test_simulated_run_on_workers(stack: System):
    body = {
        "rounds": 2,
        "simulation": {"clients": 2, "domains": ["arithmetic", "code"], "examples_per_client": 8},
        "evaluation": {"domains": ["arithmetic"], "examples": 4},
    }
    run_id = stack.create_run(launch=True, **body)["id"]
    stack.wait_run(run_id, timeout=300)
    rounds = stack.rounds(run_id)
    assert all(len(r["metrics"]["participants"]) == 2 for r in rounds)
    stack.check_consistent(run_id)
    # The exported adapter holds exactly the server's factors after the last round.
    z = stack.admin("GET", f"/api/v1/runs/{run_id}/adapter")
    assert z.status_code == 200
    weights = safetensors_load(
        zipfile.ZipFile(io.BytesIO(z.content)).read("adapter_model.safetensors")
    )
    state = server_state(stack.env["FEDSRD_DATABASE_URL"], stack.data_dir, run_id)
    assert len(weights) == 2 * len(state)
    for name, f in state.items():
        assert torch.equal(weights[f"base_model.model.{name}.lora_A.weight"], f.A)
        assert torch.equal(weights[f"base_model.model.{name}.lora_B.weight"], f.B)
