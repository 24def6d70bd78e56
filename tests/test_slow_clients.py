"""Slow, stalled and oversized requests against a real uvicorn process: they are cut off at
their timeouts, refused before their bodies are read, and never hold up other clients'
polls or the health check.

The clients here speak HTTP over raw sockets, so that a request can stop anywhere: halfway
through its headers, or after a thousand bytes of a body it said was a megabyte. The limits
are set small through the environment (``FEDSRD_*``) to keep the test short.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from agent.client import AgentClient, ServerError
from tests.api_support import ADMIN
from tests.e2e_support import System, system

pytestmark = pytest.mark.slow

HEADER_TIMEOUT = 1.0
BODY_TIMEOUT = 4.0
PER_CLIENT = 2
TOTAL = 3
MAX_BODY = 65536


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Iterator[System]:
    limits = {
        "FEDSRD_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT),
        "FEDSRD_BODY_TIMEOUT_S": str(BODY_TIMEOUT),
        "FEDSRD_MAX_UPLOADS_PER_CLIENT": str(PER_CLIENT),
        "FEDSRD_MAX_UPLOADS": str(TOTAL),
        "FEDSRD_MAX_BODY_BYTES": str(MAX_BODY),
    }
    tmp = tmp_path_factory.mktemp("slow")
    with system(tmp, "", "filesystem://", model_cache, **limits) as s:
        yield s


@dataclass
class Launched:
    run_id: int
    tokens: list[str]


@pytest.fixture(scope="module")
def launched(api: System) -> Launched:
    run_id = api.create_run()["id"]
    tokens = [api.enroll(run_id, f"site-{i}") for i in range(3)]
    assert api.admin("POST", f"/api/v1/runs/{run_id}/launch").status_code == 200
    return Launched(run_id, tokens)


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    closed: bool  #: the server closed the connection after it


def _connect(api: System) -> socket.socket:
    return socket.create_connection(("127.0.0.1", api.port), timeout=5.0)


def _send(api: System, head: str, body: bytes = b"") -> socket.socket:
    s = _connect(api)
    s.sendall(head.encode() + body)
    return s


def _request_head(method: str, path: str, token: str | None, **headers: str | int) -> str:
    lines = [f"{method} {path} HTTP/1.1", "Host: test"]
    if token is not None:
        lines.append(f"Authorization: Bearer {token}")
    lines += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
    return "\r\n".join(lines) + "\r\n\r\n"


def _read(s: socket.socket, timeout: float) -> Answer | None:
    """The response on ``s``, or None if none has begun within ``timeout`` seconds."""
    s.settimeout(timeout)
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                return None if not data else _parse(data, closed=True)
            data += chunk
        answer = _parse(data, closed=False)
        want = int(answer.headers.get("content-length", "0"))
        while len(answer.body) < want:
            chunk = s.recv(65536)
            if not chunk:
                break
            answer.body += chunk
        s.settimeout(1.0)
        try:
            answer.closed = s.recv(1) == b""
        except TimeoutError:
            answer.closed = False
        return answer
    except TimeoutError:
        return None


def _parse(data: bytes, closed: bool) -> Answer:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return Answer(int(lines[0].split()[1]), headers, body, closed)


def _closed_within(s: socket.socket, seconds: float) -> bool:
    """Whether the server closes ``s`` within ``seconds`` (whatever it sends before)."""
    deadline = time.monotonic() + seconds
    try:
        while (left := deadline - time.monotonic()) > 0:
            s.settimeout(left)
            if s.recv(65536) == b"":
                return True
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True
    return False


def _timed_get(http: httpx.Client, path: str, **kw: object) -> tuple[httpx.Response, float]:
    t0 = time.monotonic()
    r = http.get(path, **kw)  # type: ignore[arg-type]
    return r, time.monotonic() - t0


def _temp_files(api: System) -> list[Path]:
    return list((api.data_dir / "blobs" / "tmp").iterdir())


def test_stalled_uploads_are_bounded_cut_off_and_hold_up_nobody(
    api: System, launched: Launched
) -> None:
    rid, (staller, other, poller) = launched.run_id, launched.tokens
    path = f"/api/v1/agent/runs/{rid}/rounds/1/update?base_round=0"

    def stalled_upload(token: str) -> socket.socket:
        # Declares 10 kB (under the run cap), sends a thousand bytes, then nothing.
        head = _request_head("PUT", path, token, Content_Length=10_000, X_Content_SHA256="ab" * 32)
        return _send(api, head, b"\0" * 1000)

    with ExitStack() as stack:
        # More stalled uploads from one client than the server has threads in its pool (40).
        mine = [stack.enter_context(stalled_upload(staller)) for _ in range(44)]
        # Refusals come at once; the admitted stall until the body timeout.
        time.sleep(BODY_TIMEOUT / 2)
        # Meanwhile every other client is served at once (before, the stalled bodies held
        # every thread of the pool: /healthz and polls waited until they closed).
        with httpx.Client(base_url=api.url, timeout=5.0) as http:
            for _ in range(3):
                r, took = _timed_get(http, "/healthz")
                assert r.status_code == 200 and took < 1.0, took
                r, took = _timed_get(
                    http,
                    f"/api/v1/agent/runs/{rid}/poll",
                    headers={"Authorization": f"Bearer {poller}"},
                )
                assert r.status_code == 200 and took < 1.0, (r.text, took)
                assert r.json()["action"] == "train"

        answers = [_read(s, 0.01) for s in mine]
        refused = [a for a in answers if a is not None]
        assert len(refused) == 44 - PER_CLIENT, [a.status for a in refused]
        for a in refused:
            assert a.status == 429 and a.headers["retry-after"].isdigit(), a
            assert b"uploads in progress" in a.body and a.closed
        # Another client's: one more fits in the process's total, the next does not.
        theirs = [stack.enter_context(stalled_upload(other))]
        early = _read(theirs[0], 0.5)
        assert early is None, early  # admitted, and stalled like the others
        theirs.append(stack.enter_context(stalled_upload(other)))
        full = _read(theirs[1], 2.0)
        assert full is not None and full.status == 503 and full.headers["retry-after"]
        stalled = [s for s, a in zip(mine, answers, strict=True) if a is None] + [theirs[0]]
        assert len(stalled) == TOTAL
        assert len(_temp_files(api)) == TOTAL  # each streams into its temporary file

        # At the body timeout each stalled upload is refused, closed, and its file removed.
        for s in stalled:
            a = _read(s, BODY_TIMEOUT + 3.0)
            assert a is not None and a.status == 408 and a.closed, a
            assert b"no body bytes" in a.body
    deadline = time.monotonic() + 2.0
    while _temp_files(api) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _temp_files(api) == []
    # The slots are free again: the stalling client may upload (and is refused for its
    # content now, not for its count).
    r = httpx.put(
        api.url + path,
        content=b"\0" * 100,
        headers={"Authorization": f"Bearer {staller}", "X-Content-SHA256": "ab" * 32},
    )
    assert r.status_code == 422, r.text


def test_the_agent_waits_out_a_429_and_then_uploads(api: System, launched: Launched) -> None:
    rid, token = launched.run_id, launched.tokens[1]
    path = f"/api/v1/agent/runs/{rid}/rounds/1/update?base_round=0"
    head = _request_head("PUT", path, token, Content_Length=10_000, X_Content_SHA256="ab" * 32)
    with ExitStack() as stack:
        for _ in range(PER_CLIENT):  # this client's slots, taken until the body timeout
            stack.enter_context(_send(api, head, b"\0" * 1000))
        time.sleep(0.5)
        with httpx.Client(base_url=api.url, timeout=30.0) as http:
            agent = AgentClient(http, token, rid, retry_for=60.0, base_delay=0.2, max_delay=1.0)
            t0 = time.monotonic()
            # Refused with 429 first; retried after Retry-After, when the stalled uploads
            # have been cut off; then judged on its content (not a valid update: 422).
            with pytest.raises(ServerError) as e:
                agent.upload(1, 0, b"\0" * 100, num_samples=1)
            assert e.value.status == 422, e.value
            assert time.monotonic() - t0 >= BODY_TIMEOUT - 1.0


def test_unfinished_headers_and_idle_connections_are_closed(api: System) -> None:
    half = _send(api, "GET /healthz HTTP/1.1\r\nHost: test\r\nX-Slow: ")
    idle = _connect(api)
    with half, idle:
        t0 = time.monotonic()
        answer = _read(half, HEADER_TIMEOUT + 3.0)
        assert answer is not None and answer.status == 408 and answer.closed
        assert time.monotonic() - t0 < HEADER_TIMEOUT + 1.5
        assert _closed_within(idle, 2.0)  # closed without an answer to a request never made
    # A kept-alive connection: each request's headers get the whole timeout anew, and one
    # left unfinished is cut off just the same.
    with _connect(api) as s:
        for _ in range(2):
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
            first = _read_keep_alive(s)
            assert first == 200
            time.sleep(HEADER_TIMEOUT * 0.6)
        s.sendall(b"GET /healthz HTTP/1.1\r\n")
        answer = _read(s, HEADER_TIMEOUT + 3.0)
        assert answer is not None and answer.status == 408


def _read_keep_alive(s: socket.socket) -> int:
    s.settimeout(5.0)
    data = b""
    while b"\r\n\r\n" not in data:
        data += s.recv(65536)
    answer = _parse(data, closed=False)
    want = int(answer.headers["content-length"])
    while len(answer.body) < want:
        answer.body += s.recv(65536)
    return answer.status


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/api/v1/runs"), ("POST", "/api/v1/agent/runs/{rid}/heartbeat")],
)
def test_a_huge_body_without_a_token_is_refused_before_it_is_read(
    api: System, launched: Launched, method: str, path: str
) -> None:
    path = path.format(rid=launched.run_id)
    head = _request_head(
        method, path, None, Content_Type="application/json", Content_Length=200 << 20
    )
    with _send(api, head, b'{"name": "') as s:  # 200 MiB announced, ten bytes sent
        t0 = time.monotonic()
        answer = _read(s, 3.0)
        assert answer is not None, "no answer until the body arrives"
        assert answer.status == 401 and answer.closed, answer
        assert time.monotonic() - t0 < 1.0
        assert b'"error": "unauthorized"' in answer.body or b'"unauthorized"' in answer.body


def test_bodies_over_the_limit_are_413_and_stalled_ones_408(
    api: System, launched: Launched
) -> None:
    rid, token = launched.run_id, launched.tokens[2]
    url = f"{api.url}/api/v1/agent/runs/{rid}/heartbeat"
    auth = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    big = b'{"round": 1, "step": 1, "pad": "' + b"x" * MAX_BODY + b'"}'
    r = httpx.post(url, content=big, headers=auth)
    assert r.status_code == 413 and r.json()["error"] == "too_large", r.text
    assert str(MAX_BODY) in r.json()["detail"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit counts what arrives
        for i in range(0, len(big), 4096):
            yield big[i : i + 4096]

    r = httpx.post(url, content=chunks(), headers=auth)
    assert r.status_code == 413 and r.json()["error"] == "too_large", r.text
    # Admin bodies and the dashboard's sign-in form have the same limit.
    r = httpx.post(
        f"{api.url}/api/v1/runs",
        content=big,
        headers={"Authorization": f"Bearer {ADMIN}", "Content-Type": "application/json"},
    )
    assert r.status_code == 413, r.text
    r = httpx.post(f"{api.url}/login", data={"token": "x" * MAX_BODY})
    assert r.status_code == 413, r.text
    # Under the limit, nothing changed.
    r = httpx.post(url, json={"round": 1, "step": 1}, headers=auth)
    assert r.status_code == 204, r.text
    # A body that stalls is refused at the timeout.
    head = _request_head(
        "POST", f"/api/v1/agent/runs/{rid}/heartbeat", token,
        Content_Type="application/json", Content_Length=100,
    )  # fmt: skip
    with _send(api, head, b'{"round": 1') as s:
        assert _read(s, BODY_TIMEOUT * 0.5) is None
        answer = _read(s, BODY_TIMEOUT + 3.0)
        assert answer is not None and answer.status == 408 and answer.closed, answer
