"""``fedsrd``: the project's command.

* ``fedsrd up``: migrate the database, then run the API and a worker together (embedded
  default: SQLite, a local blob directory, the filesystem broker; no external server).
* ``fedsrd demo``: ``up``, then a simulated federation on the tiny model through the whole
  system; prints its rounds and exports the adapter; stops (or ``--keep`` serving).
* ``fedsrd migrate``: ``alembic upgrade head`` on the configured database.
* ``fedsrd simulate``: a federation in one process (fedsrd_core only).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from fedsrd_core.cli import (
    add_bench_model_command,
    add_simulate_command,
    run_bench_model,
    run_simulate,
)


def _settings_env(args: argparse.Namespace) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k.startswith("FEDSRD_")}
    if getattr(args, "data_dir", None):
        env["FEDSRD_DATA_DIR"] = str(Path(args.data_dir).resolve())
    env.setdefault("FEDSRD_DATA_DIR", str(Path("var").resolve()))
    env.setdefault("FEDSRD_MODEL_CACHE", str(Path(env["FEDSRD_DATA_DIR"]) / "models"))
    return env


def _start(args: argparse.Namespace) -> tuple[Any, Any, str, str]:
    from api.launcher import api_service, wait_ready, wait_worker, worker_service
    from api.migrate import upgrade
    from api.settings import Settings

    env = _settings_env(args)
    os.environ.update(env)
    settings = Settings()
    upgrade(settings.resolved_database_url)
    token = settings.resolved_admin_token
    logs = settings.data_dir / "logs"
    worker = worker_service(env, logs).start()
    api = api_service(env, args.port, logs, host=args.host).start()
    url = f"http://{args.host}:{args.port}"
    try:
        wait_ready(url, api)
        wait_worker(worker)
    except Exception:
        api.stop()
        worker.stop()
        raise
    print(f"fedsrd: API on {url}, worker running; logs in {logs}")
    print(f"fedsrd: dashboard {url}/ (sign in with the admin token); OpenAPI {url}/docs")
    print(
        f"fedsrd: admin token in {settings.data_dir / 'admin_token'}"
        if not settings.admin_token
        else "fedsrd: admin token from FEDSRD_ADMIN_TOKEN"
    )
    return api, worker, url, token


def _serve(api: Any, worker: Any) -> int:
    stop = {"now": False}

    def _on_signal(*_: Any) -> None:
        stop["now"] = True

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    code = 0
    while not stop["now"]:
        for svc in (api, worker):
            if not svc.alive():
                print(f"fedsrd: {svc.name} exited; stopping\n{svc.tail()}", file=sys.stderr)
                stop["now"], code = True, 1
        time.sleep(0.5)
    api.stop()
    worker.stop()
    return code


def cmd_up(args: argparse.Namespace) -> int:
    api, worker, _, _ = _start(args)
    return _serve(api, worker)


def cmd_migrate(args: argparse.Namespace) -> int:
    from api.migrate import upgrade
    from api.settings import Settings

    os.environ.update(_settings_env(args))
    upgrade(Settings().resolved_database_url)
    print("database at head")
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    """Collect blob garbage once and print what was done as JSON."""
    from api.runtime import make_runtime
    from api.services.storage import collect_garbage
    from api.settings import Settings

    os.environ.update(_settings_env(args))
    rt = make_runtime(Settings())
    try:
        result = collect_garbage(rt, grace_s=args.grace, dry_run=args.dry_run)
    finally:
        rt.close()
    print(json.dumps(result.as_dict()))
    if not result.supported:
        print(
            "this blob store cannot be garbage-collected safely: only a local directory or "
            "an S3 bucket with versioning enabled can",
            file=sys.stderr,
        )
        return 2
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    api, worker, url, token = _start(args)
    try:
        h = {"Authorization": f"Bearer {token}"}
        body = {
            "name": "demo",
            "model": "tiny",
            "rounds": args.rounds,
            "strategy": args.strategy,
            "lora": {"rank": 8},
            "train": {"steps": 5, "batch_size": 4, "lr": 2e-3},
            "simulation": {
                "clients": 3,
                "domains": ["arithmetic", "code", "facts"],
                "examples_per_client": 64,
            },
            "evaluation": {"domains": ["arithmetic", "code", "facts"], "examples": 16},
        }
        print("fedsrd demo: creating a simulated run (builds the tiny model on first use)")
        r = httpx.post(f"{url}/api/v1/runs?launch=true", json=body, headers=h, timeout=600)
        r.raise_for_status()
        run_id = r.json()["id"]
        deadline = time.monotonic() + 1800
        while True:
            run = httpx.get(f"{url}/api/v1/runs/{run_id}", headers=h, timeout=30).json()
            if run["status"] in ("completed", "failed", "cancelled"):
                break
            if time.monotonic() > deadline:
                print("fedsrd demo: timed out", file=sys.stderr)
                return 1
            time.sleep(1.0)
        # Evaluation of the last round runs after it closes; give it a moment.
        for _ in range(120):
            rounds = httpx.get(f"{url}/api/v1/runs/{run_id}/rounds", headers=h, timeout=30).json()
            if all("eval" in r["metrics"] for r in rounds["data"]):
                break
            time.sleep(0.5)
        base = _base_model_eval(run["config"])
        _print_rounds(run, rounds["data"], base)
        out = Path(args.data_dir or "var") / f"run-{run_id}-adapter.zip"
        z = httpx.get(f"{url}/api/v1/runs/{run_id}/adapter", headers=h, timeout=120)
        z.raise_for_status()
        out.write_bytes(z.content)
        print(f"fedsrd demo: run {run['status']}; adapter exported to {out}")
        run = httpx.get(f"{url}/api/v1/runs/{run_id}", headers=h, timeout=30).json()
        print(
            f"fedsrd demo: moved {(run['bytes_up'] + run['bytes_down']) / 2**20:.2f} MiB; "
            f"FedAvg's dense exchange would have moved "
            f"{run['fedavg_equivalent_bytes'] / 2**20:.2f} MiB"
        )
        if args.keep:
            print(f"fedsrd demo: still serving on {url}; Ctrl-C stops")
            return _serve(api, worker)
        return 0 if run["status"] == "completed" else 1
    finally:
        if not args.keep:
            api.stop()
            worker.stop()


def _base_model_eval(config: dict[str, Any]) -> dict[str, float]:
    """The demo run's evaluation of the tiny base model itself (the adapter's B = 0 adds
    nothing), computed here with the worker's evaluation, so the rounds read as changes."""
    from api.settings import Settings
    from fedsrd_core.modeling import load_causal_lm
    from fedsrd_core.tiny_assets import tiny_model_path
    from fedsrd_core.training import evaluate_domains

    model, tokenizer = load_causal_lm(str(tiny_model_path(Settings().model_cache)))
    ev = config["evaluation"]
    out = evaluate_domains(
        model,
        tokenizer,
        ev["domains"],
        int(ev["examples"]),
        seed=int(config["seed"]),
        seq_len=int(config["train"]["seq_len"]),
    )
    return {d: float(v["loss"]) for d, v in out.items() if "loss" in v}


def _print_rounds(
    run: dict[str, Any], rounds: list[dict[str, Any]], base: dict[str, float]
) -> None:
    """The run's rounds as a table: traffic, losses (mean and per evaluated domain), how long
    each round took, and the state digest every client checks after applying the round."""
    print(f"run {run['id']} ({run['strategy']}): {run['status']}")
    domains = list(base) or sorted({d for r in rounds for d in r["metrics"].get("eval", {})})
    head = ["round", "KiB up/client", "KiB down", "train loss", "eval loss"]
    head += [f"{d} loss" for d in domains] + ["seconds", "state digest"]
    rows: list[list[str]] = []

    def mean(values: list[float]) -> str:
        return f"{sum(values) / len(values):.3f}" if values else "-"

    if base:
        rows.append(["base", "", "", "", mean(list(base.values()))])
        rows[-1] += [f"{base[d]:.3f}" if d in base else "-" for d in domains] + ["", ""]
    for r in rounds:
        m = r["metrics"]
        ev = {k: v["loss"] for k, v in m.get("eval", {}).items() if "loss" in v}
        train = m.get("train_loss")
        turnaround = m.get("turnaround_s")
        row = [
            str(r["number"]),
            f"{m.get('bytes_up_mean', 0) / 1024:.1f}",
            f"{m.get('bytes_down', 0) / 1024:.1f}",
            f"{train:.3f}" if train is not None else "-",
            mean(list(ev.values())),
        ]
        row += [f"{ev[d]:.3f}" if d in ev else "-" for d in domains]
        row += [f"{turnaround:.1f}" if turnaround is not None else "-", r["digest"] or "-"]
        rows.append(row)
    widths = [max(len(x) for x in col) for col in zip(head, *rows, strict=True)]
    for line in (head, *rows):
        # Numbers right-aligned, the digest (last) left-aligned so it reads as one token.
        cells = [c.rjust(w) for c, w in zip(line[:-1], widths, strict=False)]
        print("  ".join([*cells, line[-1]]).rstrip())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fedsrd", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_ in (("up", "run the API and a worker"), ("demo", "up + a simulated run")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--host", default="127.0.0.1")
        p.add_argument("--port", type=int, default=8000)
        p.add_argument("--data-dir", default=None, help="FEDSRD_DATA_DIR (default ./var)")
        if name == "demo":
            p.add_argument("--rounds", type=int, default=3)
            p.add_argument("--strategy", default="fedsrd")
            p.add_argument("--keep", action="store_true", help="keep serving afterwards")
    m = sub.add_parser("migrate", help="alembic upgrade head")
    m.add_argument("--data-dir", default=None)
    g = sub.add_parser(
        "gc", help="remove blobs no row names, last stored before the grace period (JSON out)"
    )
    g.add_argument("--data-dir", default=None)
    g.add_argument(
        "--grace",
        type=float,
        default=None,
        help="seconds (default FEDSRD_BLOB_GRACE_S, 3600); never less than the longest time "
        "from storing a blob to committing its row",
    )
    g.add_argument("--dry-run", action="store_true", help="count, remove nothing")
    add_simulate_command(sub)
    add_bench_model_command(sub)
    args = parser.parse_args(argv)
    commands = {
        "up": cmd_up,
        "demo": cmd_demo,
        "migrate": cmd_migrate,
        "gc": cmd_gc,
        "simulate": run_simulate,
        "bench-model": run_bench_model,
    }
    return int(commands[args.command](args))


if __name__ == "__main__":
    sys.exit(main())
