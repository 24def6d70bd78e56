"""Loading instruction data from files (JSON lines or plain text) and saving it atomically."""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path

from fedsrd_core.data.examples import Example, json_type_name

_JSON_SUFFIXES = (".jsonl", ".json")


class DataError(ValueError):
    """A data file that cannot be used; the message names the file (and line, if any)."""


def load_examples(path: str | Path) -> list[Example]:
    """Load examples from ``path``.

    ``.jsonl`` / ``.json``: one JSON object per non-blank line with string fields
    ``instruction`` and ``output`` (required, ``output`` non-empty) and ``input`` and
    ``domain`` (optional, default ""); other keys are ignored. A ``.json`` file holding one
    top-level JSON array of such objects (the layout of the original Alpaca release) is
    accepted as well.

    Any other suffix (e.g. ``.txt``): plain text, split into documents on blank lines; each
    document becomes ``Example("", "", document)``, trained with the loss on all of it.

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
        return Example.from_dict(obj)
    except ValueError as exc:
        raise DataError(f"{where}: {exc}") from exc


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
