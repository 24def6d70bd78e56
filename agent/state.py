"""The agent's state directory: what survives a killed agent.

``state.json`` names the run and client, the round whose global state the agent holds and
its digest, and an upload the server has not acknowledged yet; ``state.blob`` is that global
state as a snapshot blob; ``pending.blob`` is the unacknowledged upload. Every file is
written to a temporary name, fsynced and renamed, and ``state.json`` (which points at the
others) is written last, so a kill at any moment leaves either the old state or the new.
Every file is 0600, and the directory 0700 when the agent creates it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedsrd_core.finite import finite_or_none, json_finite
from fedsrd_core.snapshot import decode_snapshot, snapshot_pieces
from fedsrd_core.state import GlobalState, state_digest


def _atomic_write(path: Path, pieces: Iterable[bytes | memoryview]) -> None:
    """Replace ``path`` with ``pieces`` (written in order), durably, as a file only its
    owner can read (the global state and the pending update are the site's training
    results: an update can leak training data)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)  # a killed agent's leftover, perhaps of another mode
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with open(fd, "wb") as f:
        for piece in pieces:
            f.write(piece)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class Pending:
    """An upload sent (or about to be) but not acknowledged."""

    round: int
    base_round: int
    num_samples: int
    train_loss: float | None
    sha256: str


@dataclass
class AgentState:
    run_id: int
    client_id: int
    have_round: int = -1
    digest: str | None = None
    pending: Pending | None = None
    rounds_trained: list[int] = field(default_factory=list)


class StateDir:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        # 0700 when the agent makes it; one that exists keeps its mode (it may be a
        # directory the operator chose, shared with other things), its files are 0600.
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)

    @property
    def _json(self) -> Path:
        return self.path / "state.json"

    def load(
        self, run_id: int, client_id: int, layout: dict[str, tuple[int, int]], rank: int
    ) -> tuple[AgentState, GlobalState | None]:
        """The saved state of this run and client (a fresh one if none, or another run's),
        with the global factors, checked against the saved digest."""
        fresh = AgentState(run_id, client_id)
        if not self._json.exists():
            return fresh, None
        raw: dict[str, Any] = json.loads(self._json.read_text())
        if raw.get("run_id") != run_id or raw.get("client_id") != client_id:
            return fresh, None
        pending = raw.pop("pending", None)
        if pending:
            # An older agent saved a diverged loss as NaN, which the server refuses: re-sent
            # after every restart, that upload could never be delivered. Missing instead.
            pending["train_loss"] = finite_or_none(pending.get("train_loss"))
        st = AgentState(**raw, pending=Pending(**pending) if pending else None)
        factors = None
        blob = self.path / "state.blob"
        if st.have_round >= 0 and blob.exists():
            factors = decode_snapshot(blob.read_bytes(), layout, rank)
            if state_digest(factors) != st.digest:
                factors = None
        if factors is None:
            st.have_round, st.digest = -1, None
        return st, factors

    def save(self, st: AgentState, factors: GlobalState | None = None) -> None:
        """Persist; ``factors`` (if given) is the global state of ``st.have_round``."""
        if factors is not None:
            _atomic_write(self.path / "state.blob", snapshot_pieces(factors))
        doc = json_finite(asdict(st))  # never a NaN in the file (see load)
        _atomic_write(self._json, [json.dumps(doc, indent=1, allow_nan=False).encode()])

    def save_pending(self, blob: bytes) -> None:
        _atomic_write(self.path / "pending.blob", [blob])

    def pending_blob(self) -> bytes | None:
        p = self.path / "pending.blob"
        return p.read_bytes() if p.exists() else None
