"""Load benchmark of the control plane: one API process on PostgreSQL and Redis, a real
Celery worker, and agents talking HTTP to it from this process.

Usage (from the repository root)::

    .venv/bin/python benchmarks/api_load.py [--quick] [--agents N] [--duration S]
                                            [--interval S] [--blob-mib M] [--repeats K]
                                            [--rounds R] [--keep-tmp]

What it starts: a throwaway PostgreSQL database ``fedsrd_bench_<random>`` (migrated with
``api.migrate.upgrade``), Redis db ``--redis-db`` (13; flushed at start and end), one
``uvicorn --factory api.main:app_from_env`` process and one Celery worker
(``-Q fedsrd.cpu,fedsrd.gpu --pool solo``), on free ports, with their output in log files
whose tails are printed if anything fails. Everything is stopped and dropped at the end,
error or not. PostgreSQL and Redis are started first if their ports are closed.

What it measures, in one run:

1. **Poll latency.** A running run (tiny model, LoRA rank 4, 1000 rounds) with ``--agents``
   enrolled clients (200; ``--quick``: 50), every one in the open round. Each agent, an
   asyncio task with its own keep-alive connection (a minimal HTTP/1.1 client that costs a
   fraction of httpx's CPU per request; ``--loadgen httpx`` for a cross-check), polls
   ``GET /api/v1/agent/runs/{id}/poll?have_round=0&wait=0`` for ``--duration`` seconds
   (60; quick: 10) and sleeps like a real agent between polls: ``retry_after`` after a
   ``wait`` answer, else ``--interval`` (1 s) of think time, so N agents make about N polls/s.
   Starts are spread over one interval and one unmeasured warm-up poll per agent opens the
   connections. Reported: p50/p90/p99/max latency of the successful polls (request start to
   parsed answer, as the agent sees it), polls/s, errors, and how many database connections
   the API opened meanwhile (``pg_stat_database.sessions``; warm-up included: a steadily
   growing count is connection-pool churn). Target: p99 < 100 ms.
2. **Transfer throughput.** A ``fedavg`` run (dense fp32 uploads) whose adapter makes a dense
   upload of about ``--blob-mib`` MiB (64). The tiny model's adapter tops out near 9 MiB at the
   largest allowed rank (1024), so this run uses a wider, *untrained* model of the same family
   (``fedsrd_core.modeling.build_tiny_model``, hidden 512, MLP 1376, 2 layers), built once into
   the model cache; the rank is chosen from a probe run's ``lora_parameters``. Upload: ``PUT
   .../rounds/1/update`` of a valid random dense update (request start to response; the server
   streams it to disk, hashes, decodes and validates it, fsyncs, records it), from 3 different
   clients (a 4th enrolled client never uploads, so the round stays open and no aggregation
   runs during the measurement). Download: ``GET .../blobs/{sha}`` of the run's initial snapshot
   (the same dense size), streamed into a file. Baselines in the same run: the same bytes sent
   through a plain TCP socket on 127.0.0.1 to a thread that writes them to a file ("loopback
   copy"), and ``shutil.copyfile`` of a file of that size (neither fsyncs, hashes nor
   validates). Each figure is the median of ``--repeats`` (3). Before each timed operation
   ``--prefault-mib`` (512) MiB are touched and freed: on a VM that hands freed memory back to
   the host, the first touch of such memory otherwise dominates (see ``prefault``). While each
   upload runs, the client that never uploads polls every 20 ms from a thread: the poll
   latency before and during the upload shows whether the upload stalls the API for other
   agents. Target: upload and download >= 0.5 of the loopback copy.
3. **Round turnaround.** A ``fedsrd`` run on the tiny model (rank 4, ``--rounds`` 5) with two
   clients that do what an agent does without training: sync (snapshot, then global deltas,
   each checked against the published digest), add small random steps to the factors, upload
   the strategy's real client update. After the first client uploads it long-polls
   (``wait=10``); the client-side turnaround is the time from the second (last) upload's
   response to that poll returning ``train`` for the next round. The server-side figure is
   each round's ``metrics.turnaround_s`` (``GET /api/v1/runs/{id}/rounds``: round collected to
   next round opened). R rounds give R - 1 turnarounds. Target: < 1 s.

Each phase also reports the CPU used while it was measured (percent of one core): this
benchmark (load generator), the API, the worker, the whole PostgreSQL cluster (exited
backends included), and every other process (``others_percent``: the machine may be
shared; a high figure means disturbed timings). ``cpu_count`` is in the summary: with 2
cores the load generator, API, worker and PostgreSQL all share them.

The exit status is 0 unless something broke (timings never fail the run). A human summary
goes to stderr; ONE JSON object is the last line of stdout. MiB = 2**20 bytes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import _common as c
import httpx
import torch

from fedsrd_core.codec import encode
from fedsrd_core.snapshot import decode_global_delta, decode_snapshot
from fedsrd_core.state import GlobalState, state_digest
from fedsrd_core.strategies import RoundContext, get_strategy

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
MIB = 1024 * 1024
AGENT = "/api/v1/agent/runs/{run_id}"
#: Wider than the tiny model, same family, so a dense adapter upload can reach ~64 MiB.
WIDE_SPEC = {
    "hidden_size": 512,
    "intermediate_size": 1376,
    "num_hidden_layers": 2,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "max_position_embeddings": 512,
}
LONG = 86400.0  # deadlines and client timeouts that never fire during the benchmark
log = c.log


# ---------------------------------------------------------------------------------------------
# Services, database and subprocesses


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_port(host: str, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not port_open(host, port):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{host}:{port} did not open within {timeout:.0f} s")
        time.sleep(0.2)


def ensure_services(host: str, pg_port: int, redis_port: int) -> None:
    """Start PostgreSQL and Redis (left running afterwards) if their ports are closed."""
    if not port_open(host, pg_port):
        versions = sorted(
            os.listdir("/etc/postgresql"), key=lambda v: [int(x) for x in v.split(".")]
        )
        log(f"PostgreSQL is not listening on {pg_port}; starting cluster {versions[-1]}/main")
        subprocess.run(
            ["pg_ctlcluster", "--skip-systemctl-redirect", versions[-1], "main", "start"],
            check=True,
        )
        wait_port(host, pg_port, 60)
    if not port_open(host, redis_port):
        log(f"Redis is not listening on {redis_port}; starting redis-server")
        subprocess.run(
            [
                *("redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "-::1"),
                *("--port", str(redis_port), "--save", "", "--appendonly", "no"),
            ],
            check=True,
        )
        wait_port(host, redis_port, 30)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def throwaway_database(host: str, port: int) -> Iterator[str]:
    """A fresh database; yields its SQLAlchemy URL, drops it (connections and all) after."""
    import psycopg
    from psycopg import sql

    name = f"fedsrd_bench_{secrets.token_hex(6)}"
    dsn = f"host={host} port={port} user=postgres dbname=postgres"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield f"postgresql+psycopg://postgres@{host}:{port}/{name}"
    finally:
        try:
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
                )
        except Exception as e:
            log(f"could not drop database {name}: {e}")


class Proc:
    """A subprocess in its own process group, its output in a log file."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], logs: Path) -> None:
        self.name = name
        self.log_path = logs / f"{name}.log"
        self._log: IO[bytes] = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def check_alive(self) -> None:
        rc = self.popen.poll()
        if rc is not None:
            raise RuntimeError(f"{self.name} exited with status {rc} (log: {self.log_path})")

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM to the group (a graceful shutdown), SIGKILL if it lingers."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                log(f"{self.name} ignored SIGTERM for {timeout:.0f} s; killing it")
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait()
        # Children left in the group (none expected with --pool solo) go too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self._log.close()

    def tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def wait_ready(base_url: str, api: Proc, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        api.check_alive()
        try:
            r = httpx.get(base_url + "/readyz", timeout=5)
            if r.status_code == 200:
                return
            last = r.text
        except httpx.HTTPError as e:
            last = f"{type(e).__name__}: {e}"
        time.sleep(0.25)
    raise RuntimeError(f"API not ready after {timeout:.0f} s: {last}")


def wait_worker(broker_url: str, node: str, worker: Proc, timeout: float = 120.0) -> None:
    """Until the Celery worker ``node`` answers a control ping."""
    from celery import Celery

    app = Celery("bench-ping", broker=broker_url, set_as_current=False)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            worker.check_alive()
            if app.control.ping(destination=[node], timeout=1.0):
                return
        raise RuntimeError(f"Celery worker {node} did not answer within {timeout:.0f} s")
    finally:
        app.close()


# ---------------------------------------------------------------------------------------------
# Small helpers


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated quantile ``q`` (0..1) of an ascending list."""
    if not sorted_values:
        return math.nan
    pos = (len(sorted_values) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


def check(r: httpx.Response, what: str) -> Any:
    if r.status_code >= 400:
        raise RuntimeError(f"{what}: HTTP {r.status_code}: {r.text[:500]}")
    return r.json() if r.content else None


class Admin:
    """The admin's side of the API (runs, clients, rounds)."""

    def __init__(self, base_url: str, token: str) -> None:
        self.http = httpx.Client(
            base_url=base_url, headers={"Authorization": f"Bearer {token}"}, timeout=600
        )

    def create_run(self, body: dict[str, Any], *, launch: bool) -> dict[str, Any]:
        r = self.http.post("/api/v1/runs", params={"launch": launch}, json=body)
        result: dict[str, Any] = check(r, f"create run {body['name']!r}")
        return result

    def launch(self, run_id: int) -> None:
        check(self.http.post(f"/api/v1/runs/{run_id}/launch"), f"launch run {run_id}")

    def cancel(self, run_id: int) -> None:
        check(self.http.post(f"/api/v1/runs/{run_id}/cancel"), f"cancel run {run_id}")

    def enroll(self, run_id: int, name: str) -> str:
        r = self.http.post(f"/api/v1/runs/{run_id}/clients", json={"name": name})
        return str(check(r, f"enroll {name}")["token"])

    def rounds(self, run_id: int) -> list[dict[str, Any]]:
        data: list[dict[str, Any]] = check(
            self.http.get(f"/api/v1/runs/{run_id}/rounds"), "list rounds"
        )["data"]
        return data

    def close(self) -> None:
        self.http.close()


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@dataclasses.dataclass
class Stack:
    """What the phases talk to: the API, its processes and the admin client."""

    base_url: str
    api: Proc
    worker: Proc
    db_name: str
    pg_dsn: str  # the maintenance database, for statistics
    admin: Admin


def _pid_ticks(pid: int) -> int | None:
    """User + system CPU ticks of ``pid`` so far (None if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[11]) + int(fields[12])


def _machine_ticks() -> tuple[int, int]:
    """(busy, steal) CPU ticks of the whole machine, all cores, since boot."""
    v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = v
    return user + nice + system + irq + softirq, steal


def _postgres_ticks() -> int:
    """CPU ticks of the whole PostgreSQL cluster so far: the postmaster, its live children,
    and the children it has reaped (short-lived connections' backends included)."""
    procs: dict[int, tuple[int, int, int]] = {}  # pid -> (ppid, own ticks, reaped ticks)
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            text = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        if text[text.index("(") + 1 : text.rindex(")")] != "postgres":
            continue
        f = text.rsplit(")", 1)[1].split()
        procs[int(d)] = (int(f[1]), int(f[11]) + int(f[12]), int(f[13]) + int(f[14]))
    masters = {pid for pid, (ppid, _, _) in procs.items() if ppid not in procs}
    return sum(
        own + (reaped if pid in masters else 0)
        for pid, (ppid, own, reaped) in procs.items()
        if pid in masters or ppid in masters
    )


def db_sessions(stack: Stack) -> int | None:
    """Connections ever opened to our database (``pg_stat_database.sessions``, PG 14+)."""
    import psycopg

    try:
        with psycopg.connect(stack.pg_dsn, autocommit=True) as conn:
            row = conn.execute(
                "SELECT sessions FROM pg_stat_database WHERE datname = %s", (stack.db_name,)
            ).fetchone()
    except Exception:
        return None
    return None if row is None or row[0] is None else int(row[0])


class CpuMeter:
    """CPU used during a ``with`` block, in percent of one core: the whole machine, this
    benchmark's processes (this one: the load generator; the API; the worker), the whole
    PostgreSQL cluster, and everything else. The machine may be shared: ``others_percent``
    (and PostgreSQL work for other databases) says how much the block was disturbed."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.result: dict[str, float] = {}

    def _sample(self) -> dict[str, int]:
        own = {"bench": os.getpid(), "api": self.stack.api.pid, "worker": self.stack.worker.pid}
        out = {group: _pid_ticks(pid) or 0 for group, pid in own.items()}
        out["postgres"] = _postgres_ticks()
        return out

    def __enter__(self) -> CpuMeter:
        self.t0 = time.monotonic()
        self.machine0 = _machine_ticks()
        self.groups0 = self._sample()
        return self

    def __exit__(self, *exc: object) -> None:
        elapsed = time.monotonic() - self.t0
        busy, steal = (b - a for a, b in zip(self.machine0, _machine_ticks(), strict=True))
        groups = self._sample()
        used = {g: groups[g] - self.groups0[g] for g in groups}
        ours = sum(used.values())
        hz = os.sysconf("SC_CLK_TCK")

        def pct(ticks: float) -> float:
            return 100.0 * ticks / hz / elapsed

        self.result = {
            "machine_percent": pct(busy),
            "ours_percent": pct(ours),
            "others_percent": max(0.0, pct(busy - ours)),
            "steal_percent": pct(steal),
            **{f"{group}_percent": pct(t) for group, t in used.items()},
        }


# ---------------------------------------------------------------------------------------------
# 1. Poll latency


def poll_phase(args: argparse.Namespace, stack: Stack) -> dict[str, Any]:
    admin = stack.admin
    run = admin.create_run(
        {
            "name": "bench-poll",
            "model": "tiny",
            "lora": {"rank": 4},
            "rounds": 1000,
            "round_deadline_s": LONG,
            "client_timeout_s": LONG,
        },
        launch=True,
    )
    run_id = int(run["id"])
    t0 = time.perf_counter()
    tokens = [admin.enroll(run_id, f"agent-{i:04d}") for i in range(args.agents)]
    log(f"poll: run {run_id}, {len(tokens)} clients enrolled in {time.perf_counter() - t0:.1f} s")
    sessions0 = db_sessions(stack)
    result = run_async(poll_load(args, stack, run_id, tokens))
    sessions1 = db_sessions(stack)
    # Connections the API opened during the phase (one of the two is this query's own).
    result["db_connections_opened"] = (
        None if sessions0 is None or sessions1 is None else sessions1 - sessions0 - 1
    )
    admin.cancel(run_id)
    return result


_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)
_CONNECTION_CLOSE = re.compile(rb"\r\nconnection:[ \t]*close", re.IGNORECASE)
#: What a failed poll raises, by load generator.
_POLL_ERRORS = (OSError, EOFError, ValueError, TimeoutError, asyncio.LimitOverrunError)


class RawGet:
    """One agent's own keep-alive HTTP/1.1 connection, speaking just enough HTTP for a GET
    answered with a Content-Length: a fraction of httpx's CPU per request, so that on a
    2-core machine the load generator leaves the cores to the server."""

    def __init__(self, host: str, port: int, target: str, token: str) -> None:
        self.host, self.port = host, port
        self.request = (
            f"GET {target} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Authorization: Bearer {token}\r\nAccept: application/json\r\n\r\n"
        ).encode()
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def get(self) -> tuple[int, bytes]:
        try:
            if self.reader is None or self.writer is None:
                self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
            self.writer.write(self.request)
            head = await self.reader.readuntil(b"\r\n\r\n")
            length = _CONTENT_LENGTH.search(head)
            if length is None:
                raise ValueError("answer without Content-Length")
            body = await self.reader.readexactly(int(length.group(1)))
            if _CONNECTION_CLOSE.search(head):
                self.close()
            return int(head[9:12]), body
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


class HttpxGet:
    """The same GET through a shared ``httpx.AsyncClient`` (``--loadgen httpx``)."""

    def __init__(self, http: httpx.AsyncClient, target: str, token: str) -> None:
        self.http, self.target, self.headers = http, target, auth(token)

    async def get(self) -> tuple[int, bytes]:
        try:
            r = await self.http.get(self.target, headers=self.headers)
        except httpx.HTTPError as e:
            raise OSError(f"{type(e).__name__}: {e}") from e
        return r.status_code, r.content

    def close(self) -> None:
        pass


async def poll_load(
    args: argparse.Namespace, stack: Stack, run_id: int, tokens: list[str]
) -> dict[str, Any]:
    target = AGENT.format(run_id=run_id) + "/poll?have_round=0&wait=0"
    latencies: list[float] = []
    actions: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    # httpx: idle connections are dropped before uvicorn's 5 s keep-alive timeout would close
    # them under a request (a race that is the client's, not the API's).
    limits = httpx.Limits(
        max_connections=len(tokens) + 8, max_keepalive_connections=len(tokens), keepalive_expiry=4
    )
    url = httpx.URL(stack.base_url)
    async with httpx.AsyncClient(base_url=stack.base_url, limits=limits, timeout=30) as http:
        conns: list[RawGet | HttpxGet] = [
            RawGet(url.host, url.port or 80, target, t)
            if args.loadgen == "raw"
            else HttpxGet(http, target, t)
            for t in tokens
        ]

        # Warm-up, unmeasured: one poll per agent, spread over an interval, opens connections.
        async def warm(i: int, conn: RawGet | HttpxGet) -> None:
            await asyncio.sleep(args.interval * i / len(conns))
            status, body = await conn.get()
            if status != 200:
                raise RuntimeError(f"warm-up poll: HTTP {status}: {body[:300]!r}")

        await asyncio.gather(*(warm(i, c) for i, c in enumerate(conns)))

        start = time.perf_counter()
        end = start + args.duration
        last_done = start

        async def agent(i: int, conn: RawGet | HttpxGet) -> None:
            nonlocal last_done
            await asyncio.sleep(args.interval * i / len(conns))  # spread the starts
            while time.perf_counter() < end:
                t0 = time.perf_counter()
                pause = args.interval
                try:
                    async with asyncio.timeout(30):
                        status, raw = await conn.get()
                    if status == 200:
                        body = json.loads(raw)
                        latencies.append(time.perf_counter() - t0)
                        actions[body["action"]] += 1
                        if body["action"] == "wait" and body.get("retry_after") is not None:
                            pause = float(body["retry_after"])
                    else:
                        errors[f"HTTP {status}"] += 1
                except _POLL_ERRORS as e:
                    errors[type(e).__name__] += 1
                last_done = max(last_done, time.perf_counter())
                await asyncio.sleep(pause)

        try:
            with CpuMeter(stack) as cpu:
                await asyncio.gather(*(agent(i, c) for i, c in enumerate(conns)))
        finally:
            for c in conns:
                c.close()
    elapsed = last_done - start
    lat = sorted(latencies)
    p99 = percentile(lat, 0.99) * 1e3
    n_err = sum(errors.values())
    return {
        "agents": len(tokens),
        "duration_s": elapsed,
        "interval_s": args.interval,
        "loadgen": args.loadgen,
        "polls": len(lat),
        "polls_per_s": len(lat) / elapsed,
        "p50_ms": percentile(lat, 0.50) * 1e3,
        "p90_ms": percentile(lat, 0.90) * 1e3,
        "p99_ms": p99,
        "max_ms": (lat[-1] if lat else math.nan) * 1e3,
        "mean_ms": (statistics.fmean(lat) if lat else math.nan) * 1e3,
        "errors": n_err,
        "error_kinds": dict(errors),
        "actions": dict(actions),
        "cpu": cpu.result,
        "target_p99_ms": 100,
        "met": bool(lat) and n_err == 0 and p99 < 100,
    }


def run_async(coro: Any) -> Any:
    """Run ``coro`` on uvloop when available (less load-generator overhead per request)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


# ---------------------------------------------------------------------------------------------
# 2. Upload / download throughput


def wide_model(cache: Path) -> Path:
    """The untrained wide model directory (built once; a few seconds)."""
    from fedsrd_core.modeling import TinyModelSpec, build_tiny_model

    tag = "-".join(f"{v}" for v in WIDE_SPEC.values())
    path = cache / f"api-load-wide-{tag}"
    if not ((path / "config.json").is_file() and (path / "model.safetensors").is_file()):
        log(f"transfer: building the wide model into {path}")
        build_tiny_model(path, TinyModelSpec(**WIDE_SPEC))
    return path


def dense_update(layout: dict[str, list[int]], rank: int, seed: int) -> bytes:
    """A valid dense fp32 update of every factor (what a fedavg client uploads)."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for module, (d_out, d_in) in sorted(layout.items()):
        tensors[module + ".lora_A"] = torch.randn(rank, d_in, generator=g) * 1e-3
        tensors[module + ".lora_B"] = torch.randn(d_out, rank, generator=g) * 1e-3
    return encode(tensors, value_dtype="fp32")


CURL = shutil.which("curl")


def curl_download(url: str, token: str, dest: Path) -> float:
    """curl's own transfer time for a GET into ``dest`` (process start-up excluded)."""
    out = subprocess.run(
        [CURL or "curl", "-sS", "--fail-with-body", "-o", str(dest), "-w", "%{time_total}",
         "-H", f"Authorization: Bearer {token}", url],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return float(out.stdout)


def curl_upload(url: str, token: str, src: Path, sha: str) -> tuple[float, dict]:
    """curl's own transfer time for a PUT of ``src``, and the JSON answer."""
    out = subprocess.run(
        [CURL or "curl", "-sS", "--fail-with-body", "-X", "PUT", "-T", str(src),
         "-w", "\n%{time_total}", "-H", f"Authorization: Bearer {token}",
         "-H", f"X-Content-SHA256: {sha}", "-H", "Content-Type: application/octet-stream",
         "-H", "Expect:", url],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"upload failed: {out.stdout[:500]} {out.stderr[:500]}")
    body, took = out.stdout.rsplit("\n", 1)
    return float(took), json.loads(body)


def loopback_copy(data: bytes, dest: Path) -> float:
    """Seconds to send ``data`` over a TCP socket on 127.0.0.1 to a thread that writes it to
    ``dest`` (until the receiver has closed the file and acknowledged)."""
    srv = socket.create_server(("127.0.0.1", 0))
    failure: list[BaseException] = []

    def receive() -> None:
        try:
            conn, _ = srv.accept()
            with conn:
                buf = bytearray(MIB)
                view = memoryview(buf)
                with open(dest, "wb") as fh:
                    while n := conn.recv_into(buf):
                        fh.write(view[:n])
                conn.sendall(b"k")
        except BaseException as e:  # reported by the sender
            failure.append(e)

    t = threading.Thread(target=receive, daemon=True)
    t.start()
    t0 = time.perf_counter()
    with socket.create_connection(srv.getsockname()[:2]) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        ack = s.recv(1)
    dt = time.perf_counter() - t0
    t.join()
    srv.close()
    if failure or ack != b"k" or dest.stat().st_size != len(data):
        raise RuntimeError(f"loopback copy failed: {failure or ack!r}")
    return dt


def prefault(mib: int) -> None:
    """Touch and free ``mib`` MiB, so that the next timed operation (in any process) gets
    memory the hypervisor backs. On a VM that hands freed guest memory back to the host (free
    page reporting, virtio-balloon) the first touch of such memory can be several times slower
    than the copy being timed: here a 64 MiB loopback copy took 25 ms or 165 ms depending
    only on it."""
    if mib > 0:
        block = b"\x01" * (mib * MIB)
        del block


def file_copy(src: Path, dest: Path) -> float:
    t0 = time.perf_counter()
    shutil.copyfile(src, dest)
    return time.perf_counter() - t0


class BackgroundPoller:
    """A thread that polls every ``period`` seconds with its own connection, recording each
    poll's (start, end): how the API answers other agents while it takes an upload."""

    def __init__(self, base_url: str, url: str, token: str, period: float = 0.02) -> None:
        self.http = httpx.Client(base_url=base_url, headers=auth(token), timeout=60)
        self.url, self.period = url, period
        self.polls: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            t0 = time.perf_counter()
            check(self.http.get(self.url, params={"have_round": 0, "wait": 0}), "poll")
            self.polls.append((t0, time.perf_counter()))
            self._stop.wait(self.period)

    def __enter__(self) -> BackgroundPoller:
        check(self.http.get(self.url, params={"have_round": 0, "wait": 0}), "poll")  # connect
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.http.close()

    def latencies(self, start: float, end: float) -> list[float]:
        """Latencies of the polls that overlapped ``[start, end]``."""
        return [b - a for a, b in self.polls if a < end and b > start]


def transfer_phase(args: argparse.Namespace, stack: Stack, work: Path) -> dict[str, Any]:
    admin = stack.admin
    model = str(wide_model(args.model_cache))
    probe_rank = 8
    probe = admin.create_run(
        {"name": "bench-probe", "model": model, "lora": {"rank": probe_rank}, "strategy": "fedavg"},
        launch=False,
    )
    per_rank = int(probe["lora_parameters"]) / probe_rank
    rank = max(1, min(1024, round(args.blob_mib * MIB / 4 / per_rank)))
    uploaders = args.repeats
    run = admin.create_run(
        {
            "name": "bench-transfer",
            "model": model,
            "lora": {"rank": rank},
            "strategy": "fedavg",
            "rounds": 1,
            "round_deadline_s": LONG,
            "client_timeout_s": LONG,
        },
        launch=False,
    )
    run_id = int(run["id"])
    # One more client than uploads: the round never completes, so no aggregation competes.
    tokens = [admin.enroll(run_id, f"xfer-{i}") for i in range(uploaders + 1)]
    admin.launch(run_id)
    prefix = AGENT.format(run_id=run_id)
    scratch = work / "transfer"
    scratch.mkdir()

    http = httpx.Client(base_url=stack.base_url, timeout=600)
    polls_idle: list[float] = []
    polls_upload: list[float] = []
    try:
        info = check(http.get(prefix, headers=auth(tokens[0])), "run info")
        blobs = [dense_update(info["layout"], rank, seed=i) for i in range(uploaders)]
        size = len(blobs[0])
        log(
            f"transfer: run {run_id}, rank {rank}, {run['lora_parameters']:,} LoRA parameters, "
            f"upload {size / MIB:.1f} MiB"
        )
        plan = check(http.get(prefix + "/sync", headers=auth(tokens[0])), "sync")
        snap = plan["snapshot"]
        src = scratch / "source.bin"
        src.write_bytes(blobs[0])
        up_s, down_s, loop_s, copy_s = [], [], [], []
        meter = CpuMeter(stack).__enter__()
        for i in range(args.repeats):
            prefault(args.prefault_mib)
            loop_s.append(loopback_copy(blobs[i], scratch / "loopback.bin"))
            prefault(args.prefault_mib)
            copy_s.append(file_copy(src, scratch / "copy.bin"))
            for name in ("loopback.bin", "copy.bin"):
                (scratch / name).unlink()

            prefault(args.prefault_mib)
            dest = scratch / "download.bin"
            if CURL:
                # curl (C) as the client, like the baseline's raw socket: this times the
                # server, not a Python HTTP client's parser.
                down_s.append(
                    curl_download(
                        stack.base_url + f"{prefix}/blobs/{snap['sha256']}", tokens[i], dest
                    )
                )
            else:
                t0 = time.perf_counter()
                with http.stream(
                    "GET", f"{prefix}/blobs/{snap['sha256']}", headers=auth(tokens[i])
                ) as r:
                    if r.status_code != 200:
                        r.read()
                        check(r, "download")
                    with open(dest, "wb") as fh:
                        for chunk in r.iter_raw(MIB):
                            fh.write(chunk)
                down_s.append(time.perf_counter() - t0)
            got = hashlib.sha256(dest.read_bytes()).hexdigest()
            if got != snap["sha256"] or dest.stat().st_size != snap["size"]:
                raise RuntimeError(f"download of {snap['sha256']} arrived as {got}")
            dest.unlink()

            blob = blobs[i]
            headers = {
                **auth(tokens[i]),
                "X-Content-SHA256": hashlib.sha256(blob).hexdigest(),
                "Content-Type": "application/octet-stream",
            }
            # Open the connection first: the upload is timed on a warm keep-alive connection.
            check(http.get(prefix, headers=auth(tokens[i])), "run info")
            # The client that never uploads polls meanwhile: idle, then during the upload.
            prefault(args.prefault_mib)
            with BackgroundPoller(stack.base_url, prefix + "/poll", tokens[-1]) as poller:
                time.sleep(0.3)
                t0 = time.perf_counter()
                if CURL:
                    src_file = scratch / "upload.bin"
                    src_file.write_bytes(blob)
                    t0 = time.perf_counter()
                    took, accepted = curl_upload(
                        stack.base_url + f"{prefix}/rounds/1/update?base_round=0&num_samples=1",
                        tokens[i],
                        src_file,
                        headers["X-Content-SHA256"],
                    )
                    t1 = t0 + took
                    src_file.unlink()
                else:
                    r = http.put(
                        f"{prefix}/rounds/1/update",
                        params={"base_round": 0, "num_samples": 1},
                        content=blob,
                        headers=headers,
                    )
                    t1 = time.perf_counter()
                    accepted = check(r, "upload")
            up_s.append(t1 - t0)
            polls_idle += poller.latencies(0.0, t0 - 0.05)
            polls_upload += poller.latencies(t0, t1)
            if accepted["size"] != len(blob) or accepted["round_complete"]:
                raise RuntimeError(f"unexpected upload answer {accepted}")
            log(
                f"transfer {i + 1}/{args.repeats}: upload {up_s[-1] * 1e3:.0f} ms, download "
                f"{down_s[-1] * 1e3:.0f} ms, loopback {loop_s[-1] * 1e3:.0f} ms, "
                f"file copy {copy_s[-1] * 1e3:.0f} ms"
            )
        meter.__exit__()
    finally:
        http.close()
    admin.cancel(run_id)
    shutil.rmtree(scratch, ignore_errors=True)
    polls_idle.sort()
    polls_upload.sort()

    mib, snap_mib = size / MIB, snap["size"] / MIB
    upload = mib / median(up_s)
    download = snap_mib / median(down_s)
    loopback = mib / median(loop_s)
    up_ratio, down_ratio = upload / loopback, download / loopback
    return {
        "blob_mib": mib,
        "snapshot_mib": snap_mib,
        "model": "untrained tiny-family model "
        + ",".join(f"{k}={v}" for k, v in WIDE_SPEC.items()),
        "lora_rank": rank,
        "repeats": args.repeats,
        "client": "curl" if CURL else "httpx",
        "prefault_mib": args.prefault_mib,
        "upload_mib_s": upload,
        "download_mib_s": download,
        "loopback_copy_mib_s": loopback,
        "file_copy_mib_s": mib / median(copy_s),
        "loopback_s": loop_s,
        "file_copy_s": copy_s,
        "upload_s": up_s,
        "download_s": down_s,
        "poll_idle_ms": {
            "count": len(polls_idle),
            "p50": percentile(polls_idle, 0.5) * 1e3,
            "max": (polls_idle[-1] if polls_idle else math.nan) * 1e3,
        },
        "poll_during_upload_ms": {
            "count": len(polls_upload),
            "p50": percentile(polls_upload, 0.5) * 1e3,
            "max": (polls_upload[-1] if polls_upload else math.nan) * 1e3,
        },
        "cpu": meter.result,
        "upload_ratio": up_ratio,
        "download_ratio": down_ratio,
        "target_ratio": 0.5,
        "met": up_ratio >= 0.5 and down_ratio >= 0.5,
    }


# ---------------------------------------------------------------------------------------------
# 3. Round turnaround


class SimAgent:
    """An agent without a model: syncs exactly as the real one, 'trains' by random steps."""

    def __init__(self, http: httpx.AsyncClient, run_id: int, token: str) -> None:
        self.http = http
        self.prefix = AGENT.format(run_id=run_id)
        self.headers = auth(token)
        self.state: GlobalState | None = None
        self.have_round = -1

    async def get(self, path: str, **kw: Any) -> httpx.Response:
        r = await self.http.get(self.prefix + path, headers=self.headers, **kw)
        if r.status_code >= 400:
            raise RuntimeError(f"GET {path}: HTTP {r.status_code}: {r.text[:300]}")
        return r

    async def load_info(self) -> None:
        self.info = (await self.get("")).json()
        self.layout = {k: (int(v[0]), int(v[1])) for k, v in self.info["layout"].items()}
        self.rank = int(self.info["lora"]["rank"])
        self.client_id = int(self.info["client_id"])
        self.strategy = get_strategy(self.info["strategy"], dict(self.info["strategy_config"]))

    async def poll_until_action(
        self, wait: float = 10.0, give_up: float = 120.0
    ) -> tuple[dict[str, Any], float]:
        """Long-poll until the answer is not ``wait``; the answer and when it arrived."""
        deadline = time.perf_counter() + give_up
        while time.perf_counter() < deadline:
            params: dict[str, Any] = {"wait": wait}
            if self.state is not None:
                params["have_round"] = self.have_round
            answer: dict[str, Any] = (await self.get("/poll", params=params)).json()
            if answer["action"] != "wait":
                return answer, time.perf_counter()
        raise RuntimeError(f"no work for {give_up:.0f} s (is the worker aggregating?)")

    async def sync(self, plan: dict[str, Any] | None) -> None:
        if not plan:
            return
        snap = plan.get("snapshot")
        if snap is not None:
            data = (await self.get(f"/blobs/{snap['sha256']}")).content
            self.state = decode_snapshot(data, self.layout, self.rank)
            self.have_round = int(snap["round"])
            if state_digest(self.state) != snap["digest"]:
                raise RuntimeError(f"snapshot of round {snap['round']}: digest mismatch")
        for d in plan.get("deltas", []):
            assert self.state is not None
            data = (await self.get(f"/blobs/{d['sha256']}")).content
            self.strategy.apply_global(
                self.state, decode_global_delta(data, self.layout, self.rank)
            )
            self.have_round = int(d["round"])
            if state_digest(self.state) != d["digest"]:
                raise RuntimeError(f"state after round {d['round']}: digest mismatch")

    def make_upload(self, number: int) -> bytes:
        assert self.state is not None
        seed = int(self.info["seed"])
        trained = c.trained_copy(self.state, seed=number * 1009 + self.client_id, scale=1e-3)
        ctx = RoundContext(round=number, seed=seed, value_dtype=self.info["value_dtype"])
        with torch.no_grad():
            tensors = self.strategy.client_upload(
                self.state, trained, ctx, client_seed=number * 1009 + self.client_id
            )
        return encode(tensors, value_dtype=self.info["value_dtype"])

    async def upload(self, number: int, blob: bytes) -> dict[str, Any]:
        r = await self.http.put(
            f"{self.prefix}/rounds/{number}/update",
            params={"base_round": number - 1, "num_samples": 1},
            content=blob,
            headers={
                **self.headers,
                "X-Content-SHA256": hashlib.sha256(blob).hexdigest(),
                "Content-Type": "application/octet-stream",
            },
        )
        if r.status_code >= 400:
            raise RuntimeError(f"upload round {number}: HTTP {r.status_code}: {r.text[:300]}")
        result: dict[str, Any] = r.json()
        return result


def turnaround_phase(args: argparse.Namespace, stack: Stack) -> dict[str, Any]:
    admin = stack.admin
    run = admin.create_run(
        {
            "name": "bench-turnaround",
            "model": "tiny",
            "lora": {"rank": 4},
            "strategy": "fedsrd",
            "rounds": args.rounds,
            "round_deadline_s": 600.0,
        },
        launch=False,
    )
    run_id = int(run["id"])
    tokens = [admin.enroll(run_id, f"turn-{i}") for i in range(2)]
    admin.launch(run_id)
    with CpuMeter(stack) as cpu:
        client_s, final_s = run_async(turnaround_rounds(args, stack.base_url, run_id, tokens))
    rounds = admin.rounds(run_id)
    server_s = [
        float(r["metrics"]["turnaround_s"]) for r in rounds if "turnaround_s" in r["metrics"]
    ]
    aggregate_s = [
        float(r["metrics"]["durations"]["aggregate_s"])
        for r in rounds
        if "durations" in r["metrics"]
    ]
    if len(rounds) != args.rounds or any(r["status"] != "closed" for r in rounds):
        raise RuntimeError(f"turnaround run did not close every round: {rounds}")
    worst = max([*client_s, *server_s], default=math.nan)
    return {
        "rounds": args.rounds,
        "turnarounds": len(client_s),
        "client_s": client_s,
        "client_median_s": median(client_s),
        "client_max_s": max(client_s, default=math.nan),
        "client_final_done_s": final_s,
        "server_s": server_s,
        "server_median_s": median(server_s),
        "server_max_s": max(server_s, default=math.nan),
        "aggregate_median_s": median(aggregate_s),
        "cpu": cpu.result,
        "target_s": 1.0,
        "met": bool(client_s) and bool(server_s) and worst < 1.0,
    }


async def turnaround_rounds(
    args: argparse.Namespace, base_url: str, run_id: int, tokens: list[str]
) -> tuple[list[float], float]:
    async with httpx.AsyncClient(base_url=base_url, timeout=60) as http:
        first, last = SimAgent(http, run_id, tokens[0]), SimAgent(http, run_id, tokens[1])
        await first.load_info()
        await last.load_info()
        ans_first, _ = await first.poll_until_action()
        ans_last, _ = await last.poll_until_action()
        client_s: list[float] = []
        final_s = math.nan
        for number in range(1, args.rounds + 1):
            for agent, ans in ((first, ans_first), (last, ans_last)):
                if ans["action"] != "train" or ans["round"] != number:
                    raise RuntimeError(f"expected to train round {number}, got {ans}")
                await agent.sync(ans.get("sync"))
            blob_first, blob_last = first.make_upload(number), last.make_upload(number)
            await first.upload(number, blob_first)
            # The first client long-polls for the next round while the last one uploads.
            waiting = asyncio.create_task(first.poll_until_action())
            await asyncio.sleep(0)
            accepted = await last.upload(number, blob_last)
            t_last = time.perf_counter()
            if not accepted["round_complete"]:
                raise RuntimeError(f"round {number} did not complete with the last upload")
            ans_first, t_next = await waiting
            if number < args.rounds:
                if ans_first["action"] != "train":
                    raise RuntimeError(f"after round {number}: {ans_first}")
                client_s.append(t_next - t_last)
                ans_last, _ = await last.poll_until_action()
                log(f"turnaround: round {number} -> {number + 1} in {client_s[-1] * 1e3:.0f} ms")
            else:
                if ans_first["action"] != "done":
                    raise RuntimeError(f"after the last round: {ans_first}")
                final_s = t_next - t_last
    return client_s, final_s


# ---------------------------------------------------------------------------------------------
# Orchestration


def round_floats(x: Any) -> Any:
    """Floats to 4 significant digits (a shorter JSON line; timings are noisier than that)."""
    if isinstance(x, float):
        return None if math.isnan(x) else float(f"{x:.4g}")
    if isinstance(x, dict):
        return {k: round_floats(v) for k, v in x.items()}
    if isinstance(x, list):
        return [round_floats(v) for v in x]
    return x


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    host = "127.0.0.1"
    ensure_services(host, args.pg_port, args.redis_port)
    import redis

    from api.migrate import upgrade

    broker = f"redis://{host}:{args.redis_port}/{args.redis_db}"
    broker_db = redis.Redis(host=host, port=args.redis_port, db=args.redis_db)
    broker_db.flushdb()
    args.model_cache.mkdir(parents=True, exist_ok=True)
    logs, data = work / "logs", work / "data"
    logs.mkdir()
    data.mkdir()
    try:
        with throwaway_database(host, args.pg_port) as db_url:
            upgrade(db_url)
            admin_token = secrets.token_urlsafe(24)[:32]
            env = {
                **os.environ,
                "PYTHONUNBUFFERED": "1",
                "FEDSRD_DATA_DIR": str(data),
                "FEDSRD_DATABASE_URL": db_url,
                "FEDSRD_BROKER_URL": broker,
                "FEDSRD_TASK_MODE": "celery",
                "FEDSRD_ADMIN_TOKEN": admin_token,
                "FEDSRD_MODEL_CACHE": str(args.model_cache),
            }
            procs: list[Proc] = []
            try:  # processes stop before the database is dropped
                port = free_port()
                base_url = f"http://{host}:{port}"
                api = Proc(
                    "uvicorn",
                    [
                        *(PYTHON, "-m", "uvicorn", "--factory", "api.main:app_from_env"),
                        *("--host", host, "--port", str(port), "--log-level", "warning"),
                        "--no-access-log",
                    ],
                    env,
                    logs,
                )
                procs.append(api)
                node = f"bench-{secrets.token_hex(4)}@{socket.gethostname()}"
                worker = Proc(
                    "celery",
                    [
                        *(PYTHON, "-m", "celery", "-A", "workers.worker", "worker"),
                        *("-Q", "fedsrd.cpu,fedsrd.gpu", "--pool", "solo", "-n", node),
                        *("--loglevel", "info", "--without-gossip", "--without-mingle"),
                    ],
                    env,
                    logs,
                )
                procs.append(worker)
                wait_ready(base_url, api)
                wait_worker(broker, node, worker)
                log(f"API at {base_url} (pid {api.pid}), worker {node} (pid {worker.pid}) ready")
                stack = Stack(
                    base_url,
                    api,
                    worker,
                    db_name=db_url.rsplit("/", 1)[1],
                    pg_dsn=f"host={host} port={args.pg_port} user=postgres dbname=postgres",
                    admin=Admin(base_url, admin_token),
                )
                try:
                    summary = run_phases(args, stack, work)
                finally:
                    stack.admin.close()
                for p in procs:
                    p.check_alive()
            except BaseException:
                for p in procs:
                    log(f"---- last lines of {p.name} ({p.log_path}) ----\n{p.tail()}")
                raise
            finally:
                for p in reversed(procs):
                    p.stop()
    finally:
        with contextlib.suppress(Exception):
            broker_db.flushdb()
        broker_db.close()
    return summary


def run_phases(args: argparse.Namespace, stack: Stack, work: Path) -> dict[str, Any]:
    # The first run builds the tiny model into the cache (once), before anything is timed.
    poll = poll_phase(args, stack)
    cpu = poll["cpu"]
    log(
        f"poll: {poll['polls']} polls by {poll['agents']} agents in {poll['duration_s']:.1f} s "
        f"({poll['polls_per_s']:.0f}/s): p50 {poll['p50_ms']:.1f} ms, p90 {poll['p90_ms']:.1f} "
        f"ms, p99 {poll['p99_ms']:.1f} ms, max {poll['max_ms']:.1f} ms, {poll['errors']} "
        f"errors; CPU: API {cpu['api_percent']:.0f}%, load generator {cpu['bench_percent']:.0f}%,"
        f" PostgreSQL {cpu['postgres_percent']:.0f}%, other processes {cpu['others_percent']:.0f}%;"
        f" the API opened {poll['db_connections_opened']} database connections"
    )
    transfer = transfer_phase(args, stack, work)
    log(
        f"transfer ({transfer['blob_mib']:.1f} MiB): upload {transfer['upload_mib_s']:.0f} MiB/s, "
        f"download {transfer['download_mib_s']:.0f} MiB/s, loopback copy "
        f"{transfer['loopback_copy_mib_s']:.0f} MiB/s, file copy "
        f"{transfer['file_copy_mib_s']:.0f} MiB/s; ratios {transfer['upload_ratio']:.2f} / "
        f"{transfer['download_ratio']:.2f}; a poll during an upload: max "
        f"{transfer['poll_during_upload_ms']['max']:.0f} ms (idle: max "
        f"{transfer['poll_idle_ms']['max']:.0f} ms); other processes "
        f"{transfer['cpu']['others_percent']:.0f}% CPU"
    )
    turnaround = turnaround_phase(args, stack)
    log(
        f"turnaround over {turnaround['turnarounds']} rounds: client median "
        f"{turnaround['client_median_s'] * 1e3:.0f} ms, max "
        f"{turnaround['client_max_s'] * 1e3:.0f} ms; server median "
        f"{turnaround['server_median_s'] * 1e3:.0f} ms, max "
        f"{turnaround['server_max_s'] * 1e3:.0f} ms; other processes "
        f"{turnaround['cpu']['others_percent']:.0f}% CPU"
    )
    return {
        "benchmark": "api_load",
        "quick": bool(args.quick),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)),
        "poll": poll,
        "transfer": transfer,
        "turnaround": turnaround,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="50 agents for 10 s")
    parser.add_argument("--agents", type=int, default=None, help="polling agents (200)")
    parser.add_argument("--duration", type=float, default=None, help="poll seconds (60)")
    parser.add_argument("--interval", type=float, default=1.0, help="think time between polls")
    parser.add_argument(
        "--loadgen",
        choices=["raw", "httpx"],
        default="raw",
        help="poll client: one raw keep-alive HTTP/1.1 connection per agent (lean) or httpx",
    )
    parser.add_argument("--blob-mib", type=float, default=64.0, help="transfer size (MiB)")
    parser.add_argument("--repeats", type=int, default=3, help="transfer repeats (median)")
    parser.add_argument(
        "--prefault-mib",
        type=int,
        default=512,
        help="memory touched and freed before each timed transfer (0: none; see prefault())",
    )
    parser.add_argument("--rounds", type=int, default=5, help="rounds of the turnaround run")
    parser.add_argument("--pg-port", type=int, default=5432)
    parser.add_argument("--redis-port", type=int, default=6379)
    parser.add_argument("--redis-db", type=int, default=13, help="flushed at start and end")
    parser.add_argument(
        "--model-cache",
        type=Path,
        default=Path(tempfile.gettempdir()) / "fedsrd-bench-models",
        help="FEDSRD_MODEL_CACHE (kept between runs: models are built once)",
    )
    parser.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (logs, blobs)")
    args = parser.parse_args(argv)
    args.agents = args.agents or (50 if args.quick else 200)
    args.duration = args.duration or (10.0 if args.quick else 60.0)
    if args.rounds < 2:
        parser.error("--rounds must be at least 2 (R rounds give R - 1 turnarounds)")
    args.model_cache = args.model_cache.resolve()

    def on_term(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)  # unwinds through the cleanup

    signal.signal(signal.SIGTERM, on_term)
    work = Path(tempfile.mkdtemp(prefix="fedsrd-api-load-"))
    ok = False
    try:
        report = run(args, work)
        ok = True
    except Exception:
        traceback.print_exc()
        sys.exit(1)
    finally:
        if args.keep_tmp:
            log(f"temp dir kept: {work}")
        elif ok:
            shutil.rmtree(work, ignore_errors=True)
        else:
            shutil.rmtree(work / "data", ignore_errors=True)
            log(f"logs kept in {work / 'logs'}")
    c.emit(round_floats(report))


if __name__ == "__main__":
    main()
