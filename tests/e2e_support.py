"""Real processes for the end-to-end tests: uvicorn and Celery workers, started with the
same launcher as ``fedsrd up``."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from agent.client import AgentClient
from api.blobstore import BlobStore, LocalBlobStore
from api.launcher import Service, api_service, free_port, wait_ready, wait_worker, worker_service
from api.migrate import upgrade
from fedsrd_core.snapshot import decode_global_delta, decode_snapshot
from fedsrd_core.state import GlobalState, state_digest
from fedsrd_core.strategies import get_strategy
from tests.api_support import ADMIN, ADMIN_H, small_run


@dataclass
class System:
    env: dict[str, str]
    data_dir: Path
    port: int
    api: Service
    workers: list[Service] = field(default_factory=list)
    #: The blob store the processes share, where it is not ``data_dir/blobs`` (S3).
    blobs: BlobStore | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60.0)

    def admin(self, method: str, path: str, **kw: Any) -> httpx.Response:
        return httpx.request(method, self.url + path, headers=ADMIN_H, timeout=120.0, **kw)

    def start_worker(self, **extra_env: str) -> Service:
        env = {**self.env, **extra_env}
        w = worker_service(env, self.data_dir / "logs", name=f"worker{len(self.workers)}").start()
        self.workers.append(w)
        wait_worker(w)
        return w

    def restart_api(self, pause: float = 0.0) -> None:
        self.api.kill()
        time.sleep(pause)
        self.api = api_service(self.env, self.port, self.data_dir / "logs").start()
        wait_ready(self.url, self.api)

    def create_run(self, launch: bool = False, **overrides: Any) -> dict[str, Any]:
        r = self.admin(
            "POST", f"/api/v1/runs?launch={str(launch).lower()}", json=small_run(**overrides)
        )
        assert r.status_code == 201, r.text
        return dict(r.json())

    def enroll(self, run_id: int, name: str) -> str:
        r = self.admin("POST", f"/api/v1/runs/{run_id}/clients", json={"name": name})
        assert r.status_code == 201, r.text
        return str(r.json()["token"])

    def agent(self, run_id: int, token: str, retry_for: float = 120.0) -> AgentClient:
        return AgentClient(
            self.http(), token, run_id, retry_for=retry_for, base_delay=0.2, max_delay=2.0
        )

    def run(self, run_id: int) -> dict[str, Any]:
        return dict(self.admin("GET", f"/api/v1/runs/{run_id}").json())

    def rounds(self, run_id: int) -> list[dict[str, Any]]:
        return list(self.admin("GET", f"/api/v1/runs/{run_id}/rounds").json()["data"])

    def wait_run(
        self, run_id: int, status: str = "completed", timeout: float = 300.0
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = self.run(run_id)
            if run["status"] == status:
                return run
            if run["status"] in ("failed", "cancelled", "completed") and run["status"] != status:
                raise AssertionError(
                    f"run ended {run['status']}: {run['status_reason']}\n{self.logs()}"
                )
            time.sleep(0.2)
        raise TimeoutError(f"run {run_id} not {status}: {self.run(run_id)}\n{self.logs()}")

    def wait_round(
        self, run_id: int, number: int, status: str, timeout: float = 120.0
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rounds = self.rounds(run_id)
            if len(rounds) >= number and rounds[number - 1]["status"] == status:
                return rounds[number - 1]
            time.sleep(0.05)
        raise TimeoutError(f"round {number} not {status}: {self.rounds(run_id)}\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(f"--- {s.name}\n{s.tail(40)}" for s in [self.api, *self.workers])

    def check_consistent(self, run_id: int) -> None:
        """Rebuild the run from the database and the blob store: every update's blob is
        there; replaying the global deltas from the initial snapshot reproduces every
        published digest and every snapshot; no temporary file is left behind."""
        check_consistent(self.env["FEDSRD_DATABASE_URL"], self.data_dir, run_id, self.blobs)


def server_state(
    database_url: str, data_dir: Path, run_id: int, blobs: BlobStore | None = None
) -> GlobalState:
    """The server's global state after the run's newest closed round (from its snapshot)."""
    from sqlalchemy import select

    from api.db import make_engine, make_session_factory
    from api.models import Round, Run

    engine = make_engine(database_url or f"sqlite:///{data_dir / 'fedsrd.db'}")
    try:
        with make_session_factory(engine)() as s:
            run = s.get(Run, run_id)
            assert run is not None
            last = s.scalars(
                select(Round)
                .where(Round.run_id == run_id, Round.status == "closed")
                .order_by(Round.number.desc())
            ).first()
            assert last is not None and last.snapshot_blob is not None
            layout = {k: (int(v[0]), int(v[1])) for k, v in run.layout.items()}
            data = (blobs or LocalBlobStore(data_dir / "blobs")).read_bytes(last.snapshot_blob)
            return decode_snapshot(data, layout, int(run.config["lora"]["rank"]))
    finally:
        engine.dispose()


def check_consistent(
    database_url: str, data_dir: Path, run_id: int, store: BlobStore | None = None
) -> None:
    """See :meth:`System.check_consistent`; ``store``: the shared blob store where it is not
    ``data_dir/blobs`` (its temp data is then the caller's to check)."""
    from sqlalchemy import select

    from api.db import make_engine, make_session_factory
    from api.models import Round, Run, Update

    blobs = store or LocalBlobStore(data_dir / "blobs")
    engine = make_engine(database_url or f"sqlite:///{data_dir / 'fedsrd.db'}")
    try:
        with make_session_factory(engine)() as s:
            run = s.get(Run, run_id)
            assert run is not None and run.initial_blob is not None
            layout = {k: (int(v[0]), int(v[1])) for k, v in run.layout.items()}
            rank = int(run.config["lora"]["rank"])
            strategy = get_strategy(run.config["strategy"], run.config["strategy_config"])
            state = decode_snapshot(blobs.read_bytes(run.initial_blob), layout, rank)
            assert state_digest(state) == run.initial_digest
            rounds = s.scalars(
                select(Round).where(Round.run_id == run_id).order_by(Round.number)
            ).all()
            kept_from: int | None = None  # the oldest round whose snapshot is kept
            for r in rounds:
                for u in s.scalars(select(Update).where(Update.round_id == r.id)):
                    if u.blob_released_at is not None:  # past FEDSRD_KEEP_UPLOADS
                        assert r.status == "closed", f"round {r.number}: upload released early"
                        continue
                    data = blobs.read_bytes(u.blob)
                    assert hashlib.sha256(data).hexdigest() == u.blob and len(data) == u.size
                if r.status != "closed":
                    continue
                delta = blobs.read_bytes(r.delta_blob)
                strategy.apply_global(state, decode_global_delta(delta, layout, rank))
                assert state_digest(state) == r.digest, f"round {r.number}: replay differs"
                if r.snapshot_blob is None:  # pruned: only rounds older than a kept one
                    assert kept_from is None, f"round {r.number}: pruned after a kept snapshot"
                    continue
                kept_from = r.number if kept_from is None else kept_from
                snap = decode_snapshot(blobs.read_bytes(r.snapshot_blob), layout, rank)
                assert state_digest(snap) == r.digest, f"round {r.number}: snapshot differs"
            closed = [r for r in rounds if r.status == "closed"]
            assert not closed or closed[-1].snapshot_blob is not None, "newest snapshot pruned"
    finally:
        engine.dispose()
    if store is None:
        assert not any((data_dir / "blobs" / "tmp").iterdir()), "temporary blob files left"


@contextmanager
def system(
    tmp: Path, database_url: str, broker_url: str, model_cache: Path, **extra: str
) -> Iterator[System]:
    data_dir = tmp / "data"
    env = {
        "FEDSRD_DATA_DIR": str(data_dir),
        "FEDSRD_DATABASE_URL": database_url,
        "FEDSRD_BROKER_URL": broker_url,
        "FEDSRD_TASK_MODE": "celery",
        "FEDSRD_ADMIN_TOKEN": ADMIN,
        "FEDSRD_MODEL_CACHE": str(model_cache),
        "FEDSRD_SWEEP_INTERVAL": "0.5",
        "OMP_NUM_THREADS": "1",
        **extra,
    }
    upgrade(database_url or f"sqlite:///{data_dir / 'fedsrd.db'}")
    port = free_port()
    api = api_service(env, port, data_dir / "logs").start()
    sys_ = System(env, data_dir, port, api)
    try:
        wait_ready(sys_.url, api)
        yield sys_
    finally:
        for s in [sys_.api, *sys_.workers]:
            s.stop()
