"""Start-up reconciliation: re-send what a crashed process may have left undone.

Every task is idempotent, so re-sending one that is in fact still queued or running costs
work, never correctness: a round left ``aggregating`` is aggregated again (the second
result is identical and its commit a no-op); simulated clients of an open round that have
not uploaded are trained again.
"""

from __future__ import annotations

from sqlalchemy import select

from api.models import Run
from api.runtime import Runtime
from api.services import rounds as round_service


def reconcile(rt: Runtime) -> int:
    with rt.sessions() as s:
        run_ids = list(s.scalars(select(Run.id).where(Run.status == "running")))
    sent = 0
    for run_id in run_ids:
        with rt.transaction() as tx:
            run = round_service.lock_run(tx.session, run_id)
            if run is None or run.status != "running":
                continue
            rnd = round_service.current_round(tx.session, run)
            if rnd is None:
                continue
            if rnd.status == "aggregating":
                rid = rnd.id
                tx.after_commit(lambda rid=rid: rt.dispatcher.aggregate(rid))  # type: ignore[misc]
                sent += 1
            elif rnd.status == "open":
                sent += round_service.train_simulated(tx, rt, run, rnd)
    return sent
