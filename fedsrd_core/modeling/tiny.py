"""A tiny Llama-architecture model built and pre-trained locally, for tests and offline demos.

The model has the same module layout as real Llama checkpoints (``model.layers.{i}.self_attn.
{q,k,v,o}_proj``, ``model.layers.{i}.mlp.{gate,up,down}_proj``), so the federated LoRA code
runs on it unchanged, and uses the byte-level tokenizer of :mod:`.tokenizer`, so nothing is
downloaded. With the default :class:`TinyModelSpec` it has 124,224 parameters.

Model directories are written atomically: everything is written into a hidden staging
directory next to the target (``.<name>.tmp-*``), flushed to disk, then renamed into place, so
a crash leaves either the previous directory or the complete new one (plus, at worst, a
stale staging directory), never a half-written model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
import struct
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypedDict

import numpy as np
import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from fedsrd_core.modeling.loading import load_causal_lm, model_fingerprint
from fedsrd_core.modeling.tokenizer import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    VOCAB_SIZE,
    build_byte_tokenizer,
)

__all__ = [
    "METADATA_FILE",
    "TINY_FORMAT_VERSION",
    "PretrainResult",
    "TinyModelSpec",
    "build_tiny_model",
    "pretrain_tiny",
    "tiny_model_dir",
]

#: Bumped whenever the bytes a given (spec, texts, steps) produce change (initialisation,
#: pre-training recipe, file layout), so stale cache entries of :func:`tiny_model_dir` are not
#: reused.
TINY_FORMAT_VERSION: Final = 1

#: Provenance written next to the weights: format version, spec, pre-training settings and
#: results, fingerprint, library versions.
METADATA_FILE: Final = "fedsrd_tiny.json"

#: Std of the initial weights, as in Llama's ``initializer_range``.
_INIT_STD: Final = 0.02


@dataclass(frozen=True)
class TinyModelSpec:
    """Shape and initialisation seed of the tiny model (all validated on construction)."""

    hidden_size: int = 64
    intermediate_size: int = 172
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            # bool is an int subclass; True as a layer count is a bug, not a 1.
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"`{field.name}` must be an int, got {type(value).__name__}")
            minimum = 0 if field.name == "seed" else 1
            if value < minimum:
                raise ValueError(f"`{field.name}` must be >= {minimum}, got {value}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"`hidden_size` ({self.hidden_size}) must be divisible by "
                f"`num_attention_heads` ({self.num_attention_heads})"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"`num_attention_heads` ({self.num_attention_heads}) must be divisible by "
                f"`num_key_value_heads` ({self.num_key_value_heads})"
            )
        if (self.hidden_size // self.num_attention_heads) % 2:
            # Rotary embeddings rotate pairs of channels.
            raise ValueError(
                f"`hidden_size / num_attention_heads` ({self.hidden_size} / "
                f"{self.num_attention_heads}) must be even for rotary position embeddings"
            )

    def to_config(self) -> LlamaConfig:
        """The ``LlamaConfig`` of this spec, with the byte tokenizer's vocabulary and ids."""
        return LlamaConfig(
            vocab_size=VOCAB_SIZE,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            max_position_embeddings=self.max_position_embeddings,
            initializer_range=_INIT_STD,
            bos_token_id=BOS_ID,
            eos_token_id=EOS_ID,
            pad_token_id=PAD_ID,
            # Separate input and output embeddings, as in the Llama 3 checkpoints this stands in
            # for (and LoRA's all-linear targeting leaves lm_head alone either way).
            tie_word_embeddings=False,
        )


class PretrainResult(TypedDict):
    """What :func:`pretrain_tiny` returns."""

    #: Mean causal-LM loss (nats/token) on a fixed sample of windows, before training.
    initial_loss: float
    #: The same, after training.
    final_loss: float
    steps: int
    #: Wall-clock seconds of the training loop and both evaluations (not loading/saving).
    seconds: float


# ---------------------------------------------------------------------------------------------
# Atomic directory writes


@contextlib.contextmanager
def _staging_dir(target: Path) -> Iterator[Path]:
    """A fresh hidden directory next to ``target`` (same filesystem, so renames are atomic).

    Removed if the body raises; otherwise the caller publishes it with :func:`_publish`.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        # mkdtemp makes it private (0700); a published model directory is ordinary shared data.
        staging.chmod(0o755)
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _fsync_tree(directory: Path) -> None:
    """Flush every file of ``directory`` (and the directory) so the rename publishes data that
    survives a power loss, not just a process crash."""
    for path in directory.iterdir():
        if path.is_file():
            with path.open("rb") as f:
                os.fsync(f.fileno())
    with contextlib.suppress(OSError):  # directories cannot be opened for fsync on Windows
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _publish(staging: Path, target: Path, *, replace: bool) -> bool:
    """Rename the complete ``staging`` directory to ``target``.

    If ``target`` exists and ``replace`` is true, the old directory is first renamed aside and
    deleted afterwards; if ``replace`` is false, ``staging`` is deleted and ``target`` kept
    (another process published the same content first). Returns whether ``staging`` was used.
    """
    _fsync_tree(staging)
    try:
        os.rename(staging, target)
        return True
    except OSError:
        if not target.exists():
            shutil.rmtree(staging, ignore_errors=True)
            raise
    if not replace:
        shutil.rmtree(staging, ignore_errors=True)
        return False
    # Two renames: between them `target` is briefly absent, but never partial.
    trash = target.with_name(f".{target.name}.old-{uuid.uuid4().hex}")
    os.rename(target, trash)
    os.rename(staging, target)
    shutil.rmtree(trash, ignore_errors=True)
    return True


# ---------------------------------------------------------------------------------------------
# Building


def _tensor_seed_bytes(seed: int, name: str, nbytes: int) -> bytes:
    """``nbytes`` pseudo-random bytes for one tensor, a pure function of (seed, name).

    SHAKE-256 is fully specified, so the initial weights are bit-identical on every platform
    and torch version (torch's own normal sampler uses vectorised math that may differ in the
    last bit between CPUs), and each tensor's values do not depend on which others exist.
    """
    return hashlib.shake_256(f"fedsrd-tiny-init-v1\0{seed}\0{name}".encode()).digest(nbytes)


def _init_weights(model: PreTrainedModel, seed: int, *, pad_id: int = PAD_ID) -> None:
    """Deterministic Llama-style initialisation: norms at 1, everything else uniform with
    standard deviation :data:`_INIT_STD`, the padding row ``pad_id`` of the embedding at 0."""
    half_width = _INIT_STD * math.sqrt(3.0)  # U(-a, a) has std a / sqrt(3)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                param.fill_(1.0)
                continue
            n = param.numel()
            words = np.frombuffer(_tensor_seed_bytes(seed, name, 4 * n), dtype="<u4")
            # (k + 0.5) / 2^32 is exact in float64, so the values are exact functions of the
            # bytes; the final rounding to float32 is IEEE and therefore platform independent.
            unit = (words.astype(np.float64) + 0.5) * (2.0 / 2.0**32) - 1.0
            values = torch.from_numpy((unit * half_width).astype(np.float32))
            param.copy_(values.reshape(param.shape))
        embed = model.get_input_embeddings()
        if not isinstance(embed, torch.nn.Embedding):  # pragma: no cover - Llama's is one
            raise TypeError(f"unexpected input embedding module {type(embed).__name__}")
        embed.weight[pad_id].zero_()  # as Llama does for padding_idx: padding adds nothing


def _write_metadata(directory: Path, metadata: dict[str, Any]) -> None:
    text = json.dumps(metadata, indent=2, sort_keys=True)
    (directory / METADATA_FILE).write_text(text + "\n", encoding="utf-8")


def _read_metadata(directory: Path) -> dict[str, Any]:
    try:
        data = json.loads((directory / METADATA_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_tiny_model(directory: Path, spec: TinyModelSpec) -> str:
    """Write the freshly initialised model and tokenizer into ``directory``; its fingerprint."""
    # The constructor runs transformers' random init, which draws from the global RNG; fork it
    # so building a model does not shift the caller's random stream (we overwrite it anyway).
    with torch.random.fork_rng(devices=[]):
        model = LlamaForCausalLM(spec.to_config())
    _init_weights(model, spec.seed)
    model.eval()  # type: ignore[no-untyped-call]
    model.save_pretrained(directory, safe_serialization=True)
    build_byte_tokenizer(model_max_length=spec.max_position_embeddings).save_pretrained(directory)
    fingerprint = model_fingerprint(model)
    _write_metadata(
        directory,
        {
            "format_version": TINY_FORMAT_VERSION,
            "spec": dataclasses.asdict(spec),
            "num_parameters": sum(p.numel() for p in model.parameters()),
            "fingerprint": fingerprint,
            "pretrain": None,
            "versions": _versions(),
        },
    )
    return fingerprint


def _versions() -> dict[str, str]:
    return {"torch": torch.__version__, "transformers": transformers.__version__}


def build_tiny_model(directory: str | Path, spec: TinyModelSpec = TinyModelSpec()) -> Path:
    """Build the tiny Llama model for ``spec`` and save it with its tokenizer to ``directory``.

    The weights are a pure function of ``spec`` (see :func:`_init_weights`): the same spec
    gives bit-identical weights, and so the same :func:`~.loading.model_fingerprint`, on every
    run. The directory (replaced atomically if it exists) loads offline with
    ``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained``; it also
    holds :data:`METADATA_FILE`. Returns ``Path(directory)``.
    """
    target = Path(directory)
    with _staging_dir(target) as staging:
        _write_tiny_model(staging, spec)
        _publish(staging, target, replace=True)
    return target


# ---------------------------------------------------------------------------------------------
# Pre-training


def _validate_pretrain_args(
    texts: Sequence[str], steps: int, batch_size: int, seq_len: int, lr: float
) -> None:
    if isinstance(texts, str):
        raise TypeError("`texts` must be a sequence of strings, not a single string")
    if not texts or not all(isinstance(t, str) for t in texts):
        raise ValueError("`texts` must be a non-empty sequence of strings")
    for name, value, minimum in (("steps", steps, 1), ("batch_size", batch_size, 1)):
        if value < minimum:
            raise ValueError(f"`{name}` must be >= {minimum}, got {value}")
    if seq_len < 2:
        raise ValueError(f"`seq_len` must be >= 2, got {seq_len}")
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"`lr` must be a positive finite number, got {lr}")


def _token_stream(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], min_len: int
) -> torch.Tensor:
    """All texts as one token stream, each followed by EOS (as fine-tuning ends responses),
    repeated as needed so it holds at least ``min_len`` tokens."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token")
    encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    stream: list[int] = [tok for ids in encoded for tok in (*ids, eos)]
    if len(stream) < min_len:
        stream *= -(-min_len // len(stream))
    return torch.tensor(stream, dtype=torch.long)


def _windows(stream: torch.Tensor, starts: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The ``(len(starts), seq_len)`` batch of ``stream`` slices beginning at ``starts``."""
    return stream[starts.unsqueeze(1) + torch.arange(seq_len)]


def _mean_loss(model: PreTrainedModel, batches: Sequence[torch.Tensor]) -> float:
    model.eval()  # type: ignore[no-untyped-call]
    with torch.no_grad():
        losses = [float(model(input_ids=x, labels=x).loss) for x in batches]
    return sum(losses) / len(losses)


def _pretrain(
    source: Path,
    destination: Path,
    texts: Sequence[str],
    *,
    steps: int,
    batch_size: int,
    seq_len: int,
    lr: float,
    seed: int,
) -> PretrainResult:
    """Train the model in ``source`` and save it to ``destination`` (a different directory: the
    loaded weights may be memory-mapped from ``source``'s files)."""
    _validate_pretrain_args(texts, steps, batch_size, seq_len, lr)
    model, tokenizer = load_causal_lm(str(source), dtype="fp32", device="cpu")
    max_positions = int(model.config.max_position_embeddings)
    if seq_len > max_positions:
        raise ValueError(f"`seq_len` ({seq_len}) exceeds max_position_embeddings {max_positions}")
    stream = _token_stream(tokenizer, texts, seq_len + 1)
    num_starts = len(stream) - seq_len + 1
    # A private generator: the data order is a function of `seed` alone, and the caller's
    # global RNG is neither used nor disturbed.
    gen = torch.Generator().manual_seed(seed)
    # A fixed sample of windows (drawn from the same texts) to measure the loss on before and
    # after: comparable numbers, unlike the noisy loss of individual training batches.
    eval_batches = [
        _windows(stream, torch.randint(num_starts, (batch_size,), generator=gen), seq_len)
        for _ in range(4)
    ]
    started = time.perf_counter()
    initial_loss = _mean_loss(model, eval_batches)

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    warmup = max(1, steps // 10)

    def lr_factor(step: int) -> float:
        # Linear warm-up (a fresh model takes large first steps at a high lr), then a cosine
        # decay to 10% so the last steps settle instead of bouncing.
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    model.train()
    for _ in range(steps):
        starts = torch.randint(num_starts, (batch_size,), generator=gen)
        x = _windows(stream, starts, seq_len)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    final_loss = _mean_loss(model, eval_batches)
    seconds = time.perf_counter() - started

    model.save_pretrained(destination, safe_serialization=True)
    tokenizer.save_pretrained(destination)
    result = PretrainResult(
        initial_loss=initial_loss, final_loss=final_loss, steps=steps, seconds=seconds
    )
    metadata = _read_metadata(source)
    metadata.update(
        fingerprint=model_fingerprint(model),
        pretrain={
            "num_texts": len(texts),
            "texts_sha256": _texts_digest(texts),
            "batch_size": batch_size,
            "seq_len": seq_len,
            "lr": lr,
            "seed": seed,
            **result,
        },
        versions=_versions(),
    )
    _write_metadata(destination, metadata)
    return result


def pretrain_tiny(
    directory: str | Path,
    texts: Sequence[str],
    *,
    steps: int = 200,
    batch_size: int = 16,
    seq_len: int = 128,
    lr: float = 3e-3,
    seed: int = 0,
) -> PretrainResult:
    """Briefly pre-train the (tiny) model in ``directory`` on ``texts`` and save it back.

    Full-parameter causal-LM training with AdamW (betas 0.9/0.95, no weight decay, gradient
    clipping at 1, linear warm-up over the first 10% of steps then cosine decay to ``lr / 10``)
    on random ``seq_len``-token windows of all texts concatenated, each text followed by EOS.
    Runs on CPU in fp32; deterministic given ``seed`` on the same machine and library versions
    (CPU kernels may round differently on other hardware or thread counts).

    The directory is replaced atomically. Returns the mean loss on a fixed sample of
    ``4 * batch_size`` windows before and after training, the step count and the seconds spent.
    """
    target = Path(directory)
    with _staging_dir(target) as staging:
        result = _pretrain(
            target,
            staging,
            texts,
            steps=steps,
            batch_size=batch_size,
            seq_len=seq_len,
            lr=lr,
            seed=seed,
        )
        _publish(staging, target, replace=True)
    return result


# ---------------------------------------------------------------------------------------------
# Cache


def _texts_digest(texts: Sequence[str]) -> str:
    h = hashlib.sha256()
    h.update(struct.pack("<Q", len(texts)))
    for text in texts:
        data = text.encode("utf-8")
        h.update(struct.pack("<Q", len(data)) + data)  # length-prefixed: ["ab"] != ["a", "b"]
    return h.hexdigest()


def tiny_model_dir(
    cache_dir: str | Path,
    spec: TinyModelSpec,
    texts: Sequence[str],
    *,
    steps: int = 200,
    batch_size: int = 16,
    seq_len: int = 128,
    lr: float = 3e-3,
) -> Path:
    """The directory of the tiny model for ``spec`` pre-trained on ``texts``, built once.

    The result lives in ``cache_dir/tiny-llama-<key>``, ``key`` a hash of the format version,
    the spec, the texts and the pre-training settings (pre-training uses ``spec.seed``). An
    existing complete entry is reused as is; otherwise it is built and pre-trained in a
    staging directory and published with one rename, so concurrent callers are safe (the first
    to finish wins, the others discard their copy). Entries are not keyed by library versions:
    a cache filled by another torch version is reused (its :data:`METADATA_FILE` records the
    versions and the fingerprint).
    """
    _validate_pretrain_args(texts, steps, batch_size, seq_len, lr)
    key_material = {
        "format_version": TINY_FORMAT_VERSION,
        "spec": dataclasses.asdict(spec),
        "texts_sha256": _texts_digest(texts),
        "steps": steps,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "lr": lr,
    }
    key = hashlib.sha256(json.dumps(key_material, sort_keys=True).encode()).hexdigest()
    target = Path(cache_dir) / f"tiny-llama-{key[:20]}"
    if _is_complete(target, key):
        return target
    with _staging_dir(target) as built, _staging_dir(target) as trained:
        try:
            _write_tiny_model(built, spec)
            _pretrain(
                built,
                trained,
                texts,
                steps=steps,
                batch_size=batch_size,
                seq_len=seq_len,
                lr=lr,
                seed=spec.seed,
            )
            metadata = _read_metadata(trained)
            metadata["cache_key"] = key
            _write_metadata(trained, metadata)
        finally:
            shutil.rmtree(built, ignore_errors=True)
        # Replace only an entry that is not a complete one of ours (e.g. left by hand).
        _publish(trained, target, replace=not _is_complete(target, key))
    return target


def _is_complete(directory: Path, key: str) -> bool:
    return (directory / "model.safetensors").is_file() and _read_metadata(directory).get(
        "cache_key"
    ) == key
