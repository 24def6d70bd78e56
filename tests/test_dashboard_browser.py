"""The dashboard in a real headless Chromium (Debian's /usr/bin/chromium, driven by Playwright)
against real uvicorn and Celery worker processes on the embedded default.

Every test records each request the browser makes and checks that all of them went to the
server itself; every page visited is screenshotted at 1280 px and at phone width (390 px),
where it must not scroll sideways. Screenshots land in ``artifacts/dashboard/`` (or
``$FEDSRD_ARTIFACTS_DIR``)."""

from __future__ import annotations

import os
import re
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import expect

from tests.api_support import ADMIN
from tests.e2e_support import System, system

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
# As root, without the sandbox; and without Chromium's own traffic to Google's hosts.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--no-first-run",
]
DESKTOP = {"width": 1280, "height": 860}
PHONE = {"width": 390, "height": 844}
ARTIFACTS = (
    Path(os.environ.get("FEDSRD_ARTIFACTS_DIR", Path(__file__).resolve().parents[1] / "artifacts"))
    / "dashboard"
)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    expect.set_options(timeout=20_000)
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: `make browser` installs Debian's chromium")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Iterator[System]:
    with system(tmp_path_factory.mktemp("dash"), "", "filesystem://", model_cache) as s:
        s.start_worker()
        yield s


class Tab:
    """A browser tab on the system: it remembers every host it sent a request to."""

    def __init__(self, browser: Any, base: str) -> None:
        self.base = base
        self.context = browser.new_context(viewport=DESKTOP, accept_downloads=True)
        self.context.set_default_timeout(20_000)
        self.hosts: set[str] = set()
        self.context.on("request", lambda req: self.hosts.add(urlsplit(req.url).netloc))
        self.page = self.context.new_page()
        self.page.on("dialog", lambda d: d.accept())

    def goto(self, path: str) -> Any:
        response = self.page.goto(self.base + path)
        assert response is not None
        return response

    def sign_in(self) -> None:
        self.goto("/login")
        self.page.fill("#token", ADMIN)
        self.page.click("#login button[type=submit]")
        self.page.wait_for_url(re.compile(r".*/runs$"))

    def shots(self, name: str) -> None:
        """Screenshots at desktop and phone width; at phone width the page must fit."""
        self.page.screenshot(path=ARTIFACTS / f"{name}-1280.png", full_page=True)
        self.page.set_viewport_size(PHONE)
        overflow = self.page.evaluate(
            "document.documentElement.scrollWidth - document.documentElement.clientWidth"
        )
        self.page.screenshot(path=ARTIFACTS / f"{name}-390.png", full_page=True)
        self.page.set_viewport_size(DESKTOP)
        assert overflow <= 1, f"{name}: the page scrolls sideways at 390 px ({overflow} px)"

    def close(self) -> None:
        own = urlsplit(self.base).netloc
        self.context.close()
        assert self.hosts, "no request recorded"
        assert self.hosts == {own}, f"requests to other hosts: {self.hosts - {own}}"


@pytest.fixture
def tab(browser: Any, stack: System) -> Iterator[Tab]:
    t = Tab(browser, stack.url)
    yield t
    t.close()


def _csp_ok(response: Any) -> None:
    csp = response.headers.get("content-security-policy", "")
    assert "default-src 'self'" in csp and "script-src 'self'" in csp


def test_sign_in_empty_state_error_pages_and_sign_out(
    browser: Any, tmp_path: Path, model_cache: Path
) -> None:
    # A system of its own, so the run list is really empty.
    with system(tmp_path, "", "filesystem://", model_cache) as s:
        t = Tab(browser, s.url)
        response = t.goto("/runs")
        assert urlsplit(t.page.url).path == "/login"  # nothing visible without signing in
        _csp_ok(response)
        t.shots("login")
        t.page.fill("#token", "not-the-token")
        t.page.click("#login button[type=submit]")
        assert t.page.locator("#token-error").inner_text() == "That is not the admin token."
        t.shots("login-error")
        t.page.fill("#token", ADMIN)
        t.page.click("#login button[type=submit]")
        t.page.wait_for_url(re.compile(r".*/runs$"))
        assert "No runs yet" in t.page.locator("#runs").inner_text()
        t.shots("runs-empty")
        cookie = next(c for c in t.context.cookies() if c["name"] == "fedsrd_session")
        assert cookie["httpOnly"] and cookie["sameSite"] == "Lax"

        response = t.goto("/runs/4242")
        assert response.status == 404
        assert "run 4242 not found" in t.page.locator("main").inner_text()
        t.shots("not-found")

        other = Tab(browser, s.url)  # a second browser, signed in too
        other.sign_in()
        t.page.click("header #sign-out")
        t.page.wait_for_url(re.compile(r".*/login$"))
        t.goto("/runs")
        assert urlsplit(t.page.url).path == "/login"
        # A copy of the cookie taken before signing out is no session any more.
        t.context.add_cookies([cookie])
        t.goto("/runs")
        assert urlsplit(t.page.url).path == "/login"
        # Signing out one browser left the other signed in; "everywhere" ends it too.
        other.goto("/runs")
        assert urlsplit(other.page.url).path == "/runs"
        t.sign_in()
        t.page.click("header #sign-out-everywhere")
        t.page.wait_for_url(re.compile(r".*/login$"))
        other.goto("/runs")
        assert urlsplit(other.page.url).path == "/login"
        other.close()
        t.close()


def _fill_run_form(page: Any, **values: str) -> None:
    for name, value in values.items():
        page.fill(f"[name='{name}']", value)


def _points(page: Any, selector: str) -> list[int]:
    return list(
        page.eval_on_selector_all(
            selector, "els => els.map(e => e.getAttribute('points').trim().split(/\\s+/).length)"
        )
    )


def test_launch_watch_to_completion_and_download_adapter(tab: Tab, stack: System) -> None:
    page = tab.page
    tab.sign_in()
    response = tab.goto("/runs/new")
    _csp_ok(response)
    tab.shots("launch-form")

    # First a config the API refuses: errors appear next to their fields, nothing is stored.
    _fill_run_form(page, name="", rounds="0", **{"train.seq_len": "4"})
    page.click("#new-run button[type=submit]")
    page.wait_for_selector("#form-errors")
    assert page.locator(".field.invalid [name='name']").count() == 1
    assert "at least 1" in page.locator("[data-field='name']").inner_text()
    assert "greater than or equal to 1" in page.locator("[data-field='rounds']").inner_text()
    assert "greater than or equal to 8" in page.locator("[data-field='train.seq_len']").inner_text()
    tab.shots("launch-form-errors")
    assert stack.admin("GET", "/api/v1/runs").json()["count"] == 0

    # Then a valid one: two simulated clients, three rounds, evaluated after each round.
    _fill_run_form(
        page,
        name="browser-run",
        rounds="3",
        **{
            "lora.rank": "4",
            "train.steps": "2",
            "train.batch_size": "2",
            "train.seq_len": "384",
            "train.lr": "0.002",
            "simulation.clients": "2",
            "simulation.examples_per_client": "8",
            "evaluation.examples": "4",
        },
    )
    for domain in ("facts", "rewrite"):
        page.uncheck(f"[name='simulation.domains'][value='{domain}']")
    for domain in ("code", "facts", "rewrite", "counting"):
        page.uncheck(f"[name='evaluation.domains'][value='{domain}']")
    page.click("#new-run button[type=submit]")
    page.wait_for_url(re.compile(r".*/runs/\d+$"))
    run_id = int(page.url.rsplit("/", 1)[1])

    # Watch it finish without reloading: the live fragment is replaced in place.
    page.evaluate("window.__sameDocument = 42")
    expect(page.locator("#run-status")).to_have_text("completed", timeout=240_000)
    # Evaluations land after their round; the page keeps refreshing until the last one has.
    expect(page.locator("#live")).to_have_attribute("data-live-active", "false", timeout=120_000)
    assert page.evaluate("window.__sameDocument") == 42
    assert int(page.locator("#live").get_attribute("data-live-refreshes") or 0) >= 1

    # What the page shows is what the JSON API says.
    run = stack.admin("GET", f"/api/v1/runs/{run_id}").json()
    rounds = stack.admin("GET", f"/api/v1/runs/{run_id}/rounds").json()["data"]
    assert run["status"] == "completed" and len(rounds) == 3
    assert page.locator("#run-round").inner_text() == "3/3"
    assert page.locator("#timeline tbody tr").count() == 3
    assert page.locator("#timeline tbody tr[data-status='closed']").count() == 3
    assert run["bytes_saved"] > 0
    assert f"{100 * run['bytes_saved'] / run['fedavg_equivalent_bytes']:.1f}%" in (
        page.locator("#run-saved").inner_text()
    )

    # Charts drawn: one point per round in every line, one bar per round.
    # Train loss per round; eval loss from round 0 (the base model) on.
    assert _points(page, "#chart-1 polyline") == [3, 4]
    assert _points(page, "#chart-2 polyline") == [3, 3, 3]  # up, down, FedAvg
    assert _points(page, "#chart-3 polyline") == [3, 3]  # cumulative: run, FedAvg
    assert page.locator("#chart-4 rect.bar").count() == 3
    assert _points(page, "#chart-5 polyline") == [4]  # eval loss per held-out set: arithmetic
    assert "log scale" in page.locator("#chart-2").inner_text()
    # The cumulative FedAvg line ends above the run's own (higher on the page = smaller y).
    ends = page.eval_on_selector_all(
        "#chart-3 polyline",
        "els => els.map(e => Number(e.getAttribute('points').trim().split(/\\s+/).pop()"
        ".split(',')[1]))",
    )
    assert ends[1] < ends[0]
    tab.shots("run-completed")

    with page.expect_download() as download:
        page.click("#download-adapter")
    path = download.value.path()
    with zipfile.ZipFile(path) as z:
        assert set(z.namelist()) == {"adapter_config.json", "adapter_model.safetensors"}

    tab.goto("/runs")
    row = page.locator(f"tr[data-run='{run_id}']")
    assert "completed" in row.inner_text() and "3/3" in row.inner_text()
    tab.shots("runs")


def test_enroll_a_client_give_it_a_new_token_then_revoke_it(tab: Tab, stack: System) -> None:
    page = tab.page
    run = stack.create_run(name="sites")
    tab.sign_in()
    tab.goto(f"/runs/{run['id']}")
    assert "No client enrolled yet" in page.locator("#live").inner_text()
    tab.shots("run-created")

    page.fill("#client-name", "bad name!")
    page.evaluate("document.querySelector('#client-name').removeAttribute('pattern')")
    page.click("#enroll button[type=submit]")
    assert "should match pattern" in page.locator("#enroll-error").inner_text()

    page.fill("#client-name", "hospital-a")
    page.click("#enroll button[type=submit]")
    token = page.locator("#enrolled-token").inner_text().strip()
    command = page.locator("#enrolled-command").inner_text()
    assert len(token) >= 32 and token in command
    assert command.startswith("FEDSRD_AGENT_TOKEN=") and f"--server {stack.url}" in command
    tab.shots("client-enrolled")
    # The token works for the agent API, and is never shown again.
    me = stack.http().get("/api/v1/agent/me", headers={"Authorization": f"Bearer {token}"})
    assert me.status_code == 200 and me.json()["name"] == "hospital-a"
    tab.goto(f"/runs/{run['id']}")
    assert token not in page.content()

    # A new token (say, the first leaked): shown once, the old one stops working at once.
    row = page.locator("#clients tbody tr", has_text="hospital-a")
    row.locator("button", has_text="New token").click()
    page.wait_for_selector("#enrolled-token")
    assert "New token for client" in page.locator("#enrolled h2").inner_text()
    new_token = page.locator("#enrolled-token").inner_text().strip()
    assert new_token != token and new_token in page.locator("#enrolled-command").inner_text()
    me = stack.http().get("/api/v1/agent/me", headers={"Authorization": f"Bearer {token}"})
    assert me.status_code == 401
    me = stack.http().get("/api/v1/agent/me", headers={"Authorization": f"Bearer {new_token}"})
    assert me.status_code == 200 and me.json()["name"] == "hospital-a"
    tab.shots("client-new-token")
    tab.goto(f"/runs/{run['id']}")

    row = page.locator("#clients tbody tr", has_text="hospital-a")
    row.locator("button", has_text="Revoke").click()
    page.wait_for_selector("#clients tbody tr .badge.revoked")
    me = stack.http().get("/api/v1/agent/me", headers={"Authorization": f"Bearer {new_token}"})
    assert me.status_code in (401, 410)
    row = page.locator("#clients tbody tr", has_text="hospital-a")
    assert row.locator("button").count() == 0  # nothing left to do for a revoked client

    # The run's audit trail, reached from its page: what this browser did, newest first.
    page.click("footer a[href^='/audit?run=']")
    page.wait_for_url(re.compile(r".*/audit\?run=\d+$"))
    actions = page.locator("#audit tbody tr td:nth-child(2)").all_inner_texts()
    assert actions == ["revoke_client", "new_client_token", "enroll_client", "create_run"]
    who = page.locator("#audit tbody tr td:nth-child(6)").all_inner_texts()
    assert who[:3] == [who[0]] * 3 and who[0].startswith("session:") and who[3] == "admin-token"
    tab.shots("audit")


def test_cancel_a_run(tab: Tab, stack: System) -> None:
    page = tab.page
    run = stack.create_run(name="to-cancel", launch=True)
    tab.sign_in()
    tab.goto(f"/runs/{run['id']}")
    assert page.locator("#run-status").inner_text() == "running"
    page.click("#cancel-run")
    expect(page.locator("#run-status")).to_have_text("cancelled")
    assert stack.run(run["id"])["status"] == "cancelled"
    assert page.locator("#cancel-run").count() == 0
    tab.shots("run-cancelled")


def test_compare_runs_from_the_runs_list(tab: Tab, stack: System) -> None:
    """Tick two finished runs (the ticks survive the list's live refresh while a third run
    keeps it refreshing), compare them: eval loss against round and against MiB moved."""
    page = tab.page
    body = {
        "rounds": 2,
        "simulation": {"clients": 2, "domains": ["arithmetic", "code"], "examples_per_client": 4},
        "evaluation": {"domains": ["arithmetic"], "examples": 2},
    }
    ids = [
        stack.create_run(name=f"cmp-{s}", strategy=s, launch=True, **body)["id"]
        for s in ("fedavg", "fedsrd")
    ]
    runs = [stack.wait_run(i) for i in ids]
    for i in ids:  # evaluations land after their round
        deadline = time.monotonic() + 120
        while "eval" not in stack.rounds(i)[-1]["metrics"] and time.monotonic() < deadline:
            time.sleep(0.2)
    runs = [stack.run(i) for i in ids]
    busy = stack.create_run(name="keeps-the-list-live", launch=True)
    tab.sign_in()
    expect(page.locator("#runs")).to_have_attribute("data-live-active", "true")
    for i in ids:
        page.check(f"tr[data-run='{i}'] input[name=run]")
    refreshes = int(page.locator("#runs").get_attribute("data-live-refreshes") or 0)
    expect(page.locator("#runs")).not_to_have_attribute(
        "data-live-refreshes", str(refreshes), timeout=20_000
    )
    for i in ids:
        assert page.locator(f"tr[data-run='{i}'] input[name=run]").is_checked()
        row = page.locator(f"tr[data-run='{i}']").inner_text()
        assert f"{stack.run(i)['final_eval_loss']:.4f}" in row and "tiny" in row
    page.click("#compare-form button[type=submit]")
    page.wait_for_url(re.compile(r".*/compare\?run=\d+&run=\d+$"))
    assert page.locator("#compared tbody tr").count() == 2
    # One line per run with the base model at round 0 and each of its 2 rounds.
    assert _points(page, "#compare-1 polyline") == [3, 3]
    assert _points(page, "#compare-2 polyline") == [3, 3]
    legend = page.locator("#compare-1 .legend").inner_text()
    assert f"run {ids[0]} · fedavg (FedAvg)" in legend and f"run {ids[1]} · fedsrd" in legend
    # FedSRD moved fewer MiB: its line ends left of FedAvg's on the MiB chart (the runs are
    # in the list's order, newest first; find each line by its series name).
    ends = dict(
        page.eval_on_selector_all(
            "#compare-2 polyline",
            "els => els.map(e => [e.dataset.series, Number(e.getAttribute('points').trim()"
            ".split(/\\s+/).pop().split(',')[0])])",
        )
    )
    moved = [r["bytes_up"] + r["bytes_down"] for r in runs]
    assert moved[1] < moved[0]
    assert ends[f"run {ids[1]} · fedsrd"] < ends[f"run {ids[0]} · fedavg (FedAvg)"]
    tab.shots("compare")
    stack.admin("POST", f"/api/v1/runs/{busy['id']}/cancel")
