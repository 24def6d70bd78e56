"""Shared fixtures: the real PostgreSQL and Redis of this machine (started if down), fresh
databases per test, and the project's tiny model built once per session."""

from __future__ import annotations

import os
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

PG_HOST, PG_PORT = "127.0.0.1", 5432
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
PG_START = "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start"
REDIS_START = (
    'redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no'
)


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _ensure(host: str, port: int, start: str, name: str) -> None:
    if port_open(host, port):
        return
    subprocess.run(["bash", "-c", start], check=False, capture_output=True, timeout=60)
    deadline = time.monotonic() + 30
    while not port_open(host, port):
        if time.monotonic() > deadline:
            pytest.fail(f"{name} is not running on {host}:{port} and `{start}` did not start it")
        time.sleep(0.2)


@pytest.fixture(scope="session")
def postgres_server() -> str:
    _ensure(PG_HOST, PG_PORT, PG_START, "PostgreSQL")
    return f"postgresql+psycopg://postgres@{PG_HOST}:{PG_PORT}"


@pytest.fixture(scope="session")
def redis_server() -> str:
    _ensure(REDIS_HOST, REDIS_PORT, REDIS_START, "Redis")
    return f"redis://{REDIS_HOST}:{REDIS_PORT}"


def _admin_sql(statement: str) -> None:
    import psycopg

    with psycopg.connect(
        host=PG_HOST, port=PG_PORT, user="postgres", dbname="postgres", autocommit=True
    ) as conn:
        conn.execute(statement)


@pytest.fixture
def pg_database(postgres_server: str) -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test (dropped afterwards)."""
    name = f"fedsrd_t_{uuid.uuid4().hex[:12]}"
    _admin_sql(f'CREATE DATABASE "{name}"')
    try:
        yield f"{postgres_server}/{name}"
    finally:
        _admin_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Cache directory holding the tiny model (built once per session)."""
    from fedsrd_core.tiny_assets import tiny_model_path

    cache = tmp_path_factory.mktemp("models")
    tiny_model_path(cache)
    return cache


@pytest.fixture(scope="session")
def tiny_model(model_cache: Path) -> Path:
    from fedsrd_core.tiny_assets import tiny_model_path

    return tiny_model_path(model_cache)


@pytest.fixture(autouse=True, scope="session")
def _quiet_hf() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


# --------------------------------------------------------------------------------------------
# S3: a real S3-API server (moto's) on loopback, for the S3 blob store's tests
# --------------------------------------------------------------------------------------------

S3_TEST_BUCKET = "fedsrd-test"
#: The same with object versioning on (garbage collection needs it).
S3_VERSIONED_BUCKET = "fedsrd-test-versioned"
#: Dummy credentials: the server checks none, and boto3 must never look further (a real
#: profile, an instance role) for any.
S3_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "fedsrd-test-key",
    "AWS_SECRET_ACCESS_KEY": "fedsrd-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """moto's S3 server in a subprocess on 127.0.0.1 (a free port); yields its endpoint URL.

    The process environment gets dummy AWS credentials for the session (restored after), and
    the buckets ``S3_TEST_BUCKET`` and ``S3_VERSIONED_BUCKET`` (versioning on) exist; tests keep
    apart by using their own key prefixes.
    """
    import sys

    import boto3

    from api.launcher import free_port

    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    saved = {k: os.environ.get(k) for k in S3_TEST_ENV}
    os.environ.update(S3_TEST_ENV)
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=dict(os.environ),
        )
    try:
        deadline = time.monotonic() + 30
        while not port_open("127.0.0.1", port):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"moto's S3 server did not start:\n{log.read_text()}")
            time.sleep(0.1)
        url = f"http://127.0.0.1:{port}"
        s3 = boto3.client("s3", endpoint_url=url, region_name="us-east-1")
        s3.create_bucket(Bucket=S3_TEST_BUCKET)
        s3.create_bucket(Bucket=S3_VERSIONED_BUCKET)
        s3.put_bucket_versioning(
            Bucket=S3_VERSIONED_BUCKET, VersioningConfiguration={"Status": "Enabled"}
        )
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
