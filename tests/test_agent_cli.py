"""``fedsrd-agent`` as a real process against real servers: bad setups end in one clear line
and a non-zero exit; four agents finish a run through an agent kill and an API outage."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from api.launcher import free_port
from fedsrd_core.data import generate, save_jsonl
from fedsrd_core.modeling import TinyModelSpec, build_tiny_model
from tests.e2e_support import System, system

pytestmark = pytest.mark.slow

DOMAINS = ("arithmetic", "code", "facts", "rewrite")


def agent_argv(s: System, token: str, data: Path, state: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "agent.cli", "--server", s.url, "--token", token,
        "--data", str(data), "--state-dir", str(state), "--device", "cpu",
        "--model-cache", s.env["FEDSRD_MODEL_CACHE"], "--poll-wait", "5", *extra,
    ]  # fmt: skip


def run_agent(argv: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)


def one_line_error(p: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert p.returncode != 0, p.stderr
    # A model that takes more than a few seconds to load is announced first (a busy machine);
    # after that, one clear line and nothing else.
    lines = [ln for ln in p.stderr.splitlines() if ln.strip() and " loading model " not in ln]
    assert len(lines) == 1, p.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def embedded(tmp_path, model_cache):
    with system(tmp_path, "", "filesystem://", model_cache) as s:
        yield s


def test_bad_setups_end_in_one_line(embedded: System, tmp_path: Path):
    s = embedded
    run_id = s.create_run(rounds=1)["id"]
    token = s.enroll(run_id, "site")
    data = tmp_path / "data.jsonl"
    save_jsonl(generate("arithmetic", 8, seed=0), data)
    state = tmp_path / "state"

    p = run_agent(agent_argv(s, "fsc_not-a-token", data, state))
    one_line_error(p, "refused the token", "invalid client token")

    dead = f"http://127.0.0.1:{free_port()}"
    argv = agent_argv(s, token, data, state, "--startup-timeout", "1")
    argv[argv.index(s.url)] = dead
    one_line_error(run_agent(argv), "cannot reach a FedSRD server", dead)

    other = build_tiny_model(tmp_path / "other-model", TinyModelSpec(seed=123))
    p = run_agent(agent_argv(s, token, data, state, "--model", str(other)))
    one_line_error(p, "model mismatch", "fingerprint")

    # A hub id that is not cached: the line says how to get it, with options the agent has.
    p = run_agent(agent_argv(s, token, data, state, "--model", "fedsrd-test/not-cached"))
    line = one_line_error(p, "cannot load the base model", "fedsrd-test/not-cached")
    assert "fedsrd-agent --allow-download" in line and "hf download" in line

    one_line_error(
        run_agent(agent_argv(s, token, tmp_path / "missing.jsonl", state)),
        "cannot use data file",
        "missing.jsonl",
    )
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": \n')
    one_line_error(run_agent(agent_argv(s, token, bad, state)), "bad.jsonl:2", "invalid JSON")

    p = run_agent([sys.executable, "-m", "agent.cli", "--token", token, "--data", str(data)])
    one_line_error(p, "--server is required")

    help_text = run_agent([sys.executable, "-m", "agent.cli", "--help"]).stdout
    for option in ("--server", "--token", "--data", "--model", "--state-dir", "--device",
                   "--config", "--log-json", "--poll-wait", "--startup-timeout",
                   "--allow-download", "--token-file"):  # fmt: skip
        assert option in help_text


def test_config_file_and_environment(embedded: System, tmp_path: Path):
    """Options from a TOML file, the token from the environment; the run completes."""
    s = embedded
    s.start_worker()
    run_id = s.create_run(rounds=1, train={"steps": 2, "batch_size": 2})["id"]
    token = s.enroll(run_id, "site")
    data = tmp_path / "data.jsonl"
    save_jsonl(generate("code", 8, seed=1), data)
    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        f'server = "{s.url}"\ndata = "{data}"\nstate-dir = "{tmp_path / "st"}"\n'
        f'model-cache = "{s.env["FEDSRD_MODEL_CACHE"]}"\ndevice = "cpu"\n'
    )
    env = {**os.environ, "FEDSRD_AGENT_TOKEN": token, "OMP_NUM_THREADS": "1"}
    log = tmp_path / "agent.log"
    with log.open("w") as err:
        p = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "--config", str(cfg), "--log-json"],
            stderr=err, text=True, env=env,
        )  # fmt: skip
        # Started before the launch: it says it is waiting (once, not once per poll).
        _wait_for(log, '"waiting for the run to be launched"', timeout=120)
        time.sleep(1.0)
        s.admin("POST", f"/api/v1/runs/{run_id}/launch")
        assert p.wait(timeout=180) == 0, log.read_text()
    docs = [json.loads(ln) for ln in log.read_text().splitlines() if ln.startswith("{")]
    events = [d["event"] for d in docs]
    assert events.count("waiting for the run to be launched") == 1, events
    assert docs[events.index("waiting for the run to be launched")]["run_status"] == "created"
    assert events[0] in ("connected", "loading model") and events[-1] == "run completed"
    assert "step" in events and "uploaded" in events
    # What it is about to download is said first: here, the initial snapshot.
    sync = docs[events.index("downloading")]
    assert sync["snapshot_round"] == 0 and sync["deltas"] == 0 and sync["bytes"] > 0, sync
    assert events.index("downloading") < events.index("training")


def _wait_for(log: Path, needle: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and needle in log.read_text():
            return
        time.sleep(0.1)
    raise TimeoutError(f"{needle!r} not in {log}:\n{log.read_text() if log.exists() else ''}")


def test_four_agents_survive_a_kill_and_an_api_outage(
    tmp_path, model_cache, pg_database, redis_server
):
    import redis

    broker = f"{redis_server}/12"
    redis.Redis.from_url(broker).flushdb()
    with system(tmp_path, pg_database, broker, model_cache) as s:
        s.start_worker()
        run_id = s.create_run(rounds=3, train={"steps": 12, "batch_size": 2}, round_deadline_s=600)[
            "id"
        ]
        procs: dict[int, subprocess.Popen[str]] = {}
        argvs: dict[int, list[str]] = {}
        logs: dict[int, Path] = {}
        for i, domain in enumerate(DOMAINS):
            data = tmp_path / f"{domain}.jsonl"
            save_jsonl(generate(domain, 16, seed=i), data)
            argvs[i] = agent_argv(
                s, s.enroll(run_id, f"site-{i}"), data, tmp_path / f"state-{i}", "--log-json"
            )
            logs[i] = tmp_path / f"agent-{i}.log"
        s.admin("POST", f"/api/v1/runs/{run_id}/launch")

        def start(i: int) -> None:
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            fh = open(logs[i], "a")  # noqa: SIM115 - the process owns it
            procs[i] = subprocess.Popen(argvs[i], stderr=fh, stdout=fh, text=True, env=env)

        for i in range(4):
            start(i)
        # SIGKILL agent 0 in the middle of round 2's local training, then restart it.
        _wait_for(logs[0], '"event": "training", "round": 2')
        _wait_for(logs[0], '"event": "step", "round": 2, "step": 2')
        procs[0].send_signal(signal.SIGKILL)
        procs[0].wait()
        start(0)
        # Stop the API for 20 s while round 3 is under way: the agents wait and go on.
        s.wait_round(run_id, 2, "closed", timeout=300)
        s.api.kill()
        time.sleep(20)
        s.restart_api()
        for i in range(4):
            assert procs[i].wait(timeout=600) == 0, logs[i].read_text()[-3000:]
        run = s.wait_run(run_id, timeout=60)
        rounds = s.rounds(run_id)
        assert run["status"] == "completed"
        assert all(len(r["metrics"]["participants"]) == 4 for r in rounds)
        for i in range(4):
            st = json.loads((tmp_path / f"state-{i}" / "state.json").read_text())
            assert st["have_round"] == 3
            assert st["digest"] == rounds[-1]["digest"]
            assert st["pending"] is None
        # Agent 0 ran twice: it trained round 2 again after the kill (no upload had been
        # made), and uploaded it once.
        log0 = logs[0].read_text()
        assert log0.count('"event": "connected"') == 2
        assert log0.count('"event": "training", "round": 2') == 2
        assert log0.count('"event": "uploaded", "round": 2') == 1
        s.check_consistent(run_id)


def test_restart_resends_an_unacknowledged_upload_instead_of_training(
    embedded: System, tmp_path: Path
):
    """A kill after the upload was saved, sent and taken, but before the agent saw the
    answer: the restarted agent re-sends it (idempotent) and never trains that round again."""
    from agent.state import AgentState, Pending, StateDir
    from fedsrd_core.state import state_digest
    from tests.api_support import FakeAgent, sha

    s = embedded
    s.start_worker()
    run_id = s.create_run(rounds=1)["id"]
    token = s.enroll(run_id, "site")
    s.admin("POST", f"/api/v1/runs/{run_id}/launch")
    fake = FakeAgent(s.agent(run_id, token))
    fake.apply(fake.poll()["sync"])
    blob = fake.make_update(1)
    accepted = fake.agent.upload(1, 0, blob, num_samples=8)  # taken by the server
    state = tmp_path / "state"
    store = StateDir(state)
    st = AgentState(run_id, fake.info["client_id"], have_round=0)
    st.digest = state_digest(fake.state)
    st.pending = Pending(1, 0, 8, None, sha(blob))
    store.save_pending(blob)
    store.save(st, fake.state)
    data = tmp_path / "data.jsonl"
    save_jsonl(generate("arithmetic", 8, seed=0), data)
    p = run_agent(agent_argv(s, token, data, state, "--log-json"), timeout=180)
    assert p.returncode == 0, p.stderr
    events = [json.loads(ln) for ln in p.stderr.splitlines() if ln.startswith("{")]
    names = [e["event"] for e in events]
    assert "re-sent unacknowledged upload" in names
    assert "training" not in names
    assert names[-1] == "run completed"
    saved = json.loads((state / "state.json").read_text())
    assert saved["pending"] is None and saved["rounds_trained"] == [1]
    assert s.rounds(run_id)[0]["uploaded"] == [accepted["client_id"]]


def test_cancelled_run_ends_the_agent_with_status_3(embedded: System, tmp_path: Path):
    s = embedded
    s.start_worker()
    run_id = s.create_run(rounds=2, train={"steps": 1, "batch_size": 2})["id"]
    token = s.enroll(run_id, "site")
    s.enroll(run_id, "absent")  # never shows up: round 1 stays open
    s.admin("POST", f"/api/v1/runs/{run_id}/launch")
    data = tmp_path / "data.jsonl"
    save_jsonl(generate("facts", 8, seed=0), data)
    log = tmp_path / "agent.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            agent_argv(s, token, data, tmp_path / "st", "--log-json"), stderr=fh, text=True
        )
        _wait_for(log, '"event": "uploaded", "round": 1')
        s.admin("POST", f"/api/v1/runs/{run_id}/cancel")
        assert proc.wait(timeout=60) == 3
    last = log.read_text().strip().splitlines()[-1]
    assert last == "fedsrd-agent: the run stopped: cancelled by an admin"


def test_plain_text_log_lines_carry_the_fields_and_waits_are_said_once(caplog):
    """Without --log-json a line still says round, step, loss and bytes; a wait is logged
    when it starts or changes, and once a minute while it lasts, not once per poll."""
    import logging

    from agent import cli

    fmt = cli._TextFormatter()
    records = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    cli.log.handlers[:] = [Keep()]
    cli.log.setLevel(logging.INFO)
    cli.event("uploaded", round=3, bytes=1234, loss=2.345678, note="two words", skip=None)
    line = fmt.format(records[-1])
    assert line.endswith('uploaded round=3 bytes=1234 loss=2.346 note="two words"'), line

    now = [100.0]
    wait = cli._WaitLog(every=60.0)
    import agent.cli as mod

    real = mod.time.monotonic
    mod.time.monotonic = lambda: now[0]  # type: ignore[assignment]
    try:
        created = {"action": "wait", "run_status": "created"}
        for _ in range(5):
            wait(created)
        assert [r.getMessage() for r in records[1:]] == ["waiting for the run to be launched"]
        now[0] += 61
        wait(created)
        between = {"action": "wait", "run_status": "running", "round": 2, "reason": "aggregating"}
        wait(between)
        wait(between)
        assert len(records) == 4
        assert fmt.format(records[-1]).endswith(
            "waiting run_status=running round=2 reason=aggregating"
        )
    finally:
        mod.time.monotonic = real  # type: ignore[assignment]
