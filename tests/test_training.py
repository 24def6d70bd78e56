"""peft bridge, local round, evaluation and simulation on the project's tiny model."""

from __future__ import annotations

import math

import pytest
import torch

from fedsrd_core.codec import decode, encode
from fedsrd_core.data import DOMAINS, Example, generate
from fedsrd_core.modeling import load_causal_lm
from fedsrd_core.peft_lora import (
    adapter_layout,
    attach_lora,
    lora_config,
    peft_to_state,
    set_trainable,
    state_to_peft,
)
from fedsrd_core.simulation import SimulationConfig, markdown_report, simulate, write_outputs
from fedsrd_core.state import init_state, state_digest
from fedsrd_core.strategies import RoundContext, Upload, get_strategy
from fedsrd_core.training import (
    IGNORE_INDEX,
    TrainConfig,
    evaluate_loss,
    exact_match_accuracy,
    local_round,
    tokenize,
)

FAST = TrainConfig(steps=3, batch_size=4, seq_len=384, lr=5e-3)


@pytest.fixture(scope="session")
def tiny_path(tiny_model):
    return tiny_model  # conftest's: built once per session for every test file


@pytest.fixture
def peft_model(tiny_path):
    model, tok = load_causal_lm(str(tiny_path))
    return attach_lora(model, lora_config(rank=4)), tok


def test_layout_names_follow_the_model(peft_model):
    pm, _ = peft_model
    layout = adapter_layout(pm)
    assert "model.layers.0.self_attn.q_proj" in layout
    assert "model.layers.1.mlp.down_proj" in layout
    assert len(layout) == 7 * pm.config.num_hidden_layers


def test_state_round_trips_through_peft(peft_model):
    pm, _ = peft_model
    state = init_state(adapter_layout(pm), 4, seed=3)
    for _, f in state.items():
        f.B.normal_(generator=torch.Generator().manual_seed(1))
    state_to_peft(state, pm)
    assert state_digest(peft_to_state(pm)) == state_digest(state)


def test_adapted_layer_computes_base_plus_scaled_BA(peft_model):
    pm, _ = peft_model
    state = init_state(adapter_layout(pm), 4, seed=3)
    g = torch.Generator().manual_seed(2)
    for _, f in state.items():
        f.B.copy_(torch.randn(f.B.shape, generator=g))
    state_to_peft(state, pm)
    name = "model.layers.0.mlp.up_proj"
    layer = dict(pm.named_modules())["base_model.model." + name]
    x = torch.randn(3, layer.in_features, generator=g)
    W0 = layer.base_layer.weight
    f = state[name]
    expect = x @ W0.T + (8.0 / 4) * (x @ f.A.T @ f.B.T)  # lora_alpha = 2r -> scale 2
    torch.testing.assert_close(layer(x), expect, rtol=1e-4, atol=1e-5)


def test_state_to_peft_rejects_a_different_layout(peft_model):
    pm, _ = peft_model
    with pytest.raises(ValueError, match="adapter layout differs"):
        state_to_peft(init_state({"model.other": (4, 4)}, 4), pm)
    wrong = init_state(adapter_layout(pm), 2)
    with pytest.raises(ValueError, match="differ from the state"):
        state_to_peft(wrong, pm)


def test_tokenize_puts_labels_on_the_response_only(tiny_path):
    _, tok = load_causal_lm(str(tiny_path))
    ex = Example("Add the numbers.", "2 + 3", "5", "arithmetic")
    t = tokenize(ex, tok, 512)
    n_resp = len(tok("5", add_special_tokens=False)["input_ids"]) + 1
    assert t.labels[-n_resp:] == t.input_ids[-n_resp:]
    assert t.input_ids[-1] == tok.eos_token_id
    assert all(lab == IGNORE_INDEX for lab in t.labels[:-n_resp])
    assert len(tokenize(ex, tok, 10).input_ids) == 10


def test_local_round_is_deterministic_and_learns(peft_model):
    pm, tok = peft_model
    data = generate("arithmetic", 64, seed=1)
    start = init_state(adapter_layout(pm), 4, seed=0)
    cfg = TrainConfig(steps=8, batch_size=8, seq_len=384, lr=5e-3)
    a, stats = local_round(pm, tok, data, start, cfg, seed=5)
    b, _ = local_round(pm, tok, data, start, cfg, seed=5)
    c, _ = local_round(pm, tok, data, start, cfg, seed=6)
    assert state_digest(a) == state_digest(b)
    assert state_digest(a) != state_digest(c)
    assert len(stats.losses) == 8 and stats.samples == 64
    assert stats.losses[-1] < stats.losses[0]
    state_to_peft(start, pm)
    before = evaluate_loss(pm, tok, data[:32], seq_len=384)["loss"]
    state_to_peft(a, pm)
    after = evaluate_loss(pm, tok, data[:32], seq_len=384)["loss"]
    assert after < before


def test_ffa_lora_keeps_A_and_fedprox_pulls_back(peft_model):
    pm, tok = peft_model
    data = generate("code", 32, seed=1)
    start = init_state(adapter_layout(pm), 4, seed=0)
    ffa, _ = local_round(pm, tok, data, start, FAST, trainable=frozenset({"B"}))
    assert all(torch.equal(ffa[m].A, start[m].A) for m in start)
    free, _ = local_round(pm, tok, data, start, FAST, seed=1)
    prox, _ = local_round(pm, tok, data, start, FAST, seed=1, proximal_mu=1e4)

    def dist(s):
        return sum(float((s[m].B - start[m].B).norm() ** 2) for m in start)

    assert dist(prox) < dist(free)


def test_set_trainable_only_lora(peft_model):
    pm, _ = peft_model
    params = set_trainable(pm, frozenset({"A", "B"}))
    trainable = [p for p in pm.parameters() if p.requires_grad]
    assert len(params) == len(trainable) == 2 * len(adapter_layout(pm))


def test_evaluate_loss_does_not_depend_on_batch_size(peft_model):
    pm, tok = peft_model
    data = generate("rewrite", 20, seed=2, split="eval")
    a = evaluate_loss(pm, tok, data, batch_size=3)
    b = evaluate_loss(pm, tok, data, batch_size=20)
    assert math.isclose(a["loss"], b["loss"], rel_tol=1e-5)
    assert math.isclose(a["perplexity"], math.exp(a["loss"]), rel_tol=1e-9)


def test_exact_match_accuracy_is_a_fraction(peft_model):
    pm, tok = peft_model
    acc = exact_match_accuracy(pm, tok, generate("arithmetic", 4, seed=3), max_new_tokens=4)
    assert 0.0 <= acc <= 1.0


def test_train_config_validation():
    with pytest.raises(ValueError, match="`steps`"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="`lr`"):
        TrainConfig(lr=float("nan"))


def test_one_real_round_through_the_codec_keeps_everyone_in_sync(peft_model):
    pm, tok = peft_model
    strategy = get_strategy("fedsrd")
    server = init_state(adapter_layout(pm), 4, seed=0)
    ctx = RoundContext(round=1, seed=9)
    uploads = []
    for c, domain in enumerate(DOMAINS[:2]):
        trained, _ = local_round(pm, tok, generate(domain, 16, seed=c), server, FAST, seed=c)
        blob = encode(strategy.client_upload(server, trained, ctx, client_seed=c))
        uploads.append(Upload(decode(blob, expected_shapes=server.wire_shapes()), 16))
    delta = strategy.server_round(server, uploads, ctx)
    client = server.clone()
    strategy.apply_global(client, decode(encode(delta)))
    strategy.apply_global(server, delta)
    assert state_digest(client) == state_digest(server)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fedsrd", "fedavg", "ffa-lora"])
def test_simulation_end_to_end(tiny_path, tmp_path, strategy):
    model, tok = load_causal_lm(str(tiny_path))
    clients = [generate(d, 24, seed=0) for d in DOMAINS]
    evals = {d: generate(d, 8, seed=0, split="eval") for d in DOMAINS[:2]}
    cfg = SimulationConfig(
        strategy=strategy,
        rounds=3,
        participation=0.75,
        dropout=0.2,
        rank=4,
        train=FAST,
        seed=1,
        eval_exact_match=2,
        diagnostics=True,
    )
    result = simulate(model, tok, clients, evals, cfg)
    assert [r.round for r in result.rounds] == [1, 2, 3]
    assert set(result.base_eval) == set(evals)
    for r in result.rounds:  # only FedSRD has a one-factor solve to diagnose
        assert (r.diagnostics is not None) == (strategy == "fedsrd")
        if r.diagnostics is not None:
            assert {"all", "q_proj"} <= set(r.diagnostics)
            assert 0.0 <= r.diagnostics["all"]["projection_loss"] <= 1.0 + 1e-9
    for r in result.rounds:
        assert len(r.participants) + len(r.dropped) == 3
        assert all(b > 0 for b in r.bytes_up.values())
        assert set(r.eval) == set(evals)
        assert ("exact_match" in r.eval[DOMAINS[0]]) == (r.round == 3)
    from fedsrd_core.modeling import fingerprint_directory

    assert result.model_fingerprint == fingerprint_directory(str(tiny_path))
    rec, rep = write_outputs(result, tmp_path / "out")
    assert rec.exists() and "| round |" in rep.read_text()
    assert markdown_report(result).startswith(f"# Simulation: {strategy}")
    again = simulate(load_causal_lm(str(tiny_path))[0], tok, clients, evals, cfg)
    assert [r.digest for r in again.rounds] == [r.digest for r in result.rounds]


def test_evaluate_loss_refuses_when_there_is_no_response_to_score(peft_model):
    pm, tok = peft_model
    data = generate("arithmetic", 4, seed=2, split="eval")
    assert evaluate_loss(pm, tok, data, seq_len=384)["tokens"] > 0
    # The prompts are cut from the left: even 8 tokens hold a response to score.
    assert evaluate_loss(pm, tok, data, seq_len=8)["tokens"] > 0
    # Before, nothing to score answered loss 0.0 (perplexity 1): a perfect score.
    with pytest.raises(ValueError, match="no response token to score"):
        evaluate_loss(pm, tok, [Example("", "", "")], seq_len=8)


def test_throttled_passes_the_first_step_then_one_per_interval_and_the_final_step():
    from fedsrd_core.training import throttled

    now = [0.0]
    seen: list[int] = []
    call = throttled(lambda step, loss: seen.append(step), 2.0, final_step=9, clock=lambda: now[0])
    for step, t in zip(range(1, 10), [0.0, 0.5, 1.9, 2.0, 2.1, 4.5, 5.0, 6.4, 6.5], strict=True):
        now[0] = t
        call(step, 0.1)
    assert seen == [1, 4, 6, 9]  # t=0, t=2.0, t=4.5, and the final step at t=6.5
