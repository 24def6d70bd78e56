"""Request and response documents of the REST API (pydantic v2).

Names follow one pattern: ``RunCreate`` (what an admin sends), ``RunPublic`` (what anyone
with the admin token reads), ``RunsPublic`` (a page: ``data`` and ``count``). Every field is
validated here or, for strategy and training settings, by fedsrd_core's own config
dataclasses; either way a bad field becomes a 422 that names it.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fedsrd_core.data import DOMAINS, OOD_DOMAINS
from fedsrd_core.finite import non_finite_paths
from fedsrd_core.strategies import available_strategies, get_strategy
from fedsrd_core.training import TrainConfig

#: Largest id, round or count the API takes: PostgreSQL INTEGER (and SQLite) hold it.
MAX_INT = 2**31 - 1
#: Longest duration a run's settings take (seconds; 30 days): far beyond any real deadline or
#: silence, and well inside what ``datetime.timedelta`` and the databases' timestamps hold.
MAX_DURATION_S = 30 * 86400
#: Most clients a run's counts (``clients_per_round``, ``quorum``) may name.
MAX_CLIENTS = 100_000
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
_ALL_DOMAINS = (*DOMAINS, *OOD_DOMAINS)


class Strict(BaseModel):
    """Every request document: unknown fields are refused, and so is every non-finite number
    in any float field (``NaN``, ``Infinity``: not JSON, but parsers take them). PostgreSQL's
    JSON refuses them, SQLite would store them, and no setting means anything at infinity.
    ``tests/test_finite_numbers.py`` walks every request schema to keep it so."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class LoraSettings(Strict):
    rank: int = Field(default=8, ge=1, le=1024)
    #: Defaults to 2 x rank (the paper).
    alpha: int | None = Field(default=None, ge=1, le=1_000_000)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    target_modules: Literal["all-linear"] | list[Annotated[str, Field(min_length=1)]] = "all-linear"


class TrainSettings(Strict):
    """Local training of every client (fedsrd_core.training.TrainConfig)."""

    steps: int = Field(default=10, ge=1, le=100_000)
    batch_size: int = Field(default=8, ge=1, le=4096)
    grad_accum: int = Field(default=1, ge=1, le=4096)
    seq_len: int = Field(default=384, ge=8, le=131_072)
    lr: float = Field(default=5e-5, gt=0.0, le=1.0)
    weight_decay: float = Field(default=0.0, ge=0.0)
    max_grad_norm: float | None = Field(default=1.0, gt=0.0)

    def to_config(self) -> TrainConfig:
        return TrainConfig(**self.model_dump())


class SimulationSettings(Strict):
    """Workers play ``clients`` clients on data the project generates (no download)."""

    #: One client per domain by default, so the defaults are a valid document.
    clients: int = Field(default=len(DOMAINS), ge=1, le=256)
    domains: list[str] = Field(default_factory=lambda: list(DOMAINS), min_length=1)
    partition: Literal["domain", "iid", "dirichlet"] = "domain"
    dirichlet_alpha: float = Field(default=0.5, gt=0.0)
    examples_per_client: int = Field(default=64, ge=1, le=100_000)

    @field_validator("domains")
    @classmethod
    def _known_domains(cls, v: list[str]) -> list[str]:
        bad = [d for d in v if d not in DOMAINS]
        if bad:
            raise ValueError(f"unknown domain(s) {bad}; known: {list(DOMAINS)}")
        return v

    @model_validator(mode="after")
    def _one_domain_per_client(self) -> SimulationSettings:
        if self.partition == "domain" and len(self.domains) != self.clients:
            raise ValueError(
                f"partition 'domain' needs one domain per client: {self.clients} clients, "
                f"{len(self.domains)} domains"
            )
        return self


class EvaluationSettings(Strict):
    """Held-out sets the server evaluates the global adapter on after each round."""

    domains: list[str] = Field(default_factory=lambda: list(DOMAINS), min_length=1)
    examples: int = Field(default=16, ge=1, le=10_000)

    @field_validator("domains")
    @classmethod
    def _known_domains(cls, v: list[str]) -> list[str]:
        bad = [d for d in v if d not in _ALL_DOMAINS]
        if bad:
            raise ValueError(f"unknown domain(s) {bad}; known: {list(_ALL_DOMAINS)}")
        return v


class RunCreate(Strict):
    """Everything that defines a run; stored with it, so every round is reproducible."""

    name: str = Field(min_length=1, max_length=200)
    #: A local directory or a Hugging Face hub id already in the local cache, or ``"tiny"``:
    #: the project's own tiny model (built on first use, nothing downloaded).
    model: str = Field(min_length=1, max_length=500)
    #: The base model's fingerprint; computed by the server when omitted, checked otherwise.
    model_fingerprint: Sha256 | None = None
    lora: LoraSettings = Field(default_factory=LoraSettings)
    strategy: str = "fedsrd"
    strategy_config: dict[str, Any] = Field(default_factory=dict)
    rounds: int = Field(default=5, ge=1, le=100_000)
    #: Clients selected per round (seeded sample); None: every active client.
    clients_per_round: int | None = Field(default=None, ge=1, le=MAX_CLIENTS)
    #: Fewest updates a round may be aggregated with once its deadline passes.
    quorum: int = Field(default=1, ge=1, le=MAX_CLIENTS)
    round_deadline_s: float = Field(default=600.0, gt=0.0, le=MAX_DURATION_S)
    #: At the deadline below quorum: extend the deadline by ``round_deadline_s``, or fail.
    below_quorum: Literal["extend", "fail"] = "extend"
    #: A client silent (no poll, heartbeat or upload) this long counts as gone: a round
    #: with quorum closes without waiting for gone clients.
    client_timeout_s: float = Field(default=300.0, gt=0.0, le=MAX_DURATION_S)
    #: Round 1 counts no missing client as gone for this long (sites are still starting
    #: agents and loading models): it closes early only when every expected client uploaded.
    #: None: until round 1's deadline.
    start_grace_s: float | None = Field(default=None, gt=0.0, le=MAX_DURATION_S)
    train: TrainSettings = Field(default_factory=TrainSettings)
    value_dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    seed: int = Field(default=0, ge=0, lt=2**63)
    simulation: SimulationSettings | None = None
    evaluation: EvaluationSettings | None = None

    @field_validator("strategy_config")
    @classmethod
    def _finite_strategy_config(cls, v: dict[str, Any]) -> dict[str, Any]:
        # Free-form (each strategy's dataclass checks its own keys), so the model's
        # ``allow_inf_nan=False`` does not reach inside: check every number here.
        bad = non_finite_paths(v)
        if bad:
            raise ValueError(f"non-finite number(s) at {', '.join(bad)}; numbers must be finite")
        return v

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, v: str) -> str:
        if v not in available_strategies():
            raise ValueError(f"unknown strategy {v!r}; known: {list(available_strategies())}")
        return v

    @model_validator(mode="after")
    def _strategy_config(self) -> RunCreate:
        try:
            get_strategy(self.strategy, dict(self.strategy_config))
        except (ValueError, TypeError) as e:
            raise ValueError(f"strategy_config: {e}") from e
        if (
            self.simulation
            and self.clients_per_round
            and self.clients_per_round > self.simulation.clients
        ):
            raise ValueError("clients_per_round exceeds simulation.clients")
        if self.simulation and self.quorum > self.simulation.clients:
            raise ValueError(
                f"quorum {self.quorum} exceeds the {self.simulation.clients} simulated clients"
            )
        if self.clients_per_round and self.quorum > self.clients_per_round:
            raise ValueError(
                f"quorum {self.quorum} exceeds clients_per_round {self.clients_per_round}"
            )
        return self


RunStatus = Literal["created", "running", "completed", "failed", "cancelled"]


class RunPublic(BaseModel):
    id: int
    name: str
    status: RunStatus
    status_reason: str | None
    base_model: str
    model_fingerprint: str
    strategy: str
    total_rounds: int
    current_round: int
    lora_parameters: int
    #: Active enrolled clients.
    clients: int
    #: Traffic of the closed rounds (api.services.rounds.round_traffic): uploads, global
    #: deltas delivered to participants, and FedAvg's dense fp32 exchange for the same
    #: participants; ``bytes_saved`` = fedavg - (up + down).
    bytes_up: int
    bytes_down: int
    fedavg_equivalent_bytes: int
    bytes_saved: int
    #: Mean eval loss over the held-out sets after the last evaluated round (None without).
    final_eval_loss: float | None = None
    created_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    config: dict[str, Any]


class RunsPublic(BaseModel):
    data: list[RunPublic]
    count: int


class ClientCreate(Strict):
    name: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class ClientPublic(BaseModel):
    id: int
    run_id: int
    name: str
    status: Literal["active", "revoked"]
    simulated: bool
    #: waiting (never contacted the server) | idle | training | gone (no contact for
    #: client_timeout_s) | finished (its run completed or was cancelled) | revoked
    liveness: str
    created_at: dt.datetime
    last_seen_at: dt.datetime | None
    rounds_done: int
    bytes_up: int
    bytes_down: int
    progress: dict[str, Any] | None


class ClientEnrolled(ClientPublic):
    #: Shown once; the server keeps only its hash.
    token: str


class ClientsPublic(BaseModel):
    data: list[ClientPublic]
    count: int


class RoundPublic(BaseModel):
    number: int
    status: Literal["open", "aggregating", "closed", "failed"]
    expected: list[int]
    uploaded: list[int]
    opened_at: dt.datetime
    deadline_at: dt.datetime
    #: When its last update arrived (aggregation could start).
    collected_at: dt.datetime | None
    closed_at: dt.datetime | None
    digest: str | None
    delta_size: int | None
    snapshot_size: int | None
    #: Whether this round's snapshot is still stored (the newest ``FEDSRD_KEEP_SNAPSHOTS``
    #: closed rounds); the state of a round without one is rebuilt from the deltas.
    snapshot_kept: bool
    metrics: dict[str, Any]
    #: Closed rounds: bytes ``up``, ``down`` and ``fedavg`` (api.services.rounds.round_traffic).
    traffic: dict[str, int] | None
    attempts: int
    error: str | None


class RoundsPublic(BaseModel):
    data: list[RoundPublic]
    count: int


class SessionsSignedOut(BaseModel):
    signed_out: int = Field(description="unexpired dashboard sessions that were ended")


class AuditEventPublic(BaseModel):
    id: int
    at: dt.datetime
    #: ``admin-token``, ``session:<12 hex digits>`` (a dashboard browser)
    actor: str
    address: str | None
    #: create_run, launch_run, cancel_run, resume_run, enroll_client, revoke_client,
    #: new_client_token, sign_in, sign_out, sign_out_everywhere
    action: str
    run_id: int | None
    client_id: int | None
    detail: dict[str, Any] | None


class AuditEventsPublic(BaseModel):
    data: list[AuditEventPublic]
    count: int


class BlobPublic(BaseModel):
    round: int
    sha256: str
    size: int
    #: State digest after applying this blob (a delta) or of this snapshot.
    digest: str


class SyncPlan(BaseModel):
    """How a client at ``from_round`` reaches the current global state: apply ``snapshot``
    (if any), then ``deltas`` in order; verify each digest."""

    from_round: int
    to_round: int
    snapshot: BlobPublic | None
    deltas: list[BlobPublic]
    bytes: int


class AgentMe(BaseModel):
    client_id: int
    run_id: int
    name: str


class AgentRunInfo(BaseModel):
    """What an agent needs to take part: the base model, adapter, strategy and training."""

    run_id: int
    client_id: int
    client_name: str
    status: RunStatus
    base_model: str
    model_fingerprint: str
    lora: LoraSettings
    layout: dict[str, list[int]]
    strategy: str
    strategy_config: dict[str, Any]
    train: TrainSettings
    value_dtype: str
    seed: int
    total_rounds: int
    current_round: int


class PollResponse(BaseModel):
    """``train``: round ``round`` is open for you, train from ``base_round`` (sync first);
    ``wait``: nothing to do now, poll again after ``retry_after`` seconds; ``done``: the run
    completed; ``stop``: the run was cancelled or failed (``reason``)."""

    action: Literal["train", "wait", "done", "stop"]
    run_status: RunStatus
    round: int | None = None
    base_round: int | None = None
    deadline_at: dt.datetime | None = None
    sync: SyncPlan | None = None
    retry_after: float | None = None
    reason: str | None = None


class HeartbeatIn(Strict):
    """Local training progress; a loss the agent could not compute is left out, never NaN."""

    round: int = Field(ge=1, le=MAX_INT)
    step: int = Field(ge=0, le=MAX_INT)
    steps: int | None = Field(default=None, ge=1, le=MAX_INT)
    loss: float | None = None
    samples_per_second: float | None = Field(default=None, ge=0.0)


class UpdateAccepted(BaseModel):
    round: int
    client_id: int
    sha256: str
    size: int
    base_round: int
    num_samples: int
    #: Whether the round has stopped taking updates (its aggregation is queued or done); an
    #: identical retry reports the round's state at the time of the retry.
    round_complete: bool


class ErrorBody(BaseModel):
    """Every 4xx/5xx answer but a 422: a stable machine code and a message naming the
    problem (``api.main`` builds them; ``api.openapi`` documents them)."""

    error: str = Field(
        description="the error's code (api.errors), e.g. unauthorized, forbidden, not_found, "
        "method_not_allowed, conflict, gone, too_large, unavailable"
    )
    detail: str


class FieldError(BaseModel):
    """One bad field of a request."""

    model_config = ConfigDict(populate_by_name=True)

    field: str = Field(description="dotted path of the field, e.g. ``train.lr``")
    in_: str = Field(alias="in", description="body, query, path, header or cookie")
    message: str


class ValidationErrorBody(BaseModel):
    """A 422: each bad field of the request, or (an upload's body) what is wrong with it."""

    error: Literal["invalid"]
    detail: list[FieldError] | str


class Readiness(BaseModel):
    """``/readyz``: ``ok`` or ``unavailable``, and each dependency's state."""

    status: Literal["ok", "unavailable"]
    checks: dict[str, str]
