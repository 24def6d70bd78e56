"""Non-finite numbers at the edges: a loss that diverged is *missing*, never ``NaN``.

JSON has no ``NaN`` or ``Infinity``. Python's ``json`` writes them anyway (and httpx refuses
to send them: ``ValueError: Out of range float values are not JSON compliant``), PostgreSQL's
JSON types refuse them, SQLite stores them, and a reader downstream then averages a ``NaN``
into every figure. So every number that leaves a process (a heartbeat, an upload's training
loss, a round's metrics, the agent's state file) goes through one of these first.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any


def finite_or_none(value: float | None) -> float | None:
    """``value`` as a float if it is a finite number, else None (missing)."""
    if value is None or isinstance(value, bool):
        return None
    v = float(value)
    return v if math.isfinite(v) else None


def json_finite(value: Any) -> Any:
    """A copy of a JSON-like document (dicts, lists, tuples, scalars) in which every
    non-finite float is None; everything else is kept as it is."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: json_finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_finite(v) for v in value]
    return value


def non_finite_paths(value: Any, prefix: str = "") -> list[str]:
    """Dotted paths (``a.b.0``) of the non-finite floats in a JSON-like document."""
    if isinstance(value, float):
        return [] if math.isfinite(value) else [prefix or "."]
    if isinstance(value, Mapping):
        items: Sequence[tuple[Any, Any]] = list(value.items())
    elif isinstance(value, list | tuple):
        items = list(enumerate(value))
    else:
        return []
    out: list[str] = []
    for k, v in items:
        out.extend(non_finite_paths(v, f"{prefix}.{k}" if prefix else str(k)))
    return out
