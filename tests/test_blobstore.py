"""Contract tests of the blob store: every BlobStore implementation must pass them.

The ``harness`` fixture is parametrized over the implementations: the local directory and
the S3-compatible bucket (against moto's S3 server on loopback, the ``s3_server`` fixture;
each test in its own key prefix). Each harness also says how to list the implementation's
temp data and how to plant an abandoned temp item, the two things the public interface
cannot do. Local-only behaviour (layout, file mode, several processes), S3-only behaviour
(multipart uploads, their cleanup, the URL) and ``open_blob_store`` are tested at the end.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import pickle
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from api.blobstore import (
    DEFAULT_CHUNK_SIZE,
    BlobError,
    BlobHashMismatch,
    BlobNotFound,
    BlobRef,
    BlobStore,
    BlobTooLarge,
    InvalidBlobKey,
    LocalBlobStore,
    is_sha256_hex,
    open_blob_store,
)
from api.blobstore_s3 import MIN_PART_SIZE, S3BlobStore
from tests.conftest import S3_TEST_BUCKET

REPO = Path(__file__).resolve().parents[1]
EMPTY_SHA = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def payload(n: int, seed: int = 0) -> bytes:
    return (hashlib.sha256(seed.to_bytes(8, "little")).digest() * (n // 32 + 1))[:n]


@dataclass
class Harness:
    store: BlobStore
    #: names of the temp items the store holds now (uploads in progress or abandoned)
    temp_items: Callable[[], list[str]]
    #: leave an abandoned temp item, as a crashed process would, last written `age` s ago
    plant_stale_temp: Callable[[float], None]


def _local_harness(tmp_path: Path) -> Harness:
    store = LocalBlobStore(tmp_path / "blobs")

    def temp_items() -> list[str]:
        return sorted(p.name for p in store.tmp_dir.iterdir())

    def plant_stale_temp(age: float) -> None:
        p = store.tmp_dir / f"999999-crashed-{len(temp_items())}.part"
        p.write_bytes(b"half an upload")
        t = time.time() - age
        os.utime(p, (t, t))

    return Harness(store, temp_items, plant_stale_temp)


def _plant_spool_file(directory: Path, age: float) -> None:
    p = directory / f"999999-crashed-{uuid.uuid4().hex}.part"
    p.write_bytes(b"half an upload")
    t = time.time() - age
    os.utime(p, (t, t))


def _s3_store(request: pytest.FixtureRequest, tmp_path: Path) -> S3BlobStore:
    endpoint = request.getfixturevalue("s3_server")
    return S3BlobStore(
        S3_TEST_BUCKET,
        f"contract/{uuid.uuid4().hex}",
        endpoint_url=endpoint,
        region="us-east-1",
        spool_dir=tmp_path / "spool",
        part_size=MIN_PART_SIZE,
    )


def _s3_harness(request: pytest.FixtureRequest, tmp_path: Path) -> Harness:
    # A crashed S3 writer leaves its spool file (and, if it died mid-upload, a multipart
    # upload: see test_s3_cleanup_aborts_stale_multipart_uploads, where moto's clock rules).
    store = _s3_store(request, tmp_path)
    return Harness(store, store.temp_items, lambda age: _plant_spool_file(store.spool_dir, age))


IMPLEMENTATIONS: dict[str, Callable[[pytest.FixtureRequest, Path], Harness]] = {
    "local": lambda _, tmp_path: _local_harness(tmp_path),
    "s3": _s3_harness,
}


@pytest.fixture(params=sorted(IMPLEMENTATIONS))
def harness(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Harness]:
    h = IMPLEMENTATIONS[request.param](request, tmp_path)
    yield h
    assert h.temp_items() == [], "a test left temp data behind"


@pytest.fixture
def store(harness: Harness) -> BlobStore:
    return harness.store


# --------------------------------------------------------------------------------------------
# Round trips
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 31, 1000, 3 * (1 << 20) + 17])
def test_put_bytes_round_trip(store: BlobStore, n: int) -> None:
    data = payload(n)
    ref = store.put_bytes(data)
    assert ref == BlobRef(sha(data), n)
    assert store.exists(ref.sha256)
    assert store.size(ref.sha256) == n
    assert store.read_bytes(ref.sha256) == data
    with store.open(ref.sha256) as fh:
        assert not fh.writable()
        assert fh.read() == data
    assert b"".join(store.iter_chunks(ref.sha256)) == data


def test_streamed_round_trip(harness: Harness) -> None:
    store = harness.store
    data = payload(200_000, seed=1)
    cuts = [0, 1, 1, 4096, 70_000, 199_999, 200_000]
    with store.writer() as w:
        assert w.size == 0 and w.sha256 == EMPTY_SHA
        for a, b in itertools.pairwise(cuts):
            w.write(data[a:b])
            assert w.size == b
            assert w.sha256 == sha(data[:b])
        assert len(harness.temp_items()) == 1  # the upload in progress
        assert not store.exists(sha(data))  # not visible before commit
        ref = w.commit()
    assert ref == BlobRef(sha(data), len(data))
    assert store.read_bytes(ref.sha256) == data


def test_writer_accepts_bytes_like(store: BlobStore) -> None:
    with store.writer() as w:
        w.write(bytearray(b"abc"))
        w.write(memoryview(b"def"))
        ref = w.commit(sha(b"abcdef"))
    assert store.read_bytes(ref.sha256) == b"abcdef"


def test_empty_blob(store: BlobStore) -> None:
    ref = store.put_bytes(b"")
    assert ref == BlobRef(EMPTY_SHA, 0)
    assert store.exists(EMPTY_SHA)
    assert store.size(EMPTY_SHA) == 0
    assert store.read_bytes(EMPTY_SHA) == b""
    assert list(store.iter_chunks(EMPTY_SHA)) == []
    with store.writer() as w:
        assert w.commit(EMPTY_SHA) == ref


@pytest.mark.parametrize("chunk_size", [1, 7, 4096, 10_000, 1 << 20])
def test_iter_chunks(store: BlobStore, chunk_size: int) -> None:
    data = payload(10_000, seed=2)
    ref = store.put_bytes(data)
    chunks = list(store.iter_chunks(ref.sha256, chunk_size=chunk_size))
    assert b"".join(chunks) == data
    assert all(len(c) == chunk_size for c in chunks[:-1])
    assert 0 < len(chunks[-1]) <= chunk_size


RANGES = [(0, None), (0, 10_000), (1, 2), (4095, 4097), (9_999, None), (10_000, None)]
RANGES += [(20_000, None), (20_000, 30_000), (5, 5), (0, 0), (3, 50_000), (7_000, 9_000)]


@pytest.mark.parametrize(("start", "stop"), RANGES)
def test_iter_chunks_range_is_a_slice(store: BlobStore, start: int, stop: int | None) -> None:
    data = payload(10_000, seed=8)
    ref = store.put_bytes(data)
    chunks = list(store.iter_chunks(ref.sha256, chunk_size=1000, start=start, stop=stop))
    assert b"".join(chunks) == data[start:stop]
    assert all(0 < len(c) <= 1000 for c in chunks)


def test_iter_chunks_range_of_empty_blob(store: BlobStore) -> None:
    store.put_bytes(b"")
    assert list(store.iter_chunks(EMPTY_SHA, start=0, stop=10)) == []
    assert list(store.iter_chunks(EMPTY_SHA, start=3)) == []


def test_iter_chunks_rejects_bad_ranges(store: BlobStore) -> None:
    ref = store.put_bytes(b"0123456789")
    for start, stop in ((-1, None), (5, 4), (-3, -1)):
        with pytest.raises(ValueError, match="byte range"):
            store.iter_chunks(ref.sha256, start=start, stop=stop)
    missing = sha(b"not there")
    for start, stop in ((0, 5), (3, None), (2, 2)):
        with pytest.raises(BlobNotFound):
            store.iter_chunks(missing, start=start, stop=stop)


def test_iter_chunks_rejects_bad_chunk_size(store: BlobStore) -> None:
    ref = store.put_bytes(b"x")
    for bad in (0, -1):
        with pytest.raises(ValueError, match="chunk_size"):
            store.iter_chunks(ref.sha256, chunk_size=bad)


def test_idempotent_double_put(store: BlobStore) -> None:
    data = payload(5000, seed=3)
    first = store.put_bytes(data)
    with store.open(first.sha256) as reader:  # a reader open across the duplicate put
        second = store.put_bytes(data, expected_sha256=first.sha256)
        assert reader.read() == data
    assert first == second
    assert store.read_bytes(first.sha256) == data


def test_interleaved_writers_of_same_content(store: BlobStore) -> None:
    data = payload(10_000, seed=4)
    w1, w2 = store.writer(), store.writer()
    with w1, w2:
        w1.write(data[:5000])
        w2.write(data[:3000])
        w1.write(data[5000:])
        w2.write(data[3000:])
        r2 = w2.commit()
        r1 = w1.commit(sha(data))
    assert r1 == r2 == BlobRef(sha(data), len(data))
    assert store.read_bytes(r1.sha256) == data


def test_concurrent_writers_of_same_content(store: BlobStore) -> None:
    data = payload(1 << 20, seed=5)
    n = 8
    barrier = threading.Barrier(n)
    refs: list[BlobRef] = []
    errors: list[BaseException] = []

    def put() -> None:
        try:
            with store.writer() as w:
                barrier.wait()
                for i in range(0, len(data), 64 << 10):
                    w.write(data[i : i + (64 << 10)])
                refs.append(w.commit(sha(data)))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=put) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert refs == [BlobRef(sha(data), len(data))] * n
    assert store.read_bytes(sha(data)) == data


def test_different_blobs_are_independent(store: BlobStore) -> None:
    a, b = store.put_bytes(b"a"), store.put_bytes(b"b")
    assert a.sha256 != b.sha256
    store.delete(a.sha256)
    assert store.read_bytes(b.sha256) == b"b"


# --------------------------------------------------------------------------------------------
# Limits, hash checks, aborts
# --------------------------------------------------------------------------------------------


def test_size_limit_exact_is_ok(store: BlobStore) -> None:
    with store.writer(max_bytes=10) as w:
        w.write(b"0123")
        w.write(b"456789")
        ref = w.commit()
    assert ref.size == 10
    with store.writer(max_bytes=0) as w:
        w.write(b"")
        assert w.commit() == BlobRef(EMPTY_SHA, 0)


def test_size_limit_one_byte_over_fails(harness: Harness) -> None:
    store = harness.store
    with store.writer(max_bytes=10) as w:
        w.write(b"01234")
        with pytest.raises(BlobTooLarge, match="10 bytes") as info:
            w.write(b"567890")
        assert info.value.limit == 10
        assert harness.temp_items() == []  # discarded at once, not at the end of the block
        with pytest.raises(ValueError, match="aborted"):
            w.write(b"x")
        with pytest.raises(ValueError, match="aborted"):
            w.commit()
    assert not store.exists(sha(b"01234567890"))
    assert not store.exists(sha(b"01234"))


def test_size_limit_single_big_chunk(harness: Harness) -> None:
    with pytest.raises(BlobTooLarge), harness.store.writer(max_bytes=100) as w:
        w.write(payload(101))
    assert harness.temp_items() == []
    assert not harness.store.exists(sha(payload(101)))


def test_negative_limit_rejected(store: BlobStore) -> None:
    with pytest.raises(ValueError, match="max_bytes"):
        store.writer(max_bytes=-1)


def test_expected_sha_mismatch(harness: Harness) -> None:
    store = harness.store
    data, wrong = b"the real content", sha(b"something else")
    with store.writer() as w:
        w.write(data)
        with pytest.raises(BlobHashMismatch) as info:
            w.commit(wrong)
        assert harness.temp_items() == []
    assert info.value.expected == wrong and info.value.actual == sha(data)
    assert wrong in str(info.value) and sha(data) in str(info.value)
    assert not store.exists(sha(data)) and not store.exists(wrong)

    with pytest.raises(BlobHashMismatch):
        store.put_bytes(data, expected_sha256=wrong)
    assert not store.exists(sha(data)) and not store.exists(wrong)


def test_mismatch_does_not_touch_an_existing_blob(store: BlobStore) -> None:
    ref = store.put_bytes(b"kept")
    with pytest.raises(BlobHashMismatch):
        store.put_bytes(b"other", expected_sha256=ref.sha256)
    assert store.read_bytes(ref.sha256) == b"kept"


def test_put_pieces_stores_the_concatenation(store: BlobStore) -> None:
    data = payload(3 * (1 << 20) + 5, seed=9)
    pieces = [data[:10], memoryview(data)[10 : 1 << 20], bytearray(data[1 << 20 :])]
    ref = store.put_pieces(pieces)
    assert ref.sha256 == sha(data) and ref.size == len(data)
    assert store.read_bytes(ref.sha256) == data
    assert store.put_pieces([data], expected_sha256=sha(data)) == ref  # idempotent
    with pytest.raises(BlobHashMismatch):
        store.put_pieces([data, b"!"], expected_sha256=sha(data))


def test_put_pieces_stores_nothing_when_the_pieces_fail(harness: Harness) -> None:
    def pieces() -> Iterator[bytes]:
        yield b"the first half of a snapshot"
        raise RuntimeError("encoder failed")

    with pytest.raises(RuntimeError, match="encoder failed"):
        harness.store.put_pieces(pieces())
    assert harness.temp_items() == []
    assert not harness.store.exists(sha(b"the first half of a snapshot"))


@pytest.mark.parametrize("n", [0, 1, 4097, 3 * (1 << 20) + 17])
def test_mapped_is_the_blob(harness: Harness, n: int) -> None:
    store = harness.store
    data = payload(n, seed=n)
    ref = store.put_bytes(data)
    with store.mapped(ref.sha256) as view:
        assert view.readonly and view.nbytes == n
        assert bytes(view) == data
    assert harness.temp_items() == []  # a remote store's spooled copy is gone

    # A slice that outlives the block (a traceback holding one) does not turn into an error.
    def decode_and_fail() -> None:
        with store.mapped(ref.sha256) as view:
            kept = view[:1]  # noqa: F841 - alive while the block exits
            raise KeyError("decoding failed")

    with pytest.raises(KeyError, match="decoding failed"):
        decode_and_fail()
    assert harness.temp_items() == []


def test_exception_inside_context_aborts(harness: Harness) -> None:
    store = harness.store
    writers = []

    def upload() -> None:
        with store.writer() as w:
            writers.append(w)
            w.write(b"partial upload")
            raise RuntimeError("client went away")

    with pytest.raises(RuntimeError, match="client went away"):
        upload()
    assert harness.temp_items() == []
    assert not store.exists(sha(b"partial upload"))
    with pytest.raises(ValueError, match="aborted"):
        writers[0].write(b"more")


def test_leaving_context_without_commit_aborts(harness: Harness) -> None:
    with harness.store.writer() as w:
        w.write(b"never committed")
    assert harness.temp_items() == []
    assert not harness.store.exists(sha(b"never committed"))


def test_explicit_abort_and_closed_writer(harness: Harness) -> None:
    store = harness.store
    w = store.writer()
    w.write(b"abc")
    w.abort()
    w.abort()  # idempotent
    assert harness.temp_items() == []
    with pytest.raises(ValueError, match="aborted"):
        w.write(b"d")
    with pytest.raises(ValueError, match="aborted"):
        w.commit()
    assert not store.exists(sha(b"abc"))

    with store.writer() as w2:
        w2.write(b"abc")
        ref = w2.commit()
        w2.abort()  # no-op after commit: the blob stays
        with pytest.raises(ValueError, match="committed"):
            w2.write(b"d")
        with pytest.raises(ValueError, match="committed"):
            w2.commit()
    assert store.read_bytes(ref.sha256) == b"abc"


def test_dropped_writer_leaves_no_temp(harness: Harness) -> None:
    w = harness.store.writer()
    w.write(b"forgotten")
    del w  # neither committed nor aborted nor used as a context manager
    assert harness.temp_items() == []


# --------------------------------------------------------------------------------------------
# Keys, missing blobs, delete
# --------------------------------------------------------------------------------------------


BAD_KEYS = [
    "../etc",
    "../" + "0" * 61,  # 64 characters, with a traversal
    "A" * 64,  # uppercase
    EMPTY_SHA.upper(),
    "a" * 63,  # short
    "a" * 65,
    "",
    "g" * 64,
    EMPTY_SHA + "\n",
    " " + EMPTY_SHA[1:],
    "/" + EMPTY_SHA[1:],
]

KEYED_CALLS: dict[str, Callable[[BlobStore, str], Any]] = {
    "exists": lambda s, k: s.exists(k),
    "size": lambda s, k: s.size(k),
    "read_bytes": lambda s, k: s.read_bytes(k),
    "open": lambda s, k: s.open(k),
    "iter_chunks": lambda s, k: s.iter_chunks(k),
    "delete": lambda s, k: s.delete(k),
    "local_path": lambda s, k: s.local_path(k),
    "put_bytes(expected)": lambda s, k: s.put_bytes(b"x", expected_sha256=k),
    "put_pieces(expected)": lambda s, k: s.put_pieces([b"x"], expected_sha256=k),
    "mapped": lambda s, k: s.mapped(k).__enter__(),
}


def _commit_with(store: BlobStore, key: str) -> BlobRef:
    with store.writer() as w:
        w.write(b"x")
        return w.commit(key)


KEYED_CALLS["writer.commit(expected)"] = _commit_with


def test_is_sha256_hex() -> None:
    assert is_sha256_hex(EMPTY_SHA)
    assert is_sha256_hex("0123456789abcdef" * 4)
    for bad in BAD_KEYS:
        assert not is_sha256_hex(bad), bad
    assert not is_sha256_hex("٠" * 64)  # Unicode digits are not hex digits
    assert not is_sha256_hex(EMPTY_SHA.encode())  # type: ignore[arg-type]


@pytest.mark.parametrize("call", sorted(KEYED_CALLS))
@pytest.mark.parametrize("key", BAD_KEYS, ids=repr)
def test_invalid_keys_rejected_everywhere(harness: Harness, call: str, key: str) -> None:
    harness.store.put_bytes(b"x")
    with pytest.raises(InvalidBlobKey) as info:
        KEYED_CALLS[call](harness.store, key)
    assert "invalid blob key" in str(info.value)
    assert isinstance(info.value, BlobError)
    assert harness.store.exists(sha(b"x"))  # nothing deleted or overwritten


def test_missing_blob(store: BlobStore) -> None:
    missing = sha(b"never stored")
    assert not store.exists(missing)
    for call in (
        store.size,
        store.read_bytes,
        store.open,
        store.iter_chunks,
        lambda k: store.mapped(k).__enter__(),
    ):
        with pytest.raises(BlobNotFound) as info:
            call(missing)
        assert info.value.sha == missing and missing in str(info.value)
    with contextlib.suppress(BlobNotFound):  # a store with local files checks
        assert store.local_path(missing) is None  # a store with no local files
    store.delete(missing)  # no error


def test_delete(store: BlobStore) -> None:
    ref = store.put_bytes(b"to be collected")
    store.delete(ref.sha256)
    assert not store.exists(ref.sha256)
    with pytest.raises(BlobNotFound):
        store.read_bytes(ref.sha256)
    store.delete(ref.sha256)  # twice: no error
    assert store.put_bytes(b"to be collected") == ref  # stored again
    assert store.read_bytes(ref.sha256) == b"to be collected"


def test_local_path_contract(store: BlobStore) -> None:
    ref = store.put_bytes(b"served from disk")
    path = store.local_path(ref.sha256)
    if path is not None:
        assert path.read_bytes() == b"served from disk"


# --------------------------------------------------------------------------------------------
# Cleanup of abandoned temp data
# --------------------------------------------------------------------------------------------


def test_cleanup_temp_removes_old_temp_only(harness: Harness) -> None:
    store = harness.store
    harness.plant_stale_temp(2 * 3600)
    harness.plant_stale_temp(3 * 3600)
    harness.plant_stale_temp(60)  # recent: a crashed upload, but maybe a slow live one
    with store.writer() as live:
        live.write(b"live upload ")
        assert len(harness.temp_items()) == 4
        assert store.cleanup_temp() == 2  # default: older than an hour
        assert len(harness.temp_items()) == 2
        assert store.cleanup_temp(older_than_seconds=3600) == 0
        live.write(b"goes on")
        ref = live.commit()  # the live upload is unaffected
    assert store.read_bytes(ref.sha256) == b"live upload goes on"
    assert store.cleanup_temp(older_than_seconds=30) == 1  # the 60 s one
    assert harness.temp_items() == []


def test_cleanup_temp_keeps_blobs(store: BlobStore) -> None:
    ref = store.put_bytes(b"a committed blob is not temp data")
    assert store.cleanup_temp(older_than_seconds=0) == 0
    assert store.exists(ref.sha256)


def test_cleanup_temp_under_a_live_writer(harness: Harness) -> None:
    # A writer whose temp data was swept (stalled longer than the threshold) fails cleanly.
    store = harness.store
    w = store.writer()
    w.write(b"stalled")
    harness.plant_stale_temp(0)
    time.sleep(0.05)
    assert store.cleanup_temp(older_than_seconds=0) == 2
    w.abort()  # nothing left to remove: no error
    assert harness.temp_items() == []


def test_cleanup_temp_rejects_negative_age(store: BlobStore) -> None:
    with pytest.raises(ValueError, match="older_than_seconds"):
        store.cleanup_temp(older_than_seconds=-1)


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "err",
    [
        BlobNotFound(EMPTY_SHA),
        BlobTooLarge(123),
        BlobHashMismatch(EMPTY_SHA, "0" * 64),
        InvalidBlobKey("../etc"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_errors_are_blob_errors_and_pickle(err: BlobError) -> None:
    assert isinstance(err, BlobError)
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is type(err) and str(back) == str(err)
    assert vars(back) == vars(err)


def test_invalid_key_message_is_bounded() -> None:
    assert len(str(InvalidBlobKey("x" * 10_000))) < 200


# --------------------------------------------------------------------------------------------
# LocalBlobStore specifics
# --------------------------------------------------------------------------------------------


def test_local_layout_and_mode(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "b")
    ref = store.put_bytes(b"layout")
    s = ref.sha256
    path = tmp_path / "b" / "sha256" / s[:2] / s[2:4] / s
    assert store.local_path(s) == path
    assert path.read_bytes() == b"layout"
    assert (tmp_path / "b" / "tmp").is_dir()
    if os.name == "posix":
        assert path.stat().st_mode & 0o777 == 0o644
    with pytest.raises(BlobNotFound):
        store.local_path(sha(b"missing"))


def test_local_mode_ignores_umask(tmp_path: Path) -> None:
    if os.name != "posix":
        pytest.skip("POSIX file modes")
    old = os.umask(0o077)
    try:
        ref = LocalBlobStore(tmp_path).put_bytes(b"shared with other processes")
    finally:
        os.umask(old)
    assert LocalBlobStore(tmp_path).local_path(ref.sha256).stat().st_mode & 0o777 == 0o644


def test_local_duplicate_put_keeps_existing_file_and_renews_it(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)
    ref = store.put_bytes(b"immutable")
    path = store.local_path(ref.sha256)
    os.utime(path, (time.time() - 7200, time.time() - 7200))  # stored two hours ago
    before = path.stat()
    store.put_bytes(b"immutable")
    after = path.stat()
    # The same file (blobs are immutable), marked stored now: a garbage collector's grace
    # period counts from the newest store of the content.
    assert after.st_ino == before.st_ino
    assert after.st_mtime > time.time() - 60 > before.st_mtime
    assert not any(store.tmp_dir.iterdir())


def test_local_stores_sharing_a_root(tmp_path: Path) -> None:
    a, b = LocalBlobStore(tmp_path), LocalBlobStore(tmp_path)  # two replicas
    wa, wb = a.writer(), b.writer()
    with wa, wb:
        wa.write(b"same content")
        wb.write(b"same content")
        ra, rb = wa.commit(), wb.commit()
    assert ra == rb
    assert b.read_bytes(ra.sha256) == b"same content"
    assert list(a.tmp_dir.iterdir()) == []


_CHILD = """
import sys
from api.blobstore import LocalBlobStore
store = LocalBlobStore(sys.argv[1])
data = bytes(range(256)) * 4096
for _ in range(5):
    with store.writer() as w:
        for i in range(0, len(data), 65536):
            w.write(data[i : i + 65536])
        ref = w.commit()
print(ref.sha256)
"""


def test_local_several_processes_same_content(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(tmp_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd=REPO,
        )
        for _ in range(4)
    ]
    outs = [p.communicate(timeout=60) for p in procs]
    data = bytes(range(256)) * 4096
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err.decode()
        assert out.decode().strip() == sha(data)
    store = LocalBlobStore(tmp_path)
    assert store.read_bytes(sha(data)) == data
    assert list(store.tmp_dir.iterdir()) == []


# --------------------------------------------------------------------------------------------
# open_blob_store
# --------------------------------------------------------------------------------------------


def test_local_read_back_starts_the_fsync_and_commit_still_syncs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Validation reads the temp file while its fsync runs in a thread; the commit still
    fsyncs before the rename (durable whatever the thread did), and the data is intact."""
    import api.blobstore as bs

    synced: list[tuple[int, int, str]] = []
    real = os.fsync

    def spy(fd: int) -> None:
        synced.append((os.fstat(fd).st_ino, fd, threading.current_thread().name))
        real(fd)

    monkeypatch.setattr(bs.os, "fsync", spy)
    store = LocalBlobStore(tmp_path / "b")
    data = os.urandom(3 << 20)
    with store.writer() as w:
        w.write(data)
        fd = w._fh.fileno()
        inode = os.fstat(fd).st_ino
        with w.spooled() as view:
            assert bytes(view) == data
        during = [(f, name) for ino, f, name in synced if ino == inode]
        # In a thread, through a descriptor of its own (so that a write-back error still
        # reaches the commit's fsync on the writer's descriptor).
        assert len(during) == 1 and during[0][1] != threading.main_thread().name
        assert during[0][0] != fd
        ref = w.commit()
    after = [(f, name) for ino, f, name in synced if ino == inode]
    assert after[:2] == [during[0], (fd, threading.main_thread().name)]
    assert store.read_bytes(ref.sha256) == data


def test_local_writer_syncs_in_the_background_while_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every ``_sync_every`` bytes an fdatasync of the temp file starts in a thread, on a
    descriptor of its own; the commit still fsyncs in the caller before the rename; an
    abort neither waits for a sync in flight nor leaves the file behind."""
    import api.blobstore as bs

    main = threading.current_thread().name
    datasyncs: list[tuple[str, int]] = []
    fsyncs: list[tuple[str, int]] = []
    real_datasync, real_fsync = os.fdatasync, os.fsync
    slow = threading.Event()

    def datasync_spy(fd: int) -> None:
        datasyncs.append((threading.current_thread().name, os.fstat(fd).st_ino))
        if slow.is_set():
            time.sleep(0.5)
        real_datasync(fd)

    def fsync_spy(fd: int) -> None:
        fsyncs.append((threading.current_thread().name, os.fstat(fd).st_ino))
        real_fsync(fd)

    monkeypatch.setattr(bs.os, "fdatasync", datasync_spy)
    monkeypatch.setattr(bs.os, "fsync", fsync_spy)
    monkeypatch.setattr(bs.LocalBlobWriter, "_sync_every", 1 << 20)
    store = LocalBlobStore(tmp_path / "b")
    data = os.urandom(5 << 20)
    with store.writer() as w:
        inode = os.fstat(w._fh.fileno()).st_ino
        for i in range(0, len(data), 1 << 18):
            w.write(data[i : i + (1 << 18)])
        syncer = w._syncer
        ref = w.commit()
    assert syncer is not None
    syncer.join()
    assert datasyncs and all(name != main and ino == inode for name, ino in datasyncs)
    assert (main, inode) in fsyncs  # the commit's own fsync, before the rename
    assert store.read_bytes(ref.sha256) == data
    # An abort while a (slow) sync runs returns at once, and the temp file is gone.
    slow.set()
    w = store.writer()
    w.write(os.urandom(2 << 20))
    assert w._syncer is not None and w._syncer.is_alive()
    t0 = time.monotonic()
    w.abort()
    assert time.monotonic() - t0 < 0.25
    assert list(store.tmp_dir.iterdir()) == []
    w._syncer.join()


def test_open_blob_store_file_url(tmp_path: Path) -> None:
    store = open_blob_store(f"file://{tmp_path}/blobs")
    assert isinstance(store, LocalBlobStore)
    assert store.root == tmp_path / "blobs"
    assert (tmp_path / "blobs" / "sha256").is_dir()
    store2 = open_blob_store(f"file://localhost{tmp_path}/blobs")
    assert isinstance(store2, LocalBlobStore) and store2.root == tmp_path / "blobs"
    ref = store.put_bytes(b"shared")
    assert store2.read_bytes(ref.sha256) == b"shared"


def test_open_blob_store_percent_encoded(tmp_path: Path) -> None:
    store = open_blob_store(f"file://{tmp_path}/my%20blobs")
    assert isinstance(store, LocalBlobStore)
    assert store.root == tmp_path / "my blobs"


def test_open_blob_store_plain_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = open_blob_store(str(tmp_path / "abs"))
    assert isinstance(store, LocalBlobStore) and store.root == tmp_path / "abs"
    monkeypatch.chdir(tmp_path)
    rel = open_blob_store("var/blobs")
    assert isinstance(rel, LocalBlobStore)
    assert (tmp_path / "var" / "blobs" / "tmp").is_dir()


@pytest.mark.parametrize(
    "url",
    [
        "https://example.com/blobs",
        "gs://bucket",
        "",
        "file://otherhost/data",
        "file:relative/path",
    ],
)
def test_open_blob_store_unsupported(url: str) -> None:
    with pytest.raises(ValueError, match="unsupported blob store URL"):
        open_blob_store(url)


@pytest.mark.parametrize(
    ("url", "named"),
    [
        ("s3://AKIAEXAMPLE:supersecret@minio:9000/bucket", "AWS environment"),
        ("s3://AKIAEXAMPLE:supersecret@bucket/prefix", "AWS environment"),
        ("https://user:supersecret@example.com/blobs", "'https'"),
    ],
)
def test_open_blob_store_error_hides_credentials(url: str, named: str) -> None:
    with pytest.raises(ValueError, match="unsupported blob store URL") as info:
        open_blob_store(url)
    assert "supersecret" not in str(info.value) and "AKIA" not in str(info.value)
    assert named in str(info.value)


def test_spooled_view_before_commit(store: BlobStore) -> None:
    with store.writer() as w:
        w.write(b"abc")
        w.write(bytearray(b"def"))
        with w.spooled() as view:
            assert bytes(view) == b"abcdef"
        ref = w.commit()
    assert store.read_bytes(ref.sha256) == b"abcdef"
    with store.writer() as w:
        with w.spooled() as view:
            assert bytes(view) == b""
        w.abort()
        with pytest.raises(ValueError, match="read back"):
            w.spooled().__enter__()


# --------------------------------------------------------------------------------------------
# S3BlobStore specifics (moto's S3 server on loopback)
# --------------------------------------------------------------------------------------------


@pytest.fixture
def s3(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[S3BlobStore]:
    store = _s3_store(request, tmp_path)
    yield store
    assert store.temp_items() == [], "a test left temp data behind"


def _objects(store: S3BlobStore) -> list[str]:
    listed = store.client.list_objects_v2(Bucket=store.bucket, Prefix=store.prefix)
    return sorted(o["Key"] for o in listed.get("Contents", []))


def test_s3_layout_mirrors_the_local_one(s3: S3BlobStore, tmp_path: Path) -> None:
    ref = s3.put_bytes(b"layout")
    s = ref.sha256
    assert _objects(s3) == [f"{s3.prefix}sha256/{s[:2]}/{s[2:4]}/{s}"]
    local = LocalBlobStore(tmp_path / "local")
    local.put_bytes(b"layout")
    # `aws s3 sync <root>/sha256 s3://bucket/<prefix>/sha256` moves a local store over.
    assert local.local_path(s).relative_to(local.root).as_posix() == _objects(s3)[0].removeprefix(
        s3.prefix
    )
    assert s3.local_path(s) is None  # nothing local: the API streams it


def test_s3_multipart_upload_round_trip(s3: S3BlobStore) -> None:
    data = payload(2 * MIN_PART_SIZE + 12_345, seed=6)  # three parts
    sent_parts = []
    real_upload_part = s3.client.upload_part

    def upload_part(**kw: Any) -> Any:
        sent_parts.append(len(kw["Body"]))
        return real_upload_part(**kw)

    s3.client.upload_part = upload_part  # type: ignore[method-assign]
    with s3.writer(max_bytes=len(data)) as w:
        for i in range(0, len(data), DEFAULT_CHUNK_SIZE):
            w.write(data[i : i + DEFAULT_CHUNK_SIZE])
        ref = w.commit(sha(data))
    assert sent_parts == [MIN_PART_SIZE, MIN_PART_SIZE, 12_345]  # bounded parts from the spool
    assert s3.size(ref.sha256) == len(data)
    assert s3.read_bytes(ref.sha256) == data
    assert (
        b"".join(s3.iter_chunks(ref.sha256, start=MIN_PART_SIZE - 3, stop=MIN_PART_SIZE + 3))
        == (data[MIN_PART_SIZE - 3 : MIN_PART_SIZE + 3])
    )


def test_s3_failed_multipart_upload_leaves_nothing(s3: S3BlobStore) -> None:
    data = payload(MIN_PART_SIZE + 1, seed=7)
    real_upload_part = s3.client.upload_part

    def upload_part(**kw: Any) -> Any:
        if kw["PartNumber"] == 2:
            raise ConnectionResetError("network went away")
        return real_upload_part(**kw)

    s3.client.upload_part = upload_part  # type: ignore[method-assign]
    with s3.writer() as w:
        w.write(data)
        with pytest.raises(ConnectionResetError):
            w.commit()
    assert not s3.exists(sha(data))
    assert s3.temp_items() == []  # the multipart upload was aborted, the spool removed
    with pytest.raises(ValueError, match="aborted"):
        w.write(b"x")


def test_s3_failed_put_leaves_nothing(s3: S3BlobStore) -> None:
    def put_object(**kw: Any) -> Any:
        raise ConnectionResetError("network went away")

    s3.client.put_object = put_object  # type: ignore[method-assign]
    with pytest.raises(ConnectionResetError):
        s3.put_bytes(b"small blob")
    assert not s3.exists(sha(b"small blob"))


def test_s3_duplicate_put_uploads_nothing(s3: S3BlobStore) -> None:
    ref = s3.put_bytes(b"stored once")

    def put_object(**kw: Any) -> Any:
        raise AssertionError("uploaded again")

    s3.client.put_object = put_object  # type: ignore[method-assign]
    assert s3.put_bytes(b"stored once") == ref


def test_s3_cleanup_aborts_stale_multipart_uploads(s3: S3BlobStore) -> None:
    client, bucket = s3.client, s3.bucket
    key = s3.key(sha(b"a crashed upload"))
    crashed = client.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
    client.upload_part(Bucket=bucket, Key=key, UploadId=crashed, PartNumber=1, Body=b"half")
    other_key = f"elsewhere-{uuid.uuid4().hex}/{key}"  # outside the store's prefix
    other = client.create_multipart_upload(Bucket=bucket, Key=other_key)["UploadId"]
    try:
        assert len(s3.temp_items()) == 1
        # Its last part is seconds old: live as far as a one-hour threshold goes. (moto
        # reports every upload as initiated in 2010, so this also shows that the newest
        # part, not the start, dates an upload.)
        assert s3.cleanup_temp() == 0
        time.sleep(1.1)  # S3 dates parts to the second
        assert s3.cleanup_temp(older_than_seconds=1) == 1
        assert s3.temp_items() == []
        uploads = client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
        assert [u["UploadId"] for u in uploads if u["Key"] == other_key] == [other]
    finally:
        client.abort_multipart_upload(Bucket=bucket, Key=other_key, UploadId=other)


def test_s3_stores_sharing_a_bucket(s3: S3BlobStore, tmp_path: Path) -> None:
    # Another machine: its own spool directory and client, the same bucket and prefix.
    other = S3BlobStore(
        s3.bucket,
        s3.prefix,
        endpoint_url=s3.endpoint_url,
        region="us-east-1",
        spool_dir=tmp_path / "other-spool",
    )
    ref = s3.put_bytes(b"written on the API machine")
    assert other.read_bytes(ref.sha256) == b"written on the API machine"
    assert other.put_bytes(b"written on the API machine") == ref
    other.delete(ref.sha256)
    assert not s3.exists(ref.sha256)


def test_s3_open_blob_store(s3_server: str, tmp_path: Path) -> None:
    prefix = f"opened/{uuid.uuid4().hex}"
    store = open_blob_store(
        f"s3://{S3_TEST_BUCKET}/{prefix}/",
        spool_dir=tmp_path / "spool",
        s3_endpoint_url=s3_server,
        s3_region="us-east-1",
    )
    assert isinstance(store, S3BlobStore)
    assert (store.bucket, store.prefix, store.endpoint_url) == (
        S3_TEST_BUCKET,
        f"{prefix}/",
        s3_server,
    )
    assert repr(store) == f"S3BlobStore('s3://{S3_TEST_BUCKET}/{prefix}/' at {s3_server})"
    ref = store.put_bytes(b"through the factory")
    assert store.read_bytes(ref.sha256) == b"through the factory"
    store.delete(ref.sha256)
    bare = S3BlobStore.from_url("s3://some-bucket", spool_dir=tmp_path / "spool")
    assert (bare.bucket, bare.prefix, bare.endpoint_url) == ("some-bucket", "", None)


@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("s3://", "invalid S3 bucket name"),
        ("s3://UPPER/prefix", "invalid S3 bucket name"),
        ("s3://a/prefix", "invalid S3 bucket name"),
        ("s3://bucket:9000/prefix", "name a bucket only"),
        ("s3://bucket/prefix?versionId=1", "no query"),
    ],
)
def test_s3_bad_urls(url: str, match: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=match):
        S3BlobStore.from_url(url, spool_dir=tmp_path)


def test_s3_part_size_has_s3s_minimum(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="part_size"):
        S3BlobStore("bucket", spool_dir=tmp_path, part_size=MIN_PART_SIZE - 1)
