"""Reading global state back from the blob store (snapshots) and run-level shape facts."""

from __future__ import annotations

from typing import Any

from api.models import Run
from api.runtime import Runtime
from fedsrd_core.codec import ValueDType
from fedsrd_core.snapshot import decode_snapshot, shape_state
from fedsrd_core.state import GlobalState
from fedsrd_core.strategies import Strategy, get_strategy

# Header bytes per entry: name (<=65535), shape (8 dims x 8 bytes), counts and codes.
_ENTRY_OVERHEAD = 256


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
    """(sha256, digest) of the global state after ``round_number`` (0: the initial state)."""
    if round_number == 0:
        if run.initial_blob is None or run.initial_digest is None:
            return None
        return run.initial_blob, run.initial_digest
    for r in run.rounds:
        if r.number == round_number and r.status == "closed":
            assert r.snapshot_blob is not None
            assert r.digest is not None
            return r.snapshot_blob, r.digest
    return None


def snapshot_sha(run: Run, round_number: int) -> str:
    """The snapshot blob of the state after ``round_number``; LookupError if there is none."""
    found = snapshot_blob(run, round_number)
    if found is None:
        raise LookupError(f"run {run.id} has no state for round {round_number}")
    return found[0]


def load_state(rt: Runtime, run: Run, round_number: int) -> GlobalState:
    """The global state after ``round_number``, decoded from its snapshot blob."""
    sha = snapshot_sha(run, round_number)
    # Decoded from the store's view of the blob (a mapped file where blobs are local): the
    # decoded factors are the only copy this process holds.
    with rt.blobs.mapped(sha) as view:
        return decode_snapshot(view, layout_of(run), rank_of(run))
