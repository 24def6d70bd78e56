"""Client-side sparsification (Eqs. 5-8) against plain reference computations."""

from __future__ import annotations

import math

import pytest
import torch

from fedsrd_core.reference import dense_exact_update
from fedsrd_core.sparsify import (
    SparsifierConfig,
    adaptive_zero_fraction,
    exact_update,
    importance_scores,
    pearson_kurtosis,
    sparsify_matrix,
    sparsify_module_update,
    top_k_mask,
)


def factors(d_out=12, d_in=10, r=3, seed=0, zero_B=False):
    g = torch.Generator().manual_seed(seed)
    A0 = torch.randn(r, d_in, generator=g)
    B0 = torch.zeros(d_out, r) if zero_B else torch.randn(d_out, r, generator=g)
    A_i = A0 + 0.1 * torch.randn(r, d_in, generator=g)
    B_i = B0 + 0.1 * torch.randn(d_out, r, generator=g)
    return A0, B0, A_i, B_i


@pytest.mark.parametrize("zero_B", [True, False])
def test_exact_update_matches_product_difference(zero_B):
    A0, B0, A_i, B_i = factors(zero_B=zero_B)
    dA, dB = exact_update(A0, B0, A_i, B_i)
    # Eq. 5: B_i A_i - B0 A0 = dB A0 + B_i dA, exactly.
    torch.testing.assert_close(
        (dB @ A0 + B_i @ dA).double(), dense_exact_update(A0, B0, A_i, B_i), rtol=1e-5, atol=1e-5
    )


def test_importance_is_norm_of_rank_one_contribution():
    A0, B0, A_i, B_i = factors(d_out=6, d_in=5, r=2)
    dA, dB = exact_update(A0, B0, A_i, B_i)
    I_A, I_B = importance_scores(A0, B_i, dA, dB)
    for u in range(dB.shape[0]):
        for v in range(dB.shape[1]):
            E = torch.zeros_like(dB)
            E[u, v] = dB[u, v]
            assert math.isclose(float(I_B[u, v]), float(torch.linalg.norm(E @ A0)), rel_tol=1e-5)
    for u in range(dA.shape[0]):
        for v in range(dA.shape[1]):
            E = torch.zeros_like(dA)
            E[u, v] = dA[u, v]
            assert math.isclose(float(I_A[u, v]), float(torch.linalg.norm(B_i @ E)), rel_tol=1e-5)


def test_importance_rule_keeps_largest_contributions():
    A0, B0, A_i, B_i = factors(d_out=40, d_in=30, r=4, seed=3)
    cfg = SparsifierConfig(ratio="fixed", zero_fraction=0.8, rescale="none")
    sA, sB = sparsify_module_update(A0, B0, A_i, B_i, cfg)
    dA, dB = exact_update(A0, B0, A_i, B_i)
    # Brute force: the norm of every element's rank-1 term, and the smallest kept one must
    # be no smaller than the largest dropped one.
    contrib_B = torch.tensor(
        [[float(torch.linalg.norm(dB[u, v] * A0[v])) for v in range(4)] for u in range(40)]
    )
    kept = torch.zeros(40 * 4, dtype=torch.bool)
    kept[sB.indices] = True
    flat = contrib_B.reshape(-1)
    assert flat[kept].min() >= flat[~kept].max()
    assert sB.nnz == 40 * 4 - math.floor(0.8 * 160)
    torch.testing.assert_close(sB.values, dB.reshape(-1)[sB.indices])
    assert sA.nnz == 4 * 30 - math.floor(0.8 * 120)


def test_pearson_kurtosis_matches_textbook_formula():
    g = torch.Generator().manual_seed(0)
    for x in (torch.randn(5000, generator=g), torch.rand(3000, generator=g) ** 4):
        xs = [float(v) for v in x]
        mu = sum(xs) / len(xs)
        m2 = sum((v - mu) ** 2 for v in xs) / len(xs)
        m4 = sum((v - mu) ** 4 for v in xs) / len(xs)
        assert math.isclose(pearson_kurtosis(x), m4 / m2**2, rel_tol=1e-9)
    assert abs(pearson_kurtosis(torch.randn(200_000, generator=g)) - 3.0) < 0.1
    assert math.isnan(pearson_kurtosis(torch.ones(10)))


def test_adaptive_fraction_follows_eq7():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(10_000, generator=g).abs()
    k = pearson_kurtosis(x)
    assert adaptive_zero_fraction(x) == pytest.approx(0.85 + min(0.11, 0.1 * math.log(k)))
    # Light tail (uniform: kurtosis 1.8) -> ln(max(k, 1)) > 0 but small; constant -> alpha.
    u = torch.rand(10_000, generator=g)
    assert adaptive_zero_fraction(u) == pytest.approx(0.85 + 0.1 * math.log(pearson_kurtosis(u)))
    assert adaptive_zero_fraction(torch.full((50,), 2.0)) == 0.85
    # Heavy tail hits the cap.
    heavy = torch.randn(10_000, generator=g).exp() ** 3
    assert adaptive_zero_fraction(heavy, alpha=0.9, cap=0.05) == pytest.approx(0.95)


def test_adaptive_sparsify_keeps_the_eq7_count():
    A0, B0, A_i, B_i = factors(d_out=64, d_in=48, r=8, seed=2)
    dA, dB = exact_update(A0, B0, A_i, B_i)
    I_A, I_B = importance_scores(A0, B_i, dA, dB)
    cfg = SparsifierConfig()
    sB, rho = sparsify_matrix(dB, I_B, cfg)
    assert rho == pytest.approx(adaptive_zero_fraction(I_B))
    assert sB.nnz == dB.numel() - math.floor(rho * dB.numel())


def test_l1_rescale_preserves_l1_norm():
    A0, B0, A_i, B_i = factors(d_out=50, d_in=40, r=4, seed=4)
    sA, sB = sparsify_module_update(A0, B0, A_i, B_i, SparsifierConfig())
    dA, dB = exact_update(A0, B0, A_i, B_i)
    assert float(sA.values.abs().sum()) == pytest.approx(float(dA.abs().sum()), rel=1e-5)
    assert float(sB.values.abs().sum()) == pytest.approx(float(dB.abs().sum()), rel=1e-5)
    # And the kept entries keep their relative sizes and signs.
    ratio = sB.values / dB.reshape(-1)[sB.indices]
    torch.testing.assert_close(ratio, torch.full_like(ratio, float(ratio[0])))


def test_magnitude_keeps_largest_abs():
    g = torch.Generator().manual_seed(5)
    d = torch.randn(30, 8, generator=g)
    cfg = SparsifierConfig(method="magnitude", ratio="fixed", zero_fraction=0.9, rescale="none")
    sp, _ = sparsify_matrix(d, None, cfg)
    kept = torch.zeros(d.numel(), dtype=torch.bool)
    kept[sp.indices] = True
    assert d.reshape(-1).abs()[kept].min() >= d.reshape(-1).abs()[~kept].max()
    assert sp.nnz == 240 - 216


def test_random_sparsifier_density_and_dare_rescale():
    g = torch.Generator().manual_seed(6)
    d = torch.randn(400, 100, generator=g)
    cfg = SparsifierConfig(method="random", ratio="fixed", zero_fraction=0.9, rescale="dare")
    sp, _ = sparsify_matrix(d, None, cfg, generator=torch.Generator().manual_seed(0))
    assert abs(sp.density - 0.1) < 0.01
    torch.testing.assert_close(sp.values, d.reshape(-1)[sp.indices] * 10, rtol=1e-6, atol=1e-6)
    again, _ = sparsify_matrix(d, None, cfg, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.indices, sp.indices)  # deterministic given the seed


def test_top_k_mask_never_keeps_zero_scores():
    s = torch.tensor([0.0, 3.0, 0.0, 1.0])
    assert top_k_mask(s, 3).tolist() == [False, True, False, True]
    assert top_k_mask(s, 0).sum() == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "best"}, "`method`"),
        ({"ratio": "auto"}, "`ratio`"),
        ({"method": "magnitude"}, "adaptive"),
        ({"alpha": 1.2}, "`alpha`"),
        ({"alpha": 0.95, "cap": 0.1}, "alpha \\+ cap"),
        ({"zero_fraction": 1.0, "ratio": "fixed"}, "`zero_fraction`"),
        ({"c": float("nan")}, "`c`"),
        ({"rescale": "l2"}, "`rescale`"),
    ],
)
def test_config_validation_names_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SparsifierConfig(**kwargs)


def test_config_dict_round_trip():
    cfg = SparsifierConfig(method="random", ratio="fixed", zero_fraction=0.7, rescale="dare")
    assert SparsifierConfig.from_dict(cfg.to_dict()) == cfg
