"""``fedsrd demo``, the main job of ``make demo``, as the README runs it: API and worker
processes on the embedded default, a simulated run to completion, the adapter exported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from api.launcher import free_port

pytestmark = pytest.mark.slow


def test_fedsrd_demo_runs_to_completion(tmp_path: Path, model_cache: Path) -> None:
    env = {**os.environ, "FEDSRD_MODEL_CACHE": str(model_cache), "OMP_NUM_THREADS": "1"}
    env.pop("FEDSRD_DATABASE_URL", None)
    env.pop("FEDSRD_BROKER_URL", None)
    data = tmp_path / "demo"
    cmd = [sys.executable, "-m", "api.cli", "demo", "--data-dir", str(data)]
    cmd += ["--port", str(free_port()), "--rounds", "2"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "dashboard http://127.0.0.1:" in out.stdout
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["status"] == "completed" and len(summary["rounds"]) == 2
    moved = summary["bytes_up"] + summary["bytes_down"]
    assert 0 < moved < summary["fedavg_equivalent_bytes"]
    # The base model's loss is printed first, so the rounds read as changes from it.
    assert set(summary["base_eval_loss"]) == {"arithmetic", "code", "facts"}
    lines = out.stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if line.split()[:1] == ["round"])
    assert lines[head + 1].split()[0] == "base" and lines[head + 2].split()[0] == "1"
    for r in summary["rounds"]:
        assert set(r["eval_loss"]) == {"arithmetic", "code", "facts"}
        assert all(v is not None and v > 0 for v in r["eval_loss"].values())
    with zipfile.ZipFile(data / f"run-{summary['run']}-adapter.zip") as z:
        assert set(z.namelist()) == {"adapter_config.json", "adapter_model.safetensors"}
