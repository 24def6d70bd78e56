"""Factored server step against the dense reference (Eqs. 9-13), on random inputs."""

from __future__ import annotations

import pytest
import torch

from fedsrd_core.aggregate import (
    aggregation_weights,
    average_factors,
    fedsrd_module_delta,
    left_pinv_product,
    right_pinv_product,
    truncated_factors,
    update_parity,
)
from fedsrd_core.reference import (
    dense_aggregate,
    dense_fedsrd_module_delta,
    dense_pinv,
    dense_truncate,
)

# (d_out, d_in, r, m): square, tall, wide, d_out < m r (rank-deficient stack), m = 1 .. 8.
SHAPES = [
    (48, 40, 4, 1),
    (48, 40, 4, 2),
    (64, 96, 8, 3),
    (96, 64, 8, 4),
    (30, 20, 8, 8),
    (128, 80, 16, 5),
    (40, 200, 6, 7),
]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))


def make_inputs(d_out, d_in, r, m, *, scale=1.0, seed=0, zero_B=False, weights="uniform"):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(r, d_in, generator=g) / d_in**0.5
    B = torch.zeros(d_out, r) if zero_B else torch.randn(d_out, r, generator=g) * 0.1
    dAs = [torch.randn(r, d_in, generator=g) * scale / d_in**0.5 for _ in range(m)]
    dBs = [torch.randn(d_out, r, generator=g) * scale * 0.1 for _ in range(m)]
    if weights == "uniform":
        w = aggregation_weights([1] * m)
    else:
        w = aggregation_weights(
            [int(x) for x in torch.randint(1, 100, (m,), generator=g)], "samples"
        )
    return A, B, dAs, dBs, w


@pytest.mark.parametrize(("d_out", "d_in", "r", "m"), SHAPES)
@pytest.mark.parametrize("round_", [1, 2, 3, 4])
@pytest.mark.parametrize("truncate", [True, False])
def test_factored_matches_dense_reference(d_out, d_in, r, m, round_, truncate):
    # Round 1 starts from B = 0, as every run does.
    A, B, dAs, dBs, w = make_inputs(d_out, d_in, r, m, seed=round_ * 100 + m, zero_B=round_ == 1)
    which, delta = fedsrd_module_delta(A, B, dAs, dBs, w, round_=round_, truncate=truncate)
    ref_which, ref = dense_fedsrd_module_delta(A, B, dAs, dBs, w, round_=round_, truncate=truncate)
    assert which == ref_which == ("B" if round_ % 2 else "A")
    assert delta.dtype == torch.float32
    assert delta.shape == ((d_out, r) if which == "B" else (r, d_in))
    assert rel_err(delta, ref) < 1e-4


@pytest.mark.parametrize(("d_out", "d_in", "r", "m"), SHAPES[1:5])
@pytest.mark.parametrize("round_", [2, 3])
@pytest.mark.parametrize("scale", [1e-2, 1e-3])
def test_small_updates_stay_accurate(d_out, d_in, r, m, round_, scale):
    """Updates 100x and 1000x smaller than the factors: W - BA is a small difference of
    large terms.

    The factored path writes T through the updates themselves, so it keeps fp32 accuracy
    where a dense fp32 path loses about ||W|| / ||T|| in relative precision. (30, 20, 8, 8)
    stacks more columns than rows, so it takes the eigendecomposition fallback.
    """
    A, B, dAs, dBs, w = make_inputs(d_out, d_in, r, m, scale=scale, seed=7)
    _, delta = fedsrd_module_delta(A, B, dAs, dBs, w, round_=round_, truncate=True)
    _, ref = dense_fedsrd_module_delta(A, B, dAs, dBs, w, round_=round_, truncate=True)
    assert rel_err(delta, ref) < 1e-4


def test_round_one_updates_B_and_is_not_a_noop():
    A, B, dAs, dBs, w = make_inputs(32, 24, 4, 3, zero_B=True)
    which, delta = fedsrd_module_delta(A, B, dAs, dBs, w, round_=1)
    assert which == "B"
    assert delta.abs().max() > 0
    # And the update moves B A toward the truncated aggregate: with A full row rank,
    # (B + dB) A is the projection of W_r onto the row space of A.
    W_r = dense_truncate(dense_aggregate(A, B, dAs, dBs, w), 4)
    proj = W_r @ dense_pinv(A.double()) @ A.double()
    assert rel_err((B + delta) @ A, proj) < 1e-4


def test_update_parity_counts_from_one():
    assert [update_parity(t) for t in (1, 2, 3, 4)] == ["B", "A", "B", "A"]
    with pytest.raises(ValueError, match="rounds count from 1"):
        update_parity(0)


@pytest.mark.parametrize("round_", [2, 3])
def test_sample_weighted_aggregation(round_):
    A, B, dAs, dBs, w = make_inputs(40, 56, 6, 4, seed=3, weights="samples")
    assert abs(sum(w) - 1) < 1e-12 and len(set(w)) > 1
    _, delta = fedsrd_module_delta(A, B, dAs, dBs, w, round_=round_)
    _, ref = dense_fedsrd_module_delta(A, B, dAs, dBs, w, round_=round_)
    assert rel_err(delta, ref) < 1e-4


def test_identical_clients_rank_deficient_stack():
    """m identical updates: the stacked factors are rank r, not m r (fallback path)."""
    A, B, dAs, dBs, _ = make_inputs(50, 60, 5, 1, seed=11)
    dAs, dBs = dAs * 4, dBs * 4
    w = aggregation_weights([1] * 4)
    for round_ in (1, 2):
        _, delta = fedsrd_module_delta(A, B, dAs, dBs, w, round_=round_)
        _, ref = dense_fedsrd_module_delta(A, B, dAs, dBs, w, round_=round_)
        assert rel_err(delta, ref) < 1e-4


def test_ill_conditioned_B_uses_fallback_and_stays_accurate():
    """A global B with singular values spread over 4 decades, as after some rounds."""
    g = torch.Generator().manual_seed(5)
    d_out, d_in, r, m = 80, 70, 8, 3
    U, _ = torch.linalg.qr(torch.randn(d_out, r, generator=g))
    B = U * torch.logspace(0, -4, r)
    A = torch.randn(r, d_in, generator=g) / d_in**0.5
    dAs = [torch.randn(r, d_in, generator=g) * 1e-2 for _ in range(m)]
    dBs = [torch.randn(d_out, r, generator=g) * 1e-3 for _ in range(m)]
    w = aggregation_weights([1] * m)
    for round_ in (2, 3):
        _, delta = fedsrd_module_delta(A, B, dAs, dBs, w, round_=round_)
        _, ref = dense_fedsrd_module_delta(A, B, dAs, dBs, w, round_=round_)
        assert rel_err(delta, ref) < 1e-4


def test_zero_updates_give_zero_delta():
    A, B, dAs, dBs, w = make_inputs(20, 30, 4, 3)
    zA = [torch.zeros_like(A)] * 3
    zB = [torch.zeros_like(B)] * 3
    for round_ in (1, 2):
        _, delta = fedsrd_module_delta(A, B, zA, zB, w, round_=round_)
        assert delta.abs().max() < 1e-6 * B.abs().max()


@pytest.mark.parametrize(("d_out", "d_in", "r", "m"), SHAPES)
def test_truncated_factors_match_dense_svd(d_out, d_in, r, m):
    A, B, dAs, dBs, w = make_inputs(d_out, d_in, r, m, seed=m)
    A_new, B_new = truncated_factors(A, B, dAs, dBs, w)
    assert A_new.shape == A.shape and B_new.shape == B.shape
    W_r = dense_truncate(dense_aggregate(A, B, dAs, dBs, w), r)
    assert rel_err(B_new @ A_new, W_r) < 1e-4
    # Balanced factors: B'^T B' = A' A'^T = S_r.
    torch.testing.assert_close(B_new.T @ B_new, A_new @ A_new.T, atol=1e-4, rtol=1e-3)


def test_average_factors_is_weighted_mean():
    A, B, dAs, dBs, w = make_inputs(10, 12, 3, 3, weights="samples")
    dA, dB = average_factors(dAs, dBs, w)
    torch.testing.assert_close(dA, sum(wi * d for wi, d in zip(w, dAs, strict=True)))
    torch.testing.assert_close(dB, sum(wi * d for wi, d in zip(w, dBs, strict=True)))


@pytest.mark.parametrize(("rows", "cols"), [(4, 50), (16, 300), (8, 8)])
def test_pinv_products_match_torch_pinv(rows, cols):
    g = torch.Generator().manual_seed(rows)
    A = torch.randn(rows, cols, generator=g)
    Y = torch.randn(7, cols, generator=g)
    torch.testing.assert_close(
        right_pinv_product(Y, A).double(), Y.double() @ dense_pinv(A.double()), rtol=1e-4, atol=1e-5
    )
    Bt = A.T.contiguous()
    Z = torch.randn(cols, 5, generator=g)
    torch.testing.assert_close(
        left_pinv_product(Bt, Z).double(),
        dense_pinv(Bt.double()) @ Z.double(),
        rtol=1e-4,
        atol=1e-5,
    )


def test_pinv_of_zero_is_zero():
    A = torch.zeros(4, 10)
    assert right_pinv_product(torch.randn(3, 10), A).abs().max() == 0


def test_rank_deficient_pinv_matches_reference():
    g = torch.Generator().manual_seed(2)
    A = torch.randn(3, 2, generator=g) @ torch.randn(2, 40, generator=g)  # rank 2 of 3 rows
    Y = torch.randn(5, 40, generator=g)
    torch.testing.assert_close(
        right_pinv_product(Y, A).double(), Y.double() @ dense_pinv(A.double()), rtol=1e-4, atol=1e-4
    )


def test_weights_validation():
    with pytest.raises(ValueError, match="no client updates"):
        aggregation_weights([])
    with pytest.raises(ValueError, match="positive sum"):
        aggregation_weights([0, 0], "samples")
    with pytest.raises(ValueError, match="`weighting`"):
        aggregation_weights([1], "median")  # type: ignore[arg-type]


def test_input_validation_names_the_problem():
    A, B, dAs, dBs, w = make_inputs(10, 12, 3, 2)
    with pytest.raises(ValueError, match="client 1"):
        fedsrd_module_delta(A, B, [dAs[0], dAs[1][:, :5]], dBs, w, round_=1)
    with pytest.raises(ValueError, match="sum to 1"):
        fedsrd_module_delta(A, B, dAs, dBs, [0.5, 0.6], round_=1)
    with pytest.raises(ValueError, match="one dA, dB and weight"):
        fedsrd_module_delta(A, B, dAs, dBs[:1], w, round_=1)


@pytest.mark.parametrize(
    ("case", "method"),
    [("well_conditioned", "cholesky"), ("rank_deficient", "eigh"), ("ill_conditioned", "eigh")],
)
def test_orthonormal_factor_both_paths(case, method):
    from fedsrd_core.aggregate import _scaled_factor

    g = torch.Generator().manual_seed(1)
    X = torch.randn(200, 12, generator=g)
    if case == "rank_deficient":
        X[:, 6:] = X[:, :6] @ torch.randn(6, 6, generator=g)
    elif case == "ill_conditioned":  # singular values over 5 decades, columns mixed
        Q, _ = torch.linalg.qr(X)
        V, _ = torch.linalg.qr(torch.randn(12, 12, generator=g))
        X = (Q * torch.logspace(0, -5, 12)) @ V.T
    f, scale = _scaled_factor(X, rows=False)
    torch.testing.assert_close(scale, X.double().norm(dim=0), rtol=1e-6, atol=0)
    X = X.double() / scale
    assert f.method == method
    Q = X @ f.M
    torch.testing.assert_close(
        Q.T @ Q, torch.eye(Q.shape[1], dtype=torch.float64), atol=1e-4, rtol=0
    )
    torch.testing.assert_close(Q @ f.N, X, atol=1e-5, rtol=0)
    # The row form gives the same factor for the transposed matrix.
    fr, scale_r = _scaled_factor(X.T.float().contiguous(), rows=True)
    assert fr.method == method
    torch.testing.assert_close(scale_r, torch.ones_like(scale_r), atol=1e-6, rtol=0)


def test_gram_blocks_match_full_product():
    from fedsrd_core.aggregate import _gram

    g = torch.Generator().manual_seed(4)
    for k in (1, 63, 64, 65, 200):
        X = torch.randn(90, k, generator=g)
        torch.testing.assert_close(_gram(X, rows=False), X.T @ X, rtol=1e-5, atol=1e-4)
        Xt = X.T.contiguous()
        torch.testing.assert_close(_gram(Xt, rows=True), X.T @ X, rtol=1e-5, atol=1e-4)


def _core_of(A, B, dAs, dBs, w):
    """The ``m r x m r`` matrix whose top eigenspace the truncation needs, and whether its
    coordinates are Cholesky ones (warm start)."""
    from fedsrd_core.aggregate import _centered_factors, _gram, _scaled_factor

    r = A.shape[0]
    L_D, R_D = _centered_factors(A, B, dAs, dBs, w)
    R_W = torch.cat([R_D[:r] + R_D[r : 2 * r], R_D[2 * r :]], dim=0)
    f, s = _scaled_factor(L_D[:, r:], rows=False)
    NS = f.N * s
    M = NS @ _gram(R_W, rows=True).double() @ NS.T
    return 0.5 * (M + M.T), f.method == "cholesky"


@pytest.mark.parametrize(("scale", "method"), [(1e-2, "iteration"), (1.0, "eigh")])
def test_top_subspace_iteration_and_fallback_agree_with_eigh(scale, method):
    """Small updates (a clear spectral gap) converge by subspace iteration; comparable
    updates (a small gap) fall back to the eigendecomposition. Both give the exact
    subspace: the projectors match the one from eigh."""
    from fedsrd_core.aggregate import _top_eigenspace

    A, B, dAs, dBs, w = make_inputs(120, 90, 6, 4, scale=scale, seed=8)
    M, warm = _core_of(A, B, dAs, dBs, w)
    assert warm
    X, how = _top_eigenspace(M, 6, warm=True)
    assert how == method
    Y, how_ref = _top_eigenspace(M, 6, warm=False)
    assert how_ref == "eigh"
    torch.testing.assert_close(X @ X.T, Y @ Y.T, atol=1e-8, rtol=0)
    torch.testing.assert_close(X.T @ X, torch.eye(6, dtype=X.dtype), atol=1e-12, rtol=0)


@pytest.mark.parametrize("cond", [1.0, 1e3, 1e6, 1e12])
def test_orthonormal_columns_against_householder(cond):
    """Cholesky-QR2 spans the same columns as Householder QR with orthonormality to
    1e-12; a Gram too ill-conditioned for it falls back to Householder QR."""
    from fedsrd_core.aggregate import _orthonormal_columns

    g = torch.Generator().manual_seed(int(cond) % 1000)
    U, _ = torch.linalg.qr(torch.randn(150, 10, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(10, 10, generator=g, dtype=torch.float64))
    Y = (U * torch.logspace(0, -torch.log10(torch.tensor(cond)).item(), 10).double()) @ V.T
    Q = _orthonormal_columns(Y)
    ref = torch.linalg.qr(Y).Q
    torch.testing.assert_close(Q.T @ Q, torch.eye(10, dtype=Q.dtype), atol=1e-12, rtol=0)
    torch.testing.assert_close(Q @ Q.T, ref @ ref.T, atol=1e-9 * cond, rtol=0)
    # Q spans Y: Y = Q (Q^T Y).
    torch.testing.assert_close(Q @ (Q.T @ Y), Y, atol=1e-12, rtol=0)


@pytest.mark.parametrize(("d_out", "d_in", "r", "m"), SHAPES)
@pytest.mark.parametrize("scale", [1e-2, 1.0])
def test_rank_r_projection_matches_dense_svd(d_out, d_in, r, m, scale):
    """``(L Z)(Y^T R)`` is the dense rank-r truncation of ``W = L R`` and ``L Z`` has
    orthonormal columns; the tail operator gives ``W - W_r``."""
    from fedsrd_core.aggregate import _centered_factors, _rank_r_projection

    A, B, dAs, dBs, w = make_inputs(d_out, d_in, r, m, scale=scale, seed=d_out + m)
    L_D, R_D = _centered_factors(A, B, dAs, dBs, w)
    L = L_D[:, r:]
    R = torch.cat([R_D[:r] + R_D[r : 2 * r], R_D[2 * r :]], dim=0)
    W = L.double() @ R.double()
    W_r = dense_truncate(W, r)
    proj = _rank_r_projection(L, R, r)
    if proj is None:  # rank(L) <= r: nothing beyond rank r
        assert torch.linalg.matrix_rank(W).item() <= r
        return
    LZ = L.double() @ proj.Z
    torch.testing.assert_close(LZ.T @ LZ, torch.eye(r, dtype=LZ.dtype), atol=1e-4, rtol=0)
    assert rel_err(LZ @ (proj.Y.T @ R.double()), W_r) < 1e-5
    eye = torch.eye(L.shape[1], dtype=torch.float64)
    tail = L.double() @ proj.right(eye) @ R.double()
    torch.testing.assert_close(L.double() @ proj.left(eye) @ R.double(), tail)
    assert float((tail - (W - W_r)).norm()) < 1e-5 * float(W.norm())
