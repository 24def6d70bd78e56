"""Prometheus metrics: request counts and latencies (recorded by a middleware) and the
federation's state (read from the database at scrape time, so every API replica reports
the same figures)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from sqlalchemy import func, select

from api.models import Client, Round, Run, Update
from api.runtime import Runtime

REGISTRY = CollectorRegistry()
REQUESTS = Counter(
    "fedsrd_http_requests", "HTTP requests", ["method", "route", "status"], registry=REGISTRY
)
LATENCY = Histogram(
    "fedsrd_http_request_seconds",
    "HTTP request latency",
    ["method", "route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10, 60),
    registry=REGISTRY,
)
RUNS = Gauge("fedsrd_runs", "Runs by status", ["status"], registry=REGISTRY)
ROUNDS = Gauge("fedsrd_rounds", "Rounds by status", ["status"], registry=REGISTRY)
CLIENTS = Gauge("fedsrd_clients", "Clients by status", ["status"], registry=REGISTRY)
UPDATES = Gauge("fedsrd_updates", "Accepted updates", registry=REGISTRY)
BYTES = Gauge("fedsrd_bytes", "Bytes moved by clients", ["direction"], registry=REGISTRY)


def refresh(rt: Runtime) -> None:
    with rt.sessions() as s:
        for gauge, col in ((RUNS, Run.status), (ROUNDS, Round.status), (CLIENTS, Client.status)):
            gauge.clear()
            for st, n in s.execute(select(col, func.count()).group_by(col)):
                gauge.labels(st).set(n)
        UPDATES.set(s.scalar(select(func.count()).select_from(Update)) or 0)
        up, down = s.execute(
            select(
                func.coalesce(func.sum(Client.bytes_up), 0),
                func.coalesce(func.sum(Client.bytes_down), 0),
            )
        ).one()
        BYTES.labels("up").set(up)
        BYTES.labels("down").set(down)
