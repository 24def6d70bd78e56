"""Long examples keep their response (the prompt's start is cut), so no batch is left with
nothing to score and a NaN loss; a loss that is not finite is reported as missing."""

from __future__ import annotations

import math

import pytest

from fedsrd_core.data import DOMAINS, Example, generate, prompt_and_response
from fedsrd_core.finite import finite_or_none, json_finite, non_finite_paths
from fedsrd_core.modeling import load_causal_lm
from fedsrd_core.peft_lora import adapter_layout, attach_lora, lora_config
from fedsrd_core.state import init_state
from fedsrd_core.training import IGNORE_INDEX, RoundStats, TrainConfig, local_round, tokenize


@pytest.fixture(scope="module")
def tok(tiny_model):
    return load_causal_lm(str(tiny_model))[1]


def _reference(example: Example, tok, seq_len: int) -> tuple[list[int], list[int], list[int]]:
    """Prompt ids, response ids + EOS, and what cutting at the end (the old rule) keeps."""
    prompt, response = prompt_and_response(example)
    p = tok(prompt, add_special_tokens=False)["input_ids"] if prompt else []
    target = [*tok(response, add_special_tokens=False)["input_ids"], tok.eos_token_id]
    return p, target, (p + target)[:seq_len]


@pytest.mark.parametrize("seq_len", [256, 64, 16])
def test_tokenize_keeps_the_response_whole_and_cuts_the_prompt_from_the_left(tok, seq_len):
    lost_before = 0
    for domain in DOMAINS:
        for ex in generate(domain, 16, seed=0, split="train"):
            p, target, old = _reference(ex, tok, seq_len)
            lost_before += len(p) >= len(old)  # cut at the end: not one response token left
            t = tokenize(ex, tok, seq_len)
            assert len(t.input_ids) == len(t.labels) <= seq_len
            if len(p) + len(target) <= seq_len:  # fits: exactly as before
                assert (t.input_ids, t.truncated) == (p + target, False)
                assert t.labels == [IGNORE_INDEX] * len(p) + target
            elif len(target) <= seq_len:  # every response token inside the window
                keep = seq_len - len(target)
                assert t.truncated and len(t.input_ids) == seq_len
                assert t.input_ids == p[len(p) - keep :] + target
                assert t.labels == [IGNORE_INDEX] * keep + target
            else:  # a response longer than the window: the prompt's end, the response's start
                keep = min(len(p), seq_len // 2)
                assert t.input_ids == p[len(p) - keep :] + target[: seq_len - keep]
            assert t.scored_tokens > 0
    if seq_len == 256:
        # The case of the report: with the project's own data, many examples lost their
        # whole response to the old rule.
        assert lost_before >= 8


def _long_examples(tok, seq_len: int) -> list[Example]:
    """Generated examples whose prompt alone fills ``seq_len`` (no response token survived
    the old cut at the end)."""
    out = []
    for domain in DOMAINS:
        for ex in generate(domain, 16, seed=0, split="train"):
            p, _, _ = _reference(ex, tok, seq_len)
            if len(p) >= seq_len:
                out.append(ex)
    return out


def test_a_batch_of_long_examples_trains_to_a_finite_loss(tiny_model, tok):
    model, _ = load_causal_lm(str(tiny_model))
    pm = attach_lora(model, lora_config(rank=4))
    start = init_state(adapter_layout(pm), 4, seed=0)
    data = _long_examples(tok, 256)[:4]
    assert len(data) == 4
    cfg = TrainConfig(steps=2, batch_size=2, seq_len=256, lr=1e-3)
    _, stats = local_round(pm, tok, data, start, cfg, seed=1)
    # Before: every batch was all prompt, a loss of 0/0 = NaN at every step.
    assert all(math.isfinite(x) for x in stats.losses), stats.losses
    assert stats.mean_loss is not None
    assert (stats.truncated, stats.skipped) == (4, 0)
    # An example with nothing to score (empty prompt and response) is left out, counted.
    _, stats = local_round(pm, tok, [*data, Example("", "", "")], start, cfg, seed=1)
    assert (stats.truncated, stats.skipped) == (4, 1)
    assert all(math.isfinite(x) for x in stats.losses)
    with pytest.raises(ValueError, match="none of the 1 local examples"):
        local_round(pm, tok, [Example("", "", "")], start, cfg)


def test_a_loss_that_is_not_finite_is_missing():
    assert RoundStats(losses=[1.0, 3.0]).mean_loss == 2.0
    assert RoundStats(losses=[1.0, math.nan]).mean_loss is None
    assert RoundStats(losses=[math.inf]).mean_loss is None
    assert RoundStats().mean_loss is None


def test_finite_helpers():
    assert finite_or_none(1.5) == 1.5
    assert finite_or_none(3) == 3.0
    assert [finite_or_none(x) for x in (math.nan, math.inf, -math.inf, None, True)] == [None] * 5
    doc = {"a": math.nan, "b": [1.0, math.inf, {"c": -math.inf}], "d": "x", "e": 2}
    assert json_finite(doc) == {"a": None, "b": [1.0, None, {"c": None}], "d": "x", "e": 2}
    assert non_finite_paths(doc) == ["a", "b.1", "b.2.c"]
    assert non_finite_paths({"ok": [1.0, 2]}) == []
