"""Bad input at every endpoint: a 4xx JSON error that names the problem, nothing stored."""

from __future__ import annotations

import struct
import threading

import pytest
import torch
from sqlalchemy import func, select

from api.errors import Conflict
from api.models import Update
from api.services import updates as update_service
from fedsrd_core.codec import encode, inspect
from fedsrd_core.sparse import SparseTensor
from tests.api_support import ADMIN_H, Api, FakeAgent, database_url, make_api, sha


@pytest.fixture(params=["sqlite", "postgresql"])
def api(request, tmp_path, model_cache):
    with make_api(tmp_path / "data", database_url(request, tmp_path), model_cache) as a:
        yield a


def _err(r, status: int, *needles: str) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error", "detail"}, body
    text = str(body["detail"])
    for n in needles:
        assert n in text, (n, body)
    return body


ADMIN_ROUTES = [
    ("POST", "/api/v1/runs"),
    ("GET", "/api/v1/runs"),
    ("GET", "/api/v1/runs/{run}"),
    ("POST", "/api/v1/runs/{run}/launch"),
    ("POST", "/api/v1/runs/{run}/cancel"),
    ("POST", "/api/v1/runs/{run}/resume"),
    ("POST", "/api/v1/runs/{run}/clients"),
    ("GET", "/api/v1/runs/{run}/clients"),
    ("POST", "/api/v1/runs/{run}/clients/1/revoke"),
    ("POST", "/api/v1/runs/{run}/clients/1/token"),
    ("GET", "/api/v1/runs/{run}/rounds"),
    ("GET", "/api/v1/runs/{run}/adapter"),
    ("GET", "/api/v1/audit"),
    ("DELETE", "/api/v1/sessions"),
]


def test_admin_endpoints_need_the_admin_token(api: Api):
    run = api.create_run()
    _, token = api.enroll(run["id"], "site")
    for method, path in ADMIN_ROUTES:
        url = path.format(run=run["id"])
        _err(api.client.request(method, url), 401, "missing admin token")
        _err(
            api.client.request(method, url, headers={"Authorization": "Bearer nope"}),
            401,
            "invalid admin token",
        )
        # A client token is not an admin token.
        _err(
            api.client.request(method, url, headers={"Authorization": f"Bearer {token}"}),
            401,
            "invalid admin token",
        )


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"rounds": 0}, "rounds"),
        ({"rounds": "many"}, "rounds"),
        ({"strategy": "fedsgd"}, "unknown strategy"),
        ({"strategy_config": {"download_drop": 1.5}}, "download_drop"),
        ({"strategy_config": {"nonsense": 1}}, "nonsense"),
        ({"lora": {"rank": 0}}, "lora.rank"),
        ({"lora": {"rank": 4, "dropout": 1.0}}, "lora.dropout"),
        ({"train": {"lr": -1}}, "train.lr"),
        ({"value_dtype": "fp8"}, "value_dtype"),
        ({"seed": -1}, "seed"),
        ({"quorum": 3, "clients_per_round": 2}, "quorum 3 exceeds"),
        ({"extra_field": 1}, "extra_field"),
        ({"name": ""}, "name"),
        ({"simulation": {"clients": 2, "domains": ["arithmetic"]}}, "one domain per client"),
        ({"evaluation": {"domains": ["astrology"]}}, "astrology"),
    ],
)
def test_create_run_rejects_bad_fields(api: Api, patch: dict, field: str):
    from tests.api_support import small_run

    body = small_run(**patch)
    _err(api.admin("POST", "/api/v1/runs", json=body), 422, field)
    assert api.admin("GET", "/api/v1/runs").json()["count"] == 0


def test_create_run_rejects_bad_models(api: Api, tmp_path):
    from tests.api_support import small_run

    # Found by schemathesis: a name too long for a path was an OSError, a 500.
    _err(api.admin("POST", "/api/v1/runs", json=small_run(model="0" * 500)), 422, "model")
    missing = tmp_path / "no-such-model"
    _err(api.admin("POST", "/api/v1/runs", json=small_run(model=str(missing))), 422, "model")
    _err(
        api.admin(
            "POST", "/api/v1/runs", json=small_run(lora={"rank": 4, "target_modules": ["nope"]})
        ),
        422,
        "lora.target_modules",
    )
    _err(
        api.admin("POST", "/api/v1/runs", json=small_run(model_fingerprint="0" * 64)),
        422,
        "model_fingerprint",
    )
    _err(
        api.admin("POST", "/api/v1/runs", json=small_run(model_fingerprint="xyz")),
        422,
        "model_fingerprint",
    )
    assert api.admin("GET", "/api/v1/runs").json()["count"] == 0


def test_an_unloadable_model_is_named_without_the_servers_paths(api: Api, tmp_path, monkeypatch):
    """A 422 for a model told a remote admin where the server keeps its Hugging Face cache
    (and the snapshot directory it tried): it names the model and what is wrong only."""
    from huggingface_hub import constants as hf_constants

    from tests.api_support import small_run

    hub = tmp_path / "hub"
    repo = hub / "models--fedsrd-test--broken"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "config.json").write_text("{not json")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(hub))
    for model, reason in [
        ("fedsrd-test/not-cached", "neither a local directory nor a model"),
        ("fedsrd-test/broken", "its config does not load"),
    ]:
        body = _err(api.admin("POST", "/api/v1/runs", json=small_run(model=model)), 422, model)
        text = str(body["detail"])
        assert reason in text, text
        assert str(hub) not in text and "snapshots" not in text, text
        assert str(api.settings.model_cache) not in text, text
    assert api.admin("GET", "/api/v1/runs").json()["count"] == 0


def test_malformed_json_and_wrong_content(api: Api):
    r = api.client.post(
        "/api/v1/runs",
        content=b'{"name": "x", "model": ',
        headers={**ADMIN_H, "Content-Type": "application/json"},
    )
    _err(r, 422, "JSON")
    r = api.client.post(
        "/api/v1/runs", content=b"[1, 2]", headers={**ADMIN_H, "Content-Type": "application/json"}
    )
    _err(r, 422)


def test_admin_lookups(api: Api):
    run = api.create_run()
    rid = run["id"]
    _err(api.admin("GET", "/api/v1/runs/999"), 404, "run 999 not found")
    _err(api.admin("GET", "/api/v1/runs/abc"), 422, "run_id")
    _err(api.admin("GET", "/api/v1/runs/0"), 422, "run_id")
    _err(api.admin("GET", "/api/v1/runs?limit=0"), 422, "limit")
    _err(api.admin("GET", "/api/v1/runs?offset=-1"), 422, "offset")
    # Found by schemathesis: ids and offsets beyond a database INTEGER were a 500.
    _err(api.admin("GET", f"/api/v1/runs/{2**64}/rounds"), 422, "run_id")
    _err(api.admin("GET", f"/api/v1/runs?offset={2**70}"), 422, "offset")
    _err(api.admin("POST", "/api/v1/runs/999/launch"), 404)
    _err(api.admin("GET", f"/api/v1/runs/{rid}/adapter"), 409, "not been launched")
    _err(api.admin("POST", f"/api/v1/runs/{rid}/clients", json={"name": "bad name!"}), 422, "name")
    _err(api.admin("POST", f"/api/v1/runs/{rid}/clients", json={}), 422, "name")
    api.enroll(rid, "site")
    _err(api.admin("POST", f"/api/v1/runs/{rid}/clients", json={"name": "site"}), 409, "already")
    _err(api.admin("POST", f"/api/v1/runs/{rid}/clients/999/revoke"), 404)
    other = api.create_run(name="other")
    cid, _ = api.enroll(other["id"], "theirs")
    _err(api.admin("POST", f"/api/v1/runs/{rid}/clients/{cid}/revoke"), 404)
    _err(api.admin("POST", f"/api/v1/runs/{rid}/clients/{cid}/token"), 404)  # another run's
    _err(api.admin("POST", f"/api/v1/runs/{rid}/clients/999/token"), 404)
    sim = api.create_run(name="sim", simulation={"clients": 2, "domains": ["arithmetic", "code"]})
    sim_client = api.admin("GET", f"/api/v1/runs/{sim['id']}/clients").json()["data"][0]
    path = f"/api/v1/runs/{sim['id']}/clients/{sim_client['id']}/token"
    _err(api.admin("POST", path), 409, "simulated")
    assert api.admin("POST", f"/api/v1/runs/{rid}/launch").status_code == 200
    _err(api.admin("POST", f"/api/v1/runs/{rid}/launch"), 409, "only a created run")
    _err(api.admin("GET", f"/api/v1/runs/{rid}/adapter?round=7"), 404, "round 7")
    _err(api.admin("DELETE", f"/api/v1/runs/{rid}"), 405)
    _err(api.client.get("/nowhere"), 404)


def _launched(api: Api, n: int = 2, **run):
    created = api.create_run(**run)
    tokens = [api.enroll(created["id"], f"site-{i}")[1] for i in range(n)]
    api.admin("POST", f"/api/v1/runs/{created['id']}/launch")
    return created["id"], tokens


AGENT_ROUTES = [
    ("GET", ""),
    ("GET", "/poll"),
    ("GET", "/sync"),
    ("GET", "/blobs/" + "a" * 64),
    ("PUT", "/rounds/1/update?base_round=0"),
    ("POST", "/heartbeat"),
]


def test_agent_endpoints_authenticate(api: Api):
    rid, tokens = _launched(api)
    other_rid, _ = _launched(api)
    for method, suffix in AGENT_ROUTES:
        url = f"/api/v1/agent/runs/{rid}{suffix}"
        _err(api.client.request(method, url), 401, "missing client token")
        _err(api.client.request(method, url, headers={"Authorization": "Bearer fsc_wrong"}), 401)
        _err(
            api.client.request(
                method, url, headers={"Authorization": f"Bearer {ADMIN_H['Authorization'][7:]}"}
            ),
            401,
        )
        other = f"/api/v1/agent/runs/{other_rid}{suffix}"
        _err(
            api.client.request(method, other, headers={"Authorization": f"Bearer {tokens[0]}"}),
            403,
            "another run",
        )


def test_revoked_token_is_refused_everywhere(api: Api):
    rid, tokens = _launched(api)
    clients = api.admin("GET", f"/api/v1/runs/{rid}/clients").json()["data"]
    api.admin("POST", f"/api/v1/runs/{rid}/clients/{clients[0]['id']}/revoke")
    for method, suffix in AGENT_ROUTES:
        r = api.client.request(
            method,
            f"/api/v1/agent/runs/{rid}{suffix}",
            headers={"Authorization": f"Bearer {tokens[0]}"},
        )
        _err(r, 410, "revoked")


def test_agent_query_validation(api: Api):
    rid, tokens = _launched(api)
    h = {"Authorization": f"Bearer {tokens[0]}"}
    base = f"/api/v1/agent/runs/{rid}"
    _err(api.client.get(f"{base}/poll?have_round=-5", headers=h), 422, "have_round")
    _err(api.client.get(f"{base}/poll?wait=1000", headers=h), 422, "wait")
    _err(api.client.get(f"{base}/poll?have_round=4", headers=h), 409, "round 4")
    _err(api.client.get(f"{base}/blobs/not-a-sha", headers=h), 422, "sha256")
    _err(api.client.get(f"{base}/blobs/{'b' * 64}", headers=h), 404, "no global blob")
    _err(
        api.client.post(
            f"{base}/heartbeat",
            headers=h,
            content=b"{",
        ),
        422,
    )
    _err(
        api.client.post(f"{base}/heartbeat", headers=h, json={"round": 1, "step": -1}), 422, "step"
    )
    _err(
        api.client.post(
            f"{base}/heartbeat",
            headers={**h, "Content-Type": "application/json"},
            content=b'{"round": 1, "step": 1, "loss": NaN}',
        ),
        422,
        "loss",
    )


def test_a_client_never_reads_another_clients_upload(api: Api):
    rid, tokens = _launched(api, n=2)
    a = FakeAgent(api.agent(rid, tokens[0]), seed=1)
    accepted = a.play_round()
    assert accepted is not None
    for token in tokens:  # neither the other client nor the uploader itself
        r = api.client.get(
            f"/api/v1/agent/runs/{rid}/blobs/{accepted['sha256']}",
            headers={"Authorization": f"Bearer {token}"},
        )
        _err(r, 404, "no global blob")


def _state_counts(api: Api) -> tuple[int, int, int]:
    root = api.rt.blobs.root  # type: ignore[attr-defined]
    blobs = sum(1 for p in (root / "sha256").rglob("*") if p.is_file())
    temps = sum(1 for p in (root / "tmp").iterdir())
    with api.rt.sessions() as s:
        rows = s.scalar(select(func.count()).select_from(Update)) or 0
    return blobs, temps, rows


def _with_nan(blob: bytes) -> bytes:
    info = next(i for i in inspect(blob) if i.count > 0)
    at = info.offset + info.position_bytes
    return blob[:at] + struct.pack("<f", float("nan")) + blob[at + 4 :]


def test_bad_uploads_are_refused_and_leave_nothing(api: Api):
    rid, tokens = _launched(api, n=2)
    agent = FakeAgent(api.agent(rid, tokens[0]), seed=3)
    agent.apply(agent.poll()["sync"])
    good = agent.make_update(1)
    h = {"Authorization": f"Bearer {tokens[0]}"}
    url = f"/api/v1/agent/runs/{rid}/rounds/1/update?base_round=0&num_samples=3"
    before = _state_counts(api)

    def put(body: bytes, digest: str | None = None, url: str = url, **headers: str):
        hh = {**h, **headers}
        if digest is not None:
            hh["X-Content-SHA256"] = digest
        return api.client.put(url, content=body, headers=hh)

    _err(put(good), 422, "x-content-sha256")
    _err(put(good, "zz"), 422, "x-content-sha256")
    _err(put(good, sha(b"other")), 422, "SHA-256")
    truncated = good[: len(good) // 2]
    _err(put(truncated, sha(truncated)), 422, "invalid update blob")
    _err(put(b"garbage" * 10, sha(b"garbage" * 10)), 422, "invalid update blob")
    nan = _with_nan(good)
    _err(put(nan, sha(nan)), 422, "non-finite")
    # Shapes of another adapter (rank 8 instead of 4).
    wrong = {
        n: SparseTensor(
            (8, s[1]) if n.endswith("lora_A") else (s[0], 8), torch.tensor([0]), torch.tensor([1.0])
        )
        for n, s in _upload_shapes(agent).items()
    }
    blob = encode(wrong)
    _err(put(blob, sha(blob)), 422, "shape")
    shapes = _upload_shapes(agent)
    missing = encode({n: torch.zeros(s) for n, s in list(shapes.items())[1:]})
    _err(put(missing, sha(missing)), 422, "missing")
    extra = encode(
        {**{n: torch.zeros(s) for n, s in shapes.items()}, "evil.lora_A": torch.zeros(2, 2)}
    )
    _err(put(extra, sha(extra)), 422, "unexpected")
    bf16 = encode({n: torch.zeros(s) for n, s in shapes.items()}, value_dtype="bf16")
    _err(put(bf16, sha(bf16)), 422, "bf16")
    cap = _cap(api, rid)
    huge = b"\0" * (cap + 1)
    _err(put(huge, sha(huge)), 413, "cap")

    def chunks():  # no Content-Length: the cap is enforced while streaming
        for _ in range(cap // 65536 + 2):
            yield b"\0" * 65536

    _err(put(chunks(), sha(b"x")), 413, "cap")
    _err(
        put(good, sha(good), url=url.replace("num_samples=3", "num_samples=-1")), 422, "num_samples"
    )
    _err(put(good, sha(good), url=url + "&train_loss=nan"), 422, "train_loss")
    _err(put(good, sha(good), url=url.replace("base_round=0&", "")), 422, "base_round")
    _err(put(good, sha(good), url=url.replace("/rounds/1/", "/rounds/0/")), 422, "number")
    assert _state_counts(api) == before  # no blob, no temp file, no row
    r = put(good, sha(good))
    assert r.status_code == 200, r.text
    blobs, temps, rows = _state_counts(api)
    assert (blobs, temps, rows) == (before[0] + 1, 0, before[2] + 1)


def test_streamed_uploads_get_the_same_answers_with_or_without_a_length(api: Api):
    """The body is validated while it streams in, sooner when its length is announced: the
    answers must not depend on that, nor on how the body is cut (nothing is stored)."""
    rid, tokens = _launched(api, n=2)
    agent = FakeAgent(api.agent(rid, tokens[0]), seed=5)
    agent.apply(agent.poll()["sync"])
    good = agent.make_update(1)
    h = {"Authorization": f"Bearer {tokens[0]}"}
    url = f"/api/v1/agent/runs/{rid}/rounds/1/update?base_round=0&num_samples=3"
    shapes = _upload_shapes(agent)
    nan = _with_nan(good)
    bodies = {
        "truncated": (good[:-3], None),
        "trailing": (good + b"\0\0", None),
        "nan": (nan, None),
        "nan, wrong sha": (nan, sha(good)),  # the hash is checked first
        "bf16": (encode({n: torch.zeros(s) for n, s in shapes.items()}, value_dtype="bf16"), None),
        "missing": (encode({n: torch.zeros(s) for n, s in list(shapes.items())[1:]}), None),
        "garbage": (b"FSRD" + bytes(100), None),
    }
    before = _state_counts(api)

    def pieces(body: bytes, size: int):
        for i in range(0, len(body), size):
            yield body[i : i + size]

    for label, (body, digest) in bodies.items():
        hh = {**h, "X-Content-SHA256": digest or sha(body)}
        answers = [api.client.put(url, content=body, headers=hh)]
        for size in (1, 7, 4096):  # no Content-Length: chunked
            answers.append(api.client.put(url, content=pieces(body, size), headers=hh))
        first = _err(answers[0], 422)
        for r in answers[1:]:
            assert _err(r, 422) == first, label
    assert _state_counts(api) == before
    r = api.client.put(
        url, content=pieces(good, 1000), headers={**h, "X-Content-SHA256": sha(good)}
    )
    assert r.status_code == 200, r.text
    assert r.json()["size"] == len(good)


def _upload_shapes(agent: FakeAgent) -> dict[str, tuple[int, int]]:
    from fedsrd_core.snapshot import shape_state

    return agent.strategy.upload_shapes(shape_state(agent.layout, agent.rank))


def _cap(api: Api, rid: int) -> int:
    from api.models import Run
    from api.services.states import upload_size_cap

    with api.rt.sessions() as s:
        return upload_size_cap(s.get(Run, rid))


def test_a_seq_len_that_cannot_hold_the_prompt_template_is_refused(api: Api):
    from tests.api_support import small_run

    # The tiny model's tokenizer is byte-level: the template alone is 140 tokens.
    short = small_run(train={"steps": 1, "batch_size": 2, "seq_len": 140})
    body = _err(api.admin("POST", "/api/v1/runs", json=short), 422, "train.seq_len", "is 141")
    assert "prompt template" in str(body["detail"])
    assert api.admin("GET", "/api/v1/runs").json()["count"] == 0
    api.create_run(train={"steps": 1, "batch_size": 2, "seq_len": 141})


def test_the_losing_one_of_two_concurrent_uploads_leaves_no_blob(api: Api):
    """Two different updates of one client for one round, both past the cheap checks and
    streamed in, recorded at the same moment from two threads (two sessions): one is
    accepted, the other is a 409 and its blob is gone at once."""
    rid, tokens = _launched(api)
    cid = api.admin("GET", f"/api/v1/runs/{rid}/clients").json()["data"][0]["id"]
    agent = FakeAgent(api.agent(rid, tokens[0]), seed=3)
    agent.catch_up()
    blobs = [agent.make_update(1), agent.make_update(1)]
    shas = [sha(b) for b in blobs]
    assert shas[0] != shas[1]
    pre = update_service.precheck(api.rt, cid, 1, 0, shas[0])
    sinks = []
    for blob in blobs:
        sink = update_service.UploadSink(api.rt, pre.run, pre.shapes, pre.size_cap, len(blob))
        sink.write(blob)
        sinks.append(sink)
    start = threading.Barrier(2)
    results: list[object] = [None, None]

    def finish(i: int) -> None:
        start.wait()
        try:
            results[i] = update_service.finish(api.rt, sinks[i], shas[i], cid, 1, 0, 4)
        except Conflict as e:
            results[i] = e

    threads = [threading.Thread(target=finish, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    won = [i for i in range(2) if isinstance(results[i], update_service.Accepted)]
    lost = [i for i in range(2) if isinstance(results[i], Conflict)]
    assert len(won) == 1 and len(lost) == 1, results
    assert "already uploaded a different update" in str(results[lost[0]])
    assert api.rt.blobs.exists(shas[won[0]])
    assert not api.rt.blobs.exists(shas[lost[0]])
    assert not any((api.settings.data_dir / "blobs" / "tmp").iterdir())
    with api.rt.sessions() as s:
        assert s.scalars(select(Update.blob)).all() == [shas[won[0]]]
