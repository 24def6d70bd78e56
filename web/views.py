"""What the pages show, computed from the REST API's documents (pure functions, no I/O).

A page handler fetches ``RunPublic``, ``RoundsPublic`` and ``ClientsPublic`` exactly as the
JSON API serves them and passes them here; templates only lay the result out.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass

from api.schemas import ClientPublic, RoundPublic, RunPublic
from api.services.rounds import eval_losses, mean_eval_loss
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
    #: Why it stopped collecting (all uploaded, quorum and the rest gone, deadline).
    close_reason: str | None = None


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
            close_reason=(
                str(r.metrics["close_reason"]) if r.metrics.get("close_reason") else None
            ),
        )
        for r, c, a in rows
    ]
    return out[::-1]


#: Line colours of the charts' series, in order (web/static/app.css).
PALETTE = ("s1", "s2", "s3", "s4", "s5", "s6")
#: Most runs one comparison shows (one colour each).
MAX_COMPARED = len(PALETTE)


def base_eval(rounds: list[RoundPublic]) -> dict[str, float]:
    """The base model's eval loss per held-out set (recorded with round 1's evaluation)."""
    first = next((r for r in rounds if r.number == 1), None)
    return eval_losses(first.metrics, "base_eval") if first is not None else {}


def eval_curve(rounds: list[RoundPublic]) -> list[tuple[float, float | None]]:
    """(round, mean eval loss) of every closed round, with the base model as round 0 when
    its evaluation is recorded."""
    first = next((r for r in rounds if r.number == 1), None)
    base = mean_eval_loss(first.metrics, "base_eval") if first is not None else None
    head: list[tuple[float, float | None]] = [(0.0, base)] if base is not None else []
    return head + [
        (float(r.number), mean_eval_loss(r.metrics)) for r in rounds if r.status == "closed"
    ]


def final_eval(rounds: list[RoundPublic]) -> float | None:
    """Mean eval loss of the last closed round that has an evaluation."""
    for r in reversed(rounds):
        if r.status == "closed" and (loss := mean_eval_loss(r.metrics)) is not None:
            return loss
    return None


def charts(rounds: list[RoundPublic]) -> list[Chart]:
    """Loss, traffic per round, cumulative traffic against FedAvg, participants per round,
    and (when the run evaluates) eval loss per held-out set."""
    closed = [r for r in rounds if r.status == "closed"]
    train = [(float(r.number), r.metrics.get("train_loss")) for r in closed]
    evals = eval_curve(rounds)
    loss_series = [Series("train loss (clients' mean)", train, "s1")]
    if any(v is not None for _, v in evals):
        loss_series.append(
            Series("eval loss (mean over held-out sets; round 0: base model)", evals, "s2")
        )
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
    out = [
        chart("Loss per round", loss_series, y_label="loss", zero=False),
        # Log scale: a sparse strategy's lines sit an order of magnitude under FedAvg's.
        chart(
            "MiB per round",
            [
                Series("up", up, "s1"),
                Series("down", down, "s2"),
                Series("FedAvg up + down", fedavg, "ref"),
            ],
            y_label="MiB",
            log_y=True,
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
    base = base_eval(rounds)
    per_set = {name for r in closed for name in eval_losses(r.metrics)} | set(base)
    if per_set:
        series = []
        for k, name in enumerate(sorted(per_set)):
            points: list[tuple[float, float | None]] = [(0.0, base[name])] if name in base else []
            points += [(float(r.number), eval_losses(r.metrics).get(name)) for r in closed]
            series.append(Series(name, points, PALETTE[k % len(PALETTE)]))
        out.append(
            chart("Eval loss per held-out set (round 0: base model)", series, y_label="loss",
                  zero=False)
        )  # fmt: skip
    return out


@dataclass(frozen=True)
class Compared:
    """One run of a comparison: its document, colour, final eval loss and MiB moved."""

    run: RunPublic
    css: str
    final_eval: float | None
    mib: float
    label: str


def compare(runs: list[tuple[RunPublic, list[RoundPublic]]]) -> tuple[list[Chart], list[Compared]]:
    """Several runs on shared axes: mean eval loss against round and against the cumulative
    MiB the run moved (uploads + downloads of all its clients), the base model at round 0 /
    0 MiB: the product's argument (the same loss for fewer bytes) in one picture."""
    by_round, by_mib, rows = [], [], []
    for k, (run, rounds) in enumerate(runs):
        css = PALETTE[k % len(PALETTE)]
        label = f"run {run.id} · {run.strategy}" + (" (FedAvg)" if run.strategy == "fedavg" else "")
        curve = eval_curve(rounds)
        moved: dict[float, float] = {0.0: 0.0}
        total = 0.0
        for r in rounds:
            if r.status == "closed" and r.traffic is not None:
                total += (r.traffic["up"] + r.traffic["down"]) / MIB
                moved[float(r.number)] = total
        by_round.append(Series(label, curve, css))
        by_mib.append(Series(label, [(moved[x], y) for x, y in curve if x in moved], css))
        rows.append(Compared(run, css, final_eval(rounds), total, label))
    charts_ = [
        chart("Eval loss against round", by_round, y_label="eval loss", zero=False),
        chart(
            "Eval loss against cumulative MiB moved",
            by_mib,
            y_label="eval loss",
            zero=False,
            x_label="MiB (all clients, up + down)",
            integer_x=False,
        ),
    ]
    return charts_, rows


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
