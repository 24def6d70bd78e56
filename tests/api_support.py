"""Helpers for the API tests: an app on a chosen database, admin calls, cheap uploads."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from agent.client import AgentClient
from agent.participant import apply_plan
from api.main import create_app
from api.migrate import upgrade
from api.runtime import Runtime, make_runtime
from api.settings import Settings
from fedsrd_core.codec import encode
from fedsrd_core.state import GlobalState, LoraFactors
from fedsrd_core.strategies import RoundContext, get_strategy

ADMIN = "admin-token-for-tests-0123456789"
ADMIN_H = {"Authorization": f"Bearer {ADMIN}"}


def small_run(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "name": "test",
        "model": "tiny",
        "rounds": 3,
        "lora": {"rank": 4},
        "train": {"steps": 1, "batch_size": 2, "seq_len": 384},
        "round_deadline_s": 600,
    }
    body.update(overrides)
    return body


@dataclass
class Api:
    client: TestClient
    rt: Runtime
    settings: Settings

    def admin(self, method: str, path: str, **kw: Any) -> Any:
        return self.client.request(method, path, headers=ADMIN_H, **kw)

    def create_run(self, launch: bool = False, **overrides: Any) -> dict[str, Any]:
        r = self.admin(
            "POST", f"/api/v1/runs?launch={str(launch).lower()}", json=small_run(**overrides)
        )
        assert r.status_code == 201, r.text
        return dict(r.json())

    def enroll(self, run_id: int, name: str) -> tuple[int, str]:
        r = self.admin("POST", f"/api/v1/runs/{run_id}/clients", json={"name": name})
        assert r.status_code == 201, r.text
        return int(r.json()["id"]), str(r.json()["token"])

    def agent(self, run_id: int, token: str) -> AgentClient:
        return AgentClient(self.client, token, run_id, retry_for=0.0)

    def run(self, run_id: int) -> dict[str, Any]:
        return dict(self.admin("GET", f"/api/v1/runs/{run_id}").json())

    def rounds(self, run_id: int) -> list[dict[str, Any]]:
        return list(self.admin("GET", f"/api/v1/runs/{run_id}/rounds").json()["data"])


def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """For a fixture parametrised ``["sqlite", "postgresql"]``: an SQLite file in
    ``tmp_path``, or a fresh database on the real PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'api.db'}"
    return str(request.getfixturevalue("pg_database"))


@contextmanager
def make_api(
    data_dir: Path, database_url: str, model_cache: Path, **settings: Any
) -> Iterator[Api]:
    s = Settings(
        data_dir=data_dir,
        database_url=database_url,
        task_mode=settings.pop("task_mode", "inline"),
        admin_token=ADMIN,
        model_cache=model_cache,
        **settings,
    )
    upgrade(s.resolved_database_url)
    rt = make_runtime(s)
    app = create_app(s, rt)
    try:
        with TestClient(app) as client:
            yield Api(client, rt, s)
    finally:
        rt.close()


class FakeAgent:
    """A client that keeps the global state like a real agent and uploads a cheap update
    (its state plus noise) instead of training: fast, and byte-exact like the real thing."""

    def __init__(self, agent: AgentClient, seed: int = 0) -> None:
        self.agent = agent
        self.info = agent.run_info()
        self.layout = {k: (int(v[0]), int(v[1])) for k, v in self.info["layout"].items()}
        self.rank = int(self.info["lora"]["rank"])
        self.strategy = get_strategy(self.info["strategy"], self.info["strategy_config"])
        self.state: GlobalState | None = None
        self.have_round = -1
        self.gen = torch.Generator().manual_seed(seed)

    def apply(self, plan: dict[str, Any]) -> None:
        """Reach the plan's state exactly as an agent does (digests checked)."""
        self.state, self.have_round = apply_plan(
            self.agent, self.strategy, self.layout, self.rank, self.state, self.have_round, plan
        )

    def poll(self, wait: float = 0.0) -> dict[str, Any]:
        return self.agent.poll(self.have_round if self.state is not None else None, wait)

    def make_update(self, number: int, scale: float = 1e-2) -> bytes:
        assert self.state is not None
        trained = GlobalState(
            {
                name: LoraFactors(
                    f.A + scale * torch.randn(f.A.shape, generator=self.gen),
                    f.B + scale * torch.randn(f.B.shape, generator=self.gen),
                )
                for name, f in self.state.items()
            }
        )
        ctx = RoundContext(
            round=number, seed=self.info["seed"], value_dtype=self.info["value_dtype"]
        )
        up = self.strategy.client_upload(
            self.state, trained, ctx, client_seed=self.info["client_id"]
        )
        return encode(up, value_dtype=self.info["value_dtype"])

    def play_round(self, wait: float = 0.0) -> dict[str, Any] | None:
        """Poll (a long poll if ``wait``); if there is a round to train, sync and upload.
        Returns the upload answer, or None if there was nothing to do."""
        answer = self.poll(wait)
        if answer["action"] != "train":
            return None
        if answer.get("sync"):
            self.apply(answer["sync"])
        assert self.have_round == answer["base_round"]
        blob = self.make_update(answer["round"])
        return self.agent.upload(answer["round"], answer["base_round"], blob, num_samples=4)

    def catch_up(self) -> None:
        plan = self.agent.sync(self.have_round if self.state is not None else None)
        self.apply(plan)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
