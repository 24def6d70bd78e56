"""``fedsrd up`` / ``demo`` / ``gc`` refuse bad setups in one line, before doing anything."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from api import cli


def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in ("FEDSRD_DATABASE_URL", "FEDSRD_DATA_DIR", "FEDSRD_BLOB_URL", "FEDSRD_BROKER_URL"):
        monkeypatch.delenv(k, raising=False)


def test_gc_outside_a_data_directory_creates_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _clean_env(monkeypatch)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["gc", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no data directory" in err[0] and "--data-dir" in err[0]
    assert list(tmp_path.iterdir()) == []  # no ./var, no database


def test_gc_on_a_data_directory_without_a_database_says_to_migrate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _clean_env(monkeypatch)
    (tmp_path / "data").mkdir()
    assert cli.main(["gc", "--dry-run", "--data-dir", str(tmp_path / "data")]) == 2
    err = capsys.readouterr().err
    assert "not migrated" in err and "fedsrd migrate" in err


@pytest.mark.parametrize("command", ["up", "demo"])
def test_a_taken_port_is_refused_before_anything_starts(
    command: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Before, the readiness check could be answered by whatever held the port, and the
    URLs printed were someone else's server."""
    _clean_env(monkeypatch)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        data = tmp_path / "data"
        assert cli.main([command, "--port", str(port), "--data-dir", str(data)]) == 2
    out = capsys.readouterr()
    assert out.out == ""  # no URL printed
    assert f"127.0.0.1:{port} is not free" in out.err and "--port" in out.err
    assert not data.exists()  # nothing started, nothing migrated
