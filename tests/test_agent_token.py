"""Where ``fedsrd-agent`` takes its token from: a file or the environment rather than the
command line, which every user of the machine can read (``ps``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.cli import AgentError, parse_args

BASE = ["--server", "https://fedsrd.example.org", "--data", "train.jsonl"]


@pytest.fixture(autouse=True)
def _no_token_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FEDSRD_AGENT_TOKEN", raising=False)
    monkeypatch.delenv("FEDSRD_AGENT_TOKEN_FILE", raising=False)


def test_the_token_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("fsc_secret\n")
    assert parse_args([*BASE, "--token-file", str(path)]).token == "fsc_secret"


def test_the_token_file_from_the_environment_or_the_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "token"
    path.write_text("fsc_from_env")
    monkeypatch.setenv("FEDSRD_AGENT_TOKEN_FILE", str(path))
    assert parse_args(BASE).token == "fsc_from_env"
    monkeypatch.delenv("FEDSRD_AGENT_TOKEN_FILE")
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'token-file = "{path}"\n')
    assert parse_args([*BASE, "--config", str(cfg)]).token == "fsc_from_env"
    monkeypatch.setenv("FEDSRD_AGENT_TOKEN", "fsc_plain_env")
    cfg.write_text("")
    assert parse_args([*BASE, "--config", str(cfg)]).token == "fsc_plain_env"


def test_token_file_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(AgentError, match="cannot read the token file"):
        parse_args([*BASE, "--token-file", str(tmp_path / "missing")])
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(AgentError, match="must hold the token alone"):
        parse_args([*BASE, "--token-file", str(tmp_path / "empty")])
    (tmp_path / "t").write_text("fsc_a")
    with pytest.raises(AgentError, match="not both"):
        parse_args([*BASE, "--token-file", str(tmp_path / "t"), "--token", "fsc_b"])
    with pytest.raises(AgentError, match="--token or --token-file is required"):
        parse_args(BASE)
