"""The OpenAPI document tells the truth: every operation's statuses, error bodies, security
and bodies (api/openapi.py), checked by reading it and by a schema fuzzer (schemathesis)
against a real uvicorn with the admin token and an enrolled client's token."""

from __future__ import annotations

import functools
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from fastapi.testclient import TestClient
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    allow_header_conformance,
    content_type_conformance,
    ignored_auth,
    missing_required_header,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)

from api.main import create_app
from api.openapi import ADMIN_SESSION, ADMIN_TOKEN, CLIENT_TOKEN, CONTRACT
from api.runtime import make_runtime
from api.schemas import ValidationErrorBody
from api.settings import Settings
from tests.api_support import ADMIN, ADMIN_H, make_api, small_run
from tests.e2e_support import System, system

#: Examples per operation and phase: bounded, and the seed fixed, so a CI run is repeatable.
MAX_EXAMPLES = 15
SEED = 17

#: What `schemathesis run --checks all` checks, less two heuristics that judge the requests
#: rather than the answers: positive_data_acceptance (a schema-valid upload whose body does
#: not match its X-Content-SHA256 is refused, rightly) and negative_data_rejection.
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
    missing_required_header,
    unsupported_method,
    allow_header_conformance,
    ignored_auth,
]


@functools.cache
def _built_document() -> str:
    with tempfile.TemporaryDirectory() as d:
        data = Path(d)
        settings = Settings(
            admin_token=ADMIN, database_url=f"sqlite:///{data / 'db'}", data_dir=data
        )
        rt = make_runtime(settings)
        try:
            return json.dumps(create_app(settings, rt).openapi())
        finally:
            rt.close()


def _document() -> dict[str, Any]:
    """The app's OpenAPI document (no server, no database connection), a fresh copy."""
    doc: dict[str, Any] = json.loads(_built_document())
    return doc


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    return _document()


def _operations(spec: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            yield method.upper(), path, op


def test_the_contract_table_names_every_operation_and_no_other(spec: dict[str, Any]) -> None:
    documented = {(m, p) for m, p, _ in _operations(spec)}
    assert documented == set(CONTRACT)


def test_errors_are_documented_with_the_bodies_the_api_sends(spec: dict[str, Any]) -> None:
    schemas = spec["components"]["schemas"]
    # FastAPI's own validation body ({detail: [{loc, msg, type}]}) is never sent.
    assert "HTTPValidationError" not in schemas
    assert set(schemas["FieldError"]["required"]) == {"field", "in", "message"}
    for method, path, op in _operations(spec):
        for status, response in op["responses"].items():
            if not status.startswith(("4", "5")) or path == "/readyz":
                continue
            content = response.get("content", {})
            if status in ("400", "416"):  # Starlette's answers to a bad Range
                continue
            ref = content["application/json"]["schema"]["$ref"]
            want = "ValidationErrorBody" if status == "422" else "ErrorBody"
            assert ref == f"#/components/schemas/{want}", (method, path, status)


def test_security_schemes_are_declared_and_attached(spec: dict[str, Any]) -> None:
    schemes = spec["components"]["securitySchemes"]
    assert schemes[ADMIN_TOKEN] == {**schemes[ADMIN_TOKEN], "type": "http", "scheme": "bearer"}
    assert schemes[CLIENT_TOKEN] == {**schemes[CLIENT_TOKEN], "type": "http", "scheme": "bearer"}
    assert schemes[ADMIN_SESSION]["in"] == "cookie"
    for method, path, op in _operations(spec):
        names = {name for requirement in op.get("security", []) for name in requirement}
        if path.startswith("/api/v1/agent/"):
            assert names == {CLIENT_TOKEN}, (method, path)
            assert "401" in op["responses"]
        elif path.startswith("/api/v1/"):
            assert names == {ADMIN_TOKEN, ADMIN_SESSION}, (method, path)
            assert "401" in op["responses"]
        else:
            assert not names, (method, path)


def test_the_upload_documents_its_binary_body(spec: dict[str, Any]) -> None:
    op = spec["paths"]["/api/v1/agent/runs/{run_id}/rounds/{number}/update"]["put"]
    assert op["requestBody"]["required"] is True
    assert set(op["requestBody"]["content"]) == {"application/octet-stream"}
    assert {"413", "429", "503"} <= set(op["responses"])
    for path in ("/api/v1/runs", "/api/v1/agent/runs/{run_id}/heartbeat"):
        assert "413" in spec["paths"][path]["post"]["responses"], path


# --------------------------------------------------------------------------------------------
# What the fuzzer found in the app (in process: FastAPI's behaviour, not the server's)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    data = tmp_path_factory.mktemp("inproc")
    with make_api(data / "data", f"sqlite:///{data / 'api.db'}", data / "models") as api:
        yield api.client


@pytest.mark.parametrize(
    ("body", "why"),
    [(b"\xff\xfe{", "not UTF-8"), (b"[" * 100_000 + b"]" * 100_000, "nested too deeply")],
    ids=["not-utf8", "nested-too-deep"],
)
def test_a_body_that_is_not_json_is_a_422_naming_the_body(
    client: TestClient, body: bytes, why: str
) -> None:
    """FastAPI answered these 400 "There was an error parsing the body"."""
    headers = {**ADMIN_H, "Content-Type": "application/json"}
    r = client.post("/api/v1/runs", content=body, headers=headers)
    assert r.status_code == 422, r.text
    err = ValidationErrorBody.model_validate(r.json())
    assert isinstance(err.detail, list), err
    assert err.detail[0].in_ == "body" and why in err.detail[0].message, err


def test_a_services_verdict_on_a_field_is_listed_like_a_validation_error(
    client: TestClient,
) -> None:
    body = small_run(model="/nowhere/no-model")
    r = client.post("/api/v1/runs", json=body, headers=ADMIN_H)
    assert r.status_code == 422, r.text
    err = ValidationErrorBody.model_validate(r.json())
    assert isinstance(err.detail, list), err
    assert [(d.field, d.in_) for d in err.detail] == [("model", "body")]


def test_a_405_names_every_method_of_the_resource(client: TestClient) -> None:
    """GET and POST /api/v1/runs are two routes; Starlette's Allow named only the first."""
    r = client.request("OPTIONS", "/api/v1/runs/1/clients", headers=ADMIN_H)
    assert r.status_code == 405, r.text
    assert {"GET", "POST"} <= {m.strip() for m in r.headers["allow"].split(",")}
    assert r.json()["error"] == "method_not_allowed"


# --------------------------------------------------------------------------------------------
# The fuzzer: a real uvicorn (inline tasks, PostgreSQL), a launched run and a client
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def live(
    tmp_path_factory: pytest.TempPathFactory, postgres_server: str, model_cache: Path
) -> Iterator[tuple[System, str]]:
    """uvicorn on a fresh PostgreSQL database, with one launched run (round 1 open) whose
    client token the agent operations are fuzzed with."""
    import uuid

    from tests.conftest import _admin_sql

    name = f"fedsrd_t_{uuid.uuid4().hex[:12]}"
    _admin_sql(f'CREATE DATABASE "{name}"')
    try:
        tmp = tmp_path_factory.mktemp("fuzz")
        with system(
            tmp, f"{postgres_server}/{name}", "", model_cache, FEDSRD_TASK_MODE="inline"
        ) as sys_:
            run = sys_.create_run()
            token = sys_.enroll(run["id"], "site-a")
            r = sys_.admin("POST", f"/api/v1/runs/{run['id']}/launch")
            assert r.status_code == 200, r.text
            yield sys_, token
    finally:
        _admin_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


#: The document the fuzzer reads: the app's own, built without a server (pytest collects the
#: fuzz tests from it, one per operation, before any fixture runs).
FUZZ_CONFIG = schemathesis.Config.from_dict(
    {
        "seed": SEED,
        # Generation is slower on a loaded CI machine; that is no finding.
        "suppress-health-check": ["too_slow", "filter_too_much"],
        "generation": {"max-examples": MAX_EXAMPLES, "deterministic": True, "database": "none"},
    }
)
schema = schemathesis.openapi.from_dict(_document(), config=FUZZ_CONFIG)
#: For the refusals: only random tokens (or none), a few per operation.
REFUSALS_CONFIG = schemathesis.Config.from_dict(
    {
        "seed": SEED,
        "suppress-health-check": ["too_slow", "filter_too_much"],
        "generation": {"max-examples": 5, "deterministic": True, "database": "none"},
        "phases": {"coverage": {"enabled": False}},
    }
)
refusals = schemathesis.openapi.from_dict(_document(), config=REFUSALS_CONFIG)


def _token_for(case: schemathesis.Case, admin: str, client: str) -> dict[str, str]:
    agent = case.operation.path.startswith("/api/v1/agent/")
    return {"Authorization": f"Bearer {client if agent else admin}"}


# The agent's operations first: the admin's fuzzing may cancel the run or revoke the client.
@pytest.mark.slow
@schema.include(path_regex="^/api/v1/agent/").parametrize()
def test_agent_operations_keep_to_the_document(
    case: schemathesis.Case, live: tuple[System, str]
) -> None:
    sys_, token = live
    case.call_and_validate(base_url=sys_.url, headers=_token_for(case, ADMIN, token), checks=CHECKS)


@pytest.mark.slow
@schema.exclude(path_regex="^/api/v1/agent/").parametrize()
def test_admin_operations_keep_to_the_document(
    case: schemathesis.Case, live: tuple[System, str]
) -> None:
    sys_, token = live
    case.call_and_validate(base_url=sys_.url, headers=_token_for(case, ADMIN, token), checks=CHECKS)


@pytest.mark.slow
@refusals.parametrize()
def test_refusals_keep_to_the_document(case: schemathesis.Case, live: tuple[System, str]) -> None:
    """Whatever token (or none) the fuzzer generates for the security schemes."""
    sys_, _ = live
    case.call_and_validate(base_url=sys_.url, checks=CHECKS)


@pytest.mark.slow
def test_uvicorn_serves_the_completed_document(
    live: tuple[System, str], spec: dict[str, Any]
) -> None:
    sys_, _ = live
    assert httpx.get(f"{sys_.url}/openapi.json", timeout=30).json() == spec
