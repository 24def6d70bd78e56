"""The OpenAPI document: FastAPI's, completed with what it cannot see in the routes.

FastAPI infers the parameters, the JSON bodies and the success answers. It cannot infer

* the errors: ``api.main`` maps every domain error, validation error and HTTP error to one
  body (:class:`~api.schemas.ErrorBody`; a 422 is :class:`~api.schemas.ValidationErrorBody`),
  and which statuses an operation can answer follows from how it authenticates and which
  services it calls;
* the authentication: the routes read the ``Authorization`` header themselves (the hot poll
  path authenticates and polls in one query), so FastAPI sees no security scheme;
* the upload's body, which the route streams from the request instead of declaring it.

:data:`CONTRACT` says, per operation, how it authenticates and which errors its services
raise; :func:`install` adds everything else that follows from that (401/403/410 from the
token, 422 from parameters or a body, 413 from a body, 503 from the database) to FastAPI's
document. ``tests/test_openapi.py`` checks that the table covers every route and, with a
schema fuzzer, that the real answers keep to the document.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import FastAPI
from pydantic import BaseModel

from api.auth import COOKIE, CSRF_HEADER
from api.schemas import ErrorBody, Readiness, ValidationErrorBody

#: Security schemes, by the names the document gives them.
ADMIN_TOKEN = "adminToken"
ADMIN_SESSION = "adminSession"
CLIENT_TOKEN = "clientToken"

SECURITY_SCHEMES: dict[str, dict[str, Any]] = {
    ADMIN_TOKEN: {
        "type": "http",
        "scheme": "bearer",
        "description": "The admin token (FEDSRD_ADMIN_TOKEN, or the file the server wrote "
        "on first start): `Authorization: Bearer <admin token>`.",
    },
    ADMIN_SESSION: {
        "type": "apiKey",
        "in": "cookie",
        "name": COOKIE,
        "description": "A dashboard sign-in (the browser's session cookie). Requests that "
        f"change state must also send the session's CSRF token in `{CSRF_HEADER}`.",
    },
    CLIENT_TOKEN: {
        "type": "http",
        "scheme": "bearer",
        "description": "An enrolled client's token (`fsc_...`, shown once at enrolment): "
        "`Authorization: Bearer <client token>`. It works for its own run only.",
    },
}

Auth = Literal["admin", "client", "client-any-run", "none"]

_SECURITY: dict[Auth, list[dict[str, list[str]]]] = {
    "admin": [{ADMIN_TOKEN: []}, {ADMIN_SESSION: []}],
    "client": [{CLIENT_TOKEN: []}],
    "client-any-run": [{CLIENT_TOKEN: []}],
    "none": [],
}


@dataclass(frozen=True)
class Contract:
    """How one operation authenticates and which errors its own services raise; the
    statuses that follow from the authentication, the parameters, a body and the database
    are added by :func:`statuses`."""

    auth: Auth
    errors: tuple[int, ...] = ()
    #: Whether it reads the database (503 with ``Retry-After`` while the database is away).
    database: bool = True


#: Every operation of the API, keyed by (method, path template).
CONTRACT: dict[tuple[str, str], Contract] = {
    ("GET", "/healthz"): Contract("none", database=False),
    # 503 here is the readiness answer itself (Readiness), not an ErrorBody.
    ("GET", "/readyz"): Contract("none", database=False),
    ("GET", "/metrics"): Contract("none"),
    ("POST", "/api/v1/runs"): Contract("admin"),
    ("GET", "/api/v1/runs"): Contract("admin"),
    ("GET", "/api/v1/runs/{run_id}"): Contract("admin", (404,)),
    ("POST", "/api/v1/runs/{run_id}/launch"): Contract("admin", (404, 409)),
    ("POST", "/api/v1/runs/{run_id}/cancel"): Contract("admin", (404, 409)),
    ("POST", "/api/v1/runs/{run_id}/resume"): Contract("admin", (404, 409)),
    ("POST", "/api/v1/runs/{run_id}/clients"): Contract("admin", (404, 409)),
    ("GET", "/api/v1/runs/{run_id}/clients"): Contract("admin", (404,)),
    ("POST", "/api/v1/runs/{run_id}/clients/{client_id}/revoke"): Contract("admin", (404,)),
    ("POST", "/api/v1/runs/{run_id}/clients/{client_id}/token"): Contract("admin", (404, 409)),
    ("GET", "/api/v1/runs/{run_id}/rounds"): Contract("admin", (404,)),
    ("GET", "/api/v1/runs/{run_id}/adapter"): Contract("admin", (404, 409)),
    ("DELETE", "/api/v1/sessions"): Contract("admin"),
    ("GET", "/api/v1/audit"): Contract("admin"),
    ("GET", "/api/v1/agent/me"): Contract("client-any-run"),
    ("GET", "/api/v1/agent/runs/{run_id}"): Contract("client"),
    # 409: the agent reports a newer state than the run has.
    ("GET", "/api/v1/agent/runs/{run_id}/poll"): Contract("client", (409,)),
    ("GET", "/api/v1/agent/runs/{run_id}/sync"): Contract("client", (409,)),
    # 206 and 416 for a Range; 400 (text) for a malformed one, from a local store.
    ("GET", "/api/v1/agent/runs/{run_id}/blobs/{sha256}"): Contract("client", (206, 400, 404, 416)),
    # 409: not open for this client; 413: over the run's size cap; 429 / 503: too many
    # uploads at once (with Retry-After).
    ("PUT", "/api/v1/agent/runs/{run_id}/rounds/{number}/update"): Contract(
        "client", (409, 413, 429)
    ),
    ("POST", "/api/v1/agent/runs/{run_id}/heartbeat"): Contract("client"),
}

_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

_DESCRIPTIONS: dict[int, str] = {
    206: "Partial content: the single byte range asked for (`Range`, `If-Range`)",
    400: "Malformed `Range` header (a local blob store answers in plain text)",
    401: "Missing or invalid token",
    404: "Not found",
    408: "The body stalled: no bytes for `FEDSRD_BODY_TIMEOUT_S` seconds (the connection is "
    "closed)",
    409: "Conflicts with the run's state",
    410: "The client was revoked, or its run ended",
    413: "The body is larger than allowed",
    416: "The range starts past the end of the blob",
    422: "Invalid request: each bad field (parameters, JSON body) or what is wrong with an "
    "uploaded body",
    429: "Too many uploads at once; retry after `Retry-After` seconds",
    503: "Unavailable for now (the database is away, or too many uploads at once); retry "
    "after `Retry-After` seconds",
}
_FORBIDDEN: dict[Auth, str] = {
    "admin": f"Signed in with a dashboard session but no valid `{CSRF_HEADER}`",
    "client": "The token belongs to another run",
}

_RETRY_AFTER = {
    "Retry-After": {
        "description": "Seconds to wait before retrying",
        "schema": {"type": "integer", "minimum": 1},
    }
}
_BLOB_HEADERS = {
    "ETag": {"description": "The quoted SHA-256", "schema": {"type": "string"}},
    "X-Content-SHA256": {"schema": {"type": "string", "pattern": "^[0-9a-f]{64}$"}},
}


def _has_json_body(op: dict[str, Any]) -> bool:
    return "application/json" in op.get("requestBody", {}).get("content", {})


def statuses(method: str, contract: Contract, op: dict[str, Any]) -> set[int]:
    """Every error status the operation ``op`` (FastAPI's document of it) can answer."""
    out = set(contract.errors)
    if contract.auth == "admin":
        out.add(401)
        if method not in _SAFE_METHODS:
            out.add(403)  # a cookie session without its CSRF token
    elif contract.auth == "client":
        out |= {401, 403, 410}
    elif contract.auth == "client-any-run":
        out |= {401, 410}
    if op.get("parameters") or "requestBody" in op:
        out.add(422)
    if _has_json_body(op):
        out.add(413)
    if "requestBody" in op:
        out.add(408)  # the body stalled past body_timeout_s (api/gate.py)
    if contract.database:
        out.add(503)
    return out


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _error_response(status: int, auth: Auth) -> dict[str, Any]:
    description = _DESCRIPTIONS.get(status) or _FORBIDDEN.get(auth, "Forbidden")
    model = ValidationErrorBody if status == 422 else ErrorBody
    response: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": _ref(model)}},
    }
    if status == 400:  # Starlette's own answer to a malformed Range, not ours
        response["content"] = {"text/plain": {"schema": {"type": "string"}}}
    if status in (429, 503):
        response["headers"] = dict(_RETRY_AFTER)
    return response


def _add_models(spec: dict[str, Any], *models: type[BaseModel]) -> None:
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    for model in models:
        doc = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(doc.pop("$defs", {}))
        schemas[model.__name__] = doc


def _complete(method: str, path: str, op: dict[str, Any]) -> None:
    contract = CONTRACT[(method, path)]
    responses: dict[str, Any] = op.setdefault("responses", {})
    for status in sorted(statuses(method, contract, op)):
        if status == 206:
            continue  # a success: below
        responses[str(status)] = _error_response(status, contract.auth)
    if contract.auth != "none":
        op["security"] = _SECURITY[contract.auth]
    _specifics(method, path, op)
    op["responses"] = dict(sorted(op["responses"].items()))


def _specifics(method: str, path: str, op: dict[str, Any]) -> None:
    """What only one operation has: bodies and headers the route handles itself."""
    responses = op["responses"]
    if path == "/api/v1/agent/runs/{run_id}/rounds/{number}/update":
        op["requestBody"] = {
            "required": True,
            "description": "The update in the wire format (sparse, self-describing); its "
            "SHA-256 goes in `X-Content-SHA256`. Streamed: checked as it arrives.",
            "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
            },
        }
    elif path == "/api/v1/agent/runs/{run_id}/blobs/{sha256}":
        binary = {"schema": {"type": "string", "format": "binary"}}
        responses["200"] = {
            "description": "The blob",
            "headers": dict(_BLOB_HEADERS),
            "content": {"application/octet-stream": binary},
        }
        responses["206"] = {
            "description": _DESCRIPTIONS[206],
            "headers": dict(_BLOB_HEADERS),
            "content": {
                "application/octet-stream": binary,
                # several ranges at once, from a local store
                "multipart/byteranges": binary,
            },
        }
        responses["416"] = {"description": _DESCRIPTIONS[416]}
    elif path == "/api/v1/agent/runs/{run_id}/poll":
        responses["200"]["headers"] = {
            "Retry-After": {
                "description": "With a `wait` answer: seconds before the next poll",
                "schema": {"type": "integer", "minimum": 1},
            }
        }
    elif path == "/readyz":
        ready_body = {"content": {"application/json": {"schema": _ref(Readiness)}}}
        responses["200"] = {"description": "Ready", **ready_body}
        responses["503"] = {"description": "Not ready: each failing check says why", **ready_body}
    elif path == "/metrics":
        responses["200"] = {
            "description": "Prometheus metrics (text exposition format)",
            "content": {"text/plain": {"schema": {"type": "string"}}},
        }


def describe(spec: dict[str, Any]) -> dict[str, Any]:
    """Complete FastAPI's document ``spec`` (in place; returned)."""
    _add_models(spec, ErrorBody, ValidationErrorBody, Readiness)
    for path, operations in spec["paths"].items():
        for method, op in operations.items():
            if (method.upper(), path) not in CONTRACT:
                raise KeyError(f"{method.upper()} {path} is not in api.openapi.CONTRACT")
            _complete(method.upper(), path, op)
    spec.setdefault("components", {})["securitySchemes"] = SECURITY_SCHEMES
    # FastAPI's own 422 body (loc/msg/type) is never sent: drop it.
    schemas = spec["components"]["schemas"]
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    return spec


@functools.cache
def _template(path: str) -> re.Pattern[str]:
    """``/api/v1/runs/{run_id}`` as a pattern matching its concrete paths."""
    return re.compile(re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(path)))


def allowed_methods(app: FastAPI, path: str) -> set[str]:
    """Every method the document lists for the resource at the concrete ``path``.

    Starlette's 405 names only the methods of the first route whose path matched, but
    ``GET`` and ``POST /api/v1/runs`` are two routes: ``Allow`` must name both (RFC 9110).
    """
    return {
        method.upper()
        for template, operations in app.openapi()["paths"].items()
        if _template(template).fullmatch(path)
        for method in operations
    }


def install(app: FastAPI) -> None:
    """Serve the completed document at ``/openapi.json`` (and so in ``/docs``). Call once
    every router is included."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = describe(FastAPI.openapi(app))
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
