"""The sparse server math (``aggregate_sparse``) against the plain dense reference.

The uploads' entries go in as they are on the wire (sparse positions and values, dense, or
absent) and are never densified on the sparse path (``SparseUpdates.dense`` is made to fail
there); the solved factor must equal the dense float64 reference (form ``W``, full SVD, pinv)
to 1e-4 relative, for FedSRD and FedSRD-e, both parities, any client count.
"""

from __future__ import annotations

import pytest
import torch

import fedsrd_core.aggregate_sparse as sp
from fedsrd_core.aggregate import aggregation_weights, module_target, one_factor_solve
from fedsrd_core.aggregate_sparse import (
    SparseModuleTarget,
    SparseUpdates,
    sparse_module_target,
)
from fedsrd_core.reference import dense_aggregate, dense_fedsrd_module_delta, dense_truncate
from fedsrd_core.sparse import SparseTensor
from fedsrd_core.state import GlobalState, LoraFactors
from fedsrd_core.strategies import RoundContext, Upload, get_strategy

TOL = 1e-4


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))


def sparse_like(
    shape: tuple[int, int], density: float, scale: float, g: torch.Generator
) -> SparseTensor:
    dense = torch.randn(shape, generator=g) * scale
    keep = torch.rand(shape, generator=g) < density
    return SparseTensor.from_mask(dense, keep)


def make_inputs(d_out, d_in, r, m, *, scale=0.1, density=0.1, seed=0, b_scale=0.3):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(r, d_in, generator=g) / d_in**0.5
    B = torch.randn(d_out, r, generator=g) * b_scale
    sAs = [sparse_like((r, d_in), density, scale / d_in**0.5 * 3, g) for _ in range(m)]
    sBs = [sparse_like((d_out, r), density, scale * 0.3, g) for _ in range(m)]
    return A, B, sAs, sBs, aggregation_weights([1] * m)


def dense_of(entries, like):
    return [torch.zeros_like(like) if e is None else _d(e) for e in entries]


def _d(e):
    return e.to_dense(torch.float32) if isinstance(e, SparseTensor) else e


@pytest.fixture
def sparse_only(monkeypatch):
    """The sparse path at every client count, and a failure if it densifies anything."""
    monkeypatch.setattr(sp, "SPARSE_MIN_CLIENTS", 1)

    def no_densifying(self):
        raise AssertionError("the sparse path densified the updates")

    monkeypatch.setattr(SparseUpdates, "dense", no_densifying)


def reference(A, B, sAs, sBs, w, round_, truncate):
    return dense_fedsrd_module_delta(
        A, B, dense_of(sAs, A), dense_of(sBs, B), w, round_=round_, truncate=truncate
    )


@pytest.mark.parametrize("m", [2, 4, 16, 64, 256])
@pytest.mark.parametrize("round_", [2, 3])
@pytest.mark.parametrize("truncate", [True, False])
@pytest.mark.parametrize(("d_out", "d_in", "r"), [(48, 40, 4), (40, 72, 6)])
def test_matches_dense_reference_for_any_client_count(
    sparse_only, d_out, d_in, r, m, round_, truncate
):
    A, B, sAs, sBs, w = make_inputs(d_out, d_in, r, m, seed=m + round_)
    target = sparse_module_target(A, B, sAs, sBs, w, truncate=truncate)
    if not truncate:
        assert isinstance(target, SparseModuleTarget)
    else:
        assert target.L.shape[1] == 4 * r  # the thin iteration's target, not the Gram path's
    which, delta = one_factor_solve(target, A, B, round_=round_)
    ref_which, ref = reference(A, B, sAs, sBs, w, round_, truncate)
    assert which == ref_which and delta.dtype == torch.float32
    assert rel_err(delta, ref) < TOL


@pytest.mark.parametrize("m", [16, 64])
@pytest.mark.parametrize("scale", [1e-2, 1e-3])
@pytest.mark.parametrize("round_", [2, 3])
@pytest.mark.parametrize("truncate", [True, False])
def test_small_updates_stay_accurate(sparse_only, m, scale, round_, truncate):
    """W - B A is small against B A; nothing here is computed as a difference with B A."""
    A, B, sAs, sBs, w = make_inputs(64, 50, 5, m, scale=scale, seed=3)
    target = sparse_module_target(A, B, sAs, sBs, w, truncate=truncate)
    _, delta = one_factor_solve(target, A, B, round_=round_)
    _, ref = reference(A, B, sAs, sBs, w, round_, truncate)
    assert rel_err(delta, ref) < TOL


def test_operators_match_dense():
    """The four CSR orientations, ``S``'s products, FedSRD-e's target and the means."""
    A, B, sAs, sBs, w = make_inputs(36, 28, 4, 9, seed=1)
    w = aggregation_weights(list(range(1, 10)), "samples")
    u = SparseUpdates(A, B, sAs, sBs, w)
    dAs, dBs = dense_of(sAs, A), dense_of(sBs, B)
    L = torch.cat([wi * d for wi, d in zip(w, dBs, strict=True)], dim=1)
    R = torch.cat(dAs, dim=0)
    torch.testing.assert_close(u.L_S.to_dense(), L)
    torch.testing.assert_close(u.R_S.to_dense(), R)
    torch.testing.assert_close(u.L_S_T.to_dense(), L.T)
    torch.testing.assert_close(u.R_S_T.to_dense(), R.T)
    torch.testing.assert_close(u.dB_bar, sum(wi * d for wi, d in zip(w, dBs, strict=True)))
    torch.testing.assert_close(u.dA_bar, sum(wi * d for wi, d in zip(w, dAs, strict=True)))
    W = dense_aggregate(A, B, dAs, dBs, w)
    T = W - B.double() @ A.double()
    g = torch.Generator().manual_seed(2)
    X, Z = torch.randn(28, 3, generator=g), torch.randn(2, 36, generator=g)
    target = SparseModuleTarget(A, B, u)
    assert rel_err(target.times(X), T @ X.double()) < 1e-5
    assert rel_err(target.times_left(Z), Z.double() @ T) < 1e-5
    T_r = dense_truncate(W, 4) - B.double() @ A.double()
    thin = sparse_module_target(A, B, sAs, sBs, w)
    assert rel_err(thin.times(X), T_r @ X.double()) < TOL
    assert rel_err(thin.times_left(Z), Z.double() @ T_r) < TOL


@pytest.mark.parametrize("correlated", [False, True])
def test_norm_bound_is_an_upper_bound(correlated):
    """The gap test's bound on ||W - B~ A~||_2, also when the clients agree (Delta ~ 0)."""
    A, B, sAs, sBs, w = make_inputs(50, 60, 5, 12, seed=4)
    if correlated:
        sAs = [sAs[0]] * 11 + [sAs[1]]
        sBs = [sBs[0]] * 11 + [sBs[1]]
    u = SparseUpdates(A, B, sAs, sBs, w)
    W = dense_aggregate(A, B, dense_of(sAs, A), dense_of(sBs, B), w)
    Bt, At = (B + u.dB_bar).double(), (A + u.dA_bar).double()
    true = float(torch.linalg.matrix_norm(W - Bt @ At, ord=2))
    assert true <= u.norm_bound()
    assert u.norm_bound() < 40 * true  # and not uselessly loose


def test_absent_and_dense_entries(sparse_only):
    """An upload without a factor counts as a zero update; dense entries are taken as they
    are (their non-zeros)."""
    A, B, sAs, sBs, w = make_inputs(40, 30, 4, 10, seed=6)
    eAs: list = list(sAs)
    eBs: list = list(sBs)
    eAs[3] = None
    eBs[5] = sBs[5].to_dense()
    for round_ in (2, 3):
        for truncate in (True, False):
            target = sparse_module_target(A, B, eAs, eBs, w, truncate=truncate)
            _, delta = one_factor_solve(target, A, B, round_=round_)
            _, ref = reference(A, B, eAs, eBs, w, round_, truncate)
            assert rel_err(delta, ref) < TOL


@pytest.mark.parametrize("decades", [2.5, 3.0])
def test_ill_conditioned_B(sparse_only, decades):
    """A global B with singular values over 2.5 and 3 decades, as after some rounds. At 3
    decades the float32 solve itself is at 1.2e-4 of the float64 reference on either path
    (pinv(B) amplifies B's float32 rounding), so there the sparse path must agree with the
    dense path instead."""
    g = torch.Generator().manual_seed(5)
    d_out, d_in, r, m = 80, 70, 6, 32
    U, _ = torch.linalg.qr(torch.randn(d_out, r, generator=g))
    B = U * torch.logspace(0, -decades, r)
    A = torch.randn(r, d_in, generator=g) / d_in**0.5
    sAs = [sparse_like((r, d_in), 0.1, 1e-3, g) for _ in range(m)]
    sBs = [sparse_like((d_out, r), 0.1, 1e-5, g) for _ in range(m)]
    w = aggregation_weights([1] * m)
    for truncate in (True, False):
        target = sparse_module_target(A, B, sAs, sBs, w, truncate=truncate)
        dense_path = module_target(A, B, dense_of(sAs, A), dense_of(sBs, B), w, truncate=truncate)
        for round_ in (2, 3):
            _, delta = one_factor_solve(target, A, B, round_=round_)
            if decades < 3:
                _, ref = reference(A, B, sAs, sBs, w, round_, truncate)
                assert rel_err(delta, ref) < TOL
            else:
                _, ref = one_factor_solve(dense_path, A, B, round_=round_)
                assert rel_err(delta, ref) < 1e-5


def test_no_gap_falls_back_to_the_dense_path(monkeypatch):
    """Updates as large as the factors: the sparse bound cannot show a gap; the updates are
    densified and the exact path answers."""
    monkeypatch.setattr(sp, "SPARSE_MIN_CLIENTS", 1)
    A, B, sAs, sBs, w = make_inputs(48, 40, 4, 16, scale=3.0, density=0.2, seed=2, b_scale=0.1)
    u = SparseUpdates(A, B, sAs, sBs, w)
    target, why = sp.thin_truncation(u.dB_bar, B + u.dB_bar, A, u.dA_bar, sp._SparseDelta(u))
    assert target is None and why == "no_gap"
    for round_ in (2, 3):
        _, delta = one_factor_solve(sparse_module_target(A, B, sAs, sBs, w), A, B, round_=round_)
        _, ref = reference(A, B, sAs, sBs, w, round_, True)
        assert rel_err(delta, ref) < TOL


def test_switch_to_the_dense_path(monkeypatch):
    """Below SPARSE_MIN_CLIENTS, or denser than SPARSE_MAX_DENSITY, the dense path (its
    target carries all (m + 1) r stacked columns); the result is the same."""
    monkeypatch.setattr(sp, "SPARSE_MIN_CLIENTS", 1)
    A, B, sAs, sBs, w = make_inputs(40, 30, 4, 8, density=0.5, seed=8)
    dense_target = sparse_module_target(A, B, sAs, sBs, w, truncate=False)
    assert not isinstance(dense_target, SparseModuleTarget)
    assert dense_target.L.shape[1] == 9 * 4
    monkeypatch.setattr(sp, "SPARSE_MAX_DENSITY", 1.0)
    sparse_target = sparse_module_target(A, B, sAs, sBs, w, truncate=False)
    assert isinstance(sparse_target, SparseModuleTarget)
    for round_ in (2, 3):
        _, a = one_factor_solve(dense_target, A, B, round_=round_)
        _, b = one_factor_solve(sparse_target, A, B, round_=round_)
        assert rel_err(a, b) < 1e-5
    monkeypatch.setattr(sp, "SPARSE_MIN_CLIENTS", 9)
    assert not isinstance(
        sparse_module_target(A, B, sAs, sBs, w, truncate=False), SparseModuleTarget
    )


def test_bad_entries_are_refused():
    A, B, sAs, sBs, w = make_inputs(20, 16, 2, 3, seed=1)
    with pytest.raises(ValueError, match="client 1: dA"):
        sparse_module_target(A, B, [sAs[0], torch.zeros(3, 16), sAs[2]], sBs, w)
    with pytest.raises(ValueError, match="one dA, dB and weight"):
        sparse_module_target(A, B, sAs[:2], sBs, w)
    with pytest.raises(ValueError, match="weights must sum to 1"):
        sparse_module_target(A, B, sAs, sBs, [0.5, 0.5, 0.5])


@pytest.mark.parametrize("m", [16, 64])
@pytest.mark.parametrize("name", ["fedsrd", "fedsrd-e"])
def test_real_uploads_server_round(m, name):
    """Uploads from the real FedSRD client (importance + adaptive ratio): the strategy's
    round on the sparse path against the dense reference, and its fitted download against
    the dense path's."""
    g = torch.Generator().manual_seed(11)
    d_out, d_in, r = 64, 48, 4
    A = torch.randn(r, d_in, generator=g) / d_in**0.5
    B = torch.randn(d_out, r, generator=g) * 0.05
    start = GlobalState({"m": LoraFactors(A, B)})
    strat = get_strategy(name)
    ups = []
    for i in range(m):
        trained = GlobalState(
            {
                "m": LoraFactors(
                    A + torch.randn(A.shape, generator=g) * 1e-2,
                    B + torch.randn(B.shape, generator=g) * 1e-2,
                )
            }
        )
        ups.append(
            Upload(strat.client_upload(start, trained, RoundContext(round=1), client_seed=i))
        )
    w = strat.weights(ups)
    ((_, eAs, eBs),) = list(strat.module_entries(start, ups))
    assert all(isinstance(e, SparseTensor) for e in eAs + eBs)
    truncate = name == "fedsrd"
    target = sparse_module_target(A, B, eAs, eBs, w, truncate=truncate)
    if not truncate:
        assert isinstance(target, SparseModuleTarget)
    for round_ in (2, 3):
        _, delta = one_factor_solve(target, A, B, round_=round_)
        _, ref = reference(A, B, eAs, eBs, w, round_, truncate)
        assert rel_err(delta, ref) < TOL
        ctx = RoundContext(round=round_, seed=3)
        fast = strat.server_round(start, ups, ctx)
        saved = sp.SPARSE_MIN_CLIENTS
        sp.SPARSE_MIN_CLIENTS = 1 << 30
        try:
            slow = strat.server_round(start, ups, ctx)
        finally:
            sp.SPARSE_MIN_CLIENTS = saved
        assert fast.keys() == slow.keys()
        for key in fast:
            assert rel_err(fast[key].values, slow[key].values) < TOL
