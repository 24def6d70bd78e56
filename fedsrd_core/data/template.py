"""The Alpaca prompt template (Taori et al., 2023), used for training and for evaluation."""

from __future__ import annotations

from typing import Any

from fedsrd_core.data.examples import Example

# The two headers of the Alpaca template, verbatim. The prompt is assembled by concatenation
# rather than str.format or str.replace, so braces or a literal "{input}" inside an
# instruction stay as they are.
HEADER_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
)
HEADER_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n"
)


def format_prompt(instruction: str, input: str) -> str:
    """The Alpaca prompt for ``instruction`` and ``input`` (the no-input variant when "").

    The prompt ends with ``"### Response:\\n"``; the response follows directly.
    """
    if input:
        return (
            f"{HEADER_WITH_INPUT}### Instruction:\n{instruction}\n\n"
            f"### Input:\n{input}\n\n### Response:\n"
        )
    return f"{HEADER_NO_INPUT}### Instruction:\n{instruction}\n\n### Response:\n"


def prompt_and_response(ex: Example) -> tuple[str, str]:
    """``(prompt, response)`` for ``ex``: the loss goes on the response only.

    A plain-text example (empty instruction and input) has the empty prompt, so the loss
    covers the whole text.
    """
    if ex.is_plain_text:
        return "", ex.output
    return format_prompt(ex.instruction, ex.input), ex.output


def shortest_seq_len(tokenizer: Any) -> int:
    """The smallest ``seq_len`` that holds the template and one response token.

    That is the tokens of the no-input prompt with an empty instruction, tokenised as
    training tokenises prompts (no special tokens), plus one: with less, truncation leaves no
    response token of any instruction example to train or evaluate on. ``tokenizer`` is a
    Hugging Face tokenizer (this package imports none).
    """
    ids = tokenizer(format_prompt("", ""), add_special_tokens=False)["input_ids"]
    return len(ids) + 1
