"""The round lifecycle (the only writer of ``rounds``, and of a run's progress fields).

open -> aggregating -> closed; an open round closes when every expected client has
uploaded, or when it has its quorum and every missing client is gone (silent for
``client_timeout_s``), or at its deadline with the quorum. Below quorum at the deadline the
run's policy extends the deadline or fails the run. Every transition locks the round row
first (``SELECT ... FOR UPDATE`` on PostgreSQL; SQLite transactions are already exclusive),
so two concurrent uploads or an upload racing the deadline sweep close a round exactly once,
and the aggregation task is sent only after that transaction commits.
"""

from __future__ import annotations

import datetime as dt
import math
import random
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from api.models import Client, Round, Run, Update, utcnow
from api.runtime import Runtime, Transaction
from api.services import clients as client_service
from api.services.states import duration_of, lora_parameters
from fedsrd_core.finite import json_finite

#: Bytes of one value in FedAvg's dense exchange (fp32 factors, as FedIT sends them).
FEDAVG_VALUE_BYTES = 4


def round_traffic(
    lora_params: int, participants: int, bytes_up: int, delta_size: int
) -> dict[str, int]:
    """What a closed round moved, and what FedAvg would have moved for the same clients.

    ``up``: the participants' uploads as stored; ``down``: the round's global delta, which
    every participant receives; ``fedavg``: FedAvg's (FedIT's) dense exchange of the same
    adapter, ``A`` and ``B`` in fp32 up and the new global factors down, per participant:
    ``2 * participants * lora_params * 4`` bytes. Catch-up snapshots and retries are not
    counted here (the clients' own byte counters include them).
    """
    return {
        "up": bytes_up,
        "down": delta_size * participants,
        "fedavg": 2 * participants * lora_params * FEDAVG_VALUE_BYTES,
    }


def lock_run(s: Session, run_id: int) -> Run | None:
    return s.scalar(select(Run).where(Run.id == run_id).with_for_update())


def lock_run_and_round(s: Session, round_id: int) -> tuple[Run, Round] | None:
    """Lock a round and its run, always in the order run, then round (no deadlocks)."""
    run_id = s.scalar(select(Round.run_id).where(Round.id == round_id))
    if run_id is None:
        return None
    run = lock_run(s, run_id)
    rnd = s.scalar(select(Round).where(Round.id == round_id).with_for_update())
    if run is None or rnd is None:
        return None
    return run, rnd


def current_round(s: Session, run: Run) -> Round | None:
    if run.current_round == 0:
        return None
    return s.scalar(select(Round).where(Round.run_id == run.id, Round.number == run.current_round))


def _select_clients(s: Session, run: Run, number: int) -> list[int]:
    active = list(
        s.scalars(
            select(Client.id)
            .where(Client.run_id == run.id, Client.status == "active")
            .order_by(Client.id)
        )
    )
    k = run.config.get("clients_per_round")
    if k is None or k >= len(active):
        return active
    # Seeded by run and round: the same run re-selects the same clients after a restart.
    rng = random.Random(f"fedsrd-select:{run.config.get('seed', 0)}:{number}")
    return sorted(rng.sample(active, int(k)))


def deadline_from(run: Run, start: dt.datetime) -> dt.datetime:
    return start + duration_of(run, "round_deadline_s", 600.0)


def open_round(tx: Transaction, rt: Runtime, run: Run, number: int) -> Round:
    """Open round ``number`` of ``run`` (the caller holds the run's lock)."""
    s = tx.session
    now = utcnow()
    expected = _select_clients(s, run, number)
    rnd = Round(
        run_id=run.id,
        number=number,
        status="open",
        expected=expected,
        opened_at=now,
        deadline_at=deadline_from(run, now),
        metrics={},
        attempts=0,
    )
    s.add(rnd)
    run.current_round = number
    run.version = run.version + 1
    s.flush()
    train_simulated(tx, rt, run, rnd)
    return rnd


def train_simulated(tx: Transaction, rt: Runtime, run: Run, rnd: Round) -> int:
    """Queue (after commit) the training of every simulated client of ``rnd`` that has not
    uploaded; returns how many."""
    if not run.config.get("simulation"):
        return 0
    s = tx.session
    uploaded = set(s.scalars(select(Update.client_id).where(Update.round_id == rnd.id)))
    sim = set(
        s.scalars(select(Client.id).where(Client.run_id == run.id, Client.simulated.is_(True)))
    )
    todo = [cid for cid in rnd.expected if cid in sim and cid not in uploaded]
    for cid in todo:
        tx.after_commit(
            lambda c=cid: rt.dispatcher.train(run.id, c, rnd.number)  # type: ignore[misc]
        )
    return len(todo)


def uploaded_clients(s: Session, rnd: Round) -> list[int]:
    return sorted(s.scalars(select(Update.client_id).where(Update.round_id == rnd.id)))


def _is_gone(
    client: Client, rnd: Round, timeout: dt.timedelta, now: dt.datetime, grace: dt.timedelta
) -> bool:
    if client.status == "revoked":
        return True
    if client.simulated:
        return False  # workers retry; a simulated client is never "gone"
    if rnd.number == 1 and now - rnd.opened_at < grace:
        return False  # the start: sites may still be loading their models
    seen = client.last_seen_at
    if seen is None:
        return now - rnd.opened_at > timeout
    return now - seen > timeout


def maybe_close(tx: Transaction, rt: Runtime, run: Run, rnd: Round) -> bool:
    """Apply the closing rule to the locked open round ``rnd``; True if it closed now."""
    if rnd.status != "open" or run.status != "running":
        return False
    s = tx.session
    now = utcnow()
    uploaded = set(uploaded_clients(s, rnd))
    missing = [c for c in rnd.expected if c not in uploaded]
    quorum = int(run.config.get("quorum", 1))
    close = False
    reason = ""
    if uploaded and not missing:
        close, reason = True, "all expected clients uploaded"
    elif len(uploaded) >= quorum:
        timeout = duration_of(run, "client_timeout_s", 300.0)
        grace = (
            duration_of(run, "start_grace_s", 0.0)
            if run.config.get("start_grace_s") is not None
            else rnd.deadline_at - rnd.opened_at
        )
        rows = s.scalars(select(Client).where(Client.id.in_(missing))).all()
        if all(_is_gone(c, rnd, timeout, now, grace) for c in rows):
            close, reason = True, "quorum reached; missing clients are gone"
        elif now >= rnd.deadline_at:
            close, reason = True, "deadline passed with quorum"
    elif now >= rnd.deadline_at:
        if run.config.get("below_quorum", "extend") == "extend":
            rnd.deadline_at = deadline_from(run, now)
            run.version = run.version + 1
            return False
        rnd.status = "failed"
        rnd.closed_at = now
        rnd.error = f"deadline passed with {len(uploaded)} update(s), quorum is {quorum}"
        run.status = "failed"
        run.status_reason = f"round {rnd.number}: {rnd.error}"
        run.version = run.version + 1
        return False
    if not close:
        return False
    rnd.status = "aggregating"
    rnd.collected_at = now
    rnd.metrics = {**rnd.metrics, "close_reason": reason}
    run.version = run.version + 1
    round_id = rnd.id
    tx.after_commit(lambda: rt.dispatcher.aggregate(round_id))
    return True


def start_aggregation(rt: Runtime, round_id: int) -> bool:
    """Count an aggregation attempt; False if the round is not waiting for aggregation
    (already closed by an earlier run of the task: nothing to do)."""
    with rt.transaction() as tx:
        locked = lock_run_and_round(tx.session, round_id)
        if locked is None or locked[1].status != "aggregating":
            return False
        rnd = locked[1]
        rnd.attempts = rnd.attempts + 1
        return True


def complete_aggregation(
    rt: Runtime,
    round_id: int,
    *,
    delta: tuple[str, int],
    snapshot: tuple[str, int],
    digest: str,
    metrics: dict[str, Any],
) -> bool:
    """Record the round's result and open the next round (or complete the run).

    Idempotent: only a round still ``aggregating`` is changed, so a second run of the task
    (redelivered, or re-sent by reconciliation) changes nothing.
    """
    keep = rt.settings.keep_snapshots
    # The snapshots this round will prune are renewed first, outside the locked transaction
    # (on S3 a renewal copies the object): from the moment no row names one, garbage
    # collection leaves it for its grace period (a backup's dump taken just before still
    # finds it). The set cannot change before the transaction below: a run's rounds close
    # one at a time, and this one has not. (If this call finds the round already closed,
    # the renewals only delay those blobs' collection.)
    with rt.sessions() as s:
        this = s.get(Round, round_id)
        prunable = [] if this is None else prunable_snapshots(s, this.run_id, this.number, keep)
        shas = [str(r.snapshot_blob) for r in prunable]
    for sha in shas:
        rt.blobs.renew(sha)
    with rt.transaction() as tx:
        s = tx.session
        locked = lock_run_and_round(s, round_id)
        if locked is None or locked[1].status != "aggregating":
            return False
        run, rnd = locked
        now = utcnow()
        participants = uploaded_clients(s, rnd)
        rnd.status = "closed"
        rnd.closed_at = now
        rnd.delta_blob, rnd.delta_size = delta
        rnd.snapshot_blob, rnd.snapshot_size = snapshot
        rnd.digest = digest
        for old in prunable_snapshots(s, run.id, rnd.number, keep):
            old.snapshot_blob = None
        turnaround = None
        # JSON columns: PostgreSQL refuses NaN (DataError), SQLite would keep it.
        rnd.metrics = {**rnd.metrics, **json_finite(metrics)}
        traffic = round_traffic(
            lora_parameters(run), len(participants), int(metrics["bytes_up"]), delta[1]
        )
        run.bytes_up = run.bytes_up + traffic["up"]
        run.bytes_down = run.bytes_down + traffic["down"]
        run.fedavg_bytes = run.fedavg_bytes + traffic["fedavg"]
        client_service.record_rounds_done(s, participants)
        if run.status == "running":
            if rnd.number < run.total_rounds:
                nxt = open_round(tx, rt, run, rnd.number + 1)
                if rnd.collected_at is not None:
                    turnaround = (nxt.opened_at - rnd.collected_at).total_seconds()
            else:
                run.status = "completed"
                run.finished_at = now
                run.version = run.version + 1
        if turnaround is not None:
            rnd.metrics = {**rnd.metrics, "turnaround_s": turnaround}
        run.version = run.version + 1
        if run.config.get("evaluation"):
            run_id, number = run.id, rnd.number
            tx.after_commit(lambda: rt.dispatcher.evaluate(run_id, number))
        return True


def prunable_snapshots(s: Session, run_id: int, newest: int, keep: int) -> list[Round]:
    """The rounds whose snapshots closing round ``newest`` stops naming: those before the
    newest ``keep`` (-1: none) that still name one. Their blobs become garbage unless another
    row names the same content (:mod:`api.services.storage` collects them). The states stay
    reachable: the initial state and the global deltas are never pruned
    (:func:`api.services.states.load_state`)."""
    if keep <= 0:
        return []
    return list(
        s.scalars(
            select(Round).where(
                Round.run_id == run_id,
                Round.number <= newest - keep,
                Round.snapshot_blob.is_not(None),
            )
        )
    )


#: Longest exception text a run's ``status_reason`` (shown on the dashboard) quotes.
_REASON_CHARS = 300


def failure_reason(error: BaseException) -> str:
    """What a run's ``status_reason`` says about ``error``: a short line for an admin. A
    database error's text holds the whole SQL statement and its parameters, so it is named
    by its class only; the full text goes to the log (the caller logs the traceback)."""
    if isinstance(error, SQLAlchemyError):
        orig = getattr(error, "orig", None)
        kind = type(orig).__name__ if orig is not None else type(error).__name__
        return f"database error ({kind}); details in the worker's log"
    text = f"{type(error).__name__}: {error}"
    return text if len(text) <= _REASON_CHARS else text[: _REASON_CHARS - 3] + "..."


def fail_aggregation(rt: Runtime, round_id: int, error: str) -> None:
    """An aggregation that cannot succeed (bad stored state): the run fails, resumable."""
    with rt.transaction() as tx:
        locked = lock_run_and_round(tx.session, round_id)
        if locked is None or locked[1].status != "aggregating":
            return
        run, rnd = locked
        rnd.error = error
        run.status = "failed"
        run.status_reason = f"round {rnd.number}: aggregation failed: {error}"
        run.version = run.version + 1


def fail_open_round(rt: Runtime, run_id: int, number: int, error: str) -> None:
    """A task the open round ``number`` needs cannot succeed (a simulated client's training
    fails): the round and the run fail with ``error``, resumable (the round reopens with
    the updates it has). Nothing happens if the round is no longer open."""
    with rt.transaction() as tx:
        s = tx.session
        run = lock_run(s, run_id)
        if run is None or run.status != "running":
            return
        rnd = s.scalar(
            select(Round).where(Round.run_id == run_id, Round.number == number).with_for_update()
        )
        if rnd is None or rnd.status != "open":
            return
        rnd.status = "failed"
        rnd.closed_at = utcnow()
        rnd.error = error
        run.status = "failed"
        run.status_reason = f"round {number}: {error}"
        run.version = run.version + 1


def eval_losses(metrics: dict[str, Any], key: str = "eval") -> dict[str, float]:
    """Loss per held-out set of a round's ``metrics[key]`` (``{set: {"loss": x, ...}}``, as
    :func:`record_evaluation` stores it: ``"eval"`` after the round, ``"base_eval"`` for the
    base model, which round 1 carries); sets without a finite loss are left out."""
    ev = metrics.get(key)
    if not isinstance(ev, dict):
        return {}
    out = {}
    for name, v in ev.items():
        loss = v.get("loss") if isinstance(v, dict) else None
        if isinstance(loss, int | float) and not isinstance(loss, bool) and math.isfinite(loss):
            out[str(name)] = float(loss)
    return out


def mean_eval_loss(metrics: dict[str, Any], key: str = "eval") -> float | None:
    """Mean of :func:`eval_losses` over the held-out sets; None without a finite one."""
    losses = eval_losses(metrics, key)
    return sum(losses.values()) / len(losses) if losses else None


def record_evaluation(
    rt: Runtime,
    run_id: int,
    number: int,
    metrics: dict[str, Any],
    base: dict[str, Any] | None = None,
) -> None:
    """Store the evaluation after round ``number``; ``base``: the base model's (round 0),
    kept with round 1's metrics as ``base_eval``."""
    with rt.transaction() as tx:
        s = tx.session
        rnd = s.scalar(
            select(Round).where(Round.run_id == run_id, Round.number == number).with_for_update()
        )
        if rnd is None:
            return
        extra = {"base_eval": json_finite(base)} if base is not None else {}
        # A JSON column: PostgreSQL refuses NaN (a diverged model's loss), SQLite keeps it.
        rnd.metrics = {**rnd.metrics, "eval": json_finite(metrics), **extra}


def final_eval_losses(rt: Runtime, run_ids: list[int]) -> dict[int, float | None]:
    """Mean eval loss of each run's last evaluated round (None where none is): one query."""
    out: dict[int, float | None] = dict.fromkeys(run_ids)
    if not run_ids:
        return out
    with rt.sessions() as s:
        rows = s.execute(
            select(Round.run_id, Round.metrics)
            .where(Round.run_id.in_(run_ids), Round.status == "closed")
            .order_by(Round.run_id, Round.number.desc())
        ).all()
    for run_id, metrics in rows:
        if out[run_id] is None:
            out[run_id] = mean_eval_loss(metrics or {})
    return out


def sweep(rt: Runtime) -> int:
    """Apply the closing rule to every open round (deadlines, gone clients); returns how
    many rounds changed state. Safe to run from several API processes at once."""
    with rt.sessions() as s:
        open_ids = list(
            s.scalars(
                select(Round.id)
                .join(Run, Run.id == Round.run_id)
                .where(Round.status == "open", Run.status == "running")
            )
        )
    changed = 0
    for rid in open_ids:
        with rt.transaction() as tx:
            locked = lock_run_and_round(tx.session, rid)
            if locked is None or locked[1].status != "open":
                continue
            run, rnd = locked
            before = (rnd.status, rnd.deadline_at, run.status)
            maybe_close(tx, rt, run, rnd)
            if (rnd.status, rnd.deadline_at, run.status) != before:
                changed += 1
    return changed


def add_expected(s: Session, run: Run, client_id: int) -> None:
    rnd = current_round(s, run)
    if rnd is not None and rnd.status == "open" and client_id not in rnd.expected:
        rnd.expected = [*rnd.expected, client_id]  # a new list: JSON columns track assignment
        run.version = run.version + 1
