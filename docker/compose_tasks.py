"""One-shot jobs of the compose stack (``docker-compose.yml``), run inside the CPU image.

    python docker/compose_tasks.py ensure-bucket          # profile minio: a versioned bucket
    python docker/compose_tasks.py demo-setup /demo       # profile demo: run + enrolment
    python docker/compose_tasks.py demo-agent /demo       # profile demo: one agent replica

``demo-setup`` creates a run on the tiny model through the admin API, enrols
``FEDSRD_DEMO_AGENTS`` client sites, gives each a directory on the shared ``/demo`` volume
(its token and local data in an ``agent.toml``, its state directory), and launches the run.
It is idempotent: a second start finds ``/demo/run.json`` and does nothing.

``demo-agent`` is the command of every replica of the ``demo-agent`` service: it claims one
site directory (an atomic ``mkdir``; a restarted container finds the site it claimed by its
hostname) and becomes ``fedsrd-agent --config <site>/agent.toml``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import httpx

DOMAINS = ("arithmetic", "code", "facts")


def _env(name: str, default: str | None = None) -> str:
    value = os.environ.get(name, default)
    if not value:
        sys.exit(f"compose_tasks: {name} is not set")
    return value


# --------------------------------------------------------------------------------------------
# ensure-bucket
# --------------------------------------------------------------------------------------------


def ensure_bucket() -> int:
    """Create the bucket of ``FEDSRD_BLOB_URL`` (s3://bucket/...) if it does not exist, with
    versioning on (blob garbage collection needs it) and noncurrent versions expiring after a
    day. An existing bucket is left as it is."""
    import boto3
    from botocore.exceptions import ClientError, EndpointConnectionError

    url = _env("FEDSRD_BLOB_URL")
    if not url.startswith("s3://"):
        print(f"compose_tasks: FEDSRD_BLOB_URL is not s3:// ({url.split(':')[0]}); nothing to do")
        return 0
    bucket = url[len("s3://") :].split("/", 1)[0]
    s3 = boto3.client(
        "s3",
        endpoint_url=os.environ.get("FEDSRD_S3_ENDPOINT_URL") or None,
        region_name=os.environ.get("FEDSRD_S3_REGION") or None,
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            s3.head_bucket(Bucket=bucket)
            print(f"compose_tasks: bucket {bucket} exists")
            return 0
        except EndpointConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket"):
                raise
            s3.create_bucket(Bucket=bucket)
            # Garbage collection needs versioning (a writer's renewal is a newer version the
            # collector never deletes); renewals leave noncurrent versions, expired here.
            s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
            s3.put_bucket_lifecycle_configuration(
                Bucket=bucket,
                LifecycleConfiguration={
                    "Rules": [
                        {
                            "ID": "fedsrd-noncurrent-versions",
                            "Status": "Enabled",
                            "Filter": {"Prefix": ""},
                            "NoncurrentVersionExpiration": {"NoncurrentDays": 1},
                        }
                    ]
                },
            )
            print(f"compose_tasks: bucket {bucket} created, versioned")
            return 0


# --------------------------------------------------------------------------------------------
# demo-setup
# --------------------------------------------------------------------------------------------


def _admin(client: httpx.Client, method: str, path: str, **kw: Any) -> Any:
    r = client.request(method, path, **kw)
    if r.status_code >= 400:
        sys.exit(f"compose_tasks: {method} {path} answered {r.status_code}: {r.text[:500]}")
    return r.json() if r.content else None


def _wait_ready(client: httpx.Client, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if client.get("/readyz").status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            sys.exit("compose_tasks: the API did not become ready")
        time.sleep(1.0)


def demo_setup(root: Path) -> int:
    from fedsrd_core.data import generate, save_jsonl

    server = _env("FEDSRD_DEMO_SERVER", "http://api:8000")
    n = int(_env("FEDSRD_DEMO_AGENTS", "3"))
    rounds = int(_env("FEDSRD_DEMO_ROUNDS", "3"))
    marker = root / "run.json"
    if marker.exists():
        print(f"compose_tasks: demo already set up ({marker.read_text().strip()})")
        return 0
    headers = {"Authorization": f"Bearer {_env('FEDSRD_ADMIN_TOKEN')}"}
    # Creating a run on "tiny" builds the tiny model on first use: minutes on a small CPU.
    with httpx.Client(base_url=server, headers=headers, timeout=900.0) as client:
        _wait_ready(client)
        body = {
            "name": "compose demo",
            "model": "tiny",
            "rounds": rounds,
            "lora": {"rank": 8},
            "train": {"steps": 5, "batch_size": 4, "lr": 2e-3},
            "quorum": n,
            "round_deadline_s": 900,
        }
        run = _admin(client, "POST", "/api/v1/runs", json=body)
        run_id = int(run["id"])
        for i in range(1, n + 1):
            site = root / f"site-{i}"
            site.mkdir(parents=True, exist_ok=True)
            domain = DOMAINS[(i - 1) % len(DOMAINS)]
            save_jsonl(generate(domain, 64, seed=i, split="train"), site / "data.jsonl")
            token = _admin(
                client, "POST", f"/api/v1/runs/{run_id}/clients", json={"name": f"site-{i}"}
            )["token"]
            config = site / "agent.toml"
            config.write_text(
                f'server = "{server}"\n'
                f'token = "{token}"\n'
                f'data = "{site / "data.jsonl"}"\n'
                f'state-dir = "{site / "state"}"\n'
                f'model-cache = "{_env("FEDSRD_MODEL_CACHE", "/cache/models")}"\n'
                'device = "cpu"\n'
            )
            config.chmod(0o600)  # the token is this site's credential
        _admin(client, "POST", f"/api/v1/runs/{run_id}/launch")
    marker.write_text(json.dumps({"run": run_id, "agents": n, "server": server}) + "\n")
    print(f"compose_tasks: run {run_id} launched with {n} enrolled sites")
    return 0


# --------------------------------------------------------------------------------------------
# demo-agent
# --------------------------------------------------------------------------------------------


def claim_site(root: Path, me: str) -> Path | None:
    """The site directory this replica owns: the one claimed under ``me`` before (a
    restart), else the first unclaimed one (``mkdir`` is atomic across containers)."""
    sites = sorted(root.glob("site-*"), key=lambda p: int(p.name.split("-")[1]))
    for site in sites:
        owner = site / "claim" / "owner"
        if owner.exists() and owner.read_text().strip() == me:
            return site
    for site in sites:
        try:
            (site / "claim").mkdir()
        except FileExistsError:
            continue
        (site / "claim" / "owner").write_text(me + "\n")
        return site
    return None


def demo_agent(root: Path) -> int:
    deadline = time.monotonic() + 900
    while not (root / "run.json").exists():  # demo-setup has not finished (a restart race)
        if time.monotonic() > deadline:
            sys.exit("compose_tasks: no demo run was set up")
        time.sleep(2.0)
    me = os.environ.get("HOSTNAME") or socket.gethostname()  # docker: the container id
    site = claim_site(root, me)
    if site is None:
        sys.exit(f"compose_tasks: every site in {root} is taken (more replicas than sites?)")
    print(f"compose_tasks: {me} runs {site.name}", flush=True)
    argv = ["fedsrd-agent", "--config", str(site / "agent.toml"), "--log-json"]
    os.execvp(argv[0], argv)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("ensure-bucket")
    for name in ("demo-setup", "demo-agent"):
        sub.add_parser(name).add_argument("root", type=Path, nargs="?", default=Path("/demo"))
    args = p.parse_args(argv)
    if args.command == "ensure-bucket":
        return ensure_bucket()
    if args.command == "demo-setup":
        return demo_setup(args.root)
    return demo_agent(args.root)


if __name__ == "__main__":
    sys.exit(main())
