"""Local fine-tuning: one client's round, and evaluation of the adapted model.

A local round starts from the global LoRA factors, trains them for a fixed number of optimizer
steps (fresh AdamW each round, constant learning rate, gradient accumulation, an optional
FedProx term), with the loss on the response tokens only (Alpaca template), and returns the
trained factors. The strategy then turns ``(start, trained)`` into the upload.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from fedsrd_core.data import Example, exact_match, first_line, generate, prompt_and_response
from fedsrd_core.peft_lora import peft_to_state, set_trainable, state_to_peft
from fedsrd_core.state import GlobalState

IGNORE_INDEX = -100  # label value the causal LM loss skips (prompt and padding tokens)


@dataclass(frozen=True)
class TrainConfig:
    """Local training settings (the paper: 10 steps of 32 sequences, constant LR).

    Attributes:
        steps: optimizer steps per round.
        batch_size: sequences per micro-batch.
        grad_accum: micro-batches per optimizer step.
        seq_len: maximum tokens per sequence (prompt + response + EOS); a longer example
            loses the start of its prompt (:func:`tokenize`).
        lr: constant learning rate of AdamW.
        weight_decay: AdamW weight decay.
        max_grad_norm: gradient clipping (None: no clipping).
    """

    steps: int = 10
    batch_size: int = 8
    grad_accum: int = 1
    seq_len: int = 384
    lr: float = 5e-5
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "seq_len"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"`{name}` must be an integer >= 1, got {v!r}")
        if not (isinstance(self.lr, int | float) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"`lr` must be a positive number, got {self.lr!r}")
        if not (isinstance(self.weight_decay, int | float) and self.weight_decay >= 0):
            raise ValueError(f"`weight_decay` must be >= 0, got {self.weight_decay!r}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"`max_grad_norm` must be > 0 or None, got {self.max_grad_norm!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class TokenizedExample:
    """Token ids of prompt + response + EOS, and labels masking the prompt."""

    input_ids: list[int]
    labels: list[int]
    #: Whether the prompt (or, for a response longer than the window, the response) was cut
    #: to fit ``seq_len``.
    truncated: bool = False

    @property
    def scored_tokens(self) -> int:
        """Labels a causal LM's loss counts: it predicts token ``i`` from the tokens before
        it, so a label at position 0 is never scored."""
        return sum(1 for lab in self.labels[1:] if lab != IGNORE_INDEX)


def tokenize(
    example: Example, tokenizer: PreTrainedTokenizerBase, seq_len: int
) -> TokenizedExample:
    """Tokenise with the Alpaca template; only the response and EOS carry labels.

    A sequence longer than ``seq_len`` loses the *start of its prompt*: the response and EOS
    stay whole, after the prompt's last tokens (the instruction's end, the input, the
    ``### Response:`` header), which is what the loss needs. Cutting at the end instead would
    drop the response, and a batch of such examples has no label at all: a loss of 0/0, NaN.
    A response that does not fit on its own keeps the prompt's last ``min(len(prompt),
    seq_len // 2)`` tokens and its own beginning (its end is cut).
    """
    if seq_len < 2:
        raise ValueError(f"`seq_len` must be >= 2 (one to predict from, one to score): {seq_len}")
    prompt, response = prompt_and_response(example)
    p_ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"]) if prompt else []
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token")
    target = [*tokenizer(response, add_special_tokens=False)["input_ids"], int(eos)]
    truncated = len(p_ids) + len(target) > seq_len
    if truncated:
        if len(target) <= seq_len:
            keep = seq_len - len(target)
        else:
            keep = min(len(p_ids), seq_len // 2)
            target = target[: seq_len - keep]
        p_ids = p_ids[len(p_ids) - keep :]  # the last ``keep`` (none when keep == 0)
    return TokenizedExample(p_ids + target, [IGNORE_INDEX] * len(p_ids) + target, truncated)


def collate(
    batch: Sequence[TokenizedExample], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad to the longest sequence: ``(input_ids, attention_mask, labels)``."""
    width = max(len(t.input_ids) for t in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    for i, t in enumerate(batch):
        n = len(t.input_ids)
        ids[i, :n] = torch.tensor(t.input_ids)
        mask[i, :n] = 1
        labels[i, :n] = torch.tensor(t.labels)
    return ids, mask, labels


def throttled(
    on_step: Callable[[int, float], None],
    interval_s: float,
    *,
    final_step: int | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Callable[[int, float], None]:
    """An ``on_step`` callback for :func:`local_round` that passes a step on to ``on_step``
    at most once every ``interval_s`` seconds (the first step always), and ``final_step``
    always: progress reports without one request per optimizer step."""
    last = -math.inf

    def call(step: int, loss: float) -> None:
        nonlocal last
        now = clock()
        if step != final_step and now - last < interval_s:
            return
        last = now
        on_step(step, loss)

    return call


@dataclass
class RoundStats:
    """What a local round reports: loss per optimizer step, samples, wall time, and how
    many local examples had to be cut to ``seq_len`` (``truncated``) or were left out for
    having no response token to score at all (``skipped``)."""

    losses: list[float] = field(default_factory=list)
    samples: int = 0
    seconds: float = 0.0
    truncated: int = 0
    skipped: int = 0

    @property
    def mean_loss(self) -> float | None:
        """The mean step loss; None (missing) without steps or if any step's loss is not
        finite (the training diverged): a NaN must never reach a heartbeat, an upload or a
        round's metrics, where it would poison every mean (see :mod:`fedsrd_core.finite`)."""
        if not self.losses or not all(math.isfinite(x) for x in self.losses):
            return None
        return sum(self.losses) / len(self.losses)

    @property
    def samples_per_second(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else math.nan


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a PAD nor an EOS token")
    return int(pad)


def client_seeds(run_seed: int, round: int, client: int) -> tuple[int, int]:
    """``(training seed, upload seed)`` of client ``client`` in round ``round`` of a run:
    the one rule that simulations, workers and agents share, so a client's round is
    reproducible wherever it runs."""
    return run_seed * 1_000_003 + round * 1009 + client, round * 1009 + client


def trainable_examples(
    examples: Sequence[Example],
    tokenizer: PreTrainedTokenizerBase,
    seq_len: int,
    stats: RoundStats | None = None,
) -> list[TokenizedExample]:
    """``examples`` tokenised for training, without those that have no token to score (an
    empty response after an empty prompt): a batch of only those would have a NaN loss.
    Counts the truncated and the skipped in ``stats``; raises ``ValueError`` if none is left.
    """
    data: list[TokenizedExample] = []
    for e in examples:
        t = tokenize(e, tokenizer, seq_len)
        if t.scored_tokens == 0:
            if stats is not None:
                stats.skipped += 1
            continue
        if stats is not None and t.truncated:
            stats.truncated += 1
        data.append(t)
    if not data:
        raise ValueError(f"none of the {len(examples)} local examples has a token to train on")
    return data


def local_round(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    start: GlobalState,
    config: TrainConfig,
    *,
    trainable: frozenset[str] = frozenset({"A", "B"}),
    proximal_mu: float = 0.0,
    seed: int = 0,
    on_step: Callable[[int, float], None] | None = None,
) -> tuple[GlobalState, RoundStats]:
    """Train the LoRA factors of ``model`` (a peft model) from ``start`` on ``examples``.

    Each optimizer step averages ``grad_accum`` micro-batches of ``batch_size`` examples drawn
    without replacement from a permutation of the data (reshuffled when exhausted) by a
    generator seeded with ``seed``; dropout is seeded too, so a round is deterministic on a
    given device. The loss is the mean token cross-entropy over response tokens plus, with
    ``proximal_mu > 0``, ``mu / 2 * sum ||theta - theta_start||^2`` over the trained factors
    (FedProx). AdamW is created fresh, with a constant learning rate.

    Returns:
        The trained factors (float32, CPU) and the round's statistics.
    """
    if not examples:
        raise ValueError("no local examples to train on")
    state_to_peft(start, model)
    params = set_trainable(model, trainable)
    if not params:
        raise ValueError(f"nothing to train: trainable factors {sorted(trainable)}")
    anchors = [p.detach().clone() for p in params] if proximal_mu > 0 else []
    optimizer = torch.optim.AdamW(
        params, lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.999)
    )
    device = params[0].device
    pad_id = _pad_id(tokenizer)
    stats = RoundStats()
    data = trainable_examples(examples, tokenizer, config.seq_len, stats)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout masks
    order: list[int] = []
    t0 = time.perf_counter()
    model.train()
    for step in range(config.steps):
        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for _ in range(config.grad_accum):
            idx: list[int] = []
            while len(idx) < config.batch_size:
                if not order:
                    order = torch.randperm(len(data), generator=gen).tolist()
                idx.append(order.pop())
            ids, mask, labels = (t.to(device) for t in collate([data[i] for i in idx], pad_id))
            out = model(input_ids=ids, attention_mask=mask, labels=labels)
            loss = out.loss / config.grad_accum
            loss.backward()
            step_loss += float(loss.detach())
            stats.samples += len(idx)
        if proximal_mu > 0:
            prox = torch.stack(
                [((p - a) ** 2).sum() for p, a in zip(params, anchors, strict=True)]
            ).sum()
            torch.autograd.backward(torch.mul(prox, 0.5 * proximal_mu))
        if config.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        stats.losses.append(step_loss)
        if on_step is not None:
            on_step(step + 1, step_loss)
    model.eval()
    stats.seconds = time.perf_counter() - t0
    return peft_to_state(model), stats


@torch.no_grad()
def evaluate_loss(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    *,
    seq_len: int = 384,
    batch_size: int = 16,
) -> dict[str, float]:
    """Mean response-token cross-entropy and perplexity on ``examples``.

    Token-weighted over the whole set (not a mean of batch means), so it does not depend on
    the batch size. Long examples are cut as for training (:func:`tokenize`: the prompt's
    start goes first). Raises ``ValueError`` when no example has a response token to score.
    """
    if not examples:
        raise ValueError("no evaluation examples")
    model.eval()
    device = next(model.parameters()).device
    pad_id = _pad_id(tokenizer)
    data = [tokenize(e, tokenizer, seq_len) for e in examples]
    total, tokens = 0.0, 0
    for i in range(0, len(data), batch_size):
        ids, mask, labels = (t.to(device) for t in collate(data[i : i + batch_size], pad_id))
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        target = labels[:, 1:]
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            target.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        total += float(loss)
        tokens += int((target != IGNORE_INDEX).sum())
    if tokens == 0:
        # A loss of 0 over no tokens would read as a perfect model.
        raise ValueError(f"no response token to score (seq_len={seq_len}): every response is empty")
    mean = total / tokens
    return {"loss": mean, "perplexity": math.exp(min(mean, 50.0)), "tokens": float(tokens)}


def evaluate_domains(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    domains: Sequence[str],
    examples: int,
    *,
    seed: int,
    seq_len: int,
) -> dict[str, dict[str, float] | dict[str, str]]:
    """:func:`evaluate_loss` on ``examples`` generated evaluation examples of each domain
    (``generate(domain, examples, seed=seed, split="eval")``). A domain with nothing to score
    at this ``seq_len`` gets ``{"error": ...}`` instead of failing the others."""
    out: dict[str, dict[str, float] | dict[str, str]] = {}
    for domain in domains:
        data = generate(domain, examples, seed=seed, split="eval")
        try:
            out[domain] = evaluate_loss(model, tokenizer, data, seq_len=seq_len)
        except ValueError as e:  # nothing to score (seq_len too short): say so
            out[domain] = {"error": str(e)}
    return out


@torch.no_grad()
def exact_match_accuracy(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    *,
    max_new_tokens: int = 24,
) -> float:
    """Share of examples whose greedy answer (first generated line) equals the reference."""
    if not examples:
        raise ValueError("no evaluation examples")
    model.eval()
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    hits = 0
    for ex in examples:
        prompt, reference = prompt_and_response(ex)
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        generate: Callable[..., torch.Tensor] = model.generate  # type: ignore[assignment]
        out = generate(
            input_ids=ids.to(device),
            attention_mask=torch.ones_like(ids).to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=_pad_id(tokenizer),
        )
        text = tokenizer.decode(out[0, ids.shape[1] :].tolist(), skip_special_tokens=True)
        hits += exact_match(first_line(str(text)), reference)
    return hits / len(examples)
