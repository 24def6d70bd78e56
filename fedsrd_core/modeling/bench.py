"""The quality testbed's base model: a Llama model wide enough to stand for a real one.

The tiny model (:mod:`.tiny`, hidden 64, byte tokenizer) is right for tests, but too narrow to
judge a federated method: how much of an element-wise perturbation of a LoRA factor (DARE's
random download, say) reaches a layer's output shrinks with the layer's width, so a 64-wide
model exaggerates such noise several-fold against a 3B model. This module builds the base model
of ``benchmarks/quality.py`` instead, entirely offline:

* a byte-level BPE tokenizer (:func:`build_bpe_tokenizer`, 4,096 tokens) trained on the
  corpus below; it shortens text about 3x against bytes;
* a Llama model (:class:`BenchModelSpec`; 256 wide, 4 layers, grouped-query attention, about 5M
  parameters), initialised from a seed like the tiny model;
* pre-trained on local text: the Python standard library's sources and docstrings (real text
  that every machine running this project has) plus the generated instruction domains in their
  prompt template (:func:`pretrain_corpus`), with a held-out split of both whose loss is
  measured along the way (the curve is stored in the model's metadata file);
* cached under a key of everything that defines it (:func:`bench_model_dir`), like the tiny
  model: built once, reused after.

Build it with ``fedsrd bench-model`` (about 30 minutes on a 2-core CPU); tests never need it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
import sysconfig
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from fedsrd_core.data import DOMAINS, OOD_DOMAINS, generate, prompt_and_response
from fedsrd_core.modeling.loading import model_fingerprint
from fedsrd_core.modeling.tiny import (
    METADATA_FILE,
    _init_weights,
    _publish,
    _read_metadata,
    _staging_dir,
    _texts_digest,
    _versions,
    _write_metadata,
)

__all__ = [
    "BENCH_FORMAT_VERSION",
    "BenchModelSpec",
    "PretrainSchedule",
    "bench_model_dir",
    "build_bpe_tokenizer",
    "pretrain_corpus",
]

#: Bumped whenever the bytes a given (spec, corpus, schedule) produce change.
BENCH_FORMAT_VERSION: Final = 1

_SPECIAL = ("<pad>", "<s>", "</s>", "<unk>")  # ids 0..3, in this order
_INIT_SEED_SALT: Final = 1_000  # the testbed's init seed space, apart from the tiny model's

#: Seed of the generated pre-training text; federations and benchmarks use small seeds.
PRETRAIN_DATA_SEED: Final = 7_777
#: Generated examples per domain in the pre-training corpus, and how many times they repeat
#: there: about 5% of the tokens, enough to learn the prompt template without learning the
#: domains (the federation's job).
PRETRAIN_PER_DOMAIN: Final = 100
PRETRAIN_DOMAIN_REPEAT: Final = 4
#: Every HELDOUT_EVERY-th file (and generated example) is held out of pre-training.
HELDOUT_EVERY: Final = 20


@dataclass(frozen=True)
class BenchModelSpec:
    """Shape of the testbed model. The default (hidden 256) is the quality benchmark's model;
    64 and 512 give the width ablation."""

    hidden_size: int = 256
    intermediate_size: int = 688
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    vocab_size: int = 4096
    max_position_embeddings: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if f.name == "seed" else 1):
                raise ValueError(f"`{f.name}` must be an integer >= 1, got {v!r}")
        if self.hidden_size % self.num_attention_heads or (
            self.num_attention_heads % self.num_key_value_heads
        ):
            raise ValueError(
                f"`hidden_size` ({self.hidden_size}) must divide into `num_attention_heads` "
                f"({self.num_attention_heads}) heads, and those into `num_key_value_heads` "
                f"({self.num_key_value_heads}) groups"
            )
        if self.vocab_size <= 256 + len(_SPECIAL):
            raise ValueError(
                f"`vocab_size` must exceed {256 + len(_SPECIAL)}, got {self.vocab_size}"
            )

    @classmethod
    def of_width(cls, hidden: int) -> BenchModelSpec:
        """The family member of width ``hidden`` (64, 256, 512, ...): heads of 64 channels,
        two query heads per key/value head, MLP about 2.7x wide, as in Llama."""
        heads = max(1, hidden // 64)
        return cls(
            hidden_size=hidden,
            intermediate_size=round(hidden * 2.6875 / 16) * 16,
            num_attention_heads=heads,
            num_key_value_heads=max(1, heads // 2),
        )

    def to_config(self, tokenizer: PreTrainedTokenizerBase) -> LlamaConfig:
        return LlamaConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            max_position_embeddings=self.max_position_embeddings,
            initializer_range=0.02,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=False,
        )


@dataclass(frozen=True)
class PretrainSchedule:
    """Pre-training: AdamW (betas 0.9/0.95), linear warm-up over 5% of the steps, cosine decay
    to 10% of ``lr``, gradient clipping at 1; random ``seq_len`` windows of the corpus; the
    held-out loss measured every ``eval_every`` steps on ``eval_batches`` fixed batches."""

    steps: int = 2000
    batch_size: int = 16
    seq_len: int = 256
    lr: float = 3e-3
    eval_every: int = 100
    eval_batches: int = 8


def build_bpe_tokenizer(
    texts: Sequence[str], vocab_size: int, *, model_max_length: int = 512
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts`` (offline, with ``tokenizers``).

    ``<pad>``, ``<s>``, ``</s>``, ``<unk>`` get ids 0-3; every byte is in the alphabet, so
    nothing is ever unknown. As with the byte tokenizer, special-token strings inside text
    encode as text (``split_special_tokens``): data cannot forge an end of sequence.
    """
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(_SPECIAL),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        split_special_tokens=True,
        padding_side="right",
        model_max_length=model_max_length,
    )
    if len(tokenizer) != vocab_size:
        raise RuntimeError(f"BPE training gave {len(tokenizer)} tokens, not {vocab_size}")
    return tokenizer


def _stdlib_files() -> list[Path]:
    """The standard library's own modules (no tests, no third-party packages), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idlelib", "__pycache__", "turtledemo"}
    return sorted(p for p in root.rglob("*.py") if not skip.intersection(p.relative_to(root).parts))


def pretrain_corpus() -> tuple[list[str], list[str]]:
    """``(train, held_out)`` pre-training texts: the standard library's sources, and the
    generated domains (prompt + response, seed :data:`PRETRAIN_DATA_SEED`, repeated
    :data:`PRETRAIN_DOMAIN_REPEAT` times in ``train``); every :data:`HELDOUT_EVERY`-th file and
    example is held out."""
    train: list[str] = []
    held: list[str] = []
    for i, path in enumerate(_stdlib_files()):
        text = path.read_text(encoding="utf-8", errors="replace")
        (held if i % HELDOUT_EVERY == 0 else train).append(text)
    domain_train: list[str] = []
    for domain in (*DOMAINS, *OOD_DOMAINS):
        for i, ex in enumerate(generate(domain, PRETRAIN_PER_DOMAIN, seed=PRETRAIN_DATA_SEED)):
            prompt, response = prompt_and_response(ex)
            (held if i % HELDOUT_EVERY == 0 else domain_train).append(prompt + response)
    return train + domain_train * PRETRAIN_DOMAIN_REPEAT, held


def _stream(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> torch.Tensor:
    eos = int(tokenizer.eos_token_id)
    ids: list[int] = []
    for chunk in range(0, len(texts), 256):
        for seq in tokenizer(list(texts[chunk : chunk + 256]), add_special_tokens=False)[
            "input_ids"
        ]:
            ids.extend(seq)
            ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def _windows(stream: torch.Tensor, starts: torch.Tensor, seq_len: int) -> torch.Tensor:
    return stream[starts.unsqueeze(1) + torch.arange(seq_len)]


@torch.no_grad()
def _heldout_loss(model: PreTrainedModel, batches: Sequence[torch.Tensor]) -> float:
    model.eval()  # type: ignore[no-untyped-call]
    loss = sum(float(model(input_ids=x, labels=x).loss) for x in batches) / len(batches)
    model.train()
    return loss


def _pretrain(
    model: PreTrainedModel,
    train: torch.Tensor,
    held: torch.Tensor,
    schedule: PretrainSchedule,
    seed: int,
    log: Callable[[str], None],
) -> dict[str, Any]:
    s = schedule
    gen = torch.Generator().manual_seed(seed)
    eval_batches = [
        _windows(
            held, torch.randint(len(held) - s.seq_len, (s.batch_size,), generator=gen), s.seq_len
        )
        for _ in range(s.eval_batches)
    ]
    optimizer = torch.optim.AdamW(model.parameters(), lr=s.lr, betas=(0.9, 0.95), weight_decay=0.0)
    warmup = max(1, s.steps // 20)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, s.steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    curve = [(0, _heldout_loss(model, eval_batches))]
    log(f"step 0: held-out loss {curve[0][1]:.3f}")
    started = time.perf_counter()
    model.train()
    for step in range(1, s.steps + 1):
        x = _windows(
            train, torch.randint(len(train) - s.seq_len, (s.batch_size,), generator=gen), s.seq_len
        )
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        sched.step()
        optimizer.zero_grad(set_to_none=True)
        if step % s.eval_every == 0 or step == s.steps:
            curve.append((step, _heldout_loss(model, eval_batches)))
            log(
                f"step {step}/{s.steps}: train loss {float(loss.detach()):.3f}, held-out loss "
                f"{curve[-1][1]:.3f} ({time.perf_counter() - started:.0f} s)"
            )
    model.eval()  # type: ignore[no-untyped-call]
    return {
        "held_out_curve": [[k, round(v, 4)] for k, v in curve],
        "initial_held_out_loss": curve[0][1],
        "final_held_out_loss": curve[-1][1],
        "train_tokens": len(train),
        "held_out_tokens": len(held),
        "seconds": round(time.perf_counter() - started, 1),
    }


def bench_model_dir(
    cache_dir: str | Path,
    spec: BenchModelSpec = BenchModelSpec(),
    schedule: PretrainSchedule = PretrainSchedule(),
    *,
    corpus: tuple[Sequence[str], Sequence[str]] | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> Path:
    """The directory of the pre-trained testbed model for ``spec``, built once and cached.

    ``cache_dir/bench-llama-<width>-<key>``, ``key`` a hash of the format version, the spec, the
    schedule and the corpus (its texts' digest: another Python version's standard library is
    another corpus). Built in a staging directory and published with one rename, like the
    tiny model. The metadata file records the held-out loss curve, the build time and the
    fingerprint. ``corpus`` replaces :func:`pretrain_corpus`'s ``(train, held_out)`` texts
    (tests build small models on small corpora); ``log`` receives progress lines.
    """
    train_texts, held_texts = corpus if corpus is not None else pretrain_corpus()
    key_material = {
        "format_version": BENCH_FORMAT_VERSION,
        "spec": dataclasses.asdict(spec),
        "schedule": dataclasses.asdict(schedule),
        "train_sha256": _texts_digest(train_texts),
        "held_out_sha256": _texts_digest(held_texts),
    }
    key = hashlib.sha256(json.dumps(key_material, sort_keys=True).encode()).hexdigest()
    target = Path(cache_dir) / f"bench-llama-{spec.hidden_size}-{key[:16]}"
    if (target / "model.safetensors").is_file() and _read_metadata(target).get("cache_key") == key:
        return target
    started = time.perf_counter()
    log(f"building the bench model (hidden {spec.hidden_size}) in {target}")
    tokenizer = build_bpe_tokenizer(
        train_texts, spec.vocab_size, model_max_length=spec.max_position_embeddings
    )
    train = _stream(tokenizer, train_texts)
    held = _stream(tokenizer, held_texts)
    log(f"tokenizer trained: {len(train):,} train and {len(held):,} held-out tokens")
    with torch.random.fork_rng(devices=[]):
        model = LlamaForCausalLM(spec.to_config(tokenizer))
    _init_weights(model, _INIT_SEED_SALT + spec.seed, pad_id=int(tokenizer.pad_token_id))
    result = _pretrain(model, train, held, schedule, spec.seed, log)
    with _staging_dir(target) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        _write_metadata(
            staging,
            {
                "format_version": BENCH_FORMAT_VERSION,
                "cache_key": key,
                "spec": dataclasses.asdict(spec),
                "schedule": dataclasses.asdict(schedule),
                "num_parameters": sum(p.numel() for p in model.parameters()),
                "fingerprint": model_fingerprint(model),
                "pretrain": result,
                "build_seconds": round(time.perf_counter() - started, 1),
                "versions": _versions(),
            },
        )
        if target.exists():
            shutil.rmtree(target)
        _publish(staging, target, replace=True)
    log(f"bench model ready: {target}")
    return target


def bench_model_metadata(directory: str | Path) -> dict[str, Any]:
    """The metadata a built testbed model carries (:data:`METADATA_FILE`)."""
    return _read_metadata(Path(directory))


__all__ += ["METADATA_FILE", "bench_model_metadata"]
