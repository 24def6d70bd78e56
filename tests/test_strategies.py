"""Strategies: registry, configs, and server/client synchronisation through the codec."""

from __future__ import annotations

import pytest
import torch

from fedsrd_core.codec import SeededSparse, decode, encode
from fedsrd_core.sparse import SparseTensor
from fedsrd_core.sparsify import SparsifierConfig
from fedsrd_core.state import GlobalState, LoraFactors, apply_delta, init_state, state_digest
from fedsrd_core.strategies import (
    FedAvgConfig,
    FedSRDConfig,
    RoundContext,
    Upload,
    available_strategies,
    default_config,
    get_strategy,
)

LAYOUT = {"layers.0.q": (24, 16), "layers.0.v": (8, 16), "layers.1.mlp": (40, 24)}
RANK = 4
ALL = [
    "fed-dare",
    "fedavg",
    "fedprox",
    "fedsrd",
    "fedsrd-e",
    "fedsrd-paper",
    "ffa-lora",
    "flexlora",
]


def local_training(start: GlobalState, strategy, seed: int) -> GlobalState:
    """Stand-in for local fine-tuning: a random step on the trainable factors."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, f in start.items():
        A = f.A + 0.05 * torch.randn(f.A.shape, generator=g)
        B = f.B + 0.05 * torch.randn(f.B.shape, generator=g)
        out[name] = LoraFactors(
            A if "A" in strategy.trainable_factors() else f.A.clone(),
            B if "B" in strategy.trainable_factors() else f.B.clone(),
        )
    return GlobalState(out)


def test_registry_lists_every_strategy():
    assert available_strategies() == ALL
    for name in ALL:
        s = get_strategy(name)
        assert s.name == name and s.paper
        assert get_strategy(name, s.config.to_dict()).config == s.config
    with pytest.raises(ValueError, match="unknown strategy 'fedsgd'"):
        get_strategy("fedsgd")


def test_fedsrd_e_is_fedsrd_without_truncation():
    assert default_config("fedsrd-e") == FedSRDConfig(truncate=False)
    assert default_config("fedsrd") == FedSRDConfig()
    # The paper's method as published: DARE values, no rebalancing; everything else shared.
    assert default_config("fedsrd-paper") == FedSRDConfig(download_values="dare", rebalance=False)


@pytest.mark.parametrize(
    ("name", "overrides", "message"),
    [
        ("fedsrd", {"download_drop": 1.0}, "`download_drop`"),
        ("fedsrd", {"server": "dense"}, "`server`"),
        ("fedsrd", {"truncate": "yes"}, "`truncate`"),
        ("fedsrd", {"download_values": "exact"}, "`download_values`"),
        ("fedsrd", {"server_lr": 0}, "`server_lr`"),
        ("fedsrd", {"server_lr": -1.0}, "`server_lr`"),
        ("fedsrd", {"server_lr": float("nan")}, "`server_lr`"),
        ("fedsrd", {"server_lr": float("inf")}, "`server_lr`"),
        ("fedsrd", {"server_lr": 17}, "`server_lr`"),
        ("fedsrd", {"server_lr": True}, "`server_lr`"),
        ("fedsrd", {"server_lr": "2"}, "`server_lr`"),
        ("fedsrd-paper", {"rebalance": 1}, "`rebalance`"),
        ("fedsrd", {"sparsifier": {"alpha": 2}}, "`alpha`"),
        ("fedsrd", {"rank": 8}, "unknown field"),
        ("fedavg", {"weighting": "median"}, "`weighting`"),
        ("fedprox", {"mu": -1}, "`mu`"),
        ("fed-dare", {"drop": 1.5}, "`drop`"),
        ("fedavg", {"upload_sparsifier": {"method": "best"}}, "`method`"),
    ],
)
def test_config_errors_name_the_field(name, overrides, message):
    with pytest.raises(ValueError, match=message):
        get_strategy(name, overrides)


def test_nested_config_round_trips_through_dicts():
    cfg = FedSRDConfig(
        sparsifier=SparsifierConfig(method="random", ratio="fixed", zero_fraction=0.9),
        server="svd",
        weighting="samples",
    )
    assert FedSRDConfig.from_dict(cfg.to_dict()) == cfg
    fa = FedAvgConfig(upload_sparsifier=SparsifierConfig(method="magnitude", ratio="fixed"))
    assert FedAvgConfig.from_dict(fa.to_dict()) == fa


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("value_dtype", ["fp32", "bf16"])
def test_server_and_clients_stay_bit_identical_over_five_rounds(name, value_dtype):
    strategy = get_strategy(name)
    server = init_state(LAYOUT, RANK, seed=3)
    clients = [server.clone() for _ in range(3)]
    shapes = server.wire_shapes()
    for round_ in range(1, 6):
        ctx = RoundContext(round=round_, seed=42, value_dtype=value_dtype)
        uploads = []
        for i, local in enumerate(clients):
            trained = local_training(local, strategy, seed=round_ * 10 + i)
            blob = encode(
                strategy.client_upload(local, trained, ctx, client_seed=i), value_dtype=value_dtype
            )
            uploads.append(Upload(decode(blob, expected_shapes=None), num_samples=10 + i))
        before = state_digest(server)
        delta = strategy.server_round(server, uploads, ctx)
        blob = encode(delta, value_dtype=value_dtype)
        strategy.apply_global(server, delta)
        assert state_digest(server) != before, f"round {round_} changed nothing"
        for local in clients:
            received = decode(blob, expected_shapes={k: shapes[k] for k in delta})
            strategy.apply_global(local, received)
            assert state_digest(local) == state_digest(server)


def test_fedsrd_round_one_sends_B_only_and_later_rounds_alternate():
    strategy = get_strategy("fedsrd")
    state = init_state(LAYOUT, RANK, seed=1)
    for round_, suffix in [(1, ".lora_B"), (2, ".lora_A"), (3, ".lora_B")]:
        ctx = RoundContext(round=round_, seed=5)
        ups = [
            Upload(
                strategy.client_upload(
                    state, local_training(state, strategy, i), ctx, client_seed=i
                )
            )
            for i in range(2)
        ]
        delta = strategy.server_round(state, ups, ctx)
        assert set(delta) == {m + suffix for m in LAYOUT}
        assert all(isinstance(t, SeededSparse) for t in delta.values())
        nnz = sum(t.values.numel() for t in delta.values())
        total = sum(t.shape[0] * t.shape[1] for t in delta.values())
        assert 0.12 < nnz / total < 0.28  # DARE keeps 20%
        assert all(t.values.abs().max() > 0 for t in delta.values())
        strategy.apply_global(state, delta)


def test_fedsrd_upload_is_sparse_at_the_adaptive_density():
    strategy = get_strategy("fedsrd")
    state = init_state({"m": (400, 300)}, 16, seed=0)
    ctx = RoundContext(round=1)
    up = strategy.client_upload(state, local_training(state, strategy, 0), ctx)
    assert all(isinstance(t, SparseTensor) for t in up.values())
    for t in up.values():
        assert 0.03 < t.density <= 0.15  # rho in [0.85, 0.96]


def test_ffa_lora_never_sends_A_and_keeps_A_fixed():
    strategy = get_strategy("ffa-lora")
    assert strategy.trainable_factors() == frozenset({"B"})
    state = init_state(LAYOUT, RANK, seed=0)
    A0 = {m: state[m].A.clone() for m in LAYOUT}
    ctx = RoundContext(round=1)
    up = strategy.client_upload(state, local_training(state, strategy, 0), ctx)
    assert all(k.endswith(".lora_B") for k in up)
    delta = strategy.server_round(state, [Upload(up)], ctx)
    assert all(k.endswith(".lora_B") for k in delta)
    apply_delta(state, delta)
    assert all(torch.equal(state[m].A, A0[m]) for m in LAYOUT)


def test_fedavg_averages_factors_with_sample_weights():
    strategy = get_strategy("fedavg", {"weighting": "samples"})
    state = init_state({"m": (6, 5)}, 2, seed=0)
    ctx = RoundContext(round=1)
    ups = []
    for i, n in enumerate((1, 3)):
        ups.append(
            Upload(strategy.client_upload(state, local_training(state, strategy, i), ctx), n)
        )
    delta = strategy.server_round(state, ups, ctx)
    expect = 0.25 * ups[0].tensors["m.lora_B"] + 0.75 * ups[1].tensors["m.lora_B"]
    torch.testing.assert_close(delta["m.lora_B"], expect)


def test_fed_dare_uploads_ten_percent_rescaled():
    strategy = get_strategy("fed-dare")
    state = init_state({"m": (300, 200)}, 8, seed=0)
    trained = local_training(state, strategy, 0)
    up = strategy.client_upload(state, trained, RoundContext(round=1), client_seed=3)
    sB = up["m.lora_B"]
    assert isinstance(sB, SparseTensor) and abs(sB.density - 0.1) < 0.02
    dB = (trained["m"].B - state["m"].B).reshape(-1)
    torch.testing.assert_close(sB.values, dB[sB.indices] * 10, rtol=1e-5, atol=1e-6)


def test_fedprox_mu():
    assert get_strategy("fedprox", {"mu": 0.1}).proximal_mu() == 0.1
    assert get_strategy("fedavg").proximal_mu() == 0.0


@pytest.mark.parametrize("server", ["svd", "average"])
def test_fedsrd_ablation_servers_download_dense_factors(server):
    strategy = get_strategy("fedsrd", {"server": server})
    state = init_state(LAYOUT, RANK, seed=0)
    ctx = RoundContext(round=1)
    ups = [
        Upload(strategy.client_upload(state, local_training(state, strategy, i), ctx))
        for i in range(2)
    ]
    delta = strategy.server_round(state, ups, ctx)
    assert len(delta) == 2 * len(LAYOUT)
    assert all(isinstance(t, torch.Tensor) for t in delta.values())


def test_flexlora_download_gives_truncated_aggregate():
    from fedsrd_core.reference import dense_aggregate, dense_truncate

    strategy = get_strategy("flexlora")
    state = init_state({"m": (20, 16)}, 3, seed=0)
    ctx = RoundContext(round=1)
    ups = [
        Upload(strategy.client_upload(state, local_training(state, strategy, i), ctx))
        for i in range(3)
    ]
    dAs = [u.tensors["m.lora_A"] for u in ups]
    dBs = [u.tensors["m.lora_B"] for u in ups]
    W_r = dense_truncate(dense_aggregate(state["m"].A, state["m"].B, dAs, dBs, [1 / 3] * 3), 3)
    apply_delta(state, strategy.server_round(state, ups, ctx))
    torch.testing.assert_close((state["m"].B @ state["m"].A).double(), W_r, rtol=1e-4, atol=1e-5)


def test_rebalance_keeps_the_product_bit_identical_and_balances():
    from fedsrd_core.state import rebalance_factors

    state = init_state({"m": (30, 20), "z": (5, 4)}, 4, seed=0)
    g = torch.Generator().manual_seed(1)
    state["m"].B.copy_(torch.randn(30, 4, generator=g) * torch.tensor([1e-6, 1e-3, 1.0, 1e4]))
    before = state["m"].B @ state["m"].A
    zero_B = state["z"].A.clone()
    rebalance_factors(state)
    assert torch.equal(state["m"].B @ state["m"].A, before)
    ratio = state["m"].A.abs().amax(dim=1) / state["m"].B.abs().amax(dim=0)
    assert bool(((ratio > 0.2) & (ratio < 5)).all())
    assert torch.equal(state["z"].A, zero_B)  # B = 0: left alone
    again = state.clone()
    rebalance_factors(again)
    assert state_digest(again) == state_digest(state)  # idempotent


def test_fedsrd_rebalances_after_apply_unless_disabled():
    state = init_state({"m": (30, 20)}, 4, seed=0)
    state["m"].B.fill_(1e-6)
    get_strategy("fedsrd", {"rebalance": False}).apply_global(state, {})
    assert float(state["m"].B.abs().max()) == pytest.approx(1e-6)
    get_strategy("fedsrd").apply_global(state, {})
    assert float(state["m"].B.abs().max()) > 1e-4


def test_dare_download_positions_are_the_seeded_mask():
    """The server's cached positions equal what a client regenerates from the mask."""
    from fedsrd_core.masks import keep_threshold, seeded_positions
    from fedsrd_core.strategies import dare_download

    delta = torch.randn(40, 8, generator=torch.Generator().manual_seed(0))
    t = dare_download(delta, "m.lora_B", seed=3, round_=5, drop=0.8, value_dtype="fp32")
    regenerated = seeded_positions(3, 5, "m.lora_B", 320, keep_threshold(0.2))
    assert torch.equal(t.positions("m.lora_B"), regenerated)
    torch.testing.assert_close(t.values, delta.reshape(-1)[regenerated] * 5.0)
    other = t.positions("m.lora_A")  # another name: regenerated, not the cache
    assert torch.equal(other, seeded_positions(3, 5, "m.lora_A", 320, keep_threshold(0.2)))
    decoded = decode(encode({"m.lora_B": t}))["m.lora_B"]
    assert torch.equal(decoded.indices, regenerated)


@pytest.mark.parametrize("name", ALL)
def test_uploads_carry_exactly_the_declared_tensors(name):
    strategy = get_strategy(name)
    state = init_state(LAYOUT, RANK, seed=0)
    up = strategy.client_upload(state, local_training(state, strategy, 0), RoundContext(round=1))
    shapes = strategy.upload_shapes(state)
    assert set(up) == set(shapes)
    decode(encode(up), expected_shapes=shapes)  # what the server checks


def test_an_upload_missing_a_tensor_is_rejected():
    from fedsrd_core.codec import WireFormatError

    strategy = get_strategy("fedsrd")
    state = init_state(LAYOUT, RANK, seed=0)
    up = strategy.client_upload(state, local_training(state, strategy, 0), RoundContext(round=1))
    up.pop("layers.0.q.lora_A")
    with pytest.raises(WireFormatError, match="missing"):
        decode(encode(up), expected_shapes=strategy.upload_shapes(state))


@pytest.mark.parametrize("round_", [1, 2, 3, 4])
@pytest.mark.parametrize("truncate", [True, False])
def test_fitted_download_is_the_masked_least_squares_of_the_target(round_, truncate):
    """The fitted values against a plain row-by-row (B-round) / column-by-column (A-round)
    lstsq of the dense target on the seeded mask; DARE's values at the same positions."""
    from fedsrd_core.aggregate import module_target, one_factor_solve, update_parity
    from fedsrd_core.masks import keep_threshold, seeded_mask
    from fedsrd_core.reference import dense_aggregate, dense_truncate
    from fedsrd_core.strategies.fedsrd import dare_download, fitted_download

    g = torch.Generator().manual_seed(round_ + 10 * truncate)
    d_out, d_in, r = 30, 26, 6
    A = torch.randn(r, d_in, generator=g)
    B = torch.randn(d_out, r, generator=g)
    dAs = [torch.randn(r, d_in, generator=g) * 0.1 for _ in range(3)]
    dBs = [torch.randn(d_out, r, generator=g) * 0.1 for _ in range(3)]
    w = [0.5, 0.3, 0.2]
    which = update_parity(round_)
    name = "m" + (".lora_A" if which == "A" else ".lora_B")
    target = module_target(A, B, dAs, dBs, w, truncate=truncate)
    got = fitted_download(
        target, A, B, which, name, seed=9, round_=round_, drop=0.8, value_dtype="fp32"
    )
    W = dense_aggregate(A, B, dAs, dBs, w)
    T = (dense_truncate(W, r) if truncate else W) - B.double() @ A.double()
    shape = (d_out, r) if which == "B" else (r, d_in)
    mask = seeded_mask(9, round_, name, shape, keep_threshold(0.2))
    want = torch.zeros(shape, dtype=torch.float64)
    if which == "B":
        for u in range(d_out):
            S = mask[u].nonzero().view(-1)
            if S.numel():
                sol = torch.linalg.lstsq(A.double()[S].T, T[u].unsqueeze(1)).solution
                want[u, S] = sol.view(-1)
    else:
        for v in range(d_in):
            S = mask[:, v].nonzero().view(-1)
            if S.numel():
                sol = torch.linalg.lstsq(B.double()[:, S], T[:, v].unsqueeze(1)).solution
                want[S, v] = sol.view(-1)
    dense = got.to_sparse(name).to_dense()
    assert torch.equal(dense != 0, mask & (want != 0))
    torch.testing.assert_close(dense.double(), want, rtol=1e-4, atol=1e-5)
    # Same positions (same bytes) as DARE's values of the exact solve.
    _, delta = one_factor_solve(target, A, B, round_=round_)
    dare = dare_download(delta, name, seed=9, round_=round_, drop=0.8, value_dtype="fp32")
    assert dare.values.numel() == got.values.numel()
    # A contraction: the fitted change is never larger than the target, DARE's can be.
    change = dense.double() @ A.double() if which == "B" else B.double() @ dense.double()
    assert float(change.norm()) <= float(T.norm()) * (1 + 1e-6)
    assert float((T - change).norm()) <= float(T.norm()) * (1 + 1e-6)


@pytest.mark.parametrize("values", ["fit", "dare"])
@pytest.mark.parametrize("round_", [1, 2])
def test_server_lr_scales_the_delivered_change(values, round_):
    """``server_lr`` = eta sends eta times the unscaled values at the same positions: the
    delivered change of ``B A`` is eta times that of eta = 1 (one plain multiplication)."""
    from fedsrd_core.state import init_state

    state = init_state({"m": (30, 26)}, 6, seed=round_)
    state["m"].B.normal_(generator=torch.Generator().manual_seed(1))
    strategies = {
        eta: get_strategy("fedsrd", {"download_values": values, "server_lr": eta})
        for eta in (1.0, 2.5)
    }
    trained = local_training(state, strategies[1.0], 0)
    ctx = RoundContext(round=round_, seed=4)
    up = strategies[1.0].client_upload(state, trained, ctx)
    uploads = [Upload(decode(encode(up)), 1)]
    out = {eta: s.server_round(state, uploads, ctx) for eta, s in strategies.items()}
    assert out[1.0].keys() == out[2.5].keys() and len(out[1.0]) == 1
    for name in out[1.0]:
        one, scaled = out[1.0][name], out[2.5][name]
        assert torch.equal(one.positions(name), scaled.positions(name))
        torch.testing.assert_close(scaled.values, one.values * 2.5, rtol=1e-6, atol=0)
