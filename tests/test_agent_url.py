"""A wrong ``--server`` is said at once in one line, not retried for the startup timeout."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from agent import cli


class _Plain(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def plain_http() -> Iterator[int]:
    """A real plain-HTTP server on localhost (not a FedSRD one)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Plain)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def _run(server: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, float]:
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n')
    argv = ["--server", server, "--token", "fsc_x", "--data", str(data)]
    argv += ["--state-dir", str(tmp_path / "st"), "--startup-timeout", "60"]
    t0 = time.monotonic()
    code = cli.main(argv)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1, lines
    return code, lines[0], time.monotonic() - t0


@pytest.mark.parametrize(
    ("server", "needle"),
    [
        ("http://127.0.0.1:9/api/v1", "base URL (http://127.0.0.1:9)"),
        ("http://127.0.0.1:9/api/v1/", "not a path on it"),
        ("127.0.0.1:8000", "not an http:// or https:// URL"),
        ("ftp://127.0.0.1", "not an http:// or https:// URL"),
    ],
)
def test_a_server_url_with_a_path_or_another_scheme_is_refused_at_once(
    server: str, needle: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, line, took = _run(server, tmp_path, capsys)
    assert code == 1 and needle in line, line
    assert took < 5


def test_https_to_a_plain_http_server_is_refused_at_once(
    plain_http: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, line, took = _run(f"https://127.0.0.1:{plain_http}", tmp_path, capsys)
    assert code == 1 and "TLS handshake" in line and "http://" in line, line
    assert took < 15  # not the 60 s startup timeout
