"""Base models: the offline tiny Llama model, its byte tokenizer, loading and fingerprinting.

* :mod:`.tokenizer`: :func:`build_byte_tokenizer`, a 260-token byte-level tokenizer.
* :mod:`.tiny`: :func:`build_tiny_model`, :func:`pretrain_tiny` and :func:`tiny_model_dir`, a
  small Llama-architecture model built and pre-trained locally (no download).
* :mod:`.loading`: :func:`load_causal_lm` for any Hugging Face causal LM (offline unless
  asked), and :func:`model_fingerprint` / :func:`fingerprint_directory`, which let a client
  prove it trains the same base model as the run.
"""

from fedsrd_core.modeling.loading import (
    VOLATILE_CONFIG_KEYS,
    ModelDType,
    ModelLoadError,
    default_device,
    fingerprint_directory,
    load_causal_lm,
    load_tokenizer,
    model_fingerprint,
    torch_dtype,
)
from fedsrd_core.modeling.tiny import (
    METADATA_FILE,
    TINY_FORMAT_VERSION,
    PretrainResult,
    TinyModelSpec,
    build_tiny_model,
    pretrain_tiny,
    tiny_model_dir,
)
from fedsrd_core.modeling.tokenizer import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    UNK_ID,
    VOCAB_SIZE,
    build_byte_tokenizer,
)

__all__ = [
    "BOS_ID",
    "EOS_ID",
    "METADATA_FILE",
    "PAD_ID",
    "TINY_FORMAT_VERSION",
    "UNK_ID",
    "VOCAB_SIZE",
    "VOLATILE_CONFIG_KEYS",
    "ModelDType",
    "ModelLoadError",
    "PretrainResult",
    "TinyModelSpec",
    "build_byte_tokenizer",
    "build_tiny_model",
    "default_device",
    "fingerprint_directory",
    "load_causal_lm",
    "load_tokenizer",
    "model_fingerprint",
    "pretrain_tiny",
    "tiny_model_dir",
    "torch_dtype",
]
