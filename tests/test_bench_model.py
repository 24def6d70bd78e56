"""The quality testbed's base model: BPE tokenizer, corpus, build, cache (on small corpora:
the real 30-minute build is a benchmark's first step, never a test's)."""

from __future__ import annotations

import json

import pytest

from fedsrd_core.data import DOMAINS, generate, prompt_and_response
from fedsrd_core.modeling import METADATA_FILE, load_causal_lm
from fedsrd_core.modeling.bench import (
    HELDOUT_EVERY,
    BenchModelSpec,
    PretrainSchedule,
    bench_model_dir,
    build_bpe_tokenizer,
    pretrain_corpus,
)
from fedsrd_core.simulation import SimulationConfig, simulate
from fedsrd_core.training import TrainConfig


def small_corpus() -> tuple[list[str], list[str]]:
    texts = []
    for d in DOMAINS:
        for ex in generate(d, 60, seed=5):
            p, r = prompt_and_response(ex)
            texts.append(p + r)
    return texts[::2], texts[1::8]


def test_bpe_tokenizer_ids_round_trip_and_unforgeable_specials():
    train, _ = small_corpus()
    tok = build_bpe_tokenizer(train, 512)
    assert len(tok) == 512
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    for text in ["Below is an instruction.", "héllo 日本 🙂", "  spaces\n\ttabs ", ""]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
        assert tok.unk_token_id not in ids  # every byte is in the alphabet
    ids = tok("a </s> b", add_special_tokens=False)["input_ids"]
    assert tok.eos_token_id not in ids
    # BPE learned the template: far fewer tokens than bytes.
    sample = train[0]
    assert len(tok(sample, add_special_tokens=False)["input_ids"]) < len(sample.encode()) / 2


def test_corpus_holds_out_every_twentieth_text():
    train, held = pretrain_corpus()
    assert held and train
    assert not set(held) & set(train)
    # Held-out files and examples are about 1 in HELDOUT_EVERY of the distinct texts.
    distinct = len(set(train)) + len(held)
    assert len(held) == pytest.approx(distinct / HELDOUT_EVERY, rel=0.2)
    assert any("def " in t for t in train)  # the standard library's sources
    assert any("### Response:" in t for t in train)  # the generated domains


def test_spec_family_and_validation():
    s = BenchModelSpec.of_width(512)
    assert (s.hidden_size, s.num_attention_heads, s.num_key_value_heads) == (512, 8, 4)
    assert BenchModelSpec.of_width(256) == BenchModelSpec()
    with pytest.raises(ValueError, match="num_attention_heads"):
        BenchModelSpec(hidden_size=100, num_attention_heads=3)
    with pytest.raises(ValueError, match="vocab_size"):
        BenchModelSpec(vocab_size=100)


def test_build_learns_caches_and_runs_a_federation(tmp_path):
    spec = BenchModelSpec.of_width(64)
    spec = BenchModelSpec(**{**spec.__dict__, "num_hidden_layers": 1, "vocab_size": 512})
    schedule = PretrainSchedule(steps=40, batch_size=8, seq_len=64, lr=3e-3, eval_every=20)
    lines: list[str] = []
    path = bench_model_dir(tmp_path, spec, schedule, corpus=small_corpus(), log=lines.append)
    meta = json.loads((path / METADATA_FILE).read_text())
    curve = meta["pretrain"]["held_out_curve"]
    assert [step for step, _ in curve] == [0, 20, 40]
    assert curve[-1][1] < curve[0][1] - 1.0  # it learned
    assert meta["num_parameters"] > 0 and meta["fingerprint"]
    # Cached: the second call builds nothing.
    lines.clear()
    assert (
        bench_model_dir(tmp_path, spec, schedule, corpus=small_corpus(), log=lines.append) == path
    )
    assert lines == []
    # Another schedule is another model.
    other = bench_model_dir(
        tmp_path,
        spec,
        PretrainSchedule(**{**schedule.__dict__, "steps": 20, "eval_every": 20}),
        corpus=small_corpus(),
    )
    assert other != path
    # It loads as any Hugging Face causal LM and federates (GQA shapes through LoRA).
    model, tok = load_causal_lm(str(path))
    clients = [generate(d, 8, seed=0) for d in DOMAINS[:2]]
    evals = {"arithmetic": generate("arithmetic", 4, seed=0, split="eval")}
    result = simulate(
        model,
        tok,
        clients,
        evals,
        SimulationConfig(rounds=2, train=TrainConfig(steps=2, batch_size=4, seq_len=256)),
    )
    assert len(result.rounds) == 2
