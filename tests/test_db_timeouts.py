"""PostgreSQL connections carry a connect timeout and a statement timeout (settings), so a
database that hangs fails requests instead of holding the API's threads for ever."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from api.runtime import make_runtime
from api.settings import Settings


def test_statements_are_cancelled_after_the_statement_timeout(tmp_path, pg_database):
    settings = Settings(
        data_dir=tmp_path,
        database_url=pg_database,
        task_mode="inline",
        database_statement_timeout_s=0.5,
    )
    rt = make_runtime(settings)
    try:
        for sessions in (rt.sessions, rt.reads):  # autocommit reads too
            assert sessions is not None
            with sessions() as s:
                assert s.scalar(text("SHOW statement_timeout")) == "500ms"
        t0 = time.monotonic()
        with rt.sessions() as s, pytest.raises(OperationalError, match="statement timeout"):
            s.execute(text("SELECT pg_sleep(5)"))
        assert time.monotonic() - t0 < 3
        with rt.sessions() as s:  # the connection goes on serving
            assert s.scalar(text("SELECT 1")) == 1
    finally:
        rt.close()


def test_the_default_statement_timeout_is_a_minute(tmp_path, pg_database):
    rt = make_runtime(Settings(data_dir=tmp_path, database_url=pg_database, task_mode="inline"))
    try:
        with rt.sessions() as s:
            assert s.scalar(text("SHOW statement_timeout")) == "1min"
    finally:
        rt.close()


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A TCP server that accepts connections and never says a word (a hung database host);
    it lets them go after 15 s, so a client without a timeout fails late instead of never."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    held: list[socket.socket] = []
    stop = threading.Event()

    def serve() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(srv.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    timer = threading.Timer(15, lambda: [c.close() for c in held])
    timer.start()
    try:
        yield srv.getsockname()[1]
    finally:
        stop.set()
        timer.cancel()
        thread.join()
        for c in held:
            c.close()
        srv.close()


def test_a_database_that_never_answers_fails_within_the_connect_timeout(tmp_path, silent_server):
    url = f"postgresql+psycopg://postgres@127.0.0.1:{silent_server}/fedsrd"
    settings = Settings(
        data_dir=tmp_path, database_url=url, task_mode="inline", database_connect_timeout_s=2
    )
    rt = make_runtime(settings)
    try:
        t0 = time.monotonic()
        with pytest.raises(OperationalError), rt.engine.connect():
            pass
        assert time.monotonic() - t0 < 8  # libpq's 2 s (per address tried), not 15 s
    finally:
        rt.close()
