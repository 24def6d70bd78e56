"""End to end on the S3 blob store: the API and two Celery workers, each with its own data
directory (as on separate machines), share blobs only through an S3 server (moto's, on
loopback), with PostgreSQL and Redis. Slow; run in CI."""

from __future__ import annotations

import io
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from safetensors.torch import load as safetensors_load

from api.blobstore_s3 import S3BlobStore
from tests.api_support import FakeAgent
from tests.conftest import S3_TEST_BUCKET, S3_TEST_ENV
from tests.e2e_support import System, server_state, system

pytestmark = pytest.mark.slow


@pytest.fixture
def s3_stack(
    tmp_path: Path, model_cache: Path, pg_database: str, redis_server: str, s3_server: str
) -> Iterator[System]:
    import redis

    broker = f"{redis_server}/12"
    redis.Redis.from_url(broker).flushdb()
    prefix = f"e2e/{uuid.uuid4().hex}"
    env = {
        "FEDSRD_BLOB_URL": f"s3://{S3_TEST_BUCKET}/{prefix}",
        "FEDSRD_S3_ENDPOINT_URL": s3_server,
        "FEDSRD_S3_REGION": "us-east-1",
        **S3_TEST_ENV,
    }
    with system(tmp_path, pg_database, broker, model_cache, **env) as s:
        s.blobs = S3BlobStore(
            S3_TEST_BUCKET,
            prefix,
            endpoint_url=s3_server,
            region="us-east-1",
            spool_dir=tmp_path / "checker-spool",
        )
        for i in range(2):  # two "machines": nothing on disk in common with the API
            s.start_worker(FEDSRD_DATA_DIR=str(tmp_path / f"worker{i}"))
        yield s


def test_rounds_with_blobs_only_in_s3(s3_stack: System, tmp_path: Path) -> None:
    s = s3_stack
    run_id = s.create_run(rounds=2)["id"]
    agents = [FakeAgent(s.agent(run_id, s.enroll(run_id, f"site-{i}")), seed=i) for i in range(3)]
    assert s.admin("POST", f"/api/v1/runs/{run_id}/launch").status_code == 200
    for _ in range(2):
        for a in agents:  # uploads go through the API into S3; a worker aggregates from S3
            assert a.play_round(wait=30) is not None
    s.wait_run(run_id)
    rounds = s.rounds(run_id)
    assert [r["status"] for r in rounds] == ["closed", "closed"]
    assert all(len(r["metrics"]["participants"]) == 3 for r in rounds)
    for a in agents:  # global deltas written by a worker, downloaded through the API
        a.catch_up()
        assert a.have_round == 2
    s.check_consistent(run_id)  # every blob the database names is in S3; replay matches
    # The exported adapter (read from S3 by the API) holds the server's last state.
    z = s.admin("GET", f"/api/v1/runs/{run_id}/adapter")
    assert z.status_code == 200
    weights = safetensors_load(
        zipfile.ZipFile(io.BytesIO(z.content)).read("adapter_model.safetensors")
    )
    state = server_state(s.env["FEDSRD_DATABASE_URL"], s.data_dir, run_id, s.blobs)
    assert len(weights) == 2 * len(state)
    # No blob touched a local directory; no spool file or multipart upload is left.
    for data_dir in (s.data_dir, tmp_path / "worker0", tmp_path / "worker1"):
        assert not (data_dir / "blobs").exists(), data_dir
        spool = data_dir / "blob-spool"
        assert not spool.exists() or not any(spool.iterdir()), spool
    assert s.blobs is not None and s.blobs.temp_items() == []
    # Both workers were up; the work went wherever Redis handed it.
    assert all(w.alive() for w in s.workers)
