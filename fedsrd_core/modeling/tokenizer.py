"""A byte-level tokenizer built locally, so that the tiny offline model needs no download.

Token ids (vocabulary size :data:`VOCAB_SIZE` = 260):

* ``0..255``: the raw UTF-8 bytes, ``id == byte value``;
* ``256`` ``<pad>`` (:data:`PAD_ID`), ``257`` ``<s>`` (:data:`BOS_ID`),
  ``258`` ``</s>`` (:data:`EOS_ID`), ``259`` ``<unk>`` (:data:`UNK_ID`).

Encoding adds **no** special tokens: ``tok(text)["input_ids"]`` is exactly the UTF-8 bytes of
``text``. Callers that want an end-of-sequence marker append ``tok.eos_token_id`` (258)
themselves; the training code does this after every response. The special tokens are also
never produced from text: the literal string ``"</s>"`` inside a document encodes as its five
bytes, not as EOS (``split_special_tokens=True``), so data cannot forge a control token.

Decoding is the inverse for any sequence of byte ids that forms valid UTF-8; a sequence that
does not (e.g. a multi-byte character cut in half) decodes with U+FFFD replacement characters.
``<unk>`` exists for compatibility with code that expects one but is never produced, since
every byte has its own id.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

__all__ = [
    "BOS_ID",
    "BOS_TOKEN",
    "EOS_ID",
    "EOS_TOKEN",
    "PAD_ID",
    "PAD_TOKEN",
    "UNK_ID",
    "UNK_TOKEN",
    "VOCAB_SIZE",
    "build_byte_tokenizer",
]

PAD_TOKEN = "<pad>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
UNK_TOKEN = "<unk>"

PAD_ID = 256
BOS_ID = 257
EOS_ID = 258
UNK_ID = 259
VOCAB_SIZE = 260


def _byte_to_unicode() -> dict[int, str]:
    """The GPT-2 byte-level alphabet: one printable character for each of the 256 bytes.

    The ``tokenizers`` ByteLevel pre-tokenizer and decoder speak this alphabet, so the model's
    vocabulary has to be written in it. Printable Latin-1 bytes map to themselves; the other
    68 bytes (controls, space, a few Latin-1 gaps) map in increasing order to U+0100 onwards.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def build_byte_tokenizer(*, model_max_length: int | None = None) -> PreTrainedTokenizerFast:
    """Build the byte-level tokenizer described in the module docstring, entirely offline.

    ``model_max_length`` is recorded on the tokenizer (used by truncation); the tiny model
    passes its ``max_position_embeddings``. The result saves with ``save_pretrained(dir)`` and
    loads back with ``transformers.AutoTokenizer.from_pretrained(dir)`` to identical ids.
    """
    alphabet = _byte_to_unicode()
    # Byte-level BPE with no merges is exactly "one token per byte"; using the stock ByteLevel
    # components (rather than a custom model) keeps the tokenizer.json loadable by any
    # `tokenizers`/`transformers` install without our code.
    vocab = {alphabet[b]: b for b in range(256)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK_TOKEN))
    # use_regex=False: no word splitting, so whitespace runs and every byte survive unchanged;
    # add_prefix_space=False: nothing is inserted in front of the text.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    # Added in this order they get ids 256..259, after the bytes.
    backend.add_special_tokens([PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN])
    kwargs: dict[str, object] = {}
    if model_max_length is not None:
        if model_max_length < 1:
            raise ValueError(f"`model_max_length` must be >= 1, got {model_max_length}")
        kwargs["model_max_length"] = model_max_length
    tokenizer = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        # Special-token strings inside text are encoded as plain bytes (see module docstring).
        split_special_tokens=True,
        padding_side="right",
        **kwargs,
    )
    # Guard the documented id layout: the training code and the tiny model's config rely on it.
    ids = (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
    if ids != (PAD_ID, BOS_ID, EOS_ID) or tokenizer.unk_token_id != UNK_ID:
        raise RuntimeError(f"unexpected special-token ids {ids}, {tokenizer.unk_token_id}")
    if len(tokenizer) != VOCAB_SIZE:
        raise RuntimeError(f"unexpected vocabulary size {len(tokenizer)}")
    return tokenizer
