"""Admin endpoints: runs, their clients, rounds and the exported adapter."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Response, status

from api.deps import AdminActor, AdminDep, RuntimeDep
from api.errors import Conflict, NotFound
from api.models import Client, Run, utcnow
from api.runtime import Runtime
from api.schemas import (
    MAX_INT,
    ClientCreate,
    ClientEnrolled,
    ClientPublic,
    ClientsPublic,
    RoundPublic,
    RoundsPublic,
    RunCreate,
    RunPublic,
    RunsPublic,
)
from api.services import clients as client_service
from api.services import rounds as round_service
from api.services import runs as run_service
from api.services.rounds import round_traffic
from api.services.states import lora_parameters

router = APIRouter(prefix="/api/v1/runs", tags=["runs"], dependencies=[AdminDep])
RunId = Annotated[int, Path(ge=1, le=MAX_INT)]


def run_public(run: Run, clients: int, final_eval_loss: float | None = None) -> RunPublic:
    return RunPublic(
        id=run.id,
        name=run.name,
        status=run.status,  # type: ignore[arg-type]
        status_reason=run.status_reason,
        base_model=run.base_model,
        model_fingerprint=run.model_fingerprint,
        strategy=run.config["strategy"],
        total_rounds=run.total_rounds,
        current_round=run.current_round,
        lora_parameters=lora_parameters(run),
        clients=clients,
        bytes_up=run.bytes_up,
        bytes_down=run.bytes_down,
        fedavg_equivalent_bytes=run.fedavg_bytes,
        bytes_saved=run.fedavg_bytes - run.bytes_up - run.bytes_down,
        final_eval_loss=final_eval_loss,
        created_at=run.created_at,
        started_at=run.started_at,
        finished_at=run.finished_at,
        config=run.config,
    )


def _one(rt: Runtime, run: Run) -> RunPublic:
    return run_public(
        run,
        run_service.active_clients(rt, [run.id])[run.id],
        round_service.final_eval_losses(rt, [run.id])[run.id],
    )


def client_public(c: Client, liveness: str) -> ClientPublic:
    return ClientPublic(
        id=c.id,
        run_id=c.run_id,
        name=c.name,
        status=c.status,  # type: ignore[arg-type]
        simulated=c.simulated,
        liveness=liveness,
        created_at=c.created_at,
        last_seen_at=c.last_seen_at,
        rounds_done=c.rounds_done,
        bytes_up=c.bytes_up,
        bytes_down=c.bytes_down,
        progress=c.progress,
    )


@router.post("", status_code=status.HTTP_201_CREATED)
def create_run(
    body: RunCreate, rt: RuntimeDep, actor: AdminActor, launch: Annotated[bool, Query()] = False
) -> RunPublic:
    """Create a run (validates the model and adapter); ``?launch=true`` also launches it."""
    run = run_service.create(rt, body, actor)
    if launch:
        run = run_service.launch(rt, run.id, actor)
    return _one(rt, run)


@router.get("")
def list_runs(
    rt: RuntimeDep,
    offset: Annotated[int, Query(ge=0, le=MAX_INT)] = 0,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> RunsPublic:
    rows, count = run_service.list_runs(rt, offset, limit)
    ids = [r.id for r in rows]
    clients = run_service.active_clients(rt, ids)
    evals = round_service.final_eval_losses(rt, ids)
    return RunsPublic(data=[run_public(r, clients[r.id], evals[r.id]) for r in rows], count=count)


@router.get("/{run_id}")
def get_run(run_id: RunId, rt: RuntimeDep) -> RunPublic:
    return _one(rt, run_service.get(rt, run_id))


@router.post("/{run_id}/launch")
def launch_run(run_id: RunId, rt: RuntimeDep, actor: AdminActor) -> RunPublic:
    return _one(rt, run_service.launch(rt, run_id, actor))


@router.post("/{run_id}/cancel")
def cancel_run(run_id: RunId, rt: RuntimeDep, actor: AdminActor) -> RunPublic:
    return _one(rt, run_service.cancel(rt, run_id, actor))


@router.post("/{run_id}/resume")
def resume_run(run_id: RunId, rt: RuntimeDep, actor: AdminActor) -> RunPublic:
    """Resume a failed run, or re-send the work of a running one after a restart."""
    return _one(rt, run_service.resume(rt, run_id, actor))


@router.post("/{run_id}/clients", status_code=status.HTTP_201_CREATED)
def enroll_client(
    run_id: RunId, body: ClientCreate, rt: RuntimeDep, actor: AdminActor
) -> ClientEnrolled:
    """Enroll a client; the response holds its token, shown this once."""
    client, token, liveness = run_service.enroll_client(rt, run_id, body.name, actor)
    return ClientEnrolled(**client_public(client, liveness).model_dump(), token=token)


@router.get("/{run_id}/clients")
def list_clients(run_id: RunId, rt: RuntimeDep) -> ClientsPublic:
    run, current, rows = run_service.list_clients(rt, run_id)
    now = utcnow()
    data = [client_public(c, client_service.liveness(c, run, current, now)) for c in rows]
    return ClientsPublic(data=data, count=len(rows))


@router.post("/{run_id}/clients/{client_id}/revoke")
def revoke_client(
    run_id: RunId,
    client_id: Annotated[int, Path(ge=1, le=MAX_INT)],
    rt: RuntimeDep,
    actor: AdminActor,
) -> ClientPublic:
    client = run_service.revoke_client(rt, run_id, client_id, actor)
    return client_public(client, "revoked")


@router.post("/{run_id}/clients/{client_id}/token")
def rotate_client_token(
    run_id: RunId,
    client_id: Annotated[int, Path(ge=1, le=MAX_INT)],
    rt: RuntimeDep,
    actor: AdminActor,
) -> ClientEnrolled:
    """Replace a client's token; the response holds the new one, shown this once."""
    client, token, liveness = run_service.rotate_client_token(rt, run_id, client_id, actor)
    return ClientEnrolled(**client_public(client, liveness).model_dump(), token=token)


@router.get("/{run_id}/rounds")
def list_rounds(run_id: RunId, rt: RuntimeDep) -> RoundsPublic:
    """Per-round metrics: participants, bytes up/down, losses, durations, state digest."""
    run, rows = run_service.rounds_of(rt, run_id)
    params = lora_parameters(run)
    data = [
        RoundPublic(
            number=r.number,
            status=r.status,  # type: ignore[arg-type]
            expected=r.expected,
            uploaded=uploaded,
            opened_at=r.opened_at,
            deadline_at=r.deadline_at,
            collected_at=r.collected_at,
            closed_at=r.closed_at,
            digest=r.digest,
            delta_size=r.delta_size,
            snapshot_size=r.snapshot_size,
            snapshot_kept=r.snapshot_blob is not None,
            metrics=r.metrics,
            traffic=(
                round_traffic(params, len(uploaded), int(r.metrics["bytes_up"]), r.delta_size)
                if r.status == "closed" and r.delta_size is not None
                else None
            ),
            attempts=r.attempts,
            error=r.error,
        )
        for r, uploaded in rows
    ]
    return RoundsPublic(data=data, count=len(data))


@router.get(
    "/{run_id}/adapter",
    response_class=Response,
    responses={200: {"content": {"application/zip": {}}}},
)
def export_adapter(
    run_id: RunId, rt: RuntimeDep, round: Annotated[int | None, Query(ge=0, le=MAX_INT)] = None
) -> Response:
    """The global adapter after ``round`` (default: the newest closed round) as a zipped
    peft directory (adapter_config.json + adapter_model.safetensors)."""
    from api.services.states import has_state, load_state
    from fedsrd_core.export import adapter_zip

    run, rows = run_service.rounds_of(rt, run_id)
    closed = [r.number for r, _ in rows if r.status == "closed"]
    number = round if round is not None else (max(closed) if closed else 0)
    if not has_state(run, number):
        if run.status == "created":
            raise Conflict(f"run {run_id} has not been launched; there is no adapter yet")
        raise NotFound(f"run {run_id} has no global state for round {number}")
    from fedsrd_core.modeling import ModelLoadError

    state = load_state(rt, run, number)
    lora = run.config["lora"]
    try:
        # The base model as a loadable path ("tiny": the cached directory), so the adapter's
        # base_model_name_or_path lets AutoPeftModelForCausalLM find it.
        data = adapter_zip(
            state,
            base_model=run_service.resolve_model(rt, run.base_model),
            rank=int(lora["rank"]),
            alpha=lora["alpha"],
            dropout=float(lora["dropout"]),
            target_modules=lora["target_modules"],
        )
    except ModelLoadError as e:  # the model left this server since the run was created
        raise Conflict(f"cannot export run {run_id}'s adapter: {e}") from e
    return Response(
        data,
        media_type="application/zip",
        headers={
            "Content-Disposition": f'attachment; filename="run-{run_id}-round-{number}-adapter.zip"'
        },
    )
