"""The agent's blob download over a network that fails: a real API process (uvicorn) behind
a TCP proxy on loopback that cuts connections midway, corrupts a byte, or strips the
``Range`` header like a middlebox that does not know it. The agent must end with the exact
blob, and after a cut must ask only for the bytes it is missing."""

from __future__ import annotations

import hashlib
import re
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from agent.client import AgentClient, ServerError
from tests.e2e_support import System, system

pytestmark = pytest.mark.slow


@dataclass
class Fault:
    """What the proxy does to one connection (one request: the test client keeps none alive)."""

    cut_after_body: int | None = None  #: close both sides after this many body bytes
    corrupt_body_at: int | None = None  #: flip this body byte
    strip_range: bool = False  #: drop the request's Range and If-Range headers


@dataclass
class Exchange:
    request_head: bytes = b""
    status: int = 0
    body_bytes: int = 0  #: response body bytes the proxy passed on


@dataclass
class FaultyProxy:
    upstream: tuple[str, int]
    faults: dict[int, Fault] = field(default_factory=dict)
    exchanges: list[Exchange] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                down, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                index = len(self.exchanges)
                self.exchanges.append(Exchange())
            fault = self.faults.get(index, Fault())
            threading.Thread(target=self._serve, args=(down, index, fault), daemon=True).start()

    def _serve(self, down: socket.socket, index: int, fault: Fault) -> None:
        ex = self.exchanges[index]
        up = socket.create_connection(self.upstream)
        try:
            head = b""
            while b"\r\n\r\n" not in head:  # a GET: the head is the whole request
                chunk = down.recv(65536)
                if not chunk:
                    return
                head += chunk
            ex.request_head = head
            if fault.strip_range:
                head = re.sub(rb"(?im)^(if-)?range:[^\r\n]*\r\n", b"", head)
            up.sendall(head)
            buffered = b""
            header_end = -1
            while True:
                chunk = up.recv(65536)
                if not chunk:
                    return
                if header_end < 0:
                    buffered += chunk
                    if b"\r\n\r\n" not in buffered:
                        continue
                    header_end = buffered.index(b"\r\n\r\n") + 4
                    ex.status = int(buffered.split(b" ", 2)[1])
                    down.sendall(buffered[:header_end])
                    chunk = buffered[header_end:]
                if fault.corrupt_body_at is not None:
                    at = fault.corrupt_body_at - ex.body_bytes
                    if 0 <= at < len(chunk):
                        chunk = chunk[:at] + bytes([chunk[at] ^ 0xFF]) + chunk[at + 1 :]
                if fault.cut_after_body is not None:
                    chunk = chunk[: max(0, fault.cut_after_body - ex.body_bytes)]
                down.sendall(chunk)
                ex.body_bytes += len(chunk)
                if fault.cut_after_body is not None and ex.body_bytes >= fault.cut_after_body:
                    return  # the connection drops mid-body
        except OSError:
            return
        finally:
            for s in (up, down):
                with suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Iterator[System]:
    with system(tmp_path_factory.mktemp("download"), "", "filesystem://", model_cache) as s:
        yield s


@dataclass
class Target:
    run_id: int
    token: str
    sha256: str
    data: bytes


@pytest.fixture(scope="module")
def snapshot(api: System) -> Target:
    """A launched run's initial snapshot, the blob every test downloads."""
    run_id = api.create_run(launch=True)["id"]
    token = api.enroll(run_id, "site-0")
    with api.http() as http:
        r = http.get(
            f"/api/v1/agent/runs/{run_id}/sync", headers={"Authorization": f"Bearer {token}"}
        )
        sha = r.json()["snapshot"]["sha256"]
        data = http.get(
            f"/api/v1/agent/runs/{run_id}/blobs/{sha}",
            headers={"Authorization": f"Bearer {token}"},
        ).content
    assert hashlib.sha256(data).hexdigest() == sha and len(data) > 10_000
    return Target(run_id, token, sha, data)


@contextmanager
def _through_proxy(
    api: System, target: Target, faults: dict[int, Fault]
) -> Iterator[tuple[AgentClient, FaultyProxy]]:
    proxy = FaultyProxy(("127.0.0.1", api.port), faults)
    # No kept-alive connections, so that the proxy's connection i is the agent's request i.
    http = httpx.Client(
        base_url=proxy.url, timeout=30.0, limits=httpx.Limits(max_keepalive_connections=0)
    )
    try:
        yield AgentClient(http, target.token, target.run_id, retry_for=30.0, base_delay=0.01), proxy
    finally:
        http.close()
        proxy.close()


def _download(
    api: System, target: Target, faults: dict[int, Fault]
) -> tuple[bytearray, FaultyProxy]:
    with _through_proxy(api, target, faults) as (client, proxy):
        return client.download(target.sha256), proxy


def _range_of(head: bytes) -> tuple[int, bytes] | None:
    m = re.search(rb"(?im)^range: bytes=(\d+)-\r\n", head)
    if m is None:
        return None
    if_range = re.search(rb"(?im)^if-range: ([^\r\n]*)\r\n", head)
    return int(m.group(1)), if_range.group(1) if if_range else b""


def test_a_clean_download_asks_once_for_the_whole_blob(api: System, snapshot: Target) -> None:
    data, proxy = _download(api, snapshot, {})
    assert data == snapshot.data
    assert [(e.status, e.body_bytes) for e in proxy.exchanges] == [(200, len(data))]
    assert _range_of(proxy.exchanges[0].request_head) is None


def test_cut_connections_resume_where_they_stopped(api: System, snapshot: Target) -> None:
    size = len(snapshot.data)
    first, second = size // 3, size // 4
    data, proxy = _download(
        api, snapshot, {0: Fault(cut_after_body=first), 1: Fault(cut_after_body=second)}
    )
    assert data == snapshot.data
    etag = f'"{snapshot.sha256}"'.encode()
    assert [(_range_of(e.request_head), e.status) for e in proxy.exchanges] == [
        (None, 200),
        ((first, etag), 206),
        ((first + second, etag), 206),
    ]
    # Nothing was sent twice: the three answers carried the blob exactly once between them.
    assert sum(e.body_bytes for e in proxy.exchanges) == size


def test_a_middlebox_that_drops_range_gets_the_whole_blob_again(
    api: System, snapshot: Target
) -> None:
    size = len(snapshot.data)
    data, proxy = _download(
        api, snapshot, {0: Fault(cut_after_body=size // 2), 1: Fault(strip_range=True)}
    )
    assert data == snapshot.data
    assert _range_of(proxy.exchanges[1].request_head) is not None  # asked for the rest...
    assert proxy.exchanges[1].status == 200  # ...got everything, and kept only that
    assert proxy.exchanges[1].body_bytes == size


def test_a_corrupted_blob_is_fetched_again_whole_and_twice_is_an_error(
    api: System, snapshot: Target
) -> None:
    size = len(snapshot.data)
    data, proxy = _download(api, snapshot, {0: Fault(corrupt_body_at=size // 2)})
    assert data == snapshot.data
    assert [(_range_of(e.request_head), e.status) for e in proxy.exchanges] == [
        (None, 200),
        (None, 200),  # a blob that hashes wrong is not resumed: nothing of it is trusted
    ]
    # A resumed download that ends corrupted is fetched whole, once more, then refused.
    faults = {
        0: Fault(cut_after_body=size // 3),
        1: Fault(corrupt_body_at=10),
        2: Fault(corrupt_body_at=size - 1),
    }
    with _through_proxy(api, snapshot, faults) as (client, proxy):
        with pytest.raises(ServerError, match="corrupt_download"):
            client.download(snapshot.sha256)
        assert [(e.status, e.body_bytes) for e in proxy.exchanges] == [
            (200, size // 3),
            (206, size - size // 3),
            (200, size),
        ]


def test_an_unknown_blob_is_refused_at_once(api: System, snapshot: Target) -> None:
    with _through_proxy(api, snapshot, {}) as (client, proxy):
        with pytest.raises(ServerError) as e:
            client.download("0" * 64)
        assert e.value.status == 404
        assert [x.status for x in proxy.exchanges] == [404]  # not retried


def test_more_bytes_than_the_plan_announced_are_refused(api: System, snapshot: Target) -> None:
    # The plan says one byte less than the server sends: the agent takes nothing of it.
    with _through_proxy(api, snapshot, {}) as (client, proxy):
        with pytest.raises(ServerError, match="size_mismatch") as e:
            client.download(snapshot.sha256, len(snapshot.data) - 1)
        assert f"announced {len(snapshot.data) - 1} bytes" in str(e.value)
        assert [x.status for x in proxy.exchanges] == [200]  # not retried
        assert client.download(snapshot.sha256, len(snapshot.data)) == snapshot.data
