"""What the pages show, computed from the REST API's documents (pure functions, no I/O).

A page handler fetches ``RunPublic``, ``RoundsPublic`` and ``ClientsPublic`` exactly as the
JSON API serves them and passes them here; templates only lay the result out.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass
from typing import Any

from api.schemas import ClientPublic, RoundPublic, RunPublic
from web.charts import Chart, Series, chart

MIB = float(1 << 20)
#: How long after a run completes its page keeps waiting for the last evaluations.
EVAL_GRACE = dt.timedelta(minutes=10)
#: Rounds shown in the timeline (the newest); the JSON API has them all.
TIMELINE_ROUNDS = 50
ACTIVE_RUN = frozenset({"created", "running"})


def mib(n: float | None) -> str:
    if n is None:
        return "—"
    v = n / MIB
    if v == 0:
        return "0 MiB"
    return f"{v:.3g} MiB" if abs(v) < 100 else f"{v:,.0f} MiB"


def duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "—"
    s = max(seconds, 0.0)
    if s < 1:
        return f"{s * 1000:.0f} ms"
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60)} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60)} min"


def ago(t: dt.datetime | None, now: dt.datetime) -> str:
    if t is None:
        return "never"
    s = (now - t).total_seconds()
    if s < 0:
        return "just now"
    return f"{duration(s)} ago" if s >= 1 else "just now"


def live(run: RunPublic, rounds: list[RoundPublic], now: dt.datetime) -> bool:
    """Whether the run's page should keep refreshing: while the run is active, and after it
    completed until every closed round's evaluation has arrived (they run after the round,
    on a worker; the grace period bounds the wait for one that never comes)."""
    if run.status in ACTIVE_RUN:
        return True
    if run.status != "completed" or not run.config.get("evaluation") or run.finished_at is None:
        return False
    pending = any(r.status == "closed" and "eval" not in r.metrics for r in rounds)
    return pending and now - run.finished_at < EVAL_GRACE


def saved_share(run: RunPublic) -> float | None:
    """Share of FedAvg's dense traffic that the run did not move (None before any round)."""
    if run.fedavg_equivalent_bytes <= 0:
        return None
    return run.bytes_saved / run.fedavg_equivalent_bytes


@dataclass(frozen=True)
class TimelineRow:
    number: int
    status: str
    opened_at: dt.datetime
    participants: int
    expected: int
    collecting_s: float
    aggregating_s: float | None
    #: Bar segments as fractions of the longest round shown: (collecting, aggregating).
    bar: tuple[float, float]
    error: str | None


def timeline(rounds: list[RoundPublic], now: dt.datetime) -> list[TimelineRow]:
    """Newest first: how long each round collected updates (opened until its last update,
    or until now while open) and aggregated (last update until closed, or until now)."""
    rows = []
    for r in rounds[-TIMELINE_ROUNDS:]:
        collected = r.collected_at or (now if r.status == "open" else r.closed_at or now)
        collecting = (collected - r.opened_at).total_seconds()
        aggregating = None
        if r.collected_at is not None:
            aggregating = ((r.closed_at or now) - r.collected_at).total_seconds()
        rows.append((r, max(collecting, 0.0), aggregating))
    longest = max((c + (a or 0.0) for _, c, a in rows), default=0.0) or 1.0
    out = [
        TimelineRow(
            number=r.number,
            status=r.status,
            opened_at=r.opened_at,
            participants=len(r.uploaded),
            expected=len(r.expected),
            collecting_s=c,
            aggregating_s=a,
            bar=(c / longest, (a or 0.0) / longest),
            error=r.error,
        )
        for r, c, a in rows
    ]
    return out[::-1]


def _eval_loss(metrics: dict[str, Any]) -> float | None:
    ev = metrics.get("eval")
    if not isinstance(ev, dict) or not ev:
        return None
    losses = [float(v["loss"]) for v in ev.values() if isinstance(v, dict) and "loss" in v]
    return sum(losses) / len(losses) if losses else None


def charts(rounds: list[RoundPublic]) -> list[Chart]:
    """Loss, traffic per round, cumulative traffic against FedAvg, participants per round."""
    closed = [r for r in rounds if r.status == "closed"]
    train = [(float(r.number), r.metrics.get("train_loss")) for r in closed]
    evals = [(float(r.number), _eval_loss(r.metrics)) for r in closed]
    loss_series = [Series("train loss (clients' mean)", train, "s1")]
    if any(v is not None for _, v in evals):
        loss_series.append(Series("eval loss (mean over held-out sets)", evals, "s2"))
    with_traffic = [r for r in closed if r.traffic is not None]
    up = [(float(r.number), r.traffic["up"] / MIB) for r in with_traffic if r.traffic]
    down = [(float(r.number), r.traffic["down"] / MIB) for r in with_traffic if r.traffic]
    fedavg = [(float(r.number), r.traffic["fedavg"] / MIB) for r in with_traffic if r.traffic]
    cum_actual: list[tuple[float, float | None]] = []
    cum_fedavg: list[tuple[float, float | None]] = []
    a = f = 0.0
    for r in with_traffic:
        assert r.traffic is not None
        a += (r.traffic["up"] + r.traffic["down"]) / MIB
        f += r.traffic["fedavg"] / MIB
        cum_actual.append((float(r.number), a))
        cum_fedavg.append((float(r.number), f))
    participants = [(float(r.number), float(len(r.uploaded))) for r in closed]
    return [
        chart("Loss per round", loss_series, y_label="loss", zero=False),
        chart(
            "MiB per round",
            [
                Series("up", up, "s1"),
                Series("down", down, "s2"),
                Series("FedAvg up + down", fedavg, "ref"),
            ],
            y_label="MiB",
        ),
        chart(
            "Cumulative MiB",
            [Series("this run", cum_actual, "s1"), Series("FedAvg", cum_fedavg, "ref")],
            y_label="MiB",
        ),
        chart(
            "Participants per round",
            [Series("participants", participants, "s3")],
            y_label="clients",
            bars=True,
        ),
    ]


@dataclass(frozen=True)
class ClientRow:
    client: ClientPublic
    #: (step, steps) of the current round's local training, when the client reports it.
    progress: tuple[int, int] | None
    last_loss: float | None


def client_rows(clients: list[ClientPublic], run: RunPublic) -> list[ClientRow]:
    rows = []
    for c in clients:
        p = c.progress or {}
        current = run.status == "running" and p.get("round") == run.current_round
        steps = p.get("steps")
        progress = None
        if current and isinstance(steps, int) and steps > 0:
            progress = (min(int(p.get("step", 0)), steps), steps)
        loss = p.get("loss") if current else None
        rows.append(ClientRow(c, progress, float(loss) if isinstance(loss, int | float) else None))
    return rows
