"""Loading instruction data from files (JSON lines or plain text) and saving it atomically.

A JSON line is one of three record formats, told apart by their keys:

* Alpaca: ``{"instruction", "input"?, "output", "domain"?}``, the project's own;
* chat: ``{"messages": [{"role", "content"}, ...]}`` (the OpenAI / TRL conversational
  format): the last message is the assistant's answer, the loss goes on it alone; the user
  message before it becomes the instruction, a leading system message is prepended to it,
  and earlier turns become the input as ``User: ...`` / ``Assistant: ...`` lines;
* prompt-completion: ``{"prompt", "completion"}`` (strings): the prompt becomes the
  instruction, the completion the output.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path

from fedsrd_core.data.examples import Example, json_type_name

_JSON_SUFFIXES = (".jsonl", ".json")
#: Table formats read as plain text would be one meaningless document: refused by name.
_TABLE_SUFFIXES = (".csv", ".tsv", ".parquet", ".xlsx", ".xls", ".arrow")
_FORMATS = (
    '{"instruction", "output"} (Alpaca), {"messages": [...]} (chat) or {"prompt", "completion"}'
)
_ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """A data file that cannot be used; the message names the file (and line, if any)."""


def load_examples(path: str | Path) -> list[Example]:
    """Load examples from ``path``.

    ``.jsonl`` / ``.json``: one JSON object per non-blank line with string fields
    ``instruction`` and ``output`` (required, ``output`` non-empty) and ``input`` and
    ``domain`` (optional, default ""); other keys are ignored. A ``.json`` file holding one
    top-level JSON array of such objects (the layout of the original Alpaca release) is
    accepted as well.

    Each line may instead be a chat record ``{"messages": [...]}`` or a prompt-completion
    record ``{"prompt", "completion"}`` (see the module docstring for how they map).

    Table formats (``.csv``, ``.tsv``, ``.parquet``, ...) are refused: convert them to JSON
    lines. Any other suffix (e.g. ``.txt``): plain text, split into documents on blank
    lines; each document becomes ``Example("", "", document)``, trained with the loss on all
    of it.

    Raises:
        DataError: unreadable file, no examples, or an invalid line; the message starts with
            ``"{path}:{line}: "`` for a problem on a line.
    """
    path = Path(path)
    try:
        # utf-8-sig: tolerate the byte-order mark some editors write; newline=None (default)
        # turns \r\n into \n so documents split the same on every platform.
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    if path.suffix.lower() in _TABLE_SUFFIXES:
        raise DataError(
            f"{path}:1: {path.suffix} files are not read (as plain text every row would run "
            f"into one document): write one JSON object per line, {_FORMATS}"
        )
    if path.suffix.lower() in _JSON_SUFFIXES:
        if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
            examples = _parse_json_array(path, text)
        else:
            examples = _parse_json_lines(path, text)
    else:
        examples = _parse_text(text)
    if not examples:
        raise DataError(f"{path}: no examples (the file is empty)")
    return examples


def _parse_json_lines(path: Path, text: str) -> list[Example]:
    examples = []
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{path}:{lineno}: invalid JSON: {exc.msg} (column {exc.colno})"
            ) from exc
        examples.append(_to_example(obj, f"{path}:{lineno}"))
    return examples


def _parse_json_array(path: Path, text: str) -> list[Example]:
    try:
        items = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{path}:{exc.lineno}: invalid JSON: {exc.msg} (column {exc.colno})"
        ) from exc
    if not isinstance(items, list):
        raise DataError(f"{path}:1: expected a JSON array of objects")
    return [_to_example(obj, f"{path}: item {i}") for i, obj in enumerate(items)]


def _to_example(obj: object, where: str) -> Example:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {json_type_name(obj)}")
    try:
        if "messages" in obj:
            return _from_chat(obj)
        if "prompt" in obj or "completion" in obj:
            return _from_prompt_completion(obj)
        if "instruction" in obj or "output" in obj:
            return Example.from_dict(obj)
    except ValueError as exc:
        raise DataError(f"{where}: {exc}") from exc
    keys = ", ".join(repr(k) for k in list(obj)[:5]) or "none"
    raise DataError(f"{where}: unrecognised record (keys {keys}): expected {_FORMATS}")


def _domain(obj: dict[str, object]) -> str:
    domain = obj.get("domain", "")
    if not isinstance(domain, str):
        raise ValueError(f"field 'domain' must be a string, got {json_type_name(domain)}")
    return domain


def _from_prompt_completion(obj: dict[str, object]) -> Example:
    for name in ("prompt", "completion"):
        if name not in obj:
            raise ValueError(f"missing field {name!r}")
        if not isinstance(obj[name], str):
            raise ValueError(
                f"field {name!r} must be a string, got {json_type_name(obj[name])} "
                '(conversational prompts: use {"messages": [...]})'
            )
    prompt, completion = str(obj["prompt"]), str(obj["completion"])
    if not prompt.strip():
        raise ValueError("field 'prompt' is empty")
    if not completion.strip():
        raise ValueError("field 'completion' is empty")
    return Example(prompt, "", completion, _domain(obj))


def _from_chat(obj: dict[str, object]) -> Example:
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages:
        raise ValueError("field 'messages' must be a non-empty array of {role, content} objects")
    turns: list[tuple[str, str]] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}] must be an object, got {json_type_name(m)}")
        role, content = m.get("role"), m.get("content")
        if role not in _ROLES:
            raise ValueError(f"messages[{i}]: role must be one of {list(_ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise ValueError(
                f"messages[{i}]: content must be a string, got {json_type_name(content)}"
            )
        if role == "system" and i > 0:
            raise ValueError(f"messages[{i}]: a system message may only come first")
        turns.append((str(role), content))
    system = turns.pop(0)[1] if turns[0][0] == "system" else ""
    # The template has one response: the last assistant message, answering the user before it.
    if len(turns) < 2 or turns[-1][0] != "assistant" or turns[-2][0] != "user":
        raise ValueError("messages must end with a user message and the assistant's answer")
    if not turns[-1][1].strip():
        raise ValueError("the last assistant message is empty")
    if not turns[-2][1].strip():
        raise ValueError("the last user message is empty")
    instruction = f"{system}\n\n{turns[-2][1]}" if system.strip() else turns[-2][1]
    context = "\n".join(f"{role.capitalize()}: {text}" for role, text in turns[:-2])
    return Example(instruction, context, turns[-1][1], _domain(obj))


def _parse_text(text: str) -> list[Example]:
    # A blank line is one holding only whitespace; runs of them separate documents.
    documents = re.split(r"\n[ \t\f\v]*\n", text)
    return [Example("", "", doc.strip()) for doc in documents if doc.strip()]


def save_jsonl(examples: Iterable[Example], path: str | Path) -> None:
    """Write ``examples`` to ``path`` as JSON lines, atomically.

    The lines go to a temporary file in the same directory, which then replaces ``path``
    (``os.replace``), so a reader never sees a half-written file and a crash leaves the old
    file intact. Parent directories are created. Raises ``ValueError`` for no examples (the
    file could not be loaded back).
    """
    path = Path(path)
    lines = [json.dumps(ex.to_dict(), ensure_ascii=False) + "\n" for ex in examples]
    if not lines:
        raise ValueError(f"no examples to save to {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.writelines(lines)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # Leave no stray temporary file behind, whatever interrupted the write.
        Path(tmp).unlink(missing_ok=True)
        raise
