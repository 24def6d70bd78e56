"""The work a worker does, independent of Celery (the inline dispatcher calls it directly).

Each job takes IDs, re-reads the state it needs, and is idempotent: a second run finds the
work done (the round closed, the update stored) and stops, or redoes it with the identical
result (aggregation is deterministic; blobs are content-addressed; commits are conditional).
"""

from __future__ import annotations

import logging
import threading
import time
from functools import lru_cache
from typing import Any

import torch
from sqlalchemy import select

from api.errors import ApiError
from api.models import Client, Round, Run, Update
from api.runtime import Runtime
from api.services import clients as client_service
from api.services import rounds as round_service
from api.services import storage as storage_service
from api.services import updates as update_service
from api.services.runs import resolve_model
from api.services.states import (
    layout_of,
    load_state,
    rank_of,
    snapshot_sha,
    strategy_of,
    upload_shapes,
    value_dtype_of,
)
from fedsrd_core.codec import LazyBlob, encode
from fedsrd_core.data import Example, generate, partition_dirichlet, partition_iid
from fedsrd_core.finite import finite_or_none
from fedsrd_core.server import stream_server_round
from fedsrd_core.strategies import RoundContext, Upload
from fedsrd_core.training import (
    TrainConfig,
    client_seeds,
    evaluate_domains,
    local_round,
    throttled,
)

log = logging.getLogger(__name__)
#: Least seconds between two progress reports of a simulated client (as an agent's).
PROGRESS_INTERVAL_S = 2.0
_model_lock = threading.Lock()


# -- aggregation -----------------------------------------------------------------------------
def aggregate_round(rt: Runtime, round_id: int) -> None:
    """Aggregate a round's updates into its global delta, the next snapshot and digest.

    An error that re-running cannot fix (a stored blob that no longer decodes, a bug) fails
    the run with the message, resumable by an admin, instead of leaving the round
    ``aggregating`` for ever."""
    if not round_service.start_aggregation(rt, round_id):
        return
    try:
        run_id, number = _aggregate(rt, round_id)
    except Exception as e:
        log.exception("aggregation of round %d failed", round_id)
        round_service.fail_aggregation(rt, round_id, round_service.failure_reason(e))
        return
    # After the round's commit (the next round is already open), the storage steps; a
    # failure in either is caught up on after the next round. First the uploads no longer
    # needed (this round's and older ones past FEDSRD_KEEP_UPLOADS), then the collection.
    try:
        update_service.release_uploads(rt, run_id, number)
    except Exception:
        log.exception("releasing the uploads of round %d failed", round_id)
    if rt.settings.gc_after_round:
        try:
            storage_service.collect_garbage(rt)
        except Exception:
            log.exception("blob garbage collection after round %d failed", round_id)


def _aggregate(rt: Runtime, round_id: int) -> tuple[int, int]:
    """The aggregation itself; returns the round's (run id, number)."""
    if rt.settings.fault_aggregate_delay_s:
        time.sleep(rt.settings.fault_aggregate_delay_s)
    t0 = time.perf_counter()
    with rt.sessions() as s:
        rnd = s.get(Round, round_id)
        assert rnd is not None
        run = s.get(Run, rnd.run_id)
        assert run is not None
        updates = list(
            s.scalars(select(Update).where(Update.round_id == rnd.id).order_by(Update.client_id))
        )
        number, run_id = rnd.number, run.id
        previous = snapshot_sha(run, number - 1)  # a failure fails the run (aggregate_round)
        strategy = strategy_of(run)
        shapes = upload_shapes(run)
        vd = value_dtype_of(run)
        seed = int(run.config["seed"])
        layout, rank = layout_of(run), rank_of(run)
    t_decode = time.perf_counter()
    # Stored uploads were fully validated when accepted; here each is parsed (headers) and
    # decoded entry by entry as the strategy walks the modules: one module's updates in
    # memory per client, plus the coded blobs.
    uploads = [
        Upload(LazyBlob(rt.blobs.read_bytes(u.blob), expected_shapes=shapes), u.num_samples)
        for u in updates
    ]
    t_server = time.perf_counter()
    ctx = RoundContext(round=number, seed=seed, value_dtype=vd)
    # Module by module from the previous snapshot (a mapped file for a local store) into the
    # new one's writer: the worker never holds the whole state. The delta applied is the
    # encoded and decoded one, what clients apply, so both sides stay bit-identical.
    with rt.blobs.mapped(previous) as view, rt.blobs.writer() as w:
        done = stream_server_round(strategy, view, layout, rank, uploads, ctx, w.write)
        t_store = time.perf_counter()
        snap_ref = w.commit()
    delta_ref = rt.blobs.put_pieces(done.delta_pieces)
    digest = done.digest
    t_end = time.perf_counter()
    # Rows stored before losses were sanitised may hold NaN (SQLite kept it): leave it out.
    losses = [x for u in updates if (x := finite_or_none(u.train_loss)) is not None]
    metrics: dict[str, Any] = {
        "participants": [u.client_id for u in updates],
        "bytes_up": sum(u.size for u in updates),
        "bytes_up_mean": sum(u.size for u in updates) / max(len(updates), 1),
        "bytes_down": delta_ref.size,
        "num_samples": sum(u.num_samples for u in updates),
        "train_loss": sum(losses) / len(losses) if losses else None,
        "durations": {
            "load_state_s": t_decode - t0,  # the rows; the state is read as it streams
            "read_uploads_s": t_server - t_decode,  # read and parse; decoding is lazy
            "server_step_s": t_store - t_server,  # incl. reading and writing the snapshot
            # Its parts (fedsrd_core.server.StreamedRound.timings): the strategy's math with
            # the uploads' lazy decoding, the delta's encoding, applying it, the snapshot.
            **{f"step_{k}": round(v, 6) for k, v in done.timings.items()},
            "store_s": t_end - t_store,  # its commit (fsync, rename) and the delta's
            "aggregate_s": t_end - t0,
        },
    }
    round_service.complete_aggregation(
        rt,
        round_id,
        delta=(delta_ref.sha256, delta_ref.size),
        snapshot=(snap_ref.sha256, snap_ref.size),
        digest=digest,
        metrics=metrics,
    )
    return run_id, number


# -- models and data of simulated runs -------------------------------------------------------
@lru_cache(maxsize=2)
def _peft_model(path: str, rank: int, alpha: int | None, dropout: float, targets: str) -> Any:
    # CUDA is first touched here, inside the task process, never in a parent that forks.
    from fedsrd_core.modeling import load_causal_lm
    from fedsrd_core.peft_lora import attach_lora, lora_config

    model, tokenizer = load_causal_lm(path)
    target: str | list[str] = targets if targets == "all-linear" else targets.split(",")
    peft = attach_lora(
        model, lora_config(rank=rank, alpha=alpha, dropout=dropout, target_modules=target)
    )
    return peft, tokenizer


def run_model(rt: Runtime, run: Run) -> tuple[Any, Any]:
    lora = run.config["lora"]
    targets = lora["target_modules"]
    key = targets if isinstance(targets, str) else ",".join(targets)
    loaded: tuple[Any, Any] = _peft_model(
        resolve_model(rt, run.base_model), lora["rank"], lora["alpha"], lora["dropout"], key
    )
    return loaded


def simulated_data(run: Run, index: int) -> list[Example]:
    """Client ``index``'s local data in a simulated run, generated from the run's seed."""
    sim = run.config["simulation"]
    seed = int(run.config["seed"])
    n, per = int(sim["clients"]), int(sim["examples_per_client"])
    domains = list(sim["domains"])
    if sim["partition"] == "domain":
        return generate(domains[index], per, seed=seed, split="train")
    pool: list[Example] = []
    each = -(-n * per // len(domains))
    for d in domains:
        pool.extend(generate(d, each, seed=seed, split="train"))
    if sim["partition"] == "iid":
        return partition_iid(pool, n, seed=seed)[index]
    return partition_dirichlet(pool, n, float(sim["dirichlet_alpha"]), seed=seed)[index]


def train_client(rt: Runtime, run_id: int, client_id: int, number: int) -> None:
    """Play simulated client ``client_id`` in round ``number``: the same local round and the
    same upload path as a real agent.

    A failure (a model the strategy cannot handle, a bug) would recur on every retry, and
    the round would wait for this client for ever (a simulated client is never "gone"): it
    fails the round and the run instead, with a short reason on both (the traceback goes to
    the worker's log), resumable by an admin once the cause is fixed."""
    try:
        _train_client(rt, run_id, client_id, number)
    except Exception as e:
        log.exception("simulated client %d, round %d: training failed", client_id, number)
        reason = f"simulated client {client_id} failed: {round_service.failure_reason(e)}"
        round_service.fail_open_round(rt, run_id, number, reason)


def _train_client(rt: Runtime, run_id: int, client_id: int, number: int) -> None:
    with rt.sessions() as s:
        run = s.get(Run, run_id)
        client = s.get(Client, client_id)
        rnd = s.scalar(select(Round).where(Round.run_id == run_id, Round.number == number))
        if run is None or client is None or rnd is None or not client.simulated:
            return
        if run.status != "running" or rnd.status != "open" or client_id not in rnd.expected:
            return
        if s.scalar(
            select(Update.id).where(Update.round_id == rnd.id, Update.client_id == client_id)
        ):
            return
        sims = list(
            s.scalars(
                select(Client.id)
                .where(Client.run_id == run_id, Client.simulated.is_(True))
                .order_by(Client.id)
            )
        )
        index = sims.index(client_id)
        start = load_state(rt, run, number - 1)
        strategy = strategy_of(run)
        train = TrainConfig(**run.config["train"])
        seed = int(run.config["seed"])
        vd = value_dtype_of(run)
        data = simulated_data(run, index)

    # Progress as a real agent reports it (throttled): the dashboard shows the local round.
    def progress(step: int, loss: float) -> None:
        report: dict[str, Any] = {"round": number, "step": step, "steps": train.steps}
        if finite_or_none(loss) is not None:
            report["loss"] = loss
        client_service.report_progress(rt, run_id, client_id, report)

    # Train with no database session open: a local round can take minutes.
    with _model_lock:
        model, tokenizer = run_model(rt, run)
        trained, stats = local_round(
            model,
            tokenizer,
            data,
            start,
            train,
            trainable=strategy.trainable_factors(),
            proximal_mu=strategy.proximal_mu(),
            seed=client_seeds(seed, number, index)[0],
            on_step=throttled(progress, PROGRESS_INTERVAL_S, final_step=train.steps),
        )
    ctx = RoundContext(round=number, seed=seed, value_dtype=vd)
    blob = encode(
        strategy.client_upload(
            start, trained, ctx, client_seed=client_seeds(seed, number, index)[1]
        ),
        value_dtype=vd,
    )
    try:
        update_service.submit_bytes(
            rt, client_id, number, number - 1, len(data), blob, train_loss=stats.mean_loss
        )
    except ApiError as e:
        # The round moved on while we trained (closed at its deadline, run cancelled).
        log.info("simulated client %d, round %d: update not taken: %s", client_id, number, e)


# -- evaluation ------------------------------------------------------------------------------
def evaluate_round(rt: Runtime, run_id: int, number: int) -> None:
    """Evaluate the global adapter after round ``number`` on the run's held-out sets."""
    from fedsrd_core.peft_lora import state_to_peft

    with rt.sessions() as s:
        run = s.get(Run, run_id)
        if run is None or not run.config.get("evaluation"):
            return
        rnd = s.scalar(select(Round).where(Round.run_id == run_id, Round.number == number))
        if rnd is None or rnd.status != "closed" or "eval" in rnd.metrics:
            return
        state = load_state(rt, run, number)
        # With round 1, the base model too (the launch state, B = 0), so the loss charts
        # start from what the federation improved on.
        start = load_state(rt, run, 0) if number == 1 else None
        ev = run.config["evaluation"]
        seq_len = int(run.config["train"]["seq_len"])
        seed = int(run.config["seed"])
        with _model_lock, torch.no_grad():
            model, tokenizer = run_model(rt, run)

            def evaluate() -> dict[str, Any]:
                return evaluate_domains(
                    model, tokenizer, ev["domains"], int(ev["examples"]), seed=seed, seq_len=seq_len
                )

            base = None
            if start is not None:
                state_to_peft(start, model)
                base = evaluate()
            state_to_peft(state, model)
            out = evaluate()
    round_service.record_evaluation(rt, run_id, number, out, base=base)
