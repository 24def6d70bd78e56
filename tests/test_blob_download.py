"""The agent's blob download through the API on both blob stores: the local store's file
response and the S3 store's streamed one send the same bytes and headers and honour the same
single ``Range`` requests; and a round whose blobs live only in S3 (moto's server on
loopback)."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from api.blob_http import RangeNotSatisfiable, parse_range
from api.blobstore import LocalBlobStore
from api.blobstore_s3 import S3BlobStore
from tests.api_support import Api, FakeAgent, make_api
from tests.conftest import S3_TEST_BUCKET


@pytest.fixture(params=["local", "s3"])
def api(request: pytest.FixtureRequest, tmp_path: Path, model_cache: Path) -> Iterator[Api]:
    extra: dict[str, str] = {}
    if request.param == "s3":
        extra = {
            "blob_url": f"s3://{S3_TEST_BUCKET}/download/{uuid.uuid4().hex}",
            "s3_endpoint_url": request.getfixturevalue("s3_server"),
            "s3_region": "us-east-1",
        }
    with make_api(tmp_path / "data", f"sqlite:///{tmp_path / 'api.db'}", model_cache, **extra) as a:
        yield a


def _client(api: Api) -> tuple[int, str, dict[str, str]]:
    created = api.create_run(launch=True, rounds=2)
    _, token = api.enroll(created["id"], "site-0")
    return created["id"], token, {"Authorization": f"Bearer {token}"}


def test_download_headers_and_ranges(api: Api) -> None:
    run_id, _, h = _client(api)
    plan = api.client.get(f"/api/v1/agent/runs/{run_id}/sync", headers=h).json()
    sha, size = plan["snapshot"]["sha256"], plan["snapshot"]["size"]
    url = f"/api/v1/agent/runs/{run_id}/blobs/{sha}"
    remote = isinstance(api.rt.blobs, S3BlobStore)
    assert (api.rt.blobs.local_path(sha) is None) == remote

    r = api.client.get(url, headers=h)
    assert r.status_code == 200
    body = r.content
    assert hashlib.sha256(body).hexdigest() == sha and len(body) == size > 200
    assert r.headers["content-length"] == str(size)
    assert r.headers["content-type"] == "application/octet-stream"
    assert r.headers["etag"] == f'"{sha}"'
    assert r.headers["x-content-sha256"] == sha
    assert r.headers["cache-control"] == "private, immutable"
    assert r.headers["accept-ranges"] == "bytes"

    for header, (start, stop) in {
        "bytes=10-99": (10, 100),
        "bytes=100-": (100, size),
        "bytes=-50": (size - 50, size),
        f"bytes=0-{size + 1000}": (0, size),
        f"bytes={size - 1}-{size - 1}": (size - 1, size),
    }.items():
        r = api.client.get(url, headers={**h, "Range": header})
        assert r.status_code == 206, header
        assert r.content == body[start:stop], header
        assert r.headers["content-range"] == f"bytes {start}-{stop - 1}/{size}", header
        assert r.headers["content-length"] == str(stop - start), header
        assert r.headers["etag"] == f'"{sha}"'

    r = api.client.get(url, headers={**h, "Range": f"bytes={size}-"})
    assert r.status_code == 416
    assert r.headers["content-range"] == f"bytes */{size}"
    # If-Range: the range only if the blob is still the one named (always, for a key).
    r = api.client.get(url, headers={**h, "Range": "bytes=0-9", "If-Range": f'"{sha}"'})
    assert r.status_code == 206 and r.content == body[:10]
    r = api.client.get(url, headers={**h, "Range": "bytes=0-9", "If-Range": '"other"'})
    assert r.status_code == 200 and r.content == body


def test_bytes_down_counts_the_bytes_sent(api: Api) -> None:
    run_id, _, h = _client(api)
    plan = api.client.get(f"/api/v1/agent/runs/{run_id}/sync", headers=h).json()
    sha, size = plan["snapshot"]["sha256"], plan["snapshot"]["size"]
    url = f"/api/v1/agent/runs/{run_id}/blobs/{sha}"

    def bytes_down() -> int:
        clients = api.admin("GET", f"/api/v1/runs/{run_id}/clients").json()["data"]
        return int(clients[0]["bytes_down"])

    assert bytes_down() == 0
    for i in range(5):  # five one-byte ranges: five bytes, not five blobs
        r = api.client.get(url, headers={**h, "Range": f"bytes={i}-{i}"})
        assert r.status_code == 206 and len(r.content) == 1
    assert bytes_down() == 5
    r = api.client.get(url, headers={**h, "Range": "bytes=-100"})
    assert r.status_code == 206
    assert bytes_down() == 105
    r = api.client.get(url, headers=h)
    assert r.status_code == 200
    assert bytes_down() == 105 + size
    r = api.client.get(url, headers={**h, "Range": f"bytes={size}-"})
    assert r.status_code == 416
    assert bytes_down() == 105 + size


def test_a_round_through_the_api_on_each_store(api: Api) -> None:
    run_id, token, h = _client(api)
    agent = FakeAgent(api.agent(run_id, token), seed=3)
    accepted = agent.play_round()
    assert accepted is not None
    rounds = api.rounds(run_id)
    assert rounds[0]["status"] == "closed"  # inline tasks: aggregated in the API process
    agent.catch_up()  # downloads the global delta and checks every digest
    assert agent.have_round == 1
    blobs = api.rt.blobs
    assert blobs.exists(accepted["sha256"])
    if isinstance(blobs, S3BlobStore):  # nothing went to a local blob directory
        assert not (api.settings.data_dir / "blobs").exists()
        assert blobs.temp_items() == []
    else:
        assert isinstance(blobs, LocalBlobStore)
        assert list(blobs.tmp_dir.iterdir()) == []


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("bytes=0-0", (0, 1)),
        ("bytes=5-", (5, 100)),
        ("bytes = 5 - 9", (5, 10)),
        ("bytes=-1", (99, 100)),
        ("bytes=-500", (0, 100)),
        ("bytes=90-500", (90, 100)),
        ("bytes=9-5", None),  # malformed: ignored
        ("bytes=0-1,5-6", None),  # several ranges: the whole blob
        ("items=0-1", None),
        ("bytes=-", None),
        ("bytes=x-1", None),
        ("", None),
    ],
)
def test_parse_range(header: str, expected: tuple[int, int] | None) -> None:
    assert parse_range(header, 100) == expected


@pytest.mark.parametrize(("header", "size"), [("bytes=100-", 100), ("bytes=-0", 100)])
def test_parse_range_unsatisfiable(header: str, size: int) -> None:
    with pytest.raises(RangeNotSatisfiable):
        parse_range(header, size)
    with pytest.raises(RangeNotSatisfiable):
        parse_range("bytes=-5", 0)
