"""Where a round's time goes through the real control plane, with many simulated clients.

``python benchmarks/round_split.py [--clients 64] [--rounds 2]``: starts the embedded stack
(API and worker processes, SQLite, local blobs, filesystem broker: ``fedsrd up``'s
composition) in a temporary data directory, runs a simulated federation of ``--clients``
clients on the tiny model (iid partition, one local step each), and reports per round:

- collect: round opened until its last update arrived (the clients' training, run one after
  another by the single worker, plus their uploads through the API);
- load: the round's rows and the previous snapshot's header;
- read: the coded uploads read and parsed (their entries decode lazily, inside the step);
- server math: the strategy's step over every module, with the uploads' decoding;
- encode: the global delta's wire blob; apply: decoding and applying it as clients do;
- write: the new snapshot; store: its commit and the delta's;
- close: from the last update to the round's close (dispatch, queueing, the aggregation, the
  closing transaction), next to the aggregation's own time.

The last line is the JSON summary. Timings are one run on whatever machine this is: compare
the parts with each other, not with another run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common as c
import httpx

PARTS = ("load_state_s", "read_uploads_s", "step_server_round_s", "step_encode_s",
         "step_apply_s", "step_write_s", "store_s")  # fmt: skip
NAMES = {
    "load_state_s": "load",
    "read_uploads_s": "read",
    "step_server_round_s": "server math",
    "step_encode_s": "encode",
    "step_apply_s": "apply",
    "step_write_s": "write",
    "store_s": "store",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--strategy", default="fedsrd")
    ap.add_argument("--port", type=int, default=0, help="0: a free port")
    args = ap.parse_args()
    import os

    from api.cli import _start
    from api.launcher import free_port
    from fedsrd_core.cli import DEFAULT_CACHE

    # The tiny model from the usual cache, not rebuilt in the temporary data directory.
    os.environ.setdefault("FEDSRD_MODEL_CACHE", str(DEFAULT_CACHE))

    with tempfile.TemporaryDirectory(prefix="fedsrd-split-") as tmp:
        ns = argparse.Namespace(
            host="127.0.0.1", port=args.port or free_port(), data_dir=str(Path(tmp) / "data")
        )
        api, worker, url, token = _start(ns)
        try:
            rounds = _run(url, token, args)
        finally:
            api.stop()
            worker.stop()
    per_round = []
    for r in rounds:
        d = r["metrics"]["durations"]
        collect = _ts(r["collected_at"]) - _ts(r["opened_at"])
        close = _ts(r["closed_at"]) - _ts(r["collected_at"])
        per_round.append(
            {
                "round": r["number"],
                "collect_s": collect,
                # The last update to the round's close: the task's dispatch and queueing,
                # the aggregation itself (the parts below) and the closing transaction.
                "close_s": close,
                "aggregate_s": d.get("aggregate_s"),
                **{NAMES[p]: d.get(p) for p in PARTS},
            }
        )
    keys = ["collect_s", "close_s", "aggregate_s", *NAMES.values()]
    mean = {k: statistics.fmean(x[k] for x in per_round if x[k] is not None) for k in keys}
    c.log(" | ".join(f"{k} {v:.3f} s" for k, v in mean.items()))
    c.emit(
        {
            "benchmark": "round_split",
            "clients": args.clients,
            "strategy": args.strategy,
            "model": "tiny",
            "rounds": per_round,
            "mean_s": {k: round(v, 4) for k, v in mean.items()},
        }
    )


def _ts(text: str) -> float:
    import datetime as dt

    return dt.datetime.fromisoformat(text).timestamp()


def _run(url: str, token: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    h = {"Authorization": f"Bearer {token}"}
    body = {
        "name": f"split-{args.clients}",
        "model": "tiny",
        "rounds": args.rounds,
        "strategy": args.strategy,
        "lora": {"rank": 8},
        "train": {"steps": 1, "batch_size": 2, "seq_len": 192},
        "round_deadline_s": 3600,
        "simulation": {"clients": args.clients, "partition": "iid", "examples_per_client": 4},
    }
    r = httpx.post(f"{url}/api/v1/runs?launch=true", json=body, headers=h, timeout=600)
    if r.status_code != 201:
        sys.exit(f"round_split: the run was refused: {r.text}")
    run_id = r.json()["id"]
    t0 = time.monotonic()
    while True:
        run = httpx.get(f"{url}/api/v1/runs/{run_id}", headers=h, timeout=30).json()
        if run["status"] != "running":
            break
        if time.monotonic() - t0 > 3600:
            sys.exit("round_split: timed out")
        time.sleep(1.0)
    if run["status"] != "completed":
        sys.exit(f"round_split: the run ended {run['status']}: {run['status_reason']}")
    data = httpx.get(f"{url}/api/v1/runs/{run_id}/rounds", headers=h, timeout=30).json()
    return list(data["data"])


if __name__ == "__main__":
    main()
