"""The dashboard in one process: sessions, CSRF, the launch form against the API's own
validation, pages against the JSON documents they render, and the chart geometry against
a plain reference. (The browser tests are in test_dashboard_browser.py.)"""

from __future__ import annotations

import datetime as dt
import math
import random
import re
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from starlette.datastructures import FormData

from api import auth
from api.models import AdminSession, utcnow
from api.schemas import RoundPublic, RunCreate, SimulationSettings
from api.services import sessions
from tests.api_support import ADMIN, ADMIN_H, Api, FakeAgent, database_url, make_api, small_run
from web import charts, views
from web.pages import _safe_next, form_to_document

HTML = {"Accept": "text/html"}


@pytest.fixture
def api(tmp_path: Path, model_cache: Path):
    with make_api(tmp_path / "data", f"sqlite:///{tmp_path / 'api.db'}", model_cache) as a:
        yield a


def sign_in(api: Api) -> str:
    """Sign the test client in; returns the session's CSRF token (from a page's form)."""
    r = api.client.post("/login", data={"token": ADMIN, "next": "/runs"}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/runs"
    page = api.client.get("/runs/new", headers=HTML)
    return csrf_of(page.text)


def csrf_of(html: str) -> str:
    m = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert m, "no CSRF field on the page"
    return m.group(1)


def run_count(api: Api) -> int:
    return int(api.admin("GET", "/api/v1/runs").json()["count"])


# -- sessions --------------------------------------------------------------------------------
def test_session_cookie_round_trip_and_every_way_it_fails():
    now = 1_800_000_000.0
    value = auth.new_session(now).cookie(ADMIN)
    session = auth.verify(value, ADMIN, ttl_s=3600, now=now + 10)
    assert auth.check_csrf(session, ADMIN, session.csrf_token(ADMIN))
    assert not auth.check_csrf(session, ADMIN, None)
    assert not auth.check_csrf(session, ADMIN, auth.new_session(now).cookie(ADMIN))
    version, issued, nonce, mac = value.split(".")
    cases = {
        "": "not signed in",
        "v1.x.y": "malformed",
        f"v2.{issued}.{nonce}.{mac}": "malformed",
        f"{version}.{int(issued) + 1}.{nonce}.{mac}": "invalid session",  # issue time moved
        f"{version}.{issued}.{nonce}x.{mac}": "invalid session",
        # One character of the MAC changed (never to itself: that would be the same cookie).
        f"{version}.{issued}.{nonce}.{mac[:-1]}{'B' if mac[-1] == 'A' else 'A'}": "invalid session",
    }
    for bad, why in cases.items():
        with pytest.raises(ValueError, match=why):
            auth.verify(bad, ADMIN, ttl_s=3600, now=now + 10)
    with pytest.raises(ValueError, match="expired"):
        auth.verify(value, ADMIN, ttl_s=3600, now=now + 3601)
    # A new admin token signs every browser out, and CSRF tokens change with it.
    with pytest.raises(ValueError, match="invalid session"):
        auth.verify(value, ADMIN + "-rotated", ttl_s=3600, now=now + 10)
    assert session.csrf_token(ADMIN) != session.csrf_token(ADMIN + "-rotated")


@pytest.fixture(params=["sqlite", "postgresql"])
def any_db_api(request: pytest.FixtureRequest, tmp_path: Path, model_cache: Path):
    with make_api(tmp_path / "data", database_url(request, tmp_path), model_cache) as a:
        yield a


def _signed_in(client: Any) -> bool:
    """Whether ``client``'s cookie is a session, asked of a page and of the JSON API."""
    page = client.get("/runs", headers=HTML, follow_redirects=False).status_code
    api_status = client.get("/api/v1/runs").status_code
    assert (page, api_status) in ((200, 200), (303, 401)), (page, api_status)
    return page == 200


def test_signing_out_ends_every_copy_of_the_cookie(any_db_api: Api):
    api = any_db_api
    csrf = sign_in(api)
    copy = api.client.cookies[auth.COOKIE]  # what a stolen or backed-up cookie would be
    assert _signed_in(api.client)
    r = api.client.post("/logout", data={"csrf_token": csrf}, follow_redirects=False)
    assert r.status_code == 303 and auth.COOKIE not in api.client.cookies
    api.client.cookies.set(auth.COOKIE, copy)
    assert not _signed_in(api.client)
    r = api.client.post("/api/v1/runs", json=small_run(), headers={"X-CSRF-Token": csrf})
    assert r.status_code == 401 and run_count(api) == 0
    # Signing in again gives a new session; the old cookie stays dead.
    api.client.cookies.clear()
    sign_in(api)
    assert _signed_in(api.client)
    with TestClient(api.client.app) as other:
        other.cookies.set(auth.COOKIE, copy)
        assert not _signed_in(other)


def test_a_correctly_signed_cookie_without_its_session_is_refused(api: Api):
    # What a cookie issued before sessions were stored, or minted by anyone who knows the
    # admin token without signing in, looks like: the MAC verifies, no row names it.
    api.client.cookies.set(auth.COOKIE, auth.new_session().cookie(ADMIN))
    assert not _signed_in(api.client)


def test_sign_out_everywhere_from_a_page_and_from_the_api(any_db_api: Api):
    api = any_db_api
    with TestClient(api.client.app) as laptop, TestClient(api.client.app) as desktop:
        for browser in (laptop, desktop):
            r = browser.post("/login", data={"token": ADMIN}, follow_redirects=False)
            assert r.status_code == 303
        csrf = csrf_of(desktop.get("/runs", headers=HTML).text)
        assert _signed_in(laptop) and _signed_in(desktop)
        r = desktop.post(
            "/logout", data={"csrf_token": csrf, "everywhere": "1"}, follow_redirects=False
        )
        assert r.status_code == 303 and r.headers["location"] == "/login"
        assert not _signed_in(laptop) and not _signed_in(desktop)

        for browser in (laptop, desktop):
            browser.cookies.clear()
            browser.post("/login", data={"token": ADMIN}, follow_redirects=False)
        # The JSON API: the admin token (or a session with its CSRF token) ends them all.
        assert api.client.delete("/api/v1/sessions").status_code == 401
        r = api.admin("DELETE", "/api/v1/sessions")
        assert r.status_code == 200 and r.json() == {"signed_out": 2}
        assert not _signed_in(laptop) and not _signed_in(desktop)
        assert api.admin("GET", "/api/v1/runs").status_code == 200  # the token still works

        laptop.cookies.clear()
        laptop.post("/login", data={"token": ADMIN}, follow_redirects=False)
        assert laptop.delete("/api/v1/sessions").status_code == 403  # no CSRF token
        csrf = csrf_of(laptop.get("/runs", headers=HTML).text)
        r = laptop.delete("/api/v1/sessions", headers={"X-CSRF-Token": csrf})
        assert r.status_code == 200 and r.json() == {"signed_out": 1}
        assert not _signed_in(laptop)


def test_sessions_expire_and_expired_rows_are_pruned_at_sign_in(api: Api):
    ttl = api.settings.session_ttl_s
    long_ago = utcnow() - dt.timedelta(seconds=ttl + 5)
    stale = [sessions.sign_in(api.rt, "127.0.0.1", now=long_ago) for _ in range(3)]
    for value in stale:
        # Its MAC is fine; both its signed age and its row say it is over.
        session = auth.verify(value, ADMIN, ttl_s=10 * ttl)
        assert not sessions.is_open(api.rt, session)
    fresh = auth.verify(sessions.sign_in(api.rt, "127.0.0.1"), ADMIN, ttl_s=ttl)
    assert sessions.is_open(api.rt, fresh)
    with api.rt.sessions() as s:
        keys = s.scalars(select(AdminSession.key)).all()
    assert keys == [fresh.key]  # the three expired rows went with the sign-in
    assert fresh.nonce not in keys[0]  # the table holds a hash, not the nonce


def test_dashboard_actions_are_audited_as_their_session(api: Api):
    run_id = api.create_run()["id"]
    r = api.client.post("/login", data={"token": "wrong"})
    assert r.status_code == 401  # refused: logged, but no row (anyone can send these)
    csrf = sign_in(api)
    r = api.client.post(f"/runs/{run_id}/launch", data={"csrf_token": csrf}, headers=HTML)
    assert r.status_code == 200 and api.run(run_id)["status"] == "running"
    api.client.post("/logout", data={"csrf_token": csrf, "everywhere": "1"})
    events = api.admin("GET", "/api/v1/audit").json()["data"]
    assert [e["action"] for e in events] == [
        "sign_out_everywhere", "launch_run", "sign_in", "create_run",
    ]  # fmt: skip
    who = events[0]["actor"]
    assert re.fullmatch(r"session:[0-9a-f]{12}", who)
    assert [e["actor"] for e in events] == [who, who, who, "admin-token"]
    assert events[0]["detail"] == {"sessions": 1}
    assert {e["address"] for e in events} == {"testclient"}


def test_the_audit_trail_page_shows_what_the_api_serves(api: Api):
    run_id = api.create_run()["id"]
    other = api.create_run(name="other")["id"]
    sign_in(api)
    document = api.admin("GET", "/api/v1/audit").json()
    page = api.client.get("/audit", headers=HTML).text
    ids = [int(i) for i in re.findall(r'<tr data-event="(\d+)">', page)]
    assert ids == [e["id"] for e in document["data"]] and len(ids) == 3  # 2 creates, sign-in
    assert '<a href="/api/v1/audit?offset=0&amp;limit=20">' in page
    one = api.client.get(f"/audit?run={run_id}", headers=HTML).text
    rows = re.findall(r'<tr data-event="(\d+)">.*?</tr>', one, flags=re.S)
    assert len(rows) == 1 and f'<a href="/runs/{run_id}">run {run_id}</a>' in one
    assert "create_run" in one and "name: other" not in one
    assert f'href="/audit?run={other}"' in api.client.get(f"/runs/{other}", headers=HTML).text
    r = api.client.get("/audit?run=0", headers=HTML)
    assert r.status_code == 404 and "bad run" in r.text


def test_next_only_redirects_within_the_server():
    assert _safe_next("/runs/3?x=1") == "/runs/3?x=1"
    for bad in (None, "", "runs", "//evil.example/x", "https://evil.example/", "/\\evil.example"):
        assert _safe_next(bad) == "/runs"


def test_pages_need_a_session_and_sign_in_sets_a_safe_cookie(api: Api):
    for path in ("/runs", "/runs/new", "/runs/1", "/runs/1/live", "/runs/live?page=2", "/audit"):
        r = api.client.get(path, headers=HTML, follow_redirects=False)
        assert r.status_code == 303, path
        section = "/audit" if path.startswith("/audit") else "/runs"
        assert r.headers["location"].startswith(f"/login?next={section}"), path
    r = api.client.post("/runs/new", data={"name": "x"}, follow_redirects=False)
    assert r.status_code == 303 and run_count(api) == 0

    r = api.client.post("/login", data={"token": "wrong", "next": "/runs"})
    assert r.status_code == 401 and "That is not the admin token." in r.text
    assert "set-cookie" not in r.headers
    r = api.client.post(
        "/login", data={"token": ADMIN, "next": "//evil.example"}, follow_redirects=False
    )
    assert r.headers["location"] == "/runs"
    cookie = r.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=lax" in cookie and "max-age=43200" in cookie
    assert api.client.get("/runs", headers=HTML).status_code == 200

    csrf = csrf_of(api.client.get("/runs", headers=HTML).text)
    r = api.client.post("/logout", data={"csrf_token": csrf}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/login"
    assert api.client.get("/runs", headers=HTML, follow_redirects=False).status_code == 303


def test_cookie_requests_that_change_state_need_the_csrf_token(api: Api):
    run_id = api.create_run(launch=True)["id"]
    csrf = sign_in(api)
    # Pages: a form without the token is refused and changes nothing.
    r = api.client.post(f"/runs/{run_id}/cancel", data={}, headers=HTML)
    assert r.status_code == 403 and "CSRF" in r.text
    r = api.client.post("/runs/new", data={"name": "x", "model": "tiny"}, headers=HTML)
    assert r.status_code == 403 and run_count(api) == 1
    # The JSON API with the cookie: reads work, writes need X-CSRF-Token.
    assert api.client.get(f"/api/v1/runs/{run_id}").status_code == 200
    r = api.client.post(f"/api/v1/runs/{run_id}/cancel")
    assert r.status_code == 403 and r.json()["error"] == "forbidden"
    assert api.run(run_id)["status"] == "running"
    r = api.client.post(f"/api/v1/runs/{run_id}/cancel", headers={"X-CSRF-Token": csrf})
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    # A forged cookie is no session at all.
    api.client.cookies.clear()
    api.client.cookies.set(auth.COOKIE, "v1.1.abc.def")
    assert api.client.get("/api/v1/runs").status_code == 401


# -- the launch form -------------------------------------------------------------------------
def _form(**fields: Any) -> FormData:
    items: list[tuple[str, str]] = []
    for k, v in fields.items():
        for one in v if isinstance(v, list) else [v]:
            items.append((k.replace("__", "."), str(one)))
    return FormData(items)


def test_the_form_and_the_api_build_the_same_document():
    form = _form(
        name="f",
        model="tiny",
        strategy="fedsrd-e",
        strategy_config='{"download_drop": 0.5}',
        rounds="4",
        clients_per_round="",
        quorum="2",
        lora__rank="4",
        lora__alpha="",
        lora__target_modules="q_proj, v_proj",
        train__steps="3",
        train__max_grad_norm="",
        simulate="1",
        simulation__clients="2",
        simulation__domains=["arithmetic", "code"],
        simulation__examples_per_client="8",
    )
    doc, errors = form_to_document(form)
    assert errors == {}
    expected = RunCreate.model_validate(
        {
            "name": "f",
            "model": "tiny",
            "strategy": "fedsrd-e",
            "strategy_config": {"download_drop": 0.5},
            "rounds": 4,
            "clients_per_round": None,
            "quorum": 2,
            "lora": {"rank": 4, "alpha": None, "target_modules": ["q_proj", "v_proj"]},
            "train": {"steps": 3, "max_grad_norm": None},
            "simulation": {
                "clients": 2,
                "domains": ["arithmetic", "code"],
                "examples_per_client": 8,
            },
        }
    )
    assert RunCreate.model_validate(doc) == expected
    assert expected.evaluation is None  # unticked: no evaluation


def test_the_api_defaults_are_a_valid_form():
    SimulationSettings()  # one client per domain by default
    doc, errors = form_to_document(_form(name="d", model="tiny", simulate="1"))
    assert errors == {} and doc["simulation"]["domains"] == []


def _errors(html: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for field, msg in re.findall(r'data-field="([^"]*)">([^<]+)<', html):
        out.setdefault(field, []).append(msg)
    return out


def _valid_form(csrf: str) -> dict[str, Any]:
    """A launch form the API accepts: two simulated clients, two cheap rounds."""
    return {
        "csrf_token": csrf,
        "name": "from-form",
        "model": "tiny",
        "rounds": "2",
        "lora.rank": "4",
        "train.steps": "1",
        "train.batch_size": "2",
        "simulate": "1",
        "simulation.clients": "2",
        "simulation.domains": ["arithmetic", "code"],
        "simulation.examples_per_client": "4",
    }


@pytest.mark.parametrize(
    ("fields", "field", "message"),
    [
        ({"name": ""}, "name", "at least 1 character"),
        ({"rounds": "0"}, "rounds", "greater than or equal to 1"),
        ({"rounds": "many"}, "rounds", "valid integer"),
        ({"strategy_config": "{nope"}, "strategy_config", "must be a JSON object"),
        ({"strategy_config": '{"download_drop": 2}'}, "strategy_config", "download_drop"),
        ({"strategy": "fedsgd"}, "strategy", "unknown strategy"),
        ({"lora.rank": "0"}, "lora.rank", "greater than or equal to 1"),
        ({"train.lr": "-1"}, "train.lr", "greater than 0"),
        ({"simulation.clients": "3"}, "simulation", "one domain per client"),
        ({"clients_per_round": "1", "quorum": "2"}, "quorum", "exceeds clients_per_round"),
        ({"model": "/no/such/model"}, "model", "cannot load"),
    ],
)
def test_bad_fields_are_named_next_to_the_field_and_nothing_is_stored(
    api: Api, fields: dict[str, str], field: str, message: str
):
    data = {**_valid_form(sign_in(api)), "name": "bad", **fields}
    r = api.client.post("/runs/new", data=data, headers=HTML)
    assert r.status_code == 422, r.text[:300]
    errors = _errors(r.text)
    assert field in errors and any(message in m for m in errors[field]), errors
    assert 'class="field invalid"' in r.text or field in ("simulation",)
    assert run_count(api) == 0
    # The submitted values come back in the form, not the defaults.
    if "name" in fields:
        assert 'name="name" type="text" value=""' in r.text


def test_a_valid_form_creates_and_launches_the_run(api: Api):
    data = {**_valid_form(sign_in(api)), "launch": "1"}
    r = api.client.post("/runs/new", data=data, headers=HTML, follow_redirects=False)
    assert r.status_code == 303
    run_id = int(r.headers["location"].rsplit("/", 1)[1])
    run = api.run(run_id)
    assert run["name"] == "from-form" and run["status"] in ("running", "completed")
    assert run["config"]["simulation"]["domains"] == ["arithmetic", "code"]


# -- pages render the JSON documents ---------------------------------------------------------
def test_run_page_shows_what_the_json_api_says(api: Api):
    created = api.create_run(rounds=2)
    agents = []
    for i in range(2):
        _, token = api.enroll(created["id"], f"site-{i}")
        agents.append(FakeAgent(api.agent(created["id"], token), seed=i))
    api.admin("POST", f"/api/v1/runs/{created['id']}/launch")
    for _ in range(2):
        for a in agents:
            a.play_round()
    run = api.run(created["id"])
    assert run["status"] == "completed"
    sign_in(api)
    r = api.client.get(f"/runs/{created['id']}", headers=HTML)
    assert r.status_code == 200
    html = r.text
    for key in ("bytes_up", "bytes_down", "fedavg_equivalent_bytes"):
        assert views.mib(run[key]) in html, key
    share = 100 * run["bytes_saved"] / run["fedavg_equivalent_bytes"]
    assert f"{views.mib(run['bytes_saved'])} ({share:.1f}%)" in html
    assert html.count('<tr data-round="') == 2
    # Why each round closed, as the rounds JSON says (both here: every client uploaded).
    assert html.count('<td class="reason">all expected clients uploaded</td>') == 2
    assert html.count('<tr data-client="') == 2
    assert 'data-live-active="false"' in html  # completed, no evaluation pending
    assert f'href="/api/v1/runs/{created["id"]}/adapter"' in html
    # Traffic chart: one point per round per series; the FedAvg line is the JSON's fedavg.
    rounds = api.rounds(created["id"])
    assert html.count('class="line s1" data-series="up"') == 1
    fedavg = [r["traffic"]["fedavg"] / views.MIB for r in rounds]
    drawn = views.charts([RoundPublic.model_validate(r) for r in rounds])[1]
    assert [m[3] for m in drawn.series[2].markers] == fedavg

    runs_page = api.client.get("/runs", headers=HTML).text
    assert f'<tr data-run="{created["id"]}">' in runs_page
    assert views.mib(run["bytes_up"] + run["bytes_down"]) in runs_page


def test_enrolment_shows_the_token_once_with_the_agent_command(api: Api):
    run_id = api.create_run()["id"]
    csrf = sign_in(api)
    r = api.client.post(
        f"/runs/{run_id}/clients", data={"csrf_token": csrf, "name": "bank-7"}, headers=HTML
    )
    assert r.status_code == 201 and r.headers["cache-control"] == "no-store"
    token = re.search(r'<code id="enrolled-token">([^<]+)</code>', r.text).group(1)
    assert f"FEDSRD_AGENT_TOKEN=&#39;{token}&#39; fedsrd-agent --server http://testserver" in r.text
    me = api.client.get("/api/v1/agent/me", headers={"Authorization": f"Bearer {token}"})
    assert me.json()["name"] == "bank-7"
    assert token not in api.client.get(f"/runs/{run_id}", headers=HTML).text
    r = api.client.post(
        f"/runs/{run_id}/clients", data={"csrf_token": csrf, "name": "a b"}, headers=HTML
    )
    assert r.status_code == 422 and "should match pattern" in r.text
    r = api.client.post(
        f"/runs/{run_id}/clients", data={"csrf_token": csrf, "name": "bank-7"}, headers=HTML
    )
    assert r.status_code == 409 and "<h1>Conflict</h1>" in r.text


def test_error_pages_for_browsers_json_for_the_api(api: Api):
    sign_in(api)
    r = api.client.get("/runs/999", headers=HTML)
    assert r.status_code == 404 and r.headers["content-type"].startswith("text/html")
    assert "run 999 not found" in r.text
    r = api.client.get("/runs/abc", headers=HTML)
    assert r.status_code == 404 and "no such page" in r.text
    r = api.client.get("/nowhere", headers=HTML)
    assert r.status_code == 404 and r.headers["content-type"].startswith("text/html")
    r = api.client.get("/api/v1/runs/999", headers=HTML)
    assert r.status_code == 404 and r.json()["error"] == "not_found"
    r = api.client.post(
        "/runs/999/launch", data={"csrf_token": csrf_of(api.client.get("/runs", headers=HTML).text)}
    )
    assert r.status_code == 404 and "run 999 not found" in r.text


def test_every_page_forbids_other_hosts(api: Api):
    run_id = api.create_run()["id"]
    sign_in(api)
    for path in (
        "/login",
        "/runs",
        "/runs/new",
        f"/runs/{run_id}",
        f"/runs/{run_id}/live",
        "/runs/9",
    ):
        r = api.client.get(path, headers=HTML)
        csp = r.headers["content-security-policy"]
        assert "default-src 'self'" in csp and "script-src 'self'" in csp, path
        assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
        assert r.headers["x-frame-options"] == "DENY"
        # No absolute URL in any attribute that loads or links something.
        assert not re.search(r'(src|href|action)="(https?:)?//', r.text), path
    static = api.client.get("/static/app.js")
    assert static.status_code == 200 and "fetch(" in static.text


def test_runs_are_paginated(api: Api):
    for i in range(23):
        api.create_run(name=f"r{i}")
    sign_in(api)
    first = api.client.get("/runs", headers=HTML).text
    assert first.count("<tr data-run=") == 20 and "Page 1 of 2" in first
    second = api.client.get("/runs?page=2", headers=HTML).text
    assert second.count("<tr data-run=") == 3 and 'rel="prev"' in second
    assert api.client.get("/runs?page=0", headers=HTML).status_code == 404


# -- charts and views ------------------------------------------------------------------------
def _reference_pixel(x, y, x0, x1, y0, y1, plot):
    left, top, right, bottom = plot
    return (
        left + (x - x0) / (x1 - x0) * (right - left),
        bottom - (y - y0) / (y1 - y0) * (bottom - top),
    )


@pytest.mark.parametrize("seed", range(20))
def test_chart_points_against_the_plain_linear_map(seed: int):
    rng = random.Random(seed)
    n = rng.randint(1, 30)
    scale = 10 ** rng.uniform(-4, 6)
    series = [
        charts.Series(f"s{k}", [(float(i + 1), rng.uniform(-0.2, 1.0) * scale) for i in range(n)])
        for k in range(rng.randint(1, 3))
    ]
    zero = rng.random() < 0.5
    c = charts.chart("t", series, zero=zero)
    ys = [y for s in series for _, y in s.points]
    y0, y1 = float(c.y_ticks[0].label), float(c.y_ticks[-1].label)
    # The axis covers every value (from zero when asked) and ends on ticks.
    assert min(ys) >= y0 - 1e-9 * scale and max(ys) <= y1 + 1e-9 * scale
    if zero:
        assert y0 <= 0 <= y1
    x0, x1 = (0.0, 2.0) if n == 1 else (1.0, float(n))
    for s, drawn in zip(series, c.series, strict=True):
        assert len(drawn.markers) == n and len(drawn.paths) == 1
        for (x, y), (px, py, mx, my) in zip(s.points, drawn.markers, strict=True):
            # Tick labels are rounded to 3-4 digits: compare in the plot's own units.
            rx, ry = _reference_pixel(x, y, x0, x1, *_axis(c), c.plot)
            assert (mx, my) == (x, y)
            assert math.isclose(px, rx, abs_tol=0.01)
            assert math.isclose(py, ry, abs_tol=0.6)


def _axis(c: charts.Chart) -> tuple[float, float]:
    # The y range from the tick positions: the first and last tick sit on the axis ends.
    left, top, right, bottom = c.plot
    first, last = c.y_ticks[0], c.y_ticks[-1]
    assert math.isclose(first.pos, bottom, abs_tol=0.01) and math.isclose(
        last.pos, top, abs_tol=0.01
    )
    step = (float(c.y_ticks[1].label) - float(first.label)) if len(c.y_ticks) > 1 else 1.0
    lo = float(first.label)
    return lo, lo + step * (len(c.y_ticks) - 1)


def test_chart_gaps_bars_and_empty():
    c = charts.chart("t", [charts.Series("a", [(1, 1.0), (2, None), (3, 2.0), (4, 3.0)])])
    assert len(c.series[0].paths) == 2 and len(c.series[0].markers) == 3
    c = charts.chart("t", [charts.Series("a", [(1, math.nan)])])
    assert c.empty
    assert charts.chart("t", []).empty
    b = charts.chart("t", [charts.Series("p", [(1, 2.0), (2, 3.0), (3, 1.0)])], bars=True)
    bars = b.series[0].bars
    assert len(bars) == 3 and not b.series[0].paths
    heights = [h for _, _, _, h in bars]
    assert heights[1] > heights[0] > heights[2] > 0
    assert all(b.plot[0] <= x and x + w <= b.plot[2] for x, _, w, _ in bars)


def test_nice_step_is_one_two_five():
    for span in (0.003, 0.7, 1, 9, 13, 250, 7e6):
        step = charts.nice_step(span)
        mantissa = step / 10 ** math.floor(math.log10(step))
        assert round(mantissa, 9) in (1, 2, 5, 10)
        # The smallest such step at least span/4: between 1.6 and 4 intervals (2 -> 5 is
        # the widest jump of the 1-2-5 ladder).
        assert 1.6 - 1e-9 <= span / step <= 4 + 1e-9


def _round(
    n: int,
    status: str,
    opened: dt.datetime,
    collected: float | None,
    closed: float | None,
    **kw: Any,
) -> RoundPublic:
    return RoundPublic(
        number=n,
        status=status,
        expected=[1, 2],
        uploaded=[1, 2] if collected is not None else [1],
        opened_at=opened,
        deadline_at=opened + dt.timedelta(hours=1),
        collected_at=None if collected is None else opened + dt.timedelta(seconds=collected),
        closed_at=None if closed is None else opened + dt.timedelta(seconds=closed),
        digest=None,
        delta_size=None,
        snapshot_size=None,
        snapshot_kept=closed is not None,
        metrics=kw.get("metrics", {}),
        traffic=None,
        attempts=0,
        error=None,
    )


def test_timeline_durations_and_bars():
    t0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    now = t0 + dt.timedelta(seconds=100)
    rows = views.timeline(
        [
            _round(1, "closed", t0, 30.0, 40.0),
            _round(2, "aggregating", t0 + dt.timedelta(seconds=40), 20.0, None),
            _round(3, "open", t0 + dt.timedelta(seconds=70), None, None),
        ],
        now,
    )
    assert [r.number for r in rows] == [3, 2, 1]
    assert [r.collecting_s for r in rows] == [30.0, 20.0, 30.0]
    assert [r.aggregating_s for r in rows] == [None, 40.0, 10.0]
    assert rows[1].bar == (20.0 / 60.0, 40.0 / 60.0)  # the longest round fills the bar
    assert rows[0].participants == 1 and rows[0].expected == 2


def test_completed_run_stays_live_until_its_evaluations_arrive(api: Api):
    created = api.create_run(
        **small_run(
            rounds=1,
            simulation={"clients": 2, "domains": ["arithmetic", "code"], "examples_per_client": 4},
            evaluation={"domains": ["arithmetic"], "examples": 2},
        ),
        launch=True,
    )
    from api.schemas import RunPublic

    run = RunPublic.model_validate(api.run(created["id"]))
    rounds = [RoundPublic.model_validate(r) for r in api.rounds(created["id"])]
    assert run.status == "completed" and "eval" in rounds[0].metrics
    now = run.finished_at + dt.timedelta(seconds=1)
    assert not views.live(run, rounds, now)
    pending = [r.model_copy(update={"metrics": {}}) for r in rounds]
    assert views.live(run, pending, now)
    assert not views.live(run, pending, run.finished_at + views.EVAL_GRACE)
    assert views.live(run.model_copy(update={"status": "running"}), rounds, now)


def test_admin_bearer_token_still_works_without_csrf(api: Api):
    run_id = api.create_run()["id"]
    r = api.client.post(f"/api/v1/runs/{run_id}/cancel", headers=ADMIN_H)
    assert r.status_code == 200


# -- log scale, base model at round 0, comparison ---------------------------------------------
@pytest.mark.parametrize("seed", range(20))
def test_log_chart_points_against_the_plain_log_map(seed: int):
    rng = random.Random(seed)
    n = rng.randint(1, 30)
    series = [
        charts.Series(
            f"s{k}",
            [
                (float(i + 1), 10 ** rng.uniform(-3, 3) * rng.choice([1, 1, 1, 0, -1]))
                for i in range(n)
            ],
        )
        for k in range(rng.randint(1, 3))
    ]
    c = charts.chart("t", series, log_y=True)
    positive = [y for s in series for _, y in s.points if y > 0]
    if not positive:
        assert c.empty
        return
    lo, hi = float(c.y_ticks[0].label), float(c.y_ticks[-1].label)
    assert lo <= min(positive) * (1 + 1e-9) and max(positive) <= hi * (1 + 1e-9)
    left, top, right, bottom = c.plot
    assert math.isclose(c.y_ticks[0].pos, bottom, abs_tol=0.01)
    assert math.isclose(c.y_ticks[-1].pos, top, abs_tol=0.01)
    for s, drawn in zip(series, c.series, strict=True):
        kept = [(x, y) for x, y in s.points if y > 0]  # log scale: the rest is not drawn
        assert [(mx, my) for _, _, mx, my in drawn.markers] == kept
        for (_, y), (_, py, _, _) in zip(kept, drawn.markers, strict=True):
            ry = bottom - (math.log10(y) - math.log10(lo)) / math.log10(hi / lo) * (bottom - top)
            assert math.isclose(py, ry, abs_tol=0.6)  # tick labels keep 3-4 digits


def test_non_integer_x_axis_gets_fractional_ticks():
    c = charts.chart(
        "t", [charts.Series("a", [(0.0, 1.0), (0.35, 2.0)])], integer_x=False, x_label="MiB"
    )
    assert c.x_label == "MiB" and len(c.x_ticks) >= 3
    assert float(c.x_ticks[1].label) < 0.35


def _evaluated(n: int, losses: dict[str, float], **kw: Any) -> RoundPublic:
    t0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    metrics: dict[str, Any] = {"eval": {k: {"loss": v} for k, v in losses.items()}}
    if "base" in kw:
        metrics["base_eval"] = {k: {"loss": v} for k, v in kw.pop("base").items()}
    r = _round(n, "closed", t0, 1.0, 2.0, metrics=metrics)
    return r.model_copy(update={"traffic": kw.get("traffic", {"up": 0, "down": 0, "fedavg": 0})})


def test_eval_curves_start_at_the_base_model_and_compare_by_mib():
    base = {"arithmetic": 3.0, "code": 4.0}
    rounds = [
        _evaluated(
            1,
            {"arithmetic": 2.5, "code": 3.5},
            base=base,
            traffic={"up": 3 << 20, "down": 1 << 20, "fedavg": 0},
        ),
        _evaluated(
            2,
            {"arithmetic": 2.0, "code": math.nan},
            traffic={"up": 2 << 20, "down": 2 << 20, "fedavg": 0},
        ),
    ]
    assert views.eval_curve(rounds) == [(0.0, 3.5), (1.0, 3.0), (2.0, 2.0)]  # NaN left out
    assert views.final_eval(rounds) == 2.0
    per_set = views.charts(rounds)[-1]
    assert per_set.title.startswith("Eval loss per held-out set")
    assert [[(m[2], m[3]) for m in s.markers] for s in per_set.series] == [
        [(0.0, 3.0), (1.0, 2.5), (2.0, 2.0)],
        [(0.0, 4.0), (1.0, 3.5)],
    ]
    from api.schemas import RunPublic

    run = RunPublic.model_validate(
        {
            "id": 7, "name": "r", "status": "completed", "status_reason": None,
            "base_model": "tiny", "model_fingerprint": "f", "strategy": "fedsrd",
            "total_rounds": 2, "current_round": 2, "lora_parameters": 1, "clients": 2,
            "bytes_up": 0, "bytes_down": 0, "fedavg_equivalent_bytes": 0, "bytes_saved": 0,
            "created_at": dt.datetime(2026, 1, 1, tzinfo=dt.UTC), "started_at": None,
            "finished_at": None, "config": {},
        }
    )  # fmt: skip
    (by_round, by_mib), rows = views.compare([(run, rounds), (run, rounds[:1])])
    assert [(m[2], m[3]) for m in by_mib.series[0].markers] == [(0.0, 3.5), (4.0, 3.0), (8.0, 2.0)]
    assert [(m[2], m[3]) for m in by_round.series[1].markers] == [(0.0, 3.5), (1.0, 3.0)]
    assert [r.mib for r in rows] == [8.0, 4.0] and rows[0].css != rows[1].css
    assert by_mib.x_label.startswith("MiB")


def test_base_eval_final_eval_compare_page_and_finished_run_pages(api: Api):
    body = small_run(
        rounds=2,
        simulation={"clients": 2, "domains": ["arithmetic", "code"], "examples_per_client": 4},
        evaluation={"domains": ["arithmetic", "code"], "examples": 2},
    )
    ids = [
        api.create_run(**{**body, "strategy": s}, launch=True)["id"] for s in ("fedavg", "fedsrd")
    ]
    docs = []
    for i in ids:
        rounds = api.rounds(i)
        run = api.run(i)
        assert run["status"] == "completed"
        # Round 1 carries the base model's evaluation (the launch state, B = 0): the same
        # model and held-out sets for both runs, so the same numbers, whatever the strategy.
        base = rounds[0]["metrics"]["base_eval"]
        assert set(base) == {"arithmetic", "code"}
        assert "base_eval" not in rounds[1]["metrics"]
        last = rounds[-1]["metrics"]["eval"]
        assert run["final_eval_loss"] == pytest.approx(sum(v["loss"] for v in last.values()) / 2)
        docs.append((run, rounds, base))
    assert docs[0][2] == docs[1][2]
    assert docs[0][1][0]["metrics"]["eval"] != docs[0][2]  # round 1 changed the model
    listed = {r["id"]: r for r in api.admin("GET", "/api/v1/runs").json()["data"]}
    assert [listed[i]["final_eval_loss"] for i in ids] == [d[0]["final_eval_loss"] for d in docs]

    sign_in(api)
    runs_page = api.client.get("/runs", headers=HTML).text
    for run, _, _ in docs:
        assert f"{run['final_eval_loss']:.4f}" in runs_page
        assert f'name="run" value="{run["id"]}" form="compare-form"' in runs_page
    r = api.client.get(f"/compare?run={ids[0]}&run={ids[1]}", headers=HTML)
    assert r.status_code == 200
    assert r.text.count("<tr data-run=") == 2 and 'id="compare-2"' in r.text
    assert f"{docs[0][0]['final_eval_loss']:.4f}" in r.text
    assert api.client.get(f"/compare?run={ids[0]}", headers=HTML).status_code == 422
    assert api.client.get(f"/compare?run={ids[0]}&run={ids[0]}", headers=HTML).status_code == 422
    assert api.client.get(f"/compare?run={ids[0]}&run=99999", headers=HTML).status_code == 404
    # A finished run offers no enrolment and no revocation; a created one does.
    page = api.client.get(f"/runs/{ids[0]}", headers=HTML).text
    assert 'id="enroll"' not in page and "/revoke" not in page
    assert "Eval loss per held-out set" in page
    fresh = api.create_run()["id"]
    api.enroll(fresh, "site-a")
    page = api.client.get(f"/runs/{fresh}", headers=HTML).text
    assert 'id="enroll"' in page and "/revoke" in page
