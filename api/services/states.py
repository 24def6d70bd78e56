"""Reading global state back from the blob store (snapshots) and run-level shape facts."""

from __future__ import annotations

import datetime as dt
import math
from typing import Any

from api.models import Run
from api.runtime import Runtime
from api.schemas import MAX_DURATION_S
from fedsrd_core.codec import ValueDType
from fedsrd_core.snapshot import decode_global_delta, decode_snapshot, shape_state
from fedsrd_core.state import GlobalState, state_digest
from fedsrd_core.strategies import Strategy, get_strategy

# Header bytes per entry: name (<=65535), shape (8 dims x 8 bytes), counts and codes.
_ENTRY_OVERHEAD = 256


def duration_of(run: Run, key: str, default: float) -> dt.timedelta:
    """A duration setting of ``run`` (seconds in its config) as a ``timedelta``.

    Clamped to ``MAX_DURATION_S``, the bound new runs are validated against: a run stored
    before that bound existed may hold ``1e300``, which ``timedelta`` cannot represent
    (OverflowError), and every listing of its clients would fail. A value that is not a
    number at all is a corrupt row and raises ``ValueError``."""
    seconds = float(run.config.get(key, default))
    if math.isnan(seconds):
        raise ValueError(f"run {run.id}: {key} is not a number")
    return dt.timedelta(seconds=min(max(seconds, 0.0), float(MAX_DURATION_S)))


def layout_of(run: Run) -> dict[str, tuple[int, int]]:
    return {k: (int(v[0]), int(v[1])) for k, v in run.layout.items()}


def rank_of(run: Run) -> int:
    return int(run.config["lora"]["rank"])


def strategy_of(run: Run) -> Strategy:
    return get_strategy(run.config["strategy"], dict(run.config.get("strategy_config", {})))


def value_dtype_of(run: Run) -> ValueDType:
    vd: Any = run.config.get("value_dtype", "fp32")
    return vd  # type: ignore[no-any-return]


def upload_shapes(run: Run) -> dict[str, tuple[int, ...]]:
    """What every upload of this run must carry, exactly (names and shapes)."""
    return strategy_of(run).upload_shapes(shape_state(layout_of(run), rank_of(run)))


def upload_size_cap(run: Run) -> int:
    """Largest upload accepted: every tensor dense *and* with u32 positions (the costliest
    valid encoding, 8 bytes per element), plus header room. Any honest sparse upload is far
    below it; anything above is refused while it streams in."""
    shapes = upload_shapes(run)
    total = 64
    for name, shape in shapes.items():
        n = 1
        for d in shape:
            n *= d
        total += 8 * n + _ENTRY_OVERHEAD + len(name.encode())
    return total


def lora_parameters(run: Run) -> int:
    r = rank_of(run)
    return sum(r * (int(d_out) + int(d_in)) for d_out, d_in in run.layout.values())


def snapshot_blob(run: Run, round_number: int) -> tuple[str, str] | None:
    """(sha256, digest) of the *kept* snapshot of the global state after ``round_number``
    (0: the initial state); None if that round has not closed or its snapshot was pruned
    (:func:`api.services.rounds.prunable_snapshots`; :func:`has_state` tells them apart)."""
    if round_number == 0:
        if run.initial_blob is None or run.initial_digest is None:
            return None
        return run.initial_blob, run.initial_digest
    for r in run.rounds:
        if r.number == round_number and r.status == "closed":
            if r.snapshot_blob is None:
                return None
            assert r.digest is not None
            return r.snapshot_blob, r.digest
    return None


def has_state(run: Run, round_number: int) -> bool:
    """Whether the global state after ``round_number`` exists (launched; that round closed),
    snapshot kept or not."""
    if round_number == 0:
        return run.initial_blob is not None
    return any(r.number == round_number and r.status == "closed" for r in run.rounds)


def snapshot_sha(run: Run, round_number: int) -> str:
    """The kept snapshot blob of the state after ``round_number``; LookupError if there is
    none (the round has not closed, or its snapshot was pruned)."""
    found = snapshot_blob(run, round_number)
    if found is None:
        raise LookupError(f"run {run.id} has no kept snapshot for round {round_number}")
    return found[0]


class StoredStateError(Exception):
    """The stored blobs do not lead to the digest recorded for a round (corruption)."""


def load_state(rt: Runtime, run: Run, round_number: int) -> GlobalState:
    """The global state after ``round_number``: its snapshot, or, where that was pruned, the
    newest kept snapshot before it (at worst the initial state) with the global deltas
    since applied in order, exactly as clients apply them, each checked against its round's
    digest. LookupError if there is no such state."""
    if not has_state(run, round_number):
        raise LookupError(f"run {run.id} has no state for round {round_number}")
    base = round_number
    while snapshot_blob(run, base) is None:
        base -= 1  # round 0, the initial state, is never pruned
    # Decoded from the store's view of the blob (a mapped file where blobs are local): the
    # decoded factors are the only copy this process holds.
    layout, rank = layout_of(run), rank_of(run)
    with rt.blobs.mapped(snapshot_sha(run, base)) as view:
        state = decode_snapshot(view, layout, rank)
    if base == round_number:
        return state
    strategy = strategy_of(run)
    rounds = {r.number: r for r in run.rounds if r.status == "closed"}
    for n in range(base + 1, round_number + 1):
        r = rounds[n]
        assert r.delta_blob is not None
        delta = decode_global_delta(rt.blobs.read_bytes(r.delta_blob), layout, rank)
        strategy.apply_global(state, delta)
        if state_digest(state) != r.digest:
            raise StoredStateError(
                f"run {run.id}: the stored global delta of round {n} does not lead to the "
                f"digest recorded for that round"
            )
    return state
