"""The instruction-tuning record shared by the generators, the loader and the training code."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

_REQUIRED = ("instruction", "output")
_OPTIONAL = ("input", "domain")


@dataclass(frozen=True)
class Example:
    """One instruction-tuning example (Alpaca fields) and the domain it was drawn from.

    Attributes:
        instruction: the task; empty (together with ``input``) for a plain-text document.
        input: optional context for the task ("" when there is none).
        output: the reference response; the loss and the exact-match metric use it.
        domain: the generator or client domain ("" when unknown, e.g. a loaded file).
    """

    instruction: str
    input: str
    output: str
    domain: str = ""

    def __post_init__(self) -> None:
        # Frozen records are shared between clients and threads; catching a non-string here
        # beats a confusing tokenizer error many calls later.
        for name in (*_REQUIRED, *_OPTIONAL):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise TypeError(f"Example.{name} must be a str, got {type(value).__name__}")

    @property
    def is_plain_text(self) -> bool:
        """True for a plain-text document: no instruction and no input, loss on all text."""
        return self.instruction == "" and self.input == ""

    def to_dict(self) -> dict[str, str]:
        """The four fields as a JSON-ready dict (the ``save_jsonl`` line format)."""
        return {
            "instruction": self.instruction,
            "input": self.input,
            "output": self.output,
            "domain": self.domain,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Example:
        """Build an example from a mapping, validating it.

        ``instruction`` and ``output`` are required strings, ``input`` and ``domain`` optional
        strings (default ""); other keys are ignored (e.g. the ``text`` column some Alpaca
        exports carry). Raises ``ValueError`` with a message naming the offending field; the
        file loader prefixes it with the file and line.
        """
        for name in _REQUIRED:
            if name not in data:
                raise ValueError(f"missing field {name!r}")
        values: dict[str, str] = {}
        for name in (*_REQUIRED, *_OPTIONAL):
            value = data.get(name, "")
            if not isinstance(value, str):
                raise ValueError(f"field {name!r} must be a string, got {json_type_name(value)}")
            values[name] = value
        if not values["output"].strip():
            raise ValueError("field 'output' is empty")
        if not values["instruction"] and values["input"]:
            # An input without an instruction would render as an Alpaca prompt with an empty
            # "### Instruction:" section: almost certainly a column mix-up in the source file.
            raise ValueError("field 'instruction' is empty but 'input' is not")
        return cls(**values)


def json_type_name(value: object) -> str:
    """The JSON name of a decoded value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, Mapping):
        return "object"
    return type(value).__name__
