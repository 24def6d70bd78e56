"""Blob garbage collection at the store level: :meth:`LocalBlobStore.collect` removes a blob
only when its caller's last check (made with the blob out of place) says so, puts it back
otherwise, and loses nothing to a writer storing the same content at any moment, which a
stress test with real threads checks.
"""

from __future__ import annotations

import os
import random
import threading
import time
from pathlib import Path

import pytest

from api.blobstore import LocalBlobStore

# -- the store -------------------------------------------------------------------------------


def _age(store: LocalBlobStore, sha: str, seconds: float) -> None:
    """Mark a blob as stored ``seconds`` ago."""
    t = time.time() - seconds
    os.utime(store.local_path(sha), (t, t))


def test_list_blobs(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)
    refs = [store.put_bytes(bytes([i]) * (i + 1)) for i in range(5)]
    (store.tmp_dir / "in-progress.part").write_bytes(b"not a blob")
    listed = {b.sha256: b for b in store.list_blobs()}
    assert set(listed) == {r.sha256 for r in refs}
    for r in refs:
        assert listed[r.sha256].size == r.size
        assert abs(listed[r.sha256].stored_at - time.time()) < 60


def test_collect_removes_or_puts_back(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)
    gone, kept = store.put_bytes(b"garbage"), store.put_bytes(b"still named")
    _age(store, gone.sha256, 100)
    seen: list[float] = []

    def unneeded(stored_at: float) -> bool:
        assert not store.exists(gone.sha256)  # asked with the blob out of place
        seen.append(stored_at)
        return False

    assert store.collect(gone.sha256, unneeded)
    assert not store.exists(gone.sha256)
    assert seen and seen[0] < time.time() - 90  # the time it was last stored
    inode = store.local_path(kept.sha256).stat().st_ino
    assert not store.collect(kept.sha256, lambda _: True)
    assert store.read_bytes(kept.sha256) == b"still named"
    assert store.local_path(kept.sha256).stat().st_ino == inode
    assert not store.collect(gone.sha256, unneeded)  # already gone
    assert not any(store.gc_dir.iterdir())


def test_collect_puts_back_when_the_check_fails(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)
    ref = store.put_bytes(b"database down")

    def broken(_: float) -> bool:
        raise ConnectionError("database unreachable")

    with pytest.raises(ConnectionError):
        store.collect(ref.sha256, broken)
    assert store.read_bytes(ref.sha256) == b"database down"
    assert not any(store.gc_dir.iterdir())


def test_writer_before_the_collectors_check_renews_the_blob(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)
    ref = store.put_bytes(b"stored again")
    _age(store, ref.sha256, 7200)
    store.put_bytes(b"stored again")  # another run stores the same content now
    grace = 3600.0
    assert not store.collect(ref.sha256, lambda at: at > time.time() - grace)
    assert store.read_bytes(ref.sha256) == b"stored again"


@pytest.mark.parametrize("needed", [False, True])
def test_writer_during_the_collectors_check_keeps_its_copy(tmp_path: Path, needed: bool) -> None:
    store = LocalBlobStore(tmp_path)
    ref = store.put_bytes(b"racing")
    _age(store, ref.sha256, 7200)

    def check(_: float) -> bool:
        # A writer of the same content comes while the blob is out of place: it finds it
        # missing and puts its own copy in.
        assert store.put_bytes(b"racing") == ref
        return needed

    assert not store.collect(ref.sha256, check)  # the blob is there either way
    assert store.read_bytes(ref.sha256) == b"racing"
    # The writer's fresh copy stays (not the collector's old one put back over it).
    assert store.local_path(ref.sha256).stat().st_mtime > time.time() - 60
    assert not any(store.gc_dir.iterdir())


def test_recover_collection_after_a_crash(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)
    a, b = store.put_bytes(b"held when the collector died"), store.put_bytes(b"stored again")
    # What a collector killed between taking blobs out and its decision leaves behind.
    os.rename(store.local_path(a.sha256), store.gc_dir / f"{a.sha256}.dead1")
    os.link(store.local_path(b.sha256), store.gc_dir / f"{b.sha256}.dead2")
    (store.gc_dir / "unrelated").write_bytes(b"x")
    assert LocalBlobStore(tmp_path).recover_collection() == 2
    assert store.read_bytes(a.sha256) == b"held when the collector died"
    assert store.read_bytes(b.sha256) == b"stored again"
    assert sorted(p.name for p in store.gc_dir.iterdir()) == ["unrelated"]


def test_collector_never_removes_a_blob_a_writer_names(tmp_path: Path) -> None:
    """Writers store a few contents over and over and name each for a while, the way runs
    commit rows after storing; a collector keeps removing what is unnamed and older than
    the grace period. Every check of a named blob must find it."""
    store = LocalBlobStore(tmp_path)
    contents = [f"content {i}".encode() for i in range(3)]
    names: dict[str, int] = {}  # sha -> how many writers name it (the "rows")
    lock = threading.Lock()
    grace = 0.02  # longer than any writer takes from storing to naming (< 5 ms here)
    stop = time.monotonic() + 3.0
    failures: list[str] = []
    removed = [0]

    def writer(seed: int) -> None:
        rng = random.Random(seed)
        while time.monotonic() < stop and not failures:
            data = rng.choice(contents)
            ref = store.put_bytes(data)
            time.sleep(rng.uniform(0, 0.004))  # from storing to the commit of the row
            with lock:
                names[ref.sha256] = names.get(ref.sha256, 0) + 1
            for _ in range(3):
                if not store.exists(ref.sha256):
                    failures.append(f"named blob {ref.sha256[:12]} is missing")
                time.sleep(rng.uniform(0, 0.01))
            with lock:
                names[ref.sha256] -= 1

    def collector() -> None:
        while time.monotonic() < stop and not failures:
            for blob in store.list_blobs():
                with lock:
                    if names.get(blob.sha256):
                        continue

                def check(at: float, sha: str = blob.sha256) -> bool:
                    with lock:
                        return at > time.time() - grace or bool(names.get(sha))

                if blob.stored_at <= time.time() - grace and store.collect(blob.sha256, check):
                    removed[0] += 1

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    threads.append(threading.Thread(target=collector))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures[:3]
    assert removed[0] > 10  # the collector did remove blobs, many times over
    assert not any(store.gc_dir.iterdir())
