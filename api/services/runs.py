"""Runs: create (validate the model and layout), launch, cancel, resume; the only writer of
``runs`` rows apart from the round lifecycle's progress fields."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from api.auth import Actor
from api.errors import Conflict, InvalidInput, NotFound
from api.models import Client, Round, Run, utcnow
from api.runtime import Runtime
from api.schemas import RunCreate
from api.services import audit
from api.services import clients as client_service
from api.services import rounds as round_service
from api.services.states import layout_of, rank_of
from fedsrd_core.data import shortest_seq_len
from fedsrd_core.export import adapter_layout_for
from fedsrd_core.modeling import ModelLoadError, fingerprint_directory, load_tokenizer
from fedsrd_core.peft_lora import LoraSettingError
from fedsrd_core.snapshot import snapshot_pieces
from fedsrd_core.state import init_state, state_digest

TINY = "tiny"
log = logging.getLogger(__name__)


def resolve_model(rt: Runtime, name: str) -> str:
    """A model name as loadable path: ``"tiny"`` is the project's own (built on first use)."""
    if name == TINY:
        from fedsrd_core.tiny_assets import tiny_model_path

        return str(tiny_model_path(rt.settings.model_cache))
    return name


_FINGERPRINTS: dict[tuple[str, float], str] = {}


def _fingerprint(path: str) -> str:
    # Fingerprinting loads the weights; remember it per directory and modification time.
    p = Path(path)
    key = (str(p.resolve()) if p.exists() else path, p.stat().st_mtime if p.exists() else 0.0)
    if key not in _FINGERPRINTS:
        _FINGERPRINTS[key] = fingerprint_directory(path)
    return _FINGERPRINTS[key]


def _unloadable(model: str, error: Exception) -> InvalidInput:
    """The 422 for a model the server cannot load: it names the model and what is wrong with
    it, never where the server looked (its cache directory, a resolved snapshot path, the
    paths in a library's error); those go to the server's log."""
    log.info("model %r does not load: %s", model, error)
    reason = (
        error.reason
        if isinstance(error, ModelLoadError)
        else "it is not a usable model directory or hub id"
    )
    return InvalidInput({"field": "model", "message": f"cannot load model {model!r}: {reason}"})


def create(rt: Runtime, body: RunCreate, actor: Actor) -> Run:
    """Validate the model against the LoRA settings and store the run (status ``created``).

    Loading the model's config (and its weights, for the fingerprint) happens before the
    transaction: a bad model is a 422 naming ``model`` and nothing is stored.
    """
    path = resolve_model(rt, body.model)
    try:
        layout = adapter_layout_for(
            path,
            rank=body.lora.rank,
            target_modules=body.lora.target_modules,
            dropout=body.lora.dropout,
        )
        tokenizer = load_tokenizer(path)
    except (ModelLoadError, OSError) as e:  # OSError: e.g. a name too long for a path
        raise _unloadable(body.model, e) from e
    except LoraSettingError as e:
        raise InvalidInput({"field": f"lora.{e.setting}", "message": str(e)}) from e
    except ValueError as e:
        raise InvalidInput({"field": "lora.target_modules", "message": str(e)}) from e
    # Every run trains and evaluates on prompts in the Alpaca template; a seq_len that cannot
    # hold it would leave no response token to learn from, found only when a worker fails.
    shortest = shortest_seq_len(tokenizer)
    if body.train.seq_len < shortest:
        raise InvalidInput(
            {
                "field": "train.seq_len",
                "message": f"seq_len {body.train.seq_len} cannot hold the prompt template with "
                f"{body.model!r}'s tokenizer: the smallest length that fits it and one response "
                f"token is {shortest}",
            }
        )
    try:
        fingerprint = _fingerprint(path)
    except (ModelLoadError, OSError) as e:
        raise _unloadable(body.model, e) from e
    if body.model_fingerprint is not None and body.model_fingerprint != fingerprint:
        raise InvalidInput(
            {
                "field": "model_fingerprint",
                "message": f"the model at {body.model!r} has fingerprint {fingerprint}, "
                f"not {body.model_fingerprint}",
            }
        )
    config = body.model_dump(mode="json")
    config["model_fingerprint"] = fingerprint
    with rt.transaction() as tx:
        run = Run(
            name=body.name,
            status="created",
            config=config,
            base_model=body.model,
            model_fingerprint=fingerprint,
            layout={k: [d_out, d_in] for k, (d_out, d_in) in sorted(layout.items())},
            total_rounds=body.rounds,
            current_round=0,
            version=0,
        )
        tx.session.add(run)
        tx.session.flush()
        if body.simulation:
            for i in range(body.simulation.clients):
                client_service.enroll(tx.session, run, f"sim-{i}", simulated=True)
        detail = {"name": run.name, "strategy": body.strategy, "rounds": body.rounds}
        audit.record(tx.session, actor, "create_run", run_id=run.id, detail=detail)
    return run


def get(rt: Runtime, run_id: int) -> Run:
    with rt.sessions() as s:
        run = s.get(Run, run_id)
        if run is None:
            raise NotFound(f"run {run_id} not found")
        return run


def list_runs(rt: Runtime, offset: int, limit: int) -> tuple[list[Run], int]:
    with rt.sessions() as s:
        count = s.scalar(select(func.count()).select_from(Run)) or 0
        rows = s.scalars(select(Run).order_by(Run.id.desc()).offset(offset).limit(limit)).all()
        return list(rows), int(count)


def active_clients(rt: Runtime, run_ids: list[int]) -> dict[int, int]:
    """Number of active (not revoked) clients of each run in ``run_ids``: one query."""
    if not run_ids:
        return {}
    with rt.sessions() as s:
        rows = s.execute(
            select(Client.run_id, func.count())
            .where(Client.run_id.in_(run_ids), Client.status == "active")
            .group_by(Client.run_id)
        ).all()
        counts = {int(run_id): int(n) for run_id, n in rows}
    return {run_id: counts.get(run_id, 0) for run_id in run_ids}


def launch(rt: Runtime, run_id: int, actor: Actor) -> Run:
    """Write the initial state (round 0 snapshot) and open round 1."""
    run = get(rt, run_id)
    if run.status != "created":
        raise Conflict(f"run {run_id} is {run.status}; only a created run can be launched")
    state = init_state(layout_of(run), rank_of(run), seed=int(run.config["seed"]))
    blob = rt.blobs.put_pieces(snapshot_pieces(state))  # complete before the row names it
    digest = state_digest(state)
    with rt.transaction() as tx:
        locked = round_service.lock_run(tx.session, run_id)
        assert locked is not None
        run = locked
        if run.status != "created":
            raise Conflict(f"run {run_id} is {run.status}; only a created run can be launched")
        run.status = "running"
        run.started_at = utcnow()
        run.initial_blob = blob.sha256
        run.initial_size = blob.size
        run.initial_digest = digest
        round_service.open_round(tx, rt, run, 1)
        audit.record(tx.session, actor, "launch_run", run_id=run.id)
    return run


def cancel(rt: Runtime, run_id: int, actor: Actor) -> Run:
    with rt.transaction() as tx:
        run = round_service.lock_run(tx.session, run_id)
        if run is None:
            raise NotFound(f"run {run_id} not found")
        if run.status in ("completed", "cancelled"):
            raise Conflict(f"run {run_id} is already {run.status}")
        run.status = "cancelled"
        run.status_reason = "cancelled by an admin"
        run.finished_at = utcnow()
        run.version = run.version + 1
        rnd = round_service.current_round(tx.session, run)
        if rnd is not None and rnd.status == "open":
            rnd.status = "failed"
            rnd.error = "run cancelled"
            rnd.closed_at = utcnow()
        audit.record(tx.session, actor, "cancel_run", run_id=run.id)
    return run


def resume(rt: Runtime, run_id: int, actor: Actor) -> Run:
    """Resume a failed run: re-open its failed round (keeping the updates it received) with
    a fresh deadline, or re-send the aggregation of a round left aggregating."""
    with rt.transaction() as tx:
        s = tx.session
        run = round_service.lock_run(s, run_id)
        if run is None:
            raise NotFound(f"run {run_id} not found")
        if run.status == "running":
            # Nothing failed; re-send whatever a lost task would have done.
            _resend(tx, rt, run)
            audit.record(s, actor, "resume_run", run_id=run.id, detail={"was": "running"})
            return run
        if run.status != "failed":
            raise Conflict(f"run {run_id} is {run.status}; only a failed run can be resumed")
        run.status = "running"
        run.status_reason = None
        run.version = run.version + 1
        rnd = round_service.current_round(s, run)
        if rnd is not None and rnd.status == "failed":
            rnd.status = "open"
            rnd.error = None
            rnd.closed_at = None
            rnd.opened_at = utcnow()
            rnd.deadline_at = round_service.deadline_from(run, rnd.opened_at)
        _resend(tx, rt, run)
        audit.record(s, actor, "resume_run", run_id=run.id, detail={"was": "failed"})
    return run


def _resend(tx: Any, rt: Runtime, run: Run) -> None:
    rnd = round_service.current_round(tx.session, run)
    if rnd is None:
        return
    if rnd.status == "aggregating":
        rid = rnd.id
        tx.after_commit(lambda: rt.dispatcher.aggregate(rid))
    elif rnd.status == "open":
        round_service.train_simulated(tx, rt, run, rnd)
        round_service.maybe_close(tx, rt, run, rnd)
    elif rnd.status == "closed":
        # The round finished while the run was failed (a retried aggregation): go on.
        if rnd.number < run.total_rounds:
            round_service.open_round(tx, rt, run, rnd.number + 1)
        else:
            run.status = "completed"
            run.finished_at = utcnow()
            run.version = run.version + 1


def rounds_of(rt: Runtime, run_id: int) -> tuple[Run, list[tuple[Round, list[int]]]]:
    with rt.sessions() as s:
        run = s.get(Run, run_id)
        if run is None:
            raise NotFound(f"run {run_id} not found")
        out = [(r, round_service.uploaded_clients(s, r)) for r in run.rounds]
        return run, out


def enroll_client(rt: Runtime, run_id: int, name: str, actor: Actor) -> tuple[Client, str, str]:
    """Enroll a client; a run that takes every client adds it to the open round too (a late
    joiner catches up on the global state before it trains). Returns the client, its token
    and its liveness, the last computed before the commit: the token is shown once, so
    nothing may fail once the row is committed."""
    with rt.transaction() as tx:
        run = round_service.lock_run(tx.session, run_id)
        if run is None:
            raise NotFound(f"run {run_id} not found")
        client, token = client_service.enroll(tx.session, run, name)
        if run.status == "running" and run.config.get("clients_per_round") is None:
            round_service.add_expected(tx.session, run, client.id)
        _audit_client(tx.session, actor, "enroll_client", client)
        live = _liveness(tx.session, run, client)
        return client, token, live


def _liveness(s: Session, run: Run, client: Client) -> str:
    return client_service.liveness(client, run, round_service.current_round(s, run), utcnow())


def revoke_client(rt: Runtime, run_id: int, client_id: int, actor: Actor) -> Client:
    """Revoke at once (the token stops working on its next request); an open round stops
    waiting for the client."""
    with rt.transaction() as tx:
        run = round_service.lock_run(tx.session, run_id)
        if run is None:
            raise NotFound(f"run {run_id} not found")
        client = client_service.get(tx.session, run_id, client_id)
        client_service.revoke(tx.session, client)
        _audit_client(tx.session, actor, "revoke_client", client)
        rnd = round_service.current_round(tx.session, run)
        if rnd is not None and rnd.status == "open":
            round_service.maybe_close(tx, rt, run, rnd)
        return client


def rotate_client_token(
    rt: Runtime, run_id: int, client_id: int, actor: Actor
) -> tuple[Client, str, str]:
    """A new token for a client (say, after the old one leaked); the old one stops working on
    its next request. The agent keeps its state: it is the same client. Returns the client,
    its new token and its liveness (computed before the commit, as in enroll_client)."""
    with rt.transaction() as tx:
        client = client_service.get(tx.session, run_id, client_id)
        token = client_service.rotate_token(tx.session, client)
        _audit_client(tx.session, actor, "new_client_token", client)
        run = tx.session.get(Run, run_id)
        assert run is not None  # the client belongs to it
        return client, token, _liveness(tx.session, run, client)


def _audit_client(s: Session, actor: Actor, action: str, client: Client) -> None:
    detail = {"name": client.name}
    audit.record(s, actor, action, run_id=client.run_id, client_id=client.id, detail=detail)


def list_clients(rt: Runtime, run_id: int) -> tuple[Run, Round | None, list[Client]]:
    with rt.sessions() as s:
        run = s.get(Run, run_id)
        if run is None:
            raise NotFound(f"run {run_id} not found")
        rows = s.scalars(select(Client).where(Client.run_id == run_id).order_by(Client.id))
        return run, round_service.current_round(s, run), list(rows)
