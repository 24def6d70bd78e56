"""The compose stack's one-shot jobs (docker/compose_tasks.py) without Docker: claiming demo
sites, creating the S3 bucket (moto's server), and the `demo` profile's whole path (set-up,
then one agent process per site) against a real API and worker."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from types import ModuleType

import boto3
import pytest

from tests.api_support import ADMIN
from tests.e2e_support import system

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "docker" / "compose_tasks.py"


def _tasks() -> ModuleType:
    spec = importlib.util.spec_from_file_location("compose_tasks", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_claim_site(tmp_path: Path) -> None:
    tasks = _tasks()
    for i in (1, 2, 3, 10):
        (tmp_path / f"site-{i}").mkdir()
    got: dict[str, Path | None] = {}

    def claim(me: str) -> None:
        got[me] = tasks.claim_site(tmp_path, me)

    threads = [threading.Thread(target=claim, args=(f"host{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(p.name for p in got.values() if p is not None) == [
        "site-1",
        "site-10",
        "site-2",
        "site-3",
    ]
    for me, site in got.items():  # a restarted container gets its own site back
        assert tasks.claim_site(tmp_path, me) == site
    assert tasks.claim_site(tmp_path, "host-too-many") is None


def test_ensure_bucket(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    tasks = _tasks()
    bucket = f"fedsrd-new-{uuid.uuid4().hex[:12]}"
    monkeypatch.setenv("FEDSRD_BLOB_URL", f"s3://{bucket}/blobs")
    monkeypatch.setenv("FEDSRD_S3_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("FEDSRD_S3_REGION", "us-east-1")
    assert tasks.ensure_bucket() == 0
    assert tasks.ensure_bucket() == 0  # exists: nothing to do
    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    s3.head_bucket(Bucket=bucket)
    # Made collectable: versioned, with the versions renewals leave expiring.
    assert s3.get_bucket_versioning(Bucket=bucket)["Status"] == "Enabled"
    (rule,) = s3.get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"]
    assert rule["NoncurrentVersionExpiration"]["NoncurrentDays"] == 1
    s3.delete_bucket(Bucket=bucket)
    monkeypatch.setenv("FEDSRD_BLOB_URL", "file:///blobs")
    assert tasks.ensure_bucket() == 0


@pytest.mark.slow
def test_demo_profile_path(tmp_path: Path, model_cache: Path) -> None:
    root = tmp_path / "demo"
    root.mkdir()
    with system(tmp_path, "", "filesystem://", model_cache) as s:
        s.start_worker()
        env = {
            **os.environ,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "FEDSRD_DEMO_SERVER": s.url,
            "FEDSRD_DEMO_AGENTS": "2",
            "FEDSRD_DEMO_ROUNDS": "1",
            "FEDSRD_ADMIN_TOKEN": ADMIN,
            "FEDSRD_MODEL_CACHE": str(model_cache),
        }

        def task(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, str(SCRIPT), *args, str(root)],
                env=env,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )

        setup = task("demo-setup")
        assert setup.returncode == 0, setup.stderr
        run_id = json.loads((root / "run.json").read_text())["run"]
        assert task("demo-setup").stdout.startswith("compose_tasks: demo already set up")
        assert len(s.admin("GET", "/api/v1/runs").json()["data"]) == 1
        assert oct((root / "site-1" / "agent.toml").stat().st_mode & 0o777) == "0o600"

        agents = [
            subprocess.Popen(
                [sys.executable, str(SCRIPT), "demo-agent", str(root)],
                env={**env, "HOSTNAME": f"replica-{i}"},
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for i in range(2)
        ]
        outs = [a.communicate(timeout=600)[0] for a in agents]
        for a, out in zip(agents, outs, strict=True):
            assert a.returncode == 0, f"{out}\n{s.logs()}"
            assert '"event": "run completed"' in out
        extra = task("demo-agent")
        assert extra.returncode != 0 and "every site" in extra.stderr
        run = s.wait_run(run_id)
        assert run["status"] == "completed"
        assert len(s.rounds(run_id)[0]["metrics"]["participants"]) == 2
        s.check_consistent(run_id)
