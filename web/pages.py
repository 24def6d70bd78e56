"""The dashboard's pages: thin handlers that call the REST API's route functions (so a page
shows exactly the documents the JSON API returns) and render them with Jinja2.

Handlers that change state take a form with the session's CSRF token and end in a redirect
(post/redirect/get), except enrollment, whose answer holds the client's token, shown once.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
from collections.abc import Callable
from typing import Annotated, Any, TypeVar
from urllib.parse import quote, urlsplit

from fastapi import APIRouter, Depends, FastAPI, Path, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from jinja2 import Environment, FileSystemLoader, select_autoescape
from pydantic import ValidationError
from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData

from api import auth
from api.deps import RuntimeDep, admin_session, client_address
from api.errors import Forbidden, InvalidInput
from api.models import utcnow
from api.routes import audit as audit_api
from api.routes import runs as runs_api
from api.runtime import Runtime
from api.schemas import (
    MAX_INT,
    ClientCreate,
    ClientEnrolled,
    EvaluationSettings,
    LoraSettings,
    RunCreate,
    SimulationSettings,
    TrainSettings,
)
from api.services import sessions
from fedsrd_core.data import DOMAINS, OOD_DOMAINS
from fedsrd_core.strategies import available_strategies
from web import STATIC_DIR, TEMPLATES_DIR, views

T = TypeVar("T")
log = logging.getLogger(__name__)
PAGE_SIZE = 20
#: Seconds between refreshes of a live fragment while its run is active.
LIVE_INTERVAL_MS = 2000

#: Nothing but the server itself: no inline script or style, no other host, no framing.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; font-src 'self'; form-action 'self'; frame-ancestors 'none'; "
    "base-uri 'none'; object-src 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}

_env = Environment(
    loader=FileSystemLoader(TEMPLATES_DIR),
    autoescape=select_autoescape(["html"]),
    trim_blocks=True,
    lstrip_blocks=True,
)
_env.filters.update(mib=views.mib, duration=views.duration)
_env.globals.update(ago=views.ago, isoformat=lambda t: t.isoformat() if t else "")
templates = Jinja2Templates(env=_env)

router = APIRouter(include_in_schema=False)
RunId = Annotated[int, Path(ge=1, le=MAX_INT)]


class SignInRequiredError(Exception):
    """A page needs a session: answered with a redirect to the sign-in page."""

    def __init__(self, next_url: str) -> None:
        super().__init__(next_url)
        self.next_url = next_url


def page_session(request: Request, rt: RuntimeDep) -> auth.Session:
    session = admin_session(request, rt)
    if session is None:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        raise SignInRequiredError(target)
    return session


SessionDep = Annotated[auth.Session, Depends(page_session)]


def render(
    request: Request,
    template: str,
    context: dict[str, Any],
    *,
    status: int = 200,
    session: auth.Session | None = None,
) -> HTMLResponse:
    rt: Runtime = request.app.state.runtime
    ctx = {
        "signed_in": session is not None,
        "csrf": session.csrf_token(rt.settings.resolved_admin_token) if session else "",
        "csrf_field": auth.CSRF_FIELD,
        "now": utcnow(),
        **context,
    }
    response = templates.TemplateResponse(request, template, ctx, status_code=status)
    response.headers.update(SECURITY_HEADERS)
    return response


def wants_html(request: Request) -> bool:
    """Whether an error on this request should be a page (not the API's JSON body)."""
    path = request.url.path
    if path.startswith(("/api/", "/static/")) or path in ("/healthz", "/readyz", "/metrics"):
        return False
    return "text/html" in request.headers.get("accept", "") or request.method == "POST"


def error_page(request: Request, status: int, message: str) -> HTMLResponse:
    rt: Runtime = request.app.state.runtime
    try:
        session = admin_session(request, rt)
    except SQLAlchemyError:  # the page reports the error it was made for, not this one
        session = None
    titles = {401: "Sign-in needed", 403: "Not allowed", 404: "Not found", 409: "Conflict"}
    title = titles.get(status, "Something went wrong" if status >= 500 else "Bad request")
    return render(
        request,
        "error.html",
        {"title": title, "status": status, "message": message},
        status=status,
        session=session,
    )


def _redirect(url: str) -> RedirectResponse:
    return RedirectResponse(url, status_code=303)


def _safe_next(value: str | None) -> str:
    """Only a path on this server (no scheme, no host, no ``//``) may be a redirect target."""
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value:
        return "/runs"
    parts = urlsplit(value)
    return "/runs" if parts.scheme or parts.netloc else value


def _check_csrf(rt: Runtime, session: auth.Session, form: FormData) -> None:
    token = form.get(auth.CSRF_FIELD)
    if not auth.check_csrf(
        session, rt.settings.resolved_admin_token, token if isinstance(token, str) else None
    ):
        raise Forbidden("the form's CSRF token is missing or stale; reload the page and retry")


def _actor(request: Request, session: auth.Session) -> auth.Actor:
    return auth.Actor.of_session(session, client_address(request))


async def _call(fn: Callable[..., T], *args: Any) -> T:
    return await run_in_threadpool(fn, *args)


# -- sign-in ---------------------------------------------------------------------------------
@router.get("/")
def home() -> RedirectResponse:
    return _redirect("/runs")


@router.get("/login")
def login_page(request: Request, rt: RuntimeDep, next: str | None = None) -> Response:
    if admin_session(request, rt) is not None:
        return _redirect(_safe_next(next))
    return render(request, "login.html", {"next": _safe_next(next), "error": None})


@router.post("/login")
async def login(request: Request, rt: RuntimeDep) -> Response:
    form = await request.form()
    token = form.get("token")
    next_url = _safe_next(str(form.get("next") or ""))
    admin = rt.settings.resolved_admin_token
    if not isinstance(token, str) or not hmac.compare_digest(
        token.strip().encode(), admin.encode()
    ):
        error = "That is not the admin token." if token else "Enter the admin token."
        # Logged, not put in the audit table: anyone can send these, as many as they like.
        log.warning("dashboard sign-in refused from %s", client_address(request))
        return render(request, "login.html", {"next": next_url, "error": error}, status=401)
    response = _redirect(next_url)
    response.set_cookie(
        auth.COOKIE,
        await _call(sessions.sign_in, rt, client_address(request)),
        max_age=rt.settings.session_ttl_s,
        httponly=True,
        samesite="lax",
        secure=request.url.scheme == "https",
        path="/",
    )
    return response


@router.post("/logout")
async def logout(request: Request, rt: RuntimeDep, session: SessionDep) -> Response:
    """Sign this browser out; with ``everywhere=1`` in the form, every signed-in browser."""
    form = await request.form()
    _check_csrf(rt, session, form)
    actor = _actor(request, session)
    if form.get("everywhere") == "1":
        await _call(sessions.sign_out_everywhere, rt, actor)
    else:
        await _call(sessions.sign_out, rt, session, actor)
    response = _redirect("/login")
    response.delete_cookie(auth.COOKIE, path="/")
    return response


# -- runs ------------------------------------------------------------------------------------
def _runs_context(rt: Runtime, page: int) -> dict[str, Any]:
    runs = runs_api.list_runs(rt, offset=(page - 1) * PAGE_SIZE, limit=PAGE_SIZE)
    pages = max(1, math.ceil(runs.count / PAGE_SIZE))
    return {
        "runs": runs,
        "page": page,
        "pages": pages,
        "saved_share": views.saved_share,
        "active": any(r.status in views.ACTIVE_RUN for r in runs.data),
        "live_url": f"/runs/live?page={page}",
        "json_url": f"/api/v1/runs?offset={(page - 1) * PAGE_SIZE}&limit={PAGE_SIZE}",
        "interval": LIVE_INTERVAL_MS,
    }


Page = Annotated[int, Query(ge=1, le=MAX_INT)]


@router.get("/audit")
def audit_page(
    request: Request,
    rt: RuntimeDep,
    session: SessionDep,
    page: Page = 1,
    run: Annotated[int | None, Query(ge=1, le=MAX_INT)] = None,
) -> Response:
    """The audit trail, newest first; ``?run=`` for one run's."""
    offset = (page - 1) * PAGE_SIZE
    events = audit_api.list_events(rt, offset=offset, limit=PAGE_SIZE, run_id=run)
    only = f"&run={run}" if run else ""
    context = {
        "events": events,
        "run": run,
        "page": page,
        "pages": max(1, math.ceil(events.count / PAGE_SIZE)),
        "page_url": lambda n: f"/audit?page={n}{only}",
        "json_url": f"/api/v1/audit?offset={offset}&limit={PAGE_SIZE}"
        + (f"&run_id={run}" if run else ""),
    }
    return render(request, "audit.html", context, session=session)


@router.get("/runs")
def runs_page(request: Request, rt: RuntimeDep, session: SessionDep, page: Page = 1) -> Response:
    return render(request, "runs.html", _runs_context(rt, page), session=session)


@router.get("/runs/live")
def runs_live(request: Request, rt: RuntimeDep, session: SessionDep, page: Page = 1) -> Response:
    return render(request, "_runs_table.html", _runs_context(rt, page), session=session)


@router.get("/compare")
def compare_page(
    request: Request,
    rt: RuntimeDep,
    session: SessionDep,
    run: Annotated[list[Annotated[int, Query(ge=1, le=MAX_INT)]], Query()] = [],  # noqa: B006
) -> Response:
    """Several runs' eval loss against round and against MiB moved (``?run=1&run=2``)."""
    ids = list(dict.fromkeys(run))  # in the order given, each once
    if not 2 <= len(ids) <= views.MAX_COMPARED:
        return error_page(
            request,
            422,
            f"Pick 2 to {views.MAX_COMPARED} runs to compare (got {len(ids)}): tick them in "
            "the runs list.",
        )
    compared = [
        (runs_api.get_run(i, rt), runs_api.list_rounds(i, rt).data) for i in ids
    ]  # 404 for an unknown run, as the API
    charts, rows = views.compare(compared)
    context = {
        "charts": charts,
        "rows": rows,
        "json_urls": [f"/api/v1/runs/{i}/rounds" for i in ids],
    }
    return render(request, "compare.html", context, session=session)


# -- launch a run ----------------------------------------------------------------------------
def form_defaults() -> dict[str, Any]:
    """The launch form's initial values: the API's own defaults, so both agree."""
    top = {
        name: f.get_default(call_default_factory=True)
        for name, f in RunCreate.model_fields.items()
        if name not in ("name", "model", "lora", "train", "simulation", "evaluation")
    }
    return {
        **top,
        "name": "",
        "model": "tiny",
        "strategy_config": "{}",
        "lora": LoraSettings().model_dump(),
        "train": TrainSettings().model_dump(),
        "simulation": SimulationSettings().model_dump(),
        "evaluation": EvaluationSettings().model_dump(),
        "simulate": True,
        "evaluate": True,
        "launch": True,
    }


def _text(form: FormData, key: str) -> str:
    value = form.get(key)
    return value.strip() if isinstance(value, str) else ""


def _optional(doc: dict[str, Any], key: str, value: str, *, blank_is_none: bool = False) -> None:
    """Blank fields take the API's default (or ``None`` where blank means "none")."""
    if value:
        doc[key] = value
    elif blank_is_none:
        doc[key] = None


def form_to_document(form: FormData) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """The ``RunCreate`` document a launch form describes, and errors of fields that are not
    even well-formed (the strategy config's JSON). Values stay strings: validation (and its
    messages) is the API's, so the form and ``POST /api/v1/runs`` cannot disagree."""
    errors: dict[str, list[str]] = {}
    doc: dict[str, Any] = {"name": _text(form, "name"), "model": _text(form, "model")}
    for key in ("strategy", "rounds", "quorum", "round_deadline_s", "below_quorum"):
        _optional(doc, key, _text(form, key))
    for key in ("client_timeout_s", "value_dtype", "seed"):
        _optional(doc, key, _text(form, key))
    _optional(doc, "clients_per_round", _text(form, "clients_per_round"), blank_is_none=True)
    raw = _text(form, "strategy_config") or "{}"
    try:
        config = json.loads(raw)
        if not isinstance(config, dict):
            raise ValueError("not an object")
        doc["strategy_config"] = config
    except ValueError as e:
        errors["strategy_config"] = [f'must be a JSON object, e.g. {{"download_drop": 0.8}} ({e})']
    lora: dict[str, Any] = {}
    _optional(lora, "rank", _text(form, "lora.rank"))
    _optional(lora, "alpha", _text(form, "lora.alpha"), blank_is_none=True)
    _optional(lora, "dropout", _text(form, "lora.dropout"))
    targets = _text(form, "lora.target_modules")
    if targets and targets != "all-linear":
        lora["target_modules"] = [t.strip() for t in targets.split(",") if t.strip()]
    doc["lora"] = lora
    train: dict[str, Any] = {}
    for key in ("steps", "batch_size", "grad_accum", "seq_len", "lr", "weight_decay"):
        _optional(train, key, _text(form, f"train.{key}"))
    _optional(train, "max_grad_norm", _text(form, "train.max_grad_norm"), blank_is_none=True)
    doc["train"] = train
    if form.get("simulate"):
        sim: dict[str, Any] = {"domains": [str(d) for d in form.getlist("simulation.domains")]}
        for key in ("clients", "partition", "dirichlet_alpha", "examples_per_client"):
            _optional(sim, key, _text(form, f"simulation.{key}"))
        doc["simulation"] = sim
    if form.get("evaluate"):
        ev: dict[str, Any] = {"domains": [str(d) for d in form.getlist("evaluation.domains")]}
        _optional(ev, "examples", _text(form, "evaluation.examples"))
        doc["evaluation"] = ev
    return doc, errors


#: Where a model-level message goes when its location is the whole document.
_MESSAGE_FIELDS = ("strategy_config", "clients_per_round", "quorum")


def validation_errors(exc: ValidationError) -> dict[str, list[str]]:
    """Pydantic's errors keyed by the form field they belong to (dotted paths)."""
    out: dict[str, list[str]] = {}
    for e in exc.errors():
        loc = [str(p) for p in e["loc"] if not isinstance(p, int)]
        msg = str(e["msg"]).removeprefix("Value error, ")
        key = ".".join(loc)
        if not key:  # the message's subject is its first word: "quorum 3 exceeds ..."
            key = next((f for f in _MESSAGE_FIELDS if msg.startswith(f)), "")
        out.setdefault(key, []).append(msg)
    return out


def _values_from_form(form: FormData) -> dict[str, Any]:
    """The submitted values, shaped like :func:`form_defaults`, to fill the form again."""
    values = form_defaults()
    for key in form:
        if key in ("simulation.domains", "evaluation.domains", auth.CSRF_FIELD):
            continue
        value = _text(form, key)
        if "." in key:
            group, _, name = key.partition(".")
            if isinstance(values.get(group), dict):
                values[group][name] = value
        else:
            values[key] = value
    values["lora"]["target_modules"] = _text(form, "lora.target_modules")
    values["simulation"]["domains"] = form.getlist("simulation.domains")
    values["evaluation"]["domains"] = form.getlist("evaluation.domains")
    for flag in ("simulate", "evaluate", "launch"):
        values[flag] = bool(form.get(flag))
    return values


def _new_run_context(values: dict[str, Any], errors: dict[str, list[str]]) -> dict[str, Any]:
    lora_targets = values["lora"].get("target_modules")
    if isinstance(lora_targets, list):
        values["lora"]["target_modules"] = ", ".join(lora_targets)
    return {
        "values": values,
        "errors": errors,
        "strategies": available_strategies(),
        "domains": DOMAINS,
        "eval_domains": (*DOMAINS, *OOD_DOMAINS),
    }


@router.get("/runs/new")
def new_run_page(request: Request, session: SessionDep) -> Response:
    return render(request, "new_run.html", _new_run_context(form_defaults(), {}), session=session)


@router.post("/runs/new")
async def create_run(request: Request, rt: RuntimeDep, session: SessionDep) -> Response:
    form = await request.form()
    _check_csrf(rt, session, form)
    doc, errors = form_to_document(form)
    body: RunCreate | None = None
    try:
        body = RunCreate.model_validate(doc)
    except ValidationError as e:
        for key, msgs in validation_errors(e).items():
            errors.setdefault(key, []).extend(msgs)
    if body is not None and not errors:
        try:
            launch = bool(form.get("launch"))
            run = await _call(runs_api.create_run, body, rt, _actor(request, session), launch)
            return _redirect(f"/runs/{run.id}")
        except InvalidInput as e:
            detail = e.detail if isinstance(e.detail, dict) else {"message": str(e.detail)}
            errors.setdefault(str(detail.get("field", "")), []).append(str(detail["message"]))
    context = _new_run_context(_values_from_form(form), errors)
    return render(request, "new_run.html", context, status=422, session=session)


# -- one run ---------------------------------------------------------------------------------
def _run_context(rt: Runtime, run_id: int) -> dict[str, Any]:
    # The documents of GET /api/v1/runs/{id}, /rounds and /clients, as the JSON API has them.
    run = runs_api.get_run(run_id, rt)
    rounds = runs_api.list_rounds(run_id, rt)
    clients = runs_api.list_clients(run_id, rt)
    now = utcnow()
    return {
        "run": run,
        "rounds": rounds,
        "clients": views.client_rows(clients.data, run),
        "timeline": views.timeline(rounds.data, now),
        "charts": views.charts(rounds.data),
        "saved_share": views.saved_share(run),
        "has_adapter": any(r.status == "closed" for r in rounds.data),
        "active": views.live(run, rounds.data, now),
        "live_url": f"/runs/{run_id}/live",
        "interval": LIVE_INTERVAL_MS,
        "timeline_limit": views.TIMELINE_ROUNDS,
    }


@router.get("/runs/{run_id}")
def run_page(request: Request, run_id: RunId, rt: RuntimeDep, session: SessionDep) -> Response:
    return render(request, "run.html", _run_context(rt, run_id), session=session)


@router.get("/runs/{run_id}/live")
def run_live(request: Request, run_id: RunId, rt: RuntimeDep, session: SessionDep) -> Response:
    return render(request, "_run_live.html", _run_context(rt, run_id), session=session)


async def _run_action(
    request: Request, rt: Runtime, session: auth.Session, run_id: int, action: Callable[..., Any]
) -> Response:
    _check_csrf(rt, session, await request.form())
    await _call(action, run_id, rt, _actor(request, session))
    return _redirect(f"/runs/{run_id}")


@router.post("/runs/{run_id}/launch")
async def launch(request: Request, run_id: RunId, rt: RuntimeDep, session: SessionDep) -> Response:
    return await _run_action(request, rt, session, run_id, runs_api.launch_run)


@router.post("/runs/{run_id}/cancel")
async def cancel(request: Request, run_id: RunId, rt: RuntimeDep, session: SessionDep) -> Response:
    return await _run_action(request, rt, session, run_id, runs_api.cancel_run)


@router.post("/runs/{run_id}/resume")
async def resume(request: Request, run_id: RunId, rt: RuntimeDep, session: SessionDep) -> Response:
    return await _run_action(request, rt, session, run_id, runs_api.resume_run)


@router.post("/runs/{run_id}/clients")
async def enroll(request: Request, run_id: RunId, rt: RuntimeDep, session: SessionDep) -> Response:
    form = await request.form()
    _check_csrf(rt, session, form)
    name = _text(form, "name")
    try:
        body = ClientCreate(name=name)
    except ValidationError as e:
        context = await _call(_run_context, rt, run_id)
        message = "; ".join(m for msgs in validation_errors(e).values() for m in msgs)
        context.update(enroll_error=message, enroll_name=name)
        return render(request, "run.html", context, status=422, session=session)
    enrolled = await _call(runs_api.enroll_client, run_id, body, rt, _actor(request, session))
    context = await _call(_run_context, rt, run_id)
    context["enrolled"] = _token_card(request, enrolled, f"Client “{enrolled.name}” enrolled")
    return render(request, "run.html", context, status=201, session=session)


def _token_card(request: Request, client: ClientEnrolled, heading: str) -> dict[str, Any]:
    """The card that shows a client's token this once, with the agent command to paste."""
    server = str(request.base_url).rstrip("/")
    return {
        "heading": heading,
        "client": client,
        "command": (
            f"FEDSRD_AGENT_TOKEN='{client.token}' fedsrd-agent --server {server} "
            f"--data PATH/TO/train.jsonl --state-dir fedsrd-agent-{client.name}"
        ),
    }


@router.post("/runs/{run_id}/clients/{client_id}/token")
async def rotate_token(
    request: Request,
    run_id: RunId,
    client_id: Annotated[int, Path(ge=1, le=MAX_INT)],
    rt: RuntimeDep,
    session: SessionDep,
) -> Response:
    _check_csrf(rt, session, await request.form())
    client = await _call(
        runs_api.rotate_client_token, run_id, client_id, rt, _actor(request, session)
    )
    context = await _call(_run_context, rt, run_id)
    context["enrolled"] = _token_card(request, client, f"New token for client “{client.name}”")
    return render(request, "run.html", context, session=session)


@router.post("/runs/{run_id}/clients/{client_id}/revoke")
async def revoke(
    request: Request,
    run_id: RunId,
    client_id: Annotated[int, Path(ge=1, le=MAX_INT)],
    rt: RuntimeDep,
    session: SessionDep,
) -> Response:
    _check_csrf(rt, session, await request.form())
    await _call(runs_api.revoke_client, run_id, client_id, rt, _actor(request, session))
    return _redirect(f"/runs/{run_id}")


# -- wiring ----------------------------------------------------------------------------------
def install(app: FastAPI) -> None:
    """Add the pages, their static files and the sign-in redirect to ``app``."""

    @app.exception_handler(SignInRequiredError)
    async def _sign_in(request: Request, exc: SignInRequiredError) -> Response:
        return _redirect(f"/login?next={quote(exc.next_url, safe='/')}")

    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")


__all__ = ["error_page", "install", "wants_html"]
