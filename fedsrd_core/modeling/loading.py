"""Loading any Hugging Face causal LM, offline by default, and fingerprinting its weights.

Downloads are off unless asked for. With ``allow_download=False`` a hub id is first resolved
to its snapshot directory in the local Hugging Face cache by a file-system lookup, and
transformers is only ever handed local directories (with ``local_files_only=True``), so a
model that is neither a local directory nor already cached fails fast with
:class:`ModelLoadError` and nothing touches the network.

Remote code (``trust_remote_code``) is never enabled: a model that needs it fails to load
rather than executing code that came with the weights.
"""

from __future__ import annotations

import hashlib
import json
import struct
import sys
from pathlib import Path
from typing import Any, Final, Literal, get_args

import torch
from huggingface_hub import constants as hf_constants
from huggingface_hub import try_to_load_from_cache
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

__all__ = [
    "VOLATILE_CONFIG_KEYS",
    "ModelDType",
    "ModelLoadError",
    "default_device",
    "fingerprint_directory",
    "load_causal_lm",
    "load_tokenizer",
    "model_fingerprint",
    "torch_dtype",
]

#: The precision a base model is loaded in.
ModelDType = Literal["fp32", "bf16", "fp16"]

_TORCH_DTYPES: Final[dict[str, torch.dtype]] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}

#: Config keys left out of :func:`model_fingerprint`, at every nesting level (sub-configs of
#: multimodal models included), besides every key starting with ``"_"`` (private bookkeeping
#: such as ``_name_or_path``, ``_commit_hash``, ``_attn_implementation*``). They either change
#: between saving and loading the same weights (``architectures`` is filled in by
#: ``save_pretrained``; ``dtype``/``torch_dtype`` by the load precision, which the tensor
#: dtypes already capture; ``transformers_version`` by the installed library) or are runtime
#: switches that training code flips without changing what the model computes (``use_cache``
#: is commonly turned off for gradient checkpointing).
VOLATILE_CONFIG_KEYS: Final[frozenset[str]] = frozenset(
    {
        "architectures",
        "dtype",
        "torch_dtype",
        "transformers_version",
        "use_cache",
        "return_dict",
        "output_attentions",
        "output_hidden_states",
        "torchscript",
    }
)

_FINGERPRINT_DOMAIN: Final = b"fedsrd-model-v1"


class ModelLoadError(ValueError):
    """A base model or its tokenizer cannot be loaded (missing, not a causal LM, bad option).

    The message says everything (where the model was looked for, the underlying error);
    ``reason`` says what went wrong without a single file-system path, for a server to tell
    a remote user (a cache directory's location is none of their business)."""

    def __init__(self, message: str, *, reason: str = "it does not load") -> None:
        super().__init__(message)
        self.reason = reason


def torch_dtype(dtype: ModelDType) -> torch.dtype:
    """The ``torch.dtype`` for a :data:`ModelDType` name; :class:`ModelLoadError` if unknown."""
    try:
        return _TORCH_DTYPES[dtype]
    except KeyError:
        raise ModelLoadError(
            f"unknown model dtype {dtype!r}; expected one of {list(get_args(ModelDType))}"
        ) from None


def default_device() -> str:
    """``"cuda"`` when a CUDA device is available, else ``"cpu"``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def _resolve_device(device: str | None) -> torch.device:
    name = default_device() if device is None else device
    try:
        resolved = torch.device(name)
    except (RuntimeError, ValueError) as e:
        raise ModelLoadError(f"invalid device {name!r}: {e}") from e
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {name!r} requested but CUDA is not available")
    return resolved


def _cached_snapshot(repo_id: str) -> Path | None:
    """The local snapshot directory of a hub model already in the Hugging Face cache, or None.

    A pure file-system lookup. Passing a hub id to ``from_pretrained`` even with
    ``local_files_only=True`` is not network-free: huggingface_hub builds request headers,
    which (in recent versions) fetches a registry from the Hub unless ``HF_HUB_OFFLINE`` was
    set before it was imported. So with downloads off, transformers only ever sees directories.
    """
    try:
        found = try_to_load_from_cache(repo_id, "config.json")
    except (ValueError, OSError):  # not a valid repo id (e.g. a missing absolute path)
        return None
    return Path(found).parent if isinstance(found, str) else None


def _locate(name_or_path: str, allow_download: bool) -> str:
    """What to pass to ``from_pretrained``: a local directory unless downloads are allowed."""
    if allow_download or Path(name_or_path).is_dir():
        return name_or_path
    snapshot = _cached_snapshot(name_or_path)
    if snapshot is None:
        raise ModelLoadError(
            f"cannot load {name_or_path!r}: it is neither a local directory nor a model in the "
            f"local Hugging Face cache ({hf_constants.HF_HUB_CACHE}), and downloads are disabled "
            "(pass a local directory, fill the cache first with `hf download "
            f"{name_or_path}`, or allow downloads: `fedsrd simulate --allow-download`, "
            "`fedsrd-agent --allow-download`, `allow_download=True` in Python)",
            reason="it is neither a local directory nor a model in the local Hugging Face cache",
        )
    return str(snapshot)


def _failure(name_or_path: str, location: str, what: str) -> str:
    """The start of a ModelLoadError message: what failed, and where it was looked for."""
    if location != name_or_path:
        return f"cannot load the {what} of {name_or_path!r} from its cached copy {location!r}"
    if Path(location).is_dir():
        return f"cannot load the {what} from local directory {name_or_path!r}"
    return f"cannot load the {what} of {name_or_path!r} from the Hugging Face Hub"


def _load_config(name_or_path: str, location: str, allow_download: bool) -> PretrainedConfig:
    try:
        config = AutoConfig.from_pretrained(location, local_files_only=not allow_download)
    except (OSError, ValueError, KeyError) as e:
        # OSError: not found / not reachable; ValueError: no or unknown `model_type`;
        # KeyError: a model_type this transformers version does not know.
        raise ModelLoadError(
            f"{_failure(name_or_path, location, 'config')}: {e}", reason="its config does not load"
        ) from e
    if not isinstance(config, PretrainedConfig):  # pragma: no cover - defensive
        raise ModelLoadError(f"{name_or_path!r} did not load as a PretrainedConfig")
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        kind = f"{type(config).__name__}, model_type {config.model_type!r}"
        raise ModelLoadError(
            f"{name_or_path!r} is not a causal language model: its config class "
            f"{type(config).__name__} (model_type {config.model_type!r}) has no "
            "AutoModelForCausalLM head",
            reason=f"it is not a causal language model ({kind})",
        )
    return config


def _load_model(
    name_or_path: str,
    location: str,
    dtype: torch.dtype,
    device: torch.device,
    allow_download: bool,
) -> PreTrainedModel:
    config = _load_config(name_or_path, location, allow_download)
    try:
        # device_map places the weights straight on the target device, so a large model never
        # needs a full copy in host memory on its way to the GPU.
        model = AutoModelForCausalLM.from_pretrained(
            location,
            config=config,
            dtype=dtype,
            device_map=str(device),
            local_files_only=not allow_download,
        )
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        # RuntimeError: e.g. shapes in the checkpoint that disagree with its config.
        raise ModelLoadError(
            f"{_failure(name_or_path, location, 'model weights')}: {e}",
            reason="its weights do not load",
        ) from e
    if not isinstance(model, PreTrainedModel):  # pragma: no cover - defensive
        raise ModelLoadError(f"{name_or_path!r} did not load as a PreTrainedModel")
    model.eval()  # type: ignore[no-untyped-call]
    return model


def load_causal_lm(
    name_or_path: str,
    *,
    dtype: ModelDType = "fp32",
    device: str | None = None,
    allow_download: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer by local directory or Hugging Face Hub id.

    Args:
        name_or_path: a directory written by ``save_pretrained`` or a hub id (``org/name``).
        dtype: precision of the loaded weights.
        device: where the weights go; ``None`` means ``"cuda"`` when available, else ``"cpu"``.
        allow_download: allow fetching from the Hub. Off by default, so only local directories
            and models already in the local Hugging Face cache load, and nothing touches the
            network.

    Returns:
        ``(model, tokenizer)``, the model in eval mode. If the tokenizer has no pad token, its
        EOS token is used as the pad token (only the tokenizer is changed, never the model's
        config, so :func:`model_fingerprint` is unaffected).

    Raises:
        ModelLoadError: the model is not found locally (and downloads are off), is not a causal
            LM, has no usable tokenizer, or ``dtype``/``device`` is invalid. The message names
            ``name_or_path``.
    """
    resolved_dtype = torch_dtype(dtype)
    resolved_device = _resolve_device(device)
    location = _locate(name_or_path, allow_download)
    model = _load_model(name_or_path, location, resolved_dtype, resolved_device, allow_download)
    return model, _load_tokenizer(name_or_path, location, allow_download)


def load_tokenizer(name_or_path: str, *, allow_download: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer of a causal LM, as :func:`load_causal_lm` returns it (no weights loaded).

    Raises:
        ModelLoadError: as :func:`load_causal_lm`, for the tokenizer.
    """
    location = _locate(name_or_path, allow_download)
    return _load_tokenizer(name_or_path, location, allow_download)


def _load_tokenizer(
    name_or_path: str, location: str, allow_download: bool
) -> PreTrainedTokenizerBase:
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, local_files_only=not allow_download)
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(
            f"{_failure(name_or_path, location, 'tokenizer')}: {e}",
            reason="its tokenizer does not load",
        ) from e
    if tokenizer.pad_token is None:
        # Batched training pads; labels of padded positions are masked, so which token pads
        # does not matter as long as it exists. EOS is the usual choice for decoder-only LMs.
        if tokenizer.eos_token is None:
            raise ModelLoadError(
                f"the tokenizer of {name_or_path!r} has neither a pad nor an EOS token"
            )
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _canonical_config(value: Any) -> Any:
    """The config dict without volatile keys (recursively), with JSON-safe values."""
    if isinstance(value, dict):
        return {
            str(k): _canonical_config(v)
            for k, v in value.items()
            if not (str(k).startswith("_") or str(k) in VOLATILE_CONFIG_KEYS)
        }
    if isinstance(value, list | tuple):
        return [_canonical_config(v) for v in value]
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, set | frozenset):
        return sorted((_canonical_config(v) for v in value), key=repr)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    # An object's default str() may contain its memory address, which would make the digest
    # differ between runs; refuse instead of hashing something unstable.
    raise TypeError(f"config value of type {type(value).__name__} is not JSON-serialisable")


def _le_bytes(t: torch.Tensor) -> torch.Tensor:
    """The tensor's raw bytes, row-major and little-endian, as a 1-D uint8 CPU tensor."""
    if t.device.type == "meta":
        raise ValueError("cannot fingerprint a tensor on the meta device (offloaded weights?)")
    if t.is_quantized:
        raise ValueError(f"cannot fingerprint quantized tensors ({t.dtype})")
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    if flat.numel() == 0:
        return torch.empty(0, dtype=torch.uint8)
    raw = flat.view(torch.uint8)
    if sys.byteorder == "big":  # pragma: no cover - no big-endian CI machine
        # Complex numbers are two floats, each byte-swapped on its own.
        width = flat.element_size() // (2 if flat.is_complex() else 1)
        if width > 1:
            raw = raw.view(-1, width).flip(1).reshape(-1)
    return raw


def _length_prefixed(data: bytes) -> bytes:
    return struct.pack("<Q", len(data)) + data


def model_fingerprint(model: PreTrainedModel) -> str:
    """SHA-256 (hex) identifying a base model's config and weights, the same on every platform.

    The hashed byte string, after the domain tag ``b"fedsrd-model-v1"``, is (``u64`` = 8-byte
    little-endian unsigned, ``bytes(x)`` = ``u64`` length then the bytes of ``x``):

    * ``bytes(config)``: ``model.config.to_dict()`` without the keys of
      :data:`VOLATILE_CONFIG_KEYS` and any key starting with ``"_"``, at every nesting level,
      as compact JSON (``sort_keys=True``, ``separators=(",", ":")``, ASCII) in UTF-8;
    * ``u64`` number of entries of ``model.state_dict()`` (parameters and *persistent* buffers;
      non-persistent buffers such as rotary ``inv_freq`` are derived from the config), then for
      each entry in sorted name order: ``bytes(name)``, ``bytes(dtype)`` (e.g. ``"float32"``,
      ``"bfloat16"``), ``u64`` ndim, ``u64`` per dimension, and ``bytes(data)``: the tensor's
      row-major little-endian raw bytes on CPU (bf16/fp16 by their 16-bit patterns).

    The same weights in the same dtype give the same digest wherever they live (any device, any
    host byte order) and after a ``save_pretrained``/``from_pretrained`` round trip; a changed
    weight, shape, dtype or architecture hyperparameter gives a different one. The dtype is
    part of the identity, so compare models loaded in the same precision. Fingerprint the base
    model *before* attaching adapters (PEFT renames and adds parameters).
    """
    config_json = json.dumps(
        _canonical_config(model.config.to_dict()),
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=True,
    )
    h = hashlib.sha256(_FINGERPRINT_DOMAIN)
    h.update(_length_prefixed(config_json.encode("utf-8")))
    state = model.state_dict()
    h.update(struct.pack("<Q", len(state)))
    for name in sorted(state):
        t = state[name]
        h.update(_length_prefixed(name.encode("utf-8")))
        h.update(_length_prefixed(str(t.dtype).removeprefix("torch.").encode("ascii")))
        h.update(struct.pack(f"<{1 + t.dim()}Q", t.dim(), *t.shape))
        raw = _le_bytes(t)
        h.update(struct.pack("<Q", raw.numel()))
        if raw.numel():
            # hashlib reads the numpy view through the buffer protocol: no extra copy.
            h.update(raw.numpy().data)
    return h.hexdigest()


def fingerprint_directory(path: str | Path) -> str:
    """:func:`model_fingerprint` of the model loaded from ``path`` in fp32 on CPU, offline.

    ``path`` is a local directory, or a hub id already in the local Hugging Face cache.

    Loading (rather than hashing the safetensors files) makes the digest agree with the one a
    client computes on its loaded model: the state dict after loading can differ from the
    files' tensors (tied weights are stored once, some checkpoints rename weights on load, a
    bf16 checkpoint becomes fp32). It costs one fp32 copy of the model in host memory.
    Raises :class:`ModelLoadError` if ``path`` cannot be loaded.
    """
    location = _locate(str(path), allow_download=False)
    model = _load_model(str(path), location, torch.float32, torch.device("cpu"), False)
    return model_fingerprint(model)
