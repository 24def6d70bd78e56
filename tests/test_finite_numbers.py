"""Bad numbers in requests: every float of every request is finite, and every duration and
count of a run has an upper bound (a 422 naming the field; nothing stored). A run stored
before the bounds existed still enrolls and lists its clients, and enrollment never
commits a client whose token it then fails to show."""

from __future__ import annotations

import json
import math
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Union, get_args, get_origin

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from pydantic import BaseModel, TypeAdapter, ValidationError
from sqlalchemy import select

from api.main import create_app
from api.models import Client, Run
from api.services import rounds as round_service
from api.settings import Settings
from tests.api_support import ADMIN_H, Api, database_url, make_api, small_run

NON_FINITE = (math.inf, -math.inf, math.nan)

#: A valid document of every request body; a new body schema must add one here, so the walk
#: below reaches its fields.
EXAMPLES: dict[str, dict[str, Any]] = {
    "RunCreate": small_run(
        simulation={"clients": 1, "domains": ["arithmetic"]},
        evaluation={"domains": ["arithmetic"], "examples": 2},
        clients_per_round=1,
    ),
    "ClientCreate": {"name": "site"},
    "HeartbeatIn": {"round": 1, "step": 1, "steps": 2, "loss": 1.5, "samples_per_second": 3.0},
}


def _api_routes(routes: list[Any]) -> Iterator[APIRoute]:
    for r in routes:
        if isinstance(r, APIRoute):
            yield r
        elif hasattr(r, "original_router"):  # FastAPI's wrapper of an included router
            yield from _api_routes(r.original_router.routes)


@pytest.fixture(scope="module")
def routes(tmp_path_factory: pytest.TempPathFactory) -> list[APIRoute]:
    data = tmp_path_factory.mktemp("routes")
    app = create_app(Settings(data_dir=data, task_mode="inline", admin_token="t" * 24))
    found = list(_api_routes(app.routes))
    assert found, "no routes found: has FastAPI's router changed shape?"
    return found


def _walk(tp: Any, path: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], str]]:
    """``(path, kind)`` of every float (``"float"``) and free-form value (``"free"``) that
    a document of type ``tp`` can hold."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        for arg in get_args(tp):
            yield from _walk(arg, path)
    elif origin is Annotated:
        yield from _walk(get_args(tp)[0], path)
    elif origin in (list, tuple, set):
        for arg in get_args(tp):
            yield from _walk(arg, (*path, "0"))
    elif origin is dict:
        yield from _walk(get_args(tp)[1], (*path, "key"))
    elif tp is Any:
        yield path[:-1] if path and path[-1] == "key" else path, "free"
    elif tp is float:
        yield path, "float"
    elif isinstance(tp, type) and issubclass(tp, BaseModel):
        for name, field in tp.model_fields.items():
            yield from _walk(field.annotation, (*path, name))


def _set(doc: dict[str, Any], path: tuple[str, ...], value: Any) -> dict[str, Any]:
    out = json.loads(json.dumps(doc))
    node = out
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value
    return out


def _body_models(routes: list[APIRoute]) -> list[type[BaseModel]]:
    models = {r.body_field.field_info.annotation for r in routes if r.body_field is not None}
    return sorted((m for m in models if isinstance(m, type)), key=lambda m: m.__name__)


def test_every_float_of_every_request_body_must_be_finite(routes: list[APIRoute]):
    seen: set[str] = set()
    for model in _body_models(routes):
        assert model.__name__ in EXAMPLES, f"add a valid example of {model.__name__} to EXAMPLES"
        example = EXAMPLES[model.__name__]
        model.model_validate(example)  # the example itself is valid
        for path, kind in _walk(model, ()):
            assert "0" not in path, f"{model.__name__}.{'.'.join(path)}: extend the walk to lists"
            dotted = ".".join(path)
            seen.add(f"{model.__name__}.{dotted}")
            # Free-form values (a strategy's config) are checked number by number.
            values = [{"probe": v} for v in NON_FINITE] if kind == "free" else NON_FINITE
            for value in values:
                # As FastAPI validates a body: Python's json parsed it (Infinity, NaN and
                # all), then the model checks the document (the HTTP tests send JSON text).
                with pytest.raises(ValidationError) as caught:
                    model.model_validate(_set(example, path, value))
                locs = {".".join(str(p) for p in e["loc"]) for e in caught.value.errors()}
                assert dotted in locs, (model.__name__, dotted, value, locs)
    # The walk reaches the fields this was written for (a sanity check of the walk itself).
    assert {
        "RunCreate.client_timeout_s",
        "RunCreate.round_deadline_s",
        "RunCreate.lora.dropout",
        "RunCreate.train.weight_decay",
        "RunCreate.train.max_grad_norm",
        "RunCreate.simulation.dirichlet_alpha",
        "RunCreate.strategy_config",
        "HeartbeatIn.loss",
        "HeartbeatIn.samples_per_second",
    } <= seen


def test_every_float_query_parameter_must_be_finite(routes: list[APIRoute]):
    checked = []
    for route in routes:
        for param in route.dependant.query_params:
            info = param.field_info
            if not any(kind == "float" for _, kind in _walk(info.annotation, ())):
                continue
            adapter: TypeAdapter[Any] = TypeAdapter(Annotated[info.annotation, *info.metadata])
            for text in ("inf", "-inf", "nan", "Infinity", "NaN"):
                with pytest.raises(ValidationError):
                    adapter.validate_python(text)
            checked.append(f"{route.path}?{param.name}")
    assert any(c.endswith("/poll?wait") for c in checked), checked


# -- over HTTP, on both databases ------------------------------------------------------------
@pytest.fixture(params=["sqlite", "postgresql"])
def api(request, tmp_path, model_cache):
    with make_api(tmp_path / "data", database_url(request, tmp_path), model_cache) as a:
        yield a


def _raw(api: Api, method: str, path: str, doc: Any, headers: dict[str, str]) -> Any:
    """Send ``doc`` as Python's json writes it (``Infinity``, ``NaN``): an HTTP client that
    refuses non-finite numbers cannot send what an attacker can."""
    body = json.dumps(doc).encode()
    return api.client.request(
        method, path, content=body, headers={**headers, "Content-Type": "application/json"}
    )


def _refused(r: Any, *fields: str) -> None:
    assert r.status_code == 422, (r.status_code, r.text)
    named = {d["field"] for d in r.json()["detail"]}
    for f in fields:
        assert f in named, (f, r.json())


@pytest.mark.parametrize("value", NON_FINITE, ids=["inf", "-inf", "nan"])
def test_non_finite_run_settings_are_refused(api: Api, value: float):
    for path in [
        ("client_timeout_s",),
        ("round_deadline_s",),
        ("train", "weight_decay"),
        ("train", "lr"),
        ("simulation", "dirichlet_alpha"),
    ]:
        doc = small_run(simulation={"clients": 1, "domains": ["arithmetic"]})
        r = _raw(api, "POST", "/api/v1/runs", _set(doc, path, value), ADMIN_H)
        _refused(r, ".".join(path))
    # Inside the free-form strategy config: fedprox's mu has no upper bound of its own.
    doc = small_run(strategy="fedprox", strategy_config={"mu": value})
    r = _raw(api, "POST", "/api/v1/runs", doc, ADMIN_H)
    _refused(r, "strategy_config")
    assert "mu" in r.text
    assert api.admin("GET", "/api/v1/runs").json()["count"] == 0


def test_non_finite_heartbeats_are_refused_and_change_nothing(api: Api):
    run = api.create_run(launch=True)
    cid, token = api.enroll(run["id"], "site")
    h = {"Authorization": f"Bearer {token}"}
    url = f"/api/v1/agent/runs/{run['id']}/heartbeat"
    assert _raw(api, "POST", url, {"round": 1, "step": 1, "loss": 2.0}, h).status_code == 204
    for value in NON_FINITE:
        for field in ("samples_per_second", "loss"):
            r = _raw(api, "POST", url, {"round": 1, "step": 2, field: value}, h)
            _refused(r, field)
    _refused(api.client.get(f"/api/v1/agent/runs/{run['id']}/poll?wait=nan", headers=h), "wait")
    clients = api.admin("GET", f"/api/v1/runs/{run['id']}/clients").json()["data"]
    progress = next(c for c in clients if c["id"] == cid)["progress"]
    assert (progress["step"], progress["loss"]) == (1, 2.0)


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"client_timeout_s": 1e300}, "client_timeout_s"),
        ({"client_timeout_s": 30 * 86400 + 1}, "client_timeout_s"),
        ({"round_deadline_s": 1e300}, "round_deadline_s"),
        ({"quorum": 10**9}, "quorum"),
        ({"clients_per_round": 10**9}, "clients_per_round"),
        ({"rounds": 10**9}, "rounds"),
        ({"lora": {"rank": 4, "alpha": 10**12}}, "lora.alpha"),
        ({"train": {"steps": 10**9}}, "train.steps"),
        ({"simulation": {"clients": 10**6}}, "simulation.clients"),
    ],
)
def test_durations_and_counts_have_upper_bounds(api: Api, patch: dict[str, Any], field: str):
    _refused(api.admin("POST", "/api/v1/runs", json=small_run(**patch)), field)
    assert api.admin("GET", "/api/v1/runs").json()["count"] == 0


def test_the_largest_durations_are_taken(api: Api):
    run = api.create_run(launch=True, client_timeout_s=30 * 86400, round_deadline_s=30 * 86400)
    api.enroll(run["id"], "site")
    assert api.admin("GET", f"/api/v1/runs/{run['id']}/clients").status_code == 200


def _set_config(api: Api, run_id: int, **values: Any) -> None:
    with api.rt.transaction() as tx:
        run = tx.session.get(Run, run_id)
        assert run is not None
        run.config = {**run.config, **values}


def test_a_run_stored_with_unbounded_durations_still_works(api: Api):
    """Rows written before the bounds existed: ``timedelta(seconds=1e300)`` overflows, which
    made enrolling a 500 after the client was committed, and every client listing a 500."""
    run = api.create_run(launch=True)
    _, token = api.enroll(run["id"], "first")
    _set_config(api, run["id"], client_timeout_s=1e300, round_deadline_s=1e300)
    cid, _ = api.enroll(run["id"], "second")
    listed = api.admin("GET", f"/api/v1/runs/{run['id']}/clients")
    assert listed.status_code == 200, listed.text
    assert {c["liveness"] for c in listed.json()["data"]} == {"waiting"}  # never seen yet
    r = api.admin("POST", f"/api/v1/runs/{run['id']}/clients/{cid}/token")
    assert r.status_code == 200, r.text
    round_service.sweep(api.rt)  # the closing rule reads both durations
    assert api.agent(run["id"], token).poll(None)["action"] == "train"


def test_an_enrollment_that_fails_commits_no_client(api: Api, tmp_path: Path):
    """Its token is shown once: a client committed by a request that then fails could never
    be used. A corrupt duration makes the response fail; the row must go with it."""
    run = api.create_run(launch=True)
    _set_config(api, run["id"], client_timeout_s="soon")
    client = TestClient(api.client.app, raise_server_exceptions=False)
    r = client.post(f"/api/v1/runs/{run['id']}/clients", json={"name": "lost"}, headers=ADMIN_H)
    assert r.status_code == 500, r.text
    with api.rt.sessions() as s:
        assert s.scalars(select(Client.name).where(Client.run_id == run["id"])).all() == []
