"""A whole federation in one process: N clients, a strategy, R rounds.

Every client-server exchange goes through the real wire codec (encode on the sender, decode
with the expected layout on the receiver), so the byte counts are the real ones, and the
server and every client apply the same decoded delta, so their state digests are compared
after each round. Clients that miss rounds (partial participation, dropouts) catch up before
training: in one process that is simply starting from the current global state.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from fedsrd_core.codec import ValueDType, decode, encode
from fedsrd_core.data import Example
from fedsrd_core.diagnostics import round_diagnostics, summarise_by_class
from fedsrd_core.modeling import model_fingerprint
from fedsrd_core.peft_lora import adapter_layout, attach_lora, lora_config, state_to_peft
from fedsrd_core.state import init_state, state_digest
from fedsrd_core.strategies import RoundContext, Upload, get_strategy
from fedsrd_core.training import (
    TrainConfig,
    client_seeds,
    evaluate_loss,
    exact_match_accuracy,
    local_round,
)

Progress = Callable[[str], None]


@dataclass(frozen=True)
class SimulationConfig:
    """Everything that defines a simulated run (stored with its record for reproducibility).

    Attributes:
        strategy: registry name; strategy_config: overrides of its defaults.
        rounds: number of rounds; participation: fraction of clients per round (at least 1);
        dropout: probability that a selected client fails to upload in a round.
        rank, lora_alpha, lora_dropout, target_modules: the LoRA adapter.
        train: local training settings.
        value_dtype: wire dtype of values; seed: run seed (masks, sampling, init).
        eval_exact_match: examples per eval set scored by greedy exact match after the last
            round (0: off); generation is slow, so earlier rounds report losses only.
        diagnostics: record, per round, what the server step did to every module
            (:mod:`fedsrd_core.diagnostics`: dense, for small models only).
    """

    strategy: str = "fedsrd"
    strategy_config: Mapping[str, Any] = field(default_factory=dict)
    rounds: int = 5
    participation: float = 1.0
    dropout: float = 0.0
    rank: int = 8
    lora_alpha: int | None = None
    lora_dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"
    train: TrainConfig = field(default_factory=TrainConfig)
    value_dtype: ValueDType = "fp32"
    seed: int = 0
    eval_exact_match: int = 0
    diagnostics: bool = False

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ValueError(f"`rounds` must be >= 1, got {self.rounds}")
        if not 0.0 < self.participation <= 1.0:
            raise ValueError(f"`participation` must be in (0, 1], got {self.participation}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"`dropout` must be in [0, 1), got {self.dropout}")
        if self.eval_exact_match < 0:
            raise ValueError(f"`eval_exact_match` must be >= 0, got {self.eval_exact_match}")
        get_strategy(self.strategy, dict(self.strategy_config))  # validates name and config

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["strategy_config"] = dict(self.strategy_config)
        return d


@dataclass
class RoundRecord:
    """Per-round figures of a simulated run."""

    round: int
    participants: list[int]
    dropped: list[int]
    bytes_up: dict[int, int]
    bytes_down: int
    #: None for a client whose training loss was not finite (see RoundStats.mean_loss)
    train_loss: dict[int, float | None]
    eval: dict[str, dict[str, float]]
    seconds: dict[str, float]
    digest: str
    #: per module class (and "all"): the medians of :mod:`fedsrd_core.diagnostics`' metrics
    diagnostics: dict[str, dict[str, float]] | None = None


@dataclass
class SimulationResult:
    config: dict[str, Any]
    rounds: list[RoundRecord]
    clients: int
    lora_parameters: int
    model_fingerprint: str = ""
    #: the evaluation of the base model before any round (the adapter's B = 0)
    base_eval: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "clients": self.clients,
            "lora_parameters": self.lora_parameters,
            "model_fingerprint": self.model_fingerprint,
            "base_eval": self.base_eval,
            "rounds": [asdict(r) for r in self.rounds],
        }

    def mean_bytes_per_client_round(self) -> dict[str, float]:
        """Mean bytes up and down per participating client and round."""
        ups = [b for r in self.rounds for b in r.bytes_up.values()]
        downs = [r.bytes_down for r in self.rounds]
        up = sum(ups) / len(ups) if ups else 0.0
        down = sum(downs) / len(downs) if downs else 0.0
        return {"up": up, "down": down, "total": up + down}


def _evaluate(
    model: torch.nn.Module,
    tokenizer: Any,
    eval_sets: Mapping[str, Sequence[Example]],
    cfg: SimulationConfig,
    *,
    last: bool,
) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for name, examples in eval_sets.items():
        metrics = evaluate_loss(model, tokenizer, examples, seq_len=cfg.train.seq_len)
        if cfg.eval_exact_match and last:
            metrics["exact_match"] = exact_match_accuracy(
                model, tokenizer, list(examples)[: cfg.eval_exact_match]
            )
        out[name] = metrics
    return out


def simulate(
    model: torch.nn.Module,
    tokenizer: Any,
    client_data: Sequence[Sequence[Example]],
    eval_sets: Mapping[str, Sequence[Example]],
    config: SimulationConfig,
    *,
    progress: Progress | None = None,
) -> SimulationResult:
    """Run a federation of ``len(client_data)`` clients on ``model`` (a plain causal LM).

    The model is wrapped with LoRA once; each client's local round loads the global factors
    into it, trains, and reads them back. Returns per-round records (bytes, losses, eval
    metrics, timings, state digest).
    """
    if not client_data or any(len(d) == 0 for d in client_data):
        raise ValueError("every client needs at least one local example")
    strategy = get_strategy(config.strategy, dict(config.strategy_config))
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"simulate needs a transformers causal LM, got {type(model).__name__}")
    fingerprint = model_fingerprint(model)  # the base model's identity, before LoRA
    peft_model = attach_lora(
        model,
        lora_config(
            rank=config.rank,
            alpha=config.lora_alpha,
            dropout=config.lora_dropout,
            target_modules=config.target_modules,
        ),
    )
    layout = adapter_layout(peft_model)
    server = init_state(layout, config.rank, seed=config.seed)
    shapes = server.wire_shapes()
    upload_shapes = strategy.upload_shapes(server)
    rng = random.Random(f"fedsrd-sim:{config.seed}")
    n = len(client_data)
    per_round = max(1, math.ceil(config.participation * n))
    records: list[RoundRecord] = []
    state_to_peft(server, peft_model)  # B = 0: the base model itself
    base_eval = _evaluate(peft_model, tokenizer, eval_sets, config, last=False)
    for t in range(1, config.rounds + 1):
        ctx = RoundContext(round=t, seed=config.seed, value_dtype=config.value_dtype)
        chosen = sorted(rng.sample(range(n), per_round))
        dropped = [c for c in chosen if rng.random() < config.dropout]
        participants = [c for c in chosen if c not in dropped]
        secs = {"local_training": 0.0, "sparsify_encode": 0.0, "server_step": 0.0}
        uploads: list[Upload] = []
        bytes_up: dict[int, int] = {}
        losses: dict[int, float | None] = {}
        for c in participants:
            if progress:
                progress(f"round {t}/{config.rounds}: client {c}")
            trained, stats = local_round(
                peft_model,
                tokenizer,
                client_data[c],
                server,
                config.train,
                trainable=strategy.trainable_factors(),
                proximal_mu=strategy.proximal_mu(),
                seed=client_seeds(config.seed, t, c)[0],
            )
            secs["local_training"] += stats.seconds
            losses[c] = stats.mean_loss
            t0 = time.perf_counter()
            blob = encode(
                strategy.client_upload(
                    server, trained, ctx, client_seed=client_seeds(config.seed, t, c)[1]
                ),
                value_dtype=config.value_dtype,
            )
            secs["sparsify_encode"] += time.perf_counter() - t0
            bytes_up[c] = len(blob)
            received = decode(blob, expected_shapes=upload_shapes)
            uploads.append(Upload(received, num_samples=len(client_data[c])))
        bytes_down = 0
        diagnostics = None
        if uploads:
            before = server.clone() if config.diagnostics else None
            t0 = time.perf_counter()
            delta = strategy.server_round(server, uploads, ctx)
            down = encode(delta, value_dtype=config.value_dtype)
            secs["server_step"] = time.perf_counter() - t0
            bytes_down = len(down)
            client_view = server.clone()
            strategy.apply_global(
                client_view, decode(down, expected_shapes={k: shapes[k] for k in delta})
            )
            strategy.apply_global(server, delta)
            digest = state_digest(server)
            if state_digest(client_view) != digest:
                raise RuntimeError(f"round {t}: client and server states diverged")
            if before is not None:
                per_module = round_diagnostics(strategy, before, uploads, server, round_=t)
                diagnostics = summarise_by_class(per_module) if per_module else None
        else:
            digest = state_digest(server)
        state_to_peft(server, peft_model)
        t0 = time.perf_counter()
        metrics = _evaluate(peft_model, tokenizer, eval_sets, config, last=t == config.rounds)
        secs["evaluation"] = time.perf_counter() - t0
        records.append(
            RoundRecord(
                round=t,
                participants=participants,
                dropped=dropped,
                bytes_up=bytes_up,
                bytes_down=bytes_down,
                train_loss=losses,
                eval=metrics,
                seconds=secs,
                digest=digest,
                diagnostics=diagnostics,
            )
        )
    return SimulationResult(
        config.to_dict(), records, n, server.num_parameters(), fingerprint, base_eval
    )


def markdown_report(result: SimulationResult) -> str:
    """A human-readable report of a simulated run."""
    cfg = result.config
    lines = [
        f"# Simulation: {cfg['strategy']}, {result.clients} clients, {cfg['rounds']} rounds",
        "",
        f"LoRA r={cfg['rank']} on `{cfg['target_modules']}` ({result.lora_parameters:,} "
        f"parameters), values {cfg['value_dtype']}, seed {cfg['seed']}.",
        "",
        f"Base model fingerprint: `{result.model_fingerprint}`.",
        "",
    ]
    eval_names = list(result.rounds[0].eval) if result.rounds else []
    head = ["round", "clients", "KiB up/client", "KiB down", "train loss"]
    head += [f"{n} loss" for n in eval_names] + ["train s", "encode s", "server s"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    if result.base_eval:  # round 0: the base model, so the rounds read as improvements
        base = ["0 (base)", "", "", "", ""]
        base += [f"{result.base_eval[n]['loss']:.3f}" for n in eval_names]
        lines.append("| " + " | ".join([*base, "", "", ""]) + " |")
    for r in result.rounds:
        up = sum(r.bytes_up.values()) / max(len(r.bytes_up), 1) / 1024
        finite = [x for x in r.train_loss.values() if x is not None]
        row = [str(r.round), str(len(r.participants)), f"{up:.1f}", f"{r.bytes_down / 1024:.1f}"]
        row.append(f"{sum(finite) / len(finite):.3f}" if finite else "n/a")
        row += [f"{r.eval[n]['loss']:.3f}" for n in eval_names]
        row += [
            f"{r.seconds['local_training']:.2f}",
            f"{r.seconds['sparsify_encode']:.3f}",
            f"{r.seconds['server_step']:.3f}",
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def write_outputs(result: SimulationResult, directory: str | Path) -> tuple[Path, Path]:
    """Write ``record.json`` and ``report.md`` into ``directory``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    rec, rep = d / "record.json", d / "report.md"
    rec.write_text(json.dumps(result.to_dict(), indent=2, sort_keys=True))
    rep.write_text(markdown_report(result))
    return rec, rep
