"""``fedsrd simulate`` as a user drives it: bad options are one line and exit status 2 (no
traceback), the user's own files train and evaluate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedsrd_core.cli import main


def simulate(tmp_path: Path, model_cache: Path, *extra: str) -> int:
    argv = ["simulate", "--cache-dir", str(model_cache), "--out", str(tmp_path / "out")]
    return main([*argv, "--quiet", *extra])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--strategy", "nope"], "unknown --strategy 'nope'; known: fed-dare, fedavg"),
        (["--strategy-config", "{density: 1"], "--strategy-config is not valid JSON"),
        (["--strategy-config", "[1]"], "--strategy-config must be a JSON object"),
        (["--strategy-config", '{"nonsense": 1}'], "nonsense"),
        (["--clients", "2"], "--clients 2 with --partition domain: that partition has one"),
        (["--partition", "iid", "--clients", "0"], "--clients must be >= 1"),
        (["--rounds", "0"], "`rounds` must be >= 1"),
        (["--seq-len", "140"], "--seq-len 140 cannot hold the prompt template"),
        (["--model", "/no/such/model"], "/no/such/model"),
    ],
)
def test_bad_options_are_one_line_and_exit_2(tmp_path, model_cache, capsys, options, message):
    assert simulate(tmp_path, model_cache, *options) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedsrd simulate: error: ") and message in err, err
    assert "Traceback" not in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_the_smallest_seq_len_is_named(tmp_path, model_cache, capsys):
    # The tiny model's byte tokenizer: 140 template tokens and one response token.
    assert simulate(tmp_path, model_cache, "--seq-len", "140") == 2
    assert "the smallest length that fits it and one response token is 141" in (
        capsys.readouterr().err
    )


def test_bad_data_files_name_the_line(tmp_path, model_cache, capsys):
    good = tmp_path / "a.jsonl"
    good.write_text('{"prompt": "p", "completion": "c"}\n')
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"prompt": "p", "completion": "c"}\n{"text": "t"}\n')
    assert simulate(tmp_path, model_cache, "--data", str(good), str(bad)) == 2
    assert f"{bad}:2: unrecognised record" in capsys.readouterr().err
    table = tmp_path / "c.csv"
    table.write_text("prompt,completion\np,c\n")
    assert simulate(tmp_path, model_cache, "--data", str(good), "--eval", str(table)) == 2
    assert f"{table}:1: .csv files are not read" in capsys.readouterr().err
    assert simulate(tmp_path, model_cache, "--data", str(good), "--clients", "3") == 2
    assert "each file is one client's data" in capsys.readouterr().err


def _chat(question: str, answer: str) -> str:
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return json.dumps({"messages": messages})


@pytest.mark.slow
def test_own_files_train_and_evaluate(tmp_path, model_cache, capsys):
    sites = []
    for i in range(2):
        site = tmp_path / f"site{i}.jsonl"
        site.write_text("\n".join(_chat(f"{a}+{i}?", str(a + i)) for a in range(8)) + "\n")
        sites.append(str(site))
    held_out = tmp_path / "held-out.jsonl"
    held_out.write_text('{"prompt": "3+1?", "completion": "4"}\n')
    options = ["--data", *sites, "--eval", str(held_out), "--rounds", "1", "--steps", "1"]
    assert simulate(tmp_path, model_cache, *options, "--batch-size", "2") == 0
    record = json.loads((tmp_path / "out" / "record.json").read_text())
    assert record["clients"] == 2
    assert set(record["base_eval"]) == set(record["rounds"][0]["eval"]) == {"held-out"}
    assert "held-out loss" in capsys.readouterr().out
