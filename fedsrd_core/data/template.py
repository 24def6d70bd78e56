"""The Alpaca prompt template (Taori et al., 2023), used for training and for evaluation."""

from __future__ import annotations

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
