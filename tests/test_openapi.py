"""The OpenAPI document tells the truth: every operation's statuses, error bodies, security
and bodies (api/openapi.py)."""

from __future__ import annotations

import functools
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from api.openapi import ADMIN_SESSION, ADMIN_TOKEN, CLIENT_TOKEN, CONTRACT
from api.runtime import make_runtime
from api.schemas import ValidationErrorBody
from api.settings import Settings
from tests.api_support import ADMIN, ADMIN_H, make_api, small_run


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


def test_a_services_verdict_on_a_field_is_listed_like_a_validation_error(
    client: TestClient,
) -> None:
    body = small_run(model="/nowhere/no-model")
    r = client.post("/api/v1/runs", json=body, headers=ADMIN_H)
    assert r.status_code == 422, r.text
    err = ValidationErrorBody.model_validate(r.json())
    assert isinstance(err.detail, list), err
    assert [(d.field, d.in_) for d in err.detail] == [("model", "body")]


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


def test_a_405_names_every_method_of_the_resource(client: TestClient) -> None:
    """GET and POST /api/v1/runs are two routes; Starlette's Allow named only the first."""
    r = client.request("OPTIONS", "/api/v1/runs/1/clients", headers=ADMIN_H)
    assert r.status_code == 405, r.text
    assert {"GET", "POST"} <= {m.strip() for m in r.headers["allow"].split(",")}
    assert r.json()["error"] == "method_not_allowed"
