"""Agent endpoints: a client site's token authorises it for its own run only."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Header, Path, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from api.blob_http import CountedResponse, blob_response
from api.deps import AgentDep, RuntimeDep, bearer
from api.errors import TooLarge
from api.schemas import (
    MAX_INT,
    AgentMe,
    AgentRunInfo,
    HeartbeatIn,
    LoraSettings,
    PollResponse,
    SyncPlan,
    TrainSettings,
)
from api.schemas import UpdateAccepted as UpdateAcceptedOut
from api.services import agent as agent_service
from api.services import clients as client_service
from api.services import runs as run_service
from api.services import updates as update_service
from api.streaming import pump

router = APIRouter(prefix="/api/v1/agent/runs/{run_id}", tags=["agent"])
me_router = APIRouter(prefix="/api/v1/agent", tags=["agent"])


@me_router.get("/me")
def whoami(request: Request, rt: RuntimeDep) -> AgentMe:
    """Which client (and run) a token belongs to: an agent started with only a server URL
    and a token finds its run here."""
    ident = agent_service.identify(rt, bearer(request))
    return AgentMe(client_id=ident.client_id, run_id=ident.run_id, name=ident.name)


Sha = Annotated[str, Path(pattern=r"^[0-9a-f]{64}$")]


@router.get("")
def run_info(run_id: int, ident: AgentDep, rt: RuntimeDep) -> AgentRunInfo:
    """The run as an agent needs it: model identity, adapter, strategy, local training."""
    run = run_service.get(rt, run_id)
    cfg = run.config
    return AgentRunInfo(
        run_id=run.id,
        client_id=ident.client_id,
        client_name=ident.name,
        status=run.status,  # type: ignore[arg-type]
        base_model=run.base_model,
        model_fingerprint=run.model_fingerprint,
        lora=LoraSettings(**cfg["lora"]),
        layout=run.layout,
        strategy=cfg["strategy"],
        strategy_config=cfg["strategy_config"],
        train=TrainSettings(**cfg["train"]),
        value_dtype=cfg["value_dtype"],
        seed=cfg["seed"],
        total_rounds=run.total_rounds,
        current_round=run.current_round,
    )


@router.get("/poll", response_model=None, responses={200: {"model": PollResponse}})
async def poll(
    request: Request,
    run_id: Annotated[int, Path(ge=1, le=MAX_INT)],
    rt: RuntimeDep,
    have_round: Annotated[int | None, Query(ge=-1, le=MAX_INT)] = None,
    wait: Annotated[float, Query(ge=0.0, le=300.0)] = 0.0,
) -> Response:
    """What to do next. ``have_round``: the round whose global state the agent holds (-1 or
    absent: none). ``wait``: hold the request up to this many seconds until there is work
    (a long poll); a ``wait`` answer carries ``Retry-After``. Needs the client's token."""
    watcher = request.app.state.watcher
    deadline = time.monotonic() + min(wait, rt.settings.poll_max_wait)
    # Authentication and the first look in one trip to the thread pool: polls are the
    # API's hottest path (hundreds of agents).
    ident, answer, version = await run_in_threadpool(
        agent_service.poll, rt, bearer(request), run_id, have_round
    )
    while answer.action == "wait":
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        await watcher.wait(ident.run_id, version, remaining)
        answer, version = await run_in_threadpool(agent_service.poll_once, rt, ident, have_round)
    headers = {}
    if answer.retry_after is not None:
        headers["Retry-After"] = str(max(1, round(answer.retry_after)))
    # Serialised once, here: FastAPI would validate the model again on the way out.
    return Response(answer.model_dump_json(), media_type="application/json", headers=headers)


@router.get("/sync")
def sync(
    ident: AgentDep,
    rt: RuntimeDep,
    have_round: Annotated[int | None, Query(ge=-1, le=MAX_INT)] = None,
) -> SyncPlan:
    """How to reach the newest global state from ``have_round`` (snapshot or deltas)."""
    return agent_service.sync_latest(rt, ident, have_round)


@router.get(
    "/blobs/{sha256}",
    response_class=Response,
    responses={200: {"content": {"application/octet-stream": {}}}},
)
def download(request: Request, sha256: Sha, ident: AgentDep, rt: RuntimeDep) -> Response:
    """A global blob of the run (initial state, global delta or snapshot); never another
    client's update. A local store's file is sent as is; an S3 object is streamed through.
    Both carry ``ETag`` (the quoted SHA-256) and honour a single ``Range``."""
    size = agent_service.check_download(rt, ident, sha256)
    headers = {"X-Content-SHA256": sha256, "Cache-Control": "private, immutable"}

    def count(sent: int) -> None:
        with rt.single_statement() as ws:
            client_service.add_bytes_down(ws, ident.client_id, sent)

    # The client's bytes_down grows by what was sent (a range, or a cut-off transfer).
    return CountedResponse(blob_response(rt.blobs, sha256, size, headers, request.headers), count)


@router.put("/rounds/{number}/update")
async def upload(
    request: Request,
    number: Annotated[int, Path(ge=1, le=MAX_INT)],
    ident: AgentDep,
    rt: RuntimeDep,
    base_round: Annotated[int, Query(ge=0, le=MAX_INT)],
    x_content_sha256: Annotated[str, Header(pattern=r"^[0-9a-f]{64}$")],
    num_samples: Annotated[int, Query(ge=0, le=MAX_INT)] = 1,
    train_loss: Annotated[float | None, Query(allow_inf_nan=False)] = None,
) -> UpdateAcceptedOut:
    """Upload the sparse update for round ``number`` (body: the wire-format blob;
    ``X-Content-SHA256``: its SHA-256). Streams to disk under the run's size cap, hashing
    and validating it completely as it arrives, then stores it. An identical retry of an
    accepted update returns the same answer."""
    pre = await run_in_threadpool(
        update_service.precheck, rt, ident.client_id, number, base_round, x_content_sha256
    )
    if pre.existing is not None:
        return UpdateAcceptedOut(**pre.existing.__dict__)
    declared = request.headers.get("content-length")
    size = int(declared) if declared is not None and declared.isdigit() else None
    if size is not None and size > pre.size_cap:
        raise TooLarge(f"update of {declared} bytes exceeds this run's cap of {pre.size_cap} bytes")
    # The event loop only gathers bytes; writing, hashing, validating and the fsync run in
    # the thread pool, so one large upload does not stall every other agent's poll. The
    # body streams to a temporary file (memory stays bounded) and is validated batch by
    # batch as it arrives; it is committed to the store (renamed into place locally,
    # uploaded to S3) only once complete and valid.
    with update_service.UploadSink(rt, pre.run, pre.shapes, pre.size_cap, size) as sink:
        # The loop fills buffers; one thread writes, hashes and checks them in order while
        # the next arrive (api.streaming): both cores work. The sink's context discards the
        # temporary file on any failure.
        await pump(
            request.stream(),
            sink.write,
            max_bytes=pre.size_cap,
            too_large=f"update exceeds this run's cap of {pre.size_cap} bytes",
            limiter=request.app.state.upload_threads,
        )
        accepted = await run_in_threadpool(
            update_service.finish,
            rt,
            sink,
            x_content_sha256,
            ident.client_id,
            number,
            base_round,
            num_samples,
            train_loss,
        )
    return UpdateAcceptedOut(**accepted.__dict__)


@router.post("/heartbeat", status_code=204)
def heartbeat(body: HeartbeatIn, ident: AgentDep, rt: RuntimeDep) -> Response:
    """Progress of local training (step, loss, samples/s): the client is alive."""
    client_service.report_progress(rt, ident.run_id, ident.client_id, body.model_dump())
    return Response(status_code=204)
