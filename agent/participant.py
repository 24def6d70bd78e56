"""One client's part in a run: keep the global state in sync, train, upload.

The same local round as simulated clients (fedsrd_core.training.local_round) and the same
strategy code; the state is reached by applying the server's blobs exactly as the server
did, and every step is checked against the digest the server published.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from agent.client import AgentClient, ServerError
from fedsrd_core.codec import encode
from fedsrd_core.data import Example
from fedsrd_core.peft_lora import attach_lora, lora_config
from fedsrd_core.snapshot import decode_global_delta, decode_snapshot
from fedsrd_core.state import GlobalState, state_digest
from fedsrd_core.strategies import RoundContext, Strategy, get_strategy
from fedsrd_core.training import TrainConfig, client_seeds, local_round, throttled

log = logging.getLogger(__name__)


class DigestMismatchError(Exception):
    pass


class StalePlanError(Exception):
    """A blob of the sync plan is no longer served (404): a snapshot the server pruned
    after it made the plan. Carries the progress made, ``state`` at ``have_round`` (every
    step applied and checked), from which a fresh plan goes on."""

    def __init__(self, message: str, state: GlobalState | None, have_round: int) -> None:
        super().__init__(message)
        self.state = state
        self.have_round = have_round


def apply_plan(
    client: AgentClient,
    strategy: Strategy,
    layout: dict[str, tuple[int, int]],
    rank: int,
    state: GlobalState | None,
    have_round: int,
    plan: dict[str, Any],
    digests: dict[int, str] | None = None,
) -> tuple[GlobalState | None, int]:
    """Reach the plan's round: load its snapshot (if any), then apply its deltas in order,
    each exactly as the server applied it, and check every published digest.

    Returns the new ``(state, round)`` (``state`` is changed in place by the deltas; records
    each digest in ``digests``). Raises :class:`DigestMismatchError` when a blob does not
    lead to its digest or a delta does not follow the state; the state is then unusable.
    """

    def download(sha256: str, size: int, what: str) -> bytearray:
        try:
            return client.download(sha256, size)
        except ServerError as e:
            if e.status != 404:
                raise
            raise StalePlanError(
                f"{what} is no longer served: {e.detail}", state, have_round
            ) from e

    snap = plan.get("snapshot")
    if snap is not None:
        state = decode_snapshot(
            download(snap["sha256"], int(snap["size"]), f"snapshot of round {snap['round']}"),
            layout,
            rank,
        )
        if state_digest(state) != snap["digest"]:
            raise DigestMismatchError(f"snapshot of round {snap['round']}")
        have_round = int(snap["round"])
        if digests is not None:
            digests[have_round] = snap["digest"]
    for d in plan.get("deltas", []):
        if state is None or int(d["round"]) != have_round + 1:
            raise DigestMismatchError(f"delta of round {d['round']} does not follow our state")
        blob = download(d["sha256"], int(d["size"]), f"delta of round {d['round']}")
        strategy.apply_global(state, decode_global_delta(blob, layout, rank))
        have_round = int(d["round"])
        if state_digest(state) != d["digest"]:
            raise DigestMismatchError(f"state after round {d['round']}")
        if digests is not None:
            digests[have_round] = d["digest"]
    return state, have_round


@dataclass
class Participant:
    client: AgentClient
    model: Any  # a transformers causal LM (LoRA is attached here)
    tokenizer: Any
    data: Sequence[Example]
    info: dict[str, Any] = field(default_factory=dict)
    state: GlobalState | None = None
    have_round: int = -1
    digests: dict[int, str] = field(default_factory=dict)
    rounds_trained: list[int] = field(default_factory=list)
    #: Least seconds between two progress reports during local training.
    progress_interval: float = 2.0

    def __post_init__(self) -> None:
        self.info = self.info or self.client.run_info()
        lora = self.info["lora"]
        self.layout = {k: (int(v[0]), int(v[1])) for k, v in self.info["layout"].items()}
        self.rank = int(lora["rank"])
        self.strategy: Strategy = get_strategy(
            self.info["strategy"], dict(self.info["strategy_config"])
        )
        self.train = TrainConfig(**self.info["train"])
        self.peft = attach_lora(
            self.model,
            lora_config(
                rank=self.rank,
                alpha=lora["alpha"],
                dropout=lora["dropout"],
                target_modules=lora["target_modules"],
            ),
        )

    def sync(self, plan: dict[str, Any]) -> None:
        """Apply a sync plan (see :func:`apply_plan`); on a mismatch the state is dropped,
        so the next poll brings a snapshot."""
        try:
            self.state, self.have_round = apply_plan(
                self.client,
                self.strategy,
                self.layout,
                self.rank,
                self.state,
                self.have_round,
                plan,
                self.digests,
            )
        except DigestMismatchError:
            self.state, self.have_round = None, -1
            raise
        except StalePlanError as e:
            self.state, self.have_round = e.state, e.have_round
            raise

    def step(self, wait: float = 5.0) -> str:
        """Poll once and act on the answer; returns the action."""
        answer = self.client.poll(self.have_round if self.state is not None else None, wait)
        action = str(answer["action"])
        if action != "train":
            return action
        if answer.get("sync"):
            try:
                self.sync(answer["sync"])
            except DigestMismatchError as e:
                log.warning("state mismatch (%s); reloading a snapshot", e)
                self.state, self.have_round = None, -1
                return "resync"
            except StalePlanError as e:
                log.info("%s; asking for a fresh plan", e)
                return "resync"
        number, base = int(answer["round"]), int(answer["base_round"])
        assert self.state is not None
        assert self.have_round == base
        blob, loss = self.train_round(number, on_step=self._progress(number))
        # A loss that is None (not finite) is left out of both: never sent as NaN.
        self.client.heartbeat(number, self.train.steps, steps=self.train.steps, loss=loss)
        self.client.upload(number, base, blob, num_samples=len(self.data), train_loss=loss)
        self.rounds_trained.append(number)
        return "trained"

    def _progress(self, number: int) -> Callable[[int, float], None]:
        """Report local progress (step, loss) at most every ``progress_interval`` seconds."""

        def report(step: int, loss: float) -> None:
            if step >= self.train.steps:
                return  # the last step is reported by the heartbeat after training
            self.client.report_progress(number, step, steps=self.train.steps, loss=loss)

        return throttled(report, self.progress_interval)

    def train_round(
        self, number: int, on_step: Callable[[int, float], None] | None = None
    ) -> tuple[bytes, float | None]:
        """Train round ``number`` from the current global state and return the encoded
        upload and the mean training loss, None if it was not finite (the same local round
        simulated clients run)."""
        assert self.state is not None
        run_seed, client_id = int(self.info["seed"]), int(self.info["client_id"])
        train_seed, upload_seed = client_seeds(run_seed, number, client_id)
        trained, stats = local_round(
            self.peft,
            self.tokenizer,
            self.data,
            self.state,
            self.train,
            trainable=self.strategy.trainable_factors(),
            proximal_mu=self.strategy.proximal_mu(),
            seed=train_seed,
            on_step=on_step,
        )
        ctx = RoundContext(round=number, seed=run_seed, value_dtype=self.info["value_dtype"])
        with torch.no_grad():
            upload = self.strategy.client_upload(self.state, trained, ctx, client_seed=upload_seed)
        return encode(upload, value_dtype=self.info["value_dtype"]), stats.mean_loss

    def run(self, wait: float = 5.0, max_steps: int = 10_000) -> str:
        """Take part until the run is done or stopped; returns the final action."""
        for _ in range(max_steps):
            action = self.step(wait)
            if action in ("done", "stop"):
                return action
        raise RuntimeError("participant did not finish")

    def catch_up(self) -> None:
        """Bring the local state to the run's newest global state (after it completed)."""
        plan = self.client.sync(self.have_round if self.state is not None else None)
        if plan["snapshot"] is not None or plan["deltas"]:
            self.sync(plan)
