"""``fedsrd demo``, the main job of ``make demo``, as the README runs it: API and worker
processes on the embedded default, a simulated run to completion, the adapter exported."""

from __future__ import annotations

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
    lines = out.stdout.splitlines()
    assert not any(line.startswith("{") for line in lines)  # a table, not a raw JSON line
    assert "run 1 (fedsrd): completed" in lines
    head = next(i for i, line in enumerate(lines) if line.split()[:1] == ["round"])
    assert lines[head].split()[-2:] == ["state", "digest"]
    for domain in ("arithmetic", "code", "facts"):  # per-domain eval losses, base first
        assert f"{domain} loss" in lines[head]
    base, *rounds = (line.split() for line in lines[head + 1 : head + 4])
    assert base[0] == "base" and [r[0] for r in rounds] == ["1", "2"]
    assert all(float(x) > 0 for x in base[1:5])
    for r in rounds:
        assert len(r[-1]) == 64 and int(r[-1], 16) >= 0  # the state digest, in full
        assert all(float(x) > 0 for x in r[1:8])  # traffic, train, mean and domain losses
    # Seconds from the round's last update to the next round's opening; the last has none.
    assert float(rounds[0][8]) > 0 and rounds[1][8] == "-"
    moved = next(line for line in lines if line.startswith("fedsrd demo: moved"))
    mib = [float(w) for w in moved.split() if w.replace(".", "").isdigit()]
    assert 0 < mib[0] < mib[1]  # what moved, and what FedAvg's dense exchange would have
    with zipfile.ZipFile(data / "run-1-adapter.zip") as z:
        assert set(z.namelist()) == {"adapter_config.json", "adapter_model.safetensors"}


def test_the_round_table_has_digests_and_domain_losses(capsys: pytest.CaptureFixture) -> None:
    from api.cli import _print_rounds

    digest = "ab" * 32
    rounds = [
        {
            "number": 1,
            "digest": digest,
            "metrics": {
                "bytes_up_mean": 2048,
                "bytes_down": 1024,
                "train_loss": 2.5,
                "turnaround_s": 3.25,
                "eval": {"code": {"loss": 2.0}, "facts": {"loss": 3.0}},
            },
        },
        {"number": 2, "digest": None, "metrics": {}},  # still aggregating
    ]
    run = {"id": 7, "strategy": "fedsrd", "status": "running"}
    _print_rounds(run, rounds, {"code": 2.5, "facts": 3.5})
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "run 7 (fedsrd): running"
    assert lines[1].split() == [
        "round", "KiB", "up/client", "KiB", "down", "train", "loss", "eval", "loss",
        "code", "loss", "facts", "loss", "seconds", "state", "digest",
    ]  # fmt: skip
    assert lines[2].split() == ["base", "3.000", "2.500", "3.500"]
    first = ["1", "2.0", "1.0", "2.500", "2.500", "2.000", "3.000", "3.2", digest]
    assert lines[3].split() == first
    assert lines[4].split() == ["2", "0.0", "0.0", "-", "-", "-", "-", "-", "-"]
