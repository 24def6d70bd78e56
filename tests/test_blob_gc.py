"""Snapshot retention and blob garbage collection.

Store level: :meth:`LocalBlobStore.collect` removes a blob only when its caller's last check
(made with the blob out of place) says so, puts it back otherwise, and loses nothing to a
writer storing the same content at any moment, which a stress test with real threads
checks. Service level, on SQLite and PostgreSQL: old snapshots stop being named after each
round, every round's state is still served (export, sync) from the deltas, and a
collection removes exactly the blobs no row of any run names.
"""

from __future__ import annotations

import io
import json
import os
import random
import threading
import time
import zipfile
from pathlib import Path

import pytest
from safetensors.torch import load as load_safetensors
from sqlalchemy import select

from api import cli
from api.blobstore import LocalBlobStore
from api.blobstore_s3 import S3BlobStore
from api.models import Round, Run, Update
from api.services import storage
from api.services.states import load_state
from fedsrd_core.state import state_digest
from tests.api_support import Api, FakeAgent, make_api
from tests.e2e_support import check_consistent

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
    """Writers store two dozen contents over and over and name each for a while, the way runs
    commit rows after storing; a collector keeps removing what is unnamed and older than
    the grace period. Every check of a named blob must find it."""
    store = LocalBlobStore(tmp_path)
    contents = [f"content {i}".encode() for i in range(24)]
    names: dict[str, int] = {}  # sha -> how many writers name it (the "rows")
    lock = threading.Lock()
    # Far longer than a writer takes from storing to naming (a few ms, more when the machine
    # is loaded), or the test would fail for a reason outside the protocol it checks.
    grace = 0.15
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
    assert removed[0] > 10  # the collector did remove blobs, many times over (about 170 here)
    assert not any(store.gc_dir.iterdir())


# -- the control plane -----------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'api.db'}"
    return str(request.getfixturevalue("pg_database"))


def _play(api: Api, rounds: int) -> tuple[int, dict[int, str], dict[int, str], list[FakeAgent]]:
    """A launched run of ``rounds`` rounds played to the end by three fake agents; the
    digest and the snapshot blob of each round as it closed."""
    created = api.create_run(rounds=rounds)
    run_id = created["id"]
    agents = []
    for i in range(3):
        _, token = api.enroll(run_id, f"site-{i}")
        agents.append(FakeAgent(api.agent(run_id, token), seed=i))
    assert api.admin("POST", f"/api/v1/runs/{run_id}/launch").status_code == 200
    digests: dict[int, str] = {}
    snapshots: dict[int, str] = {}
    for number in range(1, rounds + 1):
        for a in agents:
            a.play_round()
        with api.rt.sessions() as s:
            r = s.scalar(select(Round).where(Round.run_id == run_id, Round.number == number))
            assert r is not None and r.status == "closed" and r.snapshot_blob is not None
            digests[number], snapshots[number] = str(r.digest), r.snapshot_blob
    assert api.run(run_id)["status"] == "completed"
    return run_id, digests, snapshots, agents


def _adapter_tensors(api: Api, run_id: int, number: int) -> dict[str, object]:
    r = api.admin("GET", f"/api/v1/runs/{run_id}/adapter?round={number}")
    assert r.status_code == 200, r.text
    with zipfile.ZipFile(io.BytesIO(r.content)) as z:
        return dict(load_safetensors(z.read("adapter_model.safetensors")))


def test_old_snapshots_are_pruned_and_every_state_is_still_served(
    db_url: str, tmp_path: Path, model_cache: Path
) -> None:
    with make_api(
        tmp_path / "data", db_url, model_cache, gc_after_round=False, keep_uploads=-1
    ) as api:
        run_id, digests, snapshots, agents = _play(api, rounds=4)
        store = api.rt.blobs
        assert [r["snapshot_kept"] for r in api.rounds(run_id)] == [False, False, True, True]
        with api.rt.sessions() as s:
            run = s.get(Run, run_id)
            assert run is not None
            # Rebuilt from the newest kept snapshot before it (the initial state) + deltas.
            for number in range(1, 5):
                assert state_digest(load_state(api.rt, run, number)) == digests[number]
        # The exported adapter of a pruned round is that round's state.
        assert _adapter_tensors(api, run_id, 2).keys() == _adapter_tensors(api, run_id, 4).keys()
        # A client starting from nothing reaches the newest state.
        fresh = FakeAgent(agents[0].agent, seed=9)
        fresh.catch_up()
        assert fresh.have_round == 4 and state_digest(fresh.state) == digests[4]
        # Pruned snapshots are no longer served; kept ones are.
        for number, sha in snapshots.items():
            r = fresh.agent.http.get(
                f"/api/v1/agent/runs/{run_id}/blobs/{sha}", headers=fresh.agent.headers
            )
            assert r.status_code == (404 if number <= 2 else 200), (number, r.text)

        # What names a blob: a run's initial state, a round's delta or kept snapshot, an
        # update; nothing names a pruned snapshot or an unknown key.
        with api.rt.sessions() as s:
            run = s.get(Run, run_id)
            assert run is not None and run.initial_blob is not None
            last = s.scalar(select(Round).where(Round.run_id == run_id, Round.number == 4))
            assert last is not None and last.delta_blob is not None
            update = s.scalar(select(Update.blob).where(Update.round_id == last.id).limit(1))
            assert update is not None
            for sha in (run.initial_blob, last.delta_blob, snapshots[4], update):
                assert storage.is_named(s, sha)
            for sha in (snapshots[1], "0" * 64):
                assert not storage.is_named(s, sha)
            assert storage.named_blobs(s) >= {run.initial_blob, update, snapshots[3]}
            assert snapshots[2] not in storage.named_blobs(s)

        # Within the grace period nothing goes.
        first = storage.collect_garbage(api.rt)
        assert (first.removed, first.recent) == (0, 2)
        dry = storage.collect_garbage(api.rt, grace_s=0, dry_run=True)
        assert (dry.removed, dry.removed_bytes) == (
            2,
            sum(store.size(snapshots[n]) for n in (1, 2)),
        )
        assert all(store.exists(snapshots[n]) for n in (1, 2))
        done = storage.collect_garbage(api.rt, grace_s=0)
        assert done.supported and done.removed == 2 and done.named + 2 == done.scanned
        assert not any(store.exists(snapshots[n]) for n in (1, 2))
        assert all(store.exists(snapshots[n]) for n in (3, 4))
        assert storage.collect_garbage(api.rt, grace_s=0).removed == 0
        # Every blob a row names is intact and every round's state replays to its digest.
        check_consistent(db_url, api.settings.data_dir, run_id)
        with api.rt.sessions() as s:
            run = s.get(Run, run_id)
            assert run is not None
            assert state_digest(load_state(api.rt, run, 1)) == digests[1]


def test_a_blob_another_run_names_is_kept(db_url: str, tmp_path: Path, model_cache: Path) -> None:
    with make_api(
        tmp_path / "data",
        db_url,
        model_cache,
        keep_snapshots=1,
        gc_after_round=False,
        keep_uploads=-1,
    ) as api:
        run_id, _, snapshots, _ = _play(api, rounds=3)
        other = api.create_run()  # not launched: it names nothing yet
        # Another run names the content of a pruned snapshot (identical runs store
        # identical blobs; here a row is made to name it directly).
        with api.rt.transaction() as tx:
            row = tx.session.get(Run, other["id"])
            assert row is not None
            row.initial_blob = snapshots[1]
        result = storage.collect_garbage(api.rt, grace_s=0)
        assert result.removed == 1  # round 2's snapshot only
        assert api.rt.blobs.exists(snapshots[1])
        assert not api.rt.blobs.exists(snapshots[2])
        assert api.rt.blobs.exists(snapshots[3])


@pytest.mark.parametrize("keep", [-1, 1])
def test_keep_setting(keep: int, tmp_path: Path, model_cache: Path) -> None:
    url = f"sqlite:///{tmp_path / 'api.db'}"
    with make_api(tmp_path / "data", url, model_cache, keep_snapshots=keep) as api:
        run_id, *_ = _play(api, rounds=3)
        kept = [r["snapshot_kept"] for r in api.rounds(run_id)]
        assert kept == ([True, True, True] if keep == -1 else [False, False, True])


def test_a_pruned_snapshot_is_kept_for_the_grace_period_after_pruning(
    tmp_path: Path, model_cache: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'api.db'}"
    with make_api(
        tmp_path / "data",
        url,
        model_cache,
        keep_snapshots=1,
        gc_after_round=False,
        keep_uploads=-1,
    ) as api:
        run_id = api.create_run(rounds=2)["id"]
        agents = [FakeAgent(api.agent(run_id, api.enroll(run_id, f"s{i}")[1])) for i in range(2)]
        api.admin("POST", f"/api/v1/runs/{run_id}/launch")
        for a in agents:
            a.play_round()
        store = api.rt.blobs
        assert isinstance(store, LocalBlobStore)
        for blob in store.list_blobs():  # everything so far was stored two hours ago
            _age(store, blob.sha256, 7200)
        with api.rt.sessions() as s:
            first = s.scalar(select(Round.snapshot_blob).where(Round.number == 1))
        assert first is not None
        for a in agents:
            a.play_round()  # round 2 closes and prunes round 1's snapshot
        assert [r["snapshot_kept"] for r in api.rounds(run_id)] == [False, True]
        # No row names it any more, but it stopped being named just now: it stays for the
        # grace period from here (a dump taken a moment ago still names it).
        result = storage.collect_garbage(api.rt)
        assert (result.removed, result.recent) == (0, 1)
        assert store.exists(first)
        assert storage.collect_garbage(api.rt, grace_s=0).removed == 1
        assert not store.exists(first)


def _upload_rows(api: Api, run_id: int) -> list[tuple[int, str, bool]]:
    """(round, blob, released) of every update of the run."""
    with api.rt.sessions() as s:
        rows = s.execute(
            select(Round.number, Update.blob, Update.blob_released_at)
            .join(Round, Update.round_id == Round.id)
            .where(Round.run_id == run_id)
            .order_by(Round.number, Update.client_id)
        ).all()
    return [(n, blob, released is not None) for n, blob, released in rows]


@pytest.mark.parametrize("keep", [0, 1, -1])
def test_uploads_are_released_after_their_round(
    keep: int, db_url: str, tmp_path: Path, model_cache: Path
) -> None:
    with make_api(
        tmp_path / "data", db_url, model_cache, keep_uploads=keep, gc_after_round=False
    ) as api:
        run_id, _, snapshots, _ = _play(api, rounds=3)
        rows = _upload_rows(api, run_id)
        assert [n for n, _, _ in rows] == [1, 1, 1, 2, 2, 2, 3, 3, 3]
        released = [gone for _, _, gone in rows]
        newest_kept = {0: 4, 1: 3, -1: 1}[keep]  # the first round whose uploads stay
        assert released == [n < newest_kept for n, _, _ in rows]
        with api.rt.sessions() as s:
            named = storage.named_blobs(s)
        for _, blob, gone in rows:
            assert (blob in named) is not gone
        # Collection removes exactly the released uploads (the fake agents' updates all
        # differ) and round 1's pruned snapshot.
        result = storage.collect_garbage(api.rt, grace_s=0)
        assert result.removed == sum(released) + 1
        assert not api.rt.blobs.exists(snapshots[1])
        for _, blob, gone in rows:
            assert api.rt.blobs.exists(blob) is not gone
        check_consistent(db_url, api.settings.data_dir, run_id)


def test_uploads_of_a_round_not_closed_are_never_released(
    tmp_path: Path, model_cache: Path
) -> None:
    from api.services import updates as update_service

    url = f"sqlite:///{tmp_path / 'api.db'}"
    with make_api(tmp_path / "data", url, model_cache) as api:
        run_id = api.create_run(rounds=2)["id"]
        agents = [FakeAgent(api.agent(run_id, api.enroll(run_id, f"s{i}")[1])) for i in range(3)]
        api.admin("POST", f"/api/v1/runs/{run_id}/launch")
        for a in agents:
            a.play_round()
        for a in agents[:2]:
            a.play_round()  # round 2 stays open, two of three in
        # Even asked for round 2 (as a worker catching up would be), only closed rounds'
        # uploads are released: round 2 may still be aggregated (or, failed, resumed).
        assert update_service.release_uploads(api.rt, run_id, 2) == 0
        assert [(n, gone) for n, _, gone in _upload_rows(api, run_id)] == [
            (1, True),
            (1, True),
            (1, True),
            (2, False),
            (2, False),
        ]


def test_an_identical_retry_of_a_released_upload_gets_the_same_answer(
    tmp_path: Path, model_cache: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'api.db'}"
    with make_api(tmp_path / "data", url, model_cache, blob_grace_s=0) as api:
        run_id = api.create_run(rounds=2)["id"]
        agents = [FakeAgent(api.agent(run_id, api.enroll(run_id, f"s{i}")[1])) for i in range(2)]
        api.admin("POST", f"/api/v1/runs/{run_id}/launch")
        blobs, answers = [], []
        for a in agents:
            answer = a.poll()
            a.apply(answer["sync"])
            blob = a.make_update(1)
            blobs.append(blob)
            answers.append(a.agent.upload(1, 0, blob, num_samples=4))
        for a in agents:
            a.play_round()  # round 2: round 1's uploads were released and collected
        rows = _upload_rows(api, run_id)
        assert all(gone for n, _, gone in rows if n == 1)
        assert not api.rt.blobs.exists(answers[0]["sha256"])
        again = agents[0].agent.upload(1, 0, blobs[0], num_samples=4)
        assert {**again, "round_complete": True} == {**answers[0], "round_complete": True}


def test_keep_snapshots_zero_is_refused() -> None:
    from pydantic import ValidationError

    from api.settings import Settings

    with pytest.raises(ValidationError, match="FEDSRD_KEEP_SNAPSHOTS must be at least 1"):
        Settings(keep_snapshots=0)


def test_collection_after_each_round(tmp_path: Path, model_cache: Path) -> None:
    """The aggregation job collects after its commit: with no grace period, a pruned
    snapshot is gone as soon as the next round closes."""
    url = f"sqlite:///{tmp_path / 'api.db'}"
    with make_api(tmp_path / "data", url, model_cache, keep_snapshots=1, blob_grace_s=0) as api:
        run_id, _, snapshots, _ = _play(api, rounds=3)
        assert [api.rt.blobs.exists(snapshots[n]) for n in (1, 2, 3)] == [False, False, True]
        check_consistent(url, api.settings.data_dir, run_id)


def test_a_client_whose_plan_names_a_pruned_snapshot_asks_again(
    tmp_path: Path, model_cache: Path
) -> None:
    from agent.participant import StalePlanError

    url = f"sqlite:///{tmp_path / 'api.db'}"
    with make_api(tmp_path / "data", url, model_cache, keep_snapshots=1) as api:
        created = api.create_run(rounds=3)
        run_id = created["id"]
        agents = []
        for i in range(3):
            _, token = api.enroll(run_id, f"site-{i}")
            agents.append(FakeAgent(api.agent(run_id, token), seed=i))
        api.admin("POST", f"/api/v1/runs/{run_id}/launch")
        for a in agents:
            a.play_round()
        # A slow download: the plan (round 1's snapshot) is made now, used after round 2
        # has closed and pruned that snapshot.
        slow = FakeAgent(agents[2].agent, seed=7)
        stale_plan = slow.agent.sync(None)
        assert stale_plan["snapshot"]["round"] == 1
        for a in agents:
            a.play_round()
        assert [r["snapshot_kept"] for r in api.rounds(run_id)][:2] == [False, True]
        with pytest.raises(StalePlanError) as e:
            slow.apply(stale_plan)
        assert "snapshot of round 1 is no longer served" in str(e.value)
        assert (e.value.state, e.value.have_round) == (None, -1)  # nothing applied
        slow.catch_up()  # a fresh plan
        assert slow.have_round == 2 and slow.state is not None
        assert state_digest(slow.state) == api.rounds(run_id)[1]["digest"]


def test_gc_command(tmp_path: Path, model_cache: Path, monkeypatch, capsys) -> None:
    url = f"sqlite:///{tmp_path / 'api.db'}"
    with make_api(
        tmp_path / "data",
        url,
        model_cache,
        keep_snapshots=1,
        gc_after_round=False,
        keep_uploads=-1,
    ) as api:
        _, _, snapshots, _ = _play(api, rounds=3)
    monkeypatch.setenv("FEDSRD_DATABASE_URL", url)
    args = ["gc", "--data-dir", str(tmp_path / "data"), "--grace", "0"]
    assert cli.main([*args, "--dry-run"]) == 0
    dry = json.loads(capsys.readouterr().out)
    assert (dry["dry_run"], dry["removed"]) == (True, 2)
    assert cli.main(args) == 0
    assert json.loads(capsys.readouterr().out)["removed"] == 2
    store = LocalBlobStore(tmp_path / "data" / "blobs")
    assert [store.exists(snapshots[n]) for n in (1, 2, 3)] == [False, False, True]


def test_an_unversioned_s3_store_is_not_collected(
    s3_server: str, tmp_path: Path, model_cache: Path, monkeypatch, capsys
) -> None:
    from tests.conftest import S3_TEST_BUCKET

    blob_url = f"s3://{S3_TEST_BUCKET}/gc-{tmp_path.name}"
    url = f"sqlite:///{tmp_path / 'api.db'}"
    with make_api(
        tmp_path / "data", url, model_cache, blob_url=blob_url, s3_endpoint_url=s3_server
    ) as api:
        orphan = api.rt.blobs.put_bytes(b"named by no row")
        result = storage.collect_garbage(api.rt, grace_s=0)
        assert not result.supported and result.removed == 0
        assert api.rt.blobs.exists(orphan.sha256)
    for k, v in {
        "FEDSRD_DATABASE_URL": url,
        "FEDSRD_BLOB_URL": blob_url,
        "FEDSRD_S3_ENDPOINT_URL": s3_server,
    }.items():
        monkeypatch.setenv(k, v)
    assert cli.main(["gc", "--data-dir", str(tmp_path / "data"), "--grace", "0"]) == 2
    out = capsys.readouterr()
    assert json.loads(out.out)["supported"] is False
    assert "versioning enabled" in out.err


def test_a_participant_keeps_the_progress_of_a_plan_that_went_stale(
    tmp_path: Path, model_cache: Path, tiny_model: Path
) -> None:
    """The agent's own state keeper: what it applied before a blob of the plan turned out to
    be gone stays (checked against its digest), so the fresh plan starts from there."""
    from agent.participant import Participant, StalePlanError
    from fedsrd_core.data import generate
    from fedsrd_core.modeling import load_causal_lm

    url = f"sqlite:///{tmp_path / 'api.db'}"
    with make_api(tmp_path / "data", url, model_cache) as api:
        run_id, digests, _, agents = _play(api, rounds=2)
        client = agents[0].agent
        model, tok = load_causal_lm(str(tiny_model))
        p = Participant(client, model, tok, generate("code", 4, seed=0), agents[0].info)
        plan = client.sync(None)  # the snapshot of round 2
        assert plan["snapshot"]["round"] == 2
        # The same snapshot, then a delta whose blob the server does not have.
        gone = {"round": 3, "sha256": "f" * 64, "size": 1, "digest": "0" * 64}
        with pytest.raises(StalePlanError, match="delta of round 3 is no longer served"):
            p.sync({**plan, "deltas": [gone]})
        assert p.have_round == 2 and p.state is not None
        assert state_digest(p.state) == digests[2]


# -- S3 (versioned bucket) -------------------------------------------------------------------


@pytest.fixture
def versioned(s3_server: str, tmp_path: Path) -> S3BlobStore:
    from tests.conftest import S3_VERSIONED_BUCKET

    return S3BlobStore(
        S3_VERSIONED_BUCKET,
        f"gc-{tmp_path.name}",
        endpoint_url=s3_server,
        spool_dir=tmp_path / "spool",
    )


def test_s3_collection_needs_versioning(versioned: S3BlobStore, s3_server: str, tmp_path: Path):
    from tests.conftest import S3_TEST_BUCKET

    plain = S3BlobStore(S3_TEST_BUCKET, "gc", endpoint_url=s3_server, spool_dir=tmp_path)
    assert versioned.can_collect() and not plain.can_collect()


def test_s3_collect_removes_only_the_listed_version(versioned: S3BlobStore) -> None:
    store = versioned
    gone, kept = store.put_bytes(b"garbage"), store.put_bytes(b"still named")
    listed = {b.sha256: b for b in store.list_blobs()}
    assert set(listed) == {gone.sha256, kept.sha256}
    assert listed[gone.sha256].size == gone.size and listed[gone.sha256].version
    seen: list[float] = []

    def unneeded(stored_at: float) -> bool:
        seen.append(stored_at)
        return False

    assert store.collect(gone.sha256, unneeded, version=listed[gone.sha256].version)
    assert not store.exists(gone.sha256)
    assert seen and abs(seen[0] - time.time()) < 120
    assert not store.collect(kept.sha256, lambda _: True, version=listed[kept.sha256].version)
    assert store.read_bytes(kept.sha256) == b"still named"
    # Already gone, or a version that is not there: nothing to do.
    assert not store.collect(gone.sha256, unneeded, version=listed[gone.sha256].version)
    assert {b.sha256 for b in store.list_blobs()} == {kept.sha256}


def test_s3_writer_after_the_listing_keeps_its_version(versioned: S3BlobStore) -> None:
    store = versioned
    ref = store.put_bytes(b"racing")
    (listed,) = list(store.list_blobs())
    # Another run stores the same content after the collector listed it: the writer renews
    # the object (a copy onto itself), a newer version the collector does not touch.
    assert store.put_bytes(b"racing") == ref
    assert store.collect(ref.sha256, lambda _: False, version=listed.version) is False
    assert store.read_bytes(ref.sha256) == b"racing"
    (now,) = list(store.list_blobs())
    assert now.version != listed.version
    assert store.collect(ref.sha256, lambda _: False, version=now.version)
    assert not store.exists(ref.sha256)


def test_s3_renew_of_a_missing_blob_is_a_no_op(versioned: S3BlobStore) -> None:
    versioned.renew("ab" * 32)
    assert not versioned._renew("ab" * 32)
    ref = versioned.put_bytes(b"renewed")
    (before,) = list(versioned.list_blobs())
    versioned.renew(ref.sha256)
    (after,) = list(versioned.list_blobs())
    assert after.version != before.version
    assert versioned.read_bytes(ref.sha256) == b"renewed"


def test_versioned_s3_store_collects_pruned_snapshots(
    s3_server: str, tmp_path: Path, model_cache: Path
) -> None:
    from tests.conftest import S3_VERSIONED_BUCKET

    blob_url = f"s3://{S3_VERSIONED_BUCKET}/gc-run-{tmp_path.name}"
    url = f"sqlite:///{tmp_path / 'api.db'}"
    with make_api(
        tmp_path / "data",
        url,
        model_cache,
        blob_url=blob_url,
        s3_endpoint_url=s3_server,
        keep_snapshots=1,
        gc_after_round=False,
        keep_uploads=-1,
    ) as api:
        run_id, digests, snapshots, _ = _play(api, rounds=3)
        store = api.rt.blobs
        assert storage.collect_garbage(api.rt).removed == 0  # all within the grace period
        result = storage.collect_garbage(api.rt, grace_s=0)
        assert result.supported and result.removed == 2
        assert [store.exists(snapshots[n]) for n in (1, 2, 3)] == [False, False, True]
        check_consistent(url, api.settings.data_dir, run_id, store=store)
        with api.rt.sessions() as s:
            run = s.get(Run, run_id)
            assert run is not None
            assert state_digest(load_state(api.rt, run, 1)) == digests[1]
