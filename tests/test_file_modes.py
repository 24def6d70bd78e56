"""Files that hold secrets or a site's training results are created readable by their owner
only: the agent's state directory and its files, and the development admin token."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

from agent.state import AgentState, Pending, StateDir
from api.settings import Settings
from fedsrd_core.state import GlobalState, LoraFactors


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def open_umask():
    """The most permissive umask: what the code asks for is what the files get."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def test_agent_state_directory_and_files_are_owner_only(tmp_path: Path, open_umask: None):
    store = StateDir(tmp_path / "site" / "state")
    factors = GlobalState({"m.a": LoraFactors(torch.ones(2, 3), torch.zeros(4, 2))})
    st = AgentState(run_id=1, client_id=2, have_round=0)
    store.save(st, factors)
    store.save_pending(b"update bytes")
    st.pending = Pending(1, 0, 4, None, "0" * 64)
    store.save(st)
    assert _mode(store.path) == 0o700
    files = sorted(p.name for p in store.path.iterdir())
    assert files == ["pending.blob", "state.blob", "state.json"]
    for name in files:
        assert _mode(store.path / name) == 0o600, name


def test_a_leftover_temporary_file_does_not_lend_its_mode(tmp_path: Path, open_umask: None):
    store = StateDir(tmp_path / "state")
    leftover = store.path / "pending.blob.tmp"  # a killed agent's, world-readable
    leftover.write_bytes(b"old")
    leftover.chmod(0o644)
    store.save_pending(b"new")
    assert _mode(store.path / "pending.blob") == 0o600
    assert store.pending_blob() == b"new"


def test_the_development_admin_token_is_created_owner_only(
    tmp_path: Path, open_umask: None, monkeypatch: pytest.MonkeyPatch
):
    # Created with its final mode: no chmod after the token is written (a crash between the
    # two, or a reader in between, would see a world-readable token).
    def no_chmod(*args: object, **kwargs: object) -> None:
        raise AssertionError("the token file was chmodded after it was written")

    monkeypatch.setattr(Path, "chmod", no_chmod)
    monkeypatch.setattr(os, "chmod", no_chmod)
    (tmp_path / "admin_token.tmp").write_text("stale")  # a crashed start's leftover
    settings = Settings(data_dir=tmp_path)
    token = settings.resolved_admin_token
    assert len(token) >= 16
    assert _mode(tmp_path / "admin_token") == 0o600
    assert (tmp_path / "admin_token").read_text().strip() == token
    assert not (tmp_path / "admin_token.tmp").exists()
