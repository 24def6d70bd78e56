"""The thin (linear in m) FedSRD truncation against the dense reference, on random inputs.

The thin path (``aggregate._thin_target``) returns the target ``T = W_r - B A`` as thin
factors; it must agree with the plain dense implementation (form ``W``, full SVD, pinv, in
float64) to 1e-4 relative in the solved factor, for any client count, both parities, and
fall back to the exact Gram path when it cannot show a spectral gap. Results of
``module_target`` / ``one_factor_solve`` change only within that float tolerance.
"""

from __future__ import annotations

import pytest
import torch

import fedsrd_core.aggregate as agg
from fedsrd_core.aggregate import (
    aggregation_weights,
    fedsrd_module_delta,
    module_target,
    one_factor_solve,
)
from fedsrd_core.reference import dense_aggregate, dense_fedsrd_module_delta, dense_truncate
from fedsrd_core.state import GlobalState, LoraFactors
from fedsrd_core.strategies import RoundContext, get_strategy

TOL = 1e-4


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))


def make_inputs(d_out, d_in, r, m, *, scale=0.1, seed=0, zero_B=False, b_scale=0.1):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(r, d_in, generator=g) / d_in**0.5
    B = torch.zeros(d_out, r) if zero_B else torch.randn(d_out, r, generator=g) * b_scale
    dAs = [torch.randn(r, d_in, generator=g) * scale / d_in**0.5 for _ in range(m)]
    dBs = [torch.randn(d_out, r, generator=g) * scale * 0.1 for _ in range(m)]
    return A, B, dAs, dBs, aggregation_weights([1] * m)


def thin_path(A, B, dAs, dBs, w):
    r = A.shape[0]
    L_D, R_D = agg._centered_factors(A, B, dAs, dBs, w)
    return agg._thin_target(L_D, R_D, r)


@pytest.fixture
def thin_always(monkeypatch):
    """Take the thin path at every client count (it is the default from 8 clients on)."""
    monkeypatch.setattr(agg, "_THIN_MIN_CLIENTS", 1)


@pytest.mark.parametrize("m", [2, 4, 16, 64, 256])
@pytest.mark.parametrize("round_", [2, 3])
@pytest.mark.parametrize("truncate", [True, False])
@pytest.mark.parametrize(("d_out", "d_in", "r"), [(48, 40, 4), (40, 72, 6)])
def test_matches_dense_reference_for_any_client_count(
    thin_always, d_out, d_in, r, m, round_, truncate
):
    A, B, dAs, dBs, w = make_inputs(d_out, d_in, r, m, seed=m + round_)
    if truncate:
        _, how = thin_path(A, B, dAs, dBs, w)
        assert how == "iteration"
    which, delta = fedsrd_module_delta(A, B, dAs, dBs, w, round_=round_, truncate=truncate)
    ref_which, ref = dense_fedsrd_module_delta(A, B, dAs, dBs, w, round_=round_, truncate=truncate)
    assert which == ref_which
    assert delta.dtype == torch.float32
    assert rel_err(delta, ref) < TOL


@pytest.mark.parametrize("m", [16, 64])
@pytest.mark.parametrize("scale", [1e-2, 1e-3])
@pytest.mark.parametrize("round_", [2, 3])
def test_small_updates_stay_accurate(m, scale, round_):
    """W - B A is a small difference of large terms; the thin target is written through the
    differences (dB_bar A + B~ dA_bar - F A~ + P H), so it keeps float32 accuracy."""
    A, B, dAs, dBs, w = make_inputs(64, 50, 5, m, scale=scale, seed=3)
    assert thin_path(A, B, dAs, dBs, w)[1] == "iteration"
    _, delta = fedsrd_module_delta(A, B, dAs, dBs, w, round_=round_)
    _, ref = dense_fedsrd_module_delta(A, B, dAs, dBs, w, round_=round_)
    assert rel_err(delta, ref) < TOL


def test_thin_target_operator_matches_dense_target():
    """``times`` / ``times_left`` of the thin target against the dense ``T`` (what the
    fitted download uses), and the factored form has 4 r columns and no tail."""
    A, B, dAs, dBs, w = make_inputs(56, 44, 4, 32, seed=5)
    target, how = thin_path(A, B, dAs, dBs, w)
    assert how == "iteration" and target is not None
    assert target.tail is None and target.L.shape[1] == 4 * 4
    W = dense_aggregate(A, B, dAs, dBs, w)
    T = dense_truncate(W, 4) - B.double() @ A.double()
    g = torch.Generator().manual_seed(1)
    X = torch.randn(44, 3, generator=g)
    Z = torch.randn(2, 56, generator=g)
    assert rel_err(target.times(X), T @ X.double()) < TOL
    assert rel_err(target.times_left(Z), Z.double() @ T) < TOL
    assert rel_err(target.L.double() @ target.R.double(), T) < TOL


@pytest.mark.parametrize("round_", [1, 2])
def test_round_one_from_zero_B(thin_always, round_):
    """Round 1 starts from B = 0: B~ = dB_bar. Whatever path is taken, the result is exact."""
    A, B, dAs, dBs, w = make_inputs(40, 48, 4, 16, seed=9, zero_B=True)
    _, delta = fedsrd_module_delta(A, B, dAs, dBs, w, round_=round_)
    _, ref = dense_fedsrd_module_delta(A, B, dAs, dBs, w, round_=round_)
    assert rel_err(delta, ref) < TOL


def test_no_gap_falls_back_to_exact_path():
    """Updates as large as the factors: the Weyl bound cannot show a gap, the thin path
    declines and module_target takes the exact Gram path."""
    A, B, dAs, dBs, w = make_inputs(48, 40, 4, 16, scale=1.0, seed=2)
    target, how = thin_path(A, B, dAs, dBs, w)
    assert target is None and how == "no_gap"
    for round_ in (2, 3):
        _, delta = fedsrd_module_delta(A, B, dAs, dBs, w, round_=round_)
        _, ref = dense_fedsrd_module_delta(A, B, dAs, dBs, w, round_=round_)
        assert rel_err(delta, ref) < TOL


def test_rank_deficient_B_tilde_falls_back():
    A, B, dAs, dBs, w = make_inputs(30, 36, 4, 16, seed=4, zero_B=True)
    dBs = [torch.zeros_like(B) for _ in dBs]  # B~ = 0
    target, how = thin_path(A, B, dAs, dBs, w)
    assert target is None and how == "rank_deficient"
    _, delta = fedsrd_module_delta(A, B, dAs, dBs, w, round_=3)
    _, ref = dense_fedsrd_module_delta(A, B, dAs, dBs, w, round_=3)
    assert delta.abs().max() < 1e-6 and ref.abs().max() < 1e-6


def test_ill_conditioned_B():
    """A global B with singular values over 3 decades, as after some rounds."""
    g = torch.Generator().manual_seed(5)
    d_out, d_in, r, m = 80, 70, 6, 32
    U, _ = torch.linalg.qr(torch.randn(d_out, r, generator=g))
    B = U * torch.logspace(0, -3, r)
    A = torch.randn(r, d_in, generator=g) / d_in**0.5
    dAs = [torch.randn(r, d_in, generator=g) * 1e-3 for _ in range(m)]
    dBs = [torch.randn(d_out, r, generator=g) * 1e-5 for _ in range(m)]
    w = aggregation_weights([1] * m)
    for round_ in (2, 3):
        _, delta = fedsrd_module_delta(A, B, dAs, dBs, w, round_=round_)
        _, ref = dense_fedsrd_module_delta(A, B, dAs, dBs, w, round_=round_)
        assert rel_err(delta, ref) < TOL


def test_sample_weights(thin_always):
    g = torch.Generator().manual_seed(7)
    A, B, dAs, dBs, _ = make_inputs(40, 56, 4, 24, seed=7)
    w = aggregation_weights([int(x) for x in torch.randint(1, 100, (24,), generator=g)], "samples")
    for round_ in (2, 3):
        _, delta = fedsrd_module_delta(A, B, dAs, dBs, w, round_=round_)
        _, ref = dense_fedsrd_module_delta(A, B, dAs, dBs, w, round_=round_)
        assert rel_err(delta, ref) < TOL


@pytest.mark.parametrize("m", [16, 64])
def test_real_uploads_through_the_client_sparsifier(m):
    """Uploads from the real FedSRD client (importance + adaptive ratio, about 5-15% dense)
    on a started state: the shipped module_target + one_factor_solve against dense."""
    g = torch.Generator().manual_seed(11)
    d_out, d_in, r = 64, 48, 4
    A = torch.randn(r, d_in, generator=g) / d_in**0.5
    B = torch.randn(d_out, r, generator=g) * 0.05
    start = GlobalState({"m": LoraFactors(A, B)})
    client = get_strategy("fedsrd")
    uploads = []
    for i in range(m):
        trained = GlobalState(
            {
                "m": LoraFactors(
                    A + torch.randn(A.shape, generator=g) * 1e-2,
                    B + torch.randn(B.shape, generator=g) * 1e-2,
                )
            }
        )
        uploads.append(client.client_upload(start, trained, RoundContext(round=1), client_seed=i))
    from fedsrd_core.strategies import Upload

    ups = [Upload(u, 1) for u in uploads]
    w = client.weights(ups)
    ((_, dAs, dBs),) = list(client.module_updates(start, ups))
    assert thin_path(A, B, dAs, dBs, w)[1] == "iteration"
    for round_ in (2, 3):
        target = module_target(A, B, dAs, dBs, w)
        _, delta = one_factor_solve(target, A, B, round_=round_)
        _, ref = dense_fedsrd_module_delta(A, B, dAs, dBs, w, round_=round_)
        assert rel_err(delta, ref) < TOL
