"""fedsrd_core.diagnostics against plain computations on random inputs."""

from __future__ import annotations

import math

import pytest
import torch

from fedsrd_core.aggregate import fedsrd_module_delta
from fedsrd_core.diagnostics import module_class, module_diagnostics, summarise_by_class


def _inputs(seed: int, d_out: int = 24, d_in: int = 20, r: int = 4, m: int = 3):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(r, d_in, generator=g)
    B = torch.randn(d_out, r, generator=g) * 0.3
    dAs = [torch.randn(r, d_in, generator=g) * 0.1 for _ in range(m)]
    dBs = [torch.randn(d_out, r, generator=g) * 0.1 for _ in range(m)]
    return A, B, dAs, dBs, [1.0 / m] * m


def _plain_target(A, B, dAs, dBs, w, truncate):
    d = torch.float64
    W = sum(wi * (B + dB).to(d) @ (A + dA).to(d) for wi, dA, dB in zip(w, dAs, dBs, strict=True))
    if truncate:
        U, S, Vh = torch.linalg.svd(W)
        r = A.shape[0]
        W_r = U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]
    else:
        W_r = W
    return W, W_r, W_r - B.to(d) @ A.to(d)


@pytest.mark.parametrize("round_", [1, 2])
@pytest.mark.parametrize("truncate", [True, False])
def test_exact_solve_delivers_the_projection_and_nothing_else(round_, truncate):
    A, B, dAs, dBs, w = _inputs(round_ + 2 * truncate)
    which, delta = fedsrd_module_delta(A, B, dAs, dBs, w, round_=round_, truncate=truncate)
    new_A, new_B = (A + delta, B) if which == "A" else (A, B + delta)
    m = module_diagnostics(A, B, dAs, dBs, w, new_A, new_B, round_=round_, truncate=truncate)
    W, W_r, T = _plain_target(A, B, dAs, dBs, w, truncate)
    # The plain one-factor least squares: min ||dB A - T|| (B-round) / ||B dA - T|| (A-round).
    d = torch.float64
    if which == "B":
        X = torch.linalg.lstsq(A.to(d).T, T.T).solution.T
        solved = X @ A.to(d)
        fixed = A.to(d)
    else:
        X = torch.linalg.lstsq(B.to(d), T).solution
        solved = B.to(d) @ X
        fixed = B.to(d)
    s = torch.linalg.svdvals(fixed)
    assert m["cond_fixed"] == pytest.approx(float(s[0] / s[-1]), rel=1e-9)
    assert m["target"] == pytest.approx(float(T.norm()), rel=1e-9)
    assert m["solved"] == pytest.approx(float(solved.norm()), rel=1e-6)
    assert m["projection_loss"] == pytest.approx(float((T - solved).norm() / T.norm()), rel=1e-5)
    # A dense download of the exact solve delivers exactly the projection.
    assert m["download_noise"] < 1e-5
    assert m["residual"] == pytest.approx(m["projection_loss"], rel=1e-4)
    assert m["alignment"] == pytest.approx(float(solved.norm() / T.norm()), rel=1e-4)
    expected_trunc = float((W - W_r).norm() / (W - B.to(d) @ A.to(d)).norm())
    assert m["truncation_loss"] == pytest.approx(expected_trunc, abs=1e-9)
    assert (m["truncation_loss"] == 0.0) == (not truncate)
    assert m["norm_A"] == pytest.approx(float(A.norm()), rel=1e-6)
    assert m["norm_B"] == pytest.approx(float(B.norm()), rel=1e-6)


def test_download_noise_of_dare_is_near_its_prediction():
    """Keeping each entry with probability q and scaling by 1/q adds element-wise noise of
    relative size sqrt((1 - q) / q): 2 at the paper's p = 0.8, on average."""
    A, B, dAs, dBs, w = _inputs(7, d_out=200, d_in=160, r=8)
    _, delta = fedsrd_module_delta(A, B, dAs, dBs, w, round_=1)  # dB, d_out x r
    g = torch.Generator().manual_seed(0)
    keep = torch.rand(delta.shape, generator=g) < 0.2
    new_B = B + torch.where(keep, delta / 0.2, 0.0)
    m = module_diagnostics(A, B, dAs, dBs, w, A, new_B, round_=1, truncate=True)
    assert m["download_noise"] == pytest.approx(2.0, rel=0.15)
    assert m["residual"] > 1.5


def test_rank_deficient_fixed_factor_has_infinite_condition():
    A, B, dAs, dBs, w = _inputs(3)
    B = torch.zeros_like(B)  # round 2 holds B fixed, and B = 0 at the start
    _, delta = fedsrd_module_delta(A, B, dAs, dBs, w, round_=2)
    m = module_diagnostics(A, B, dAs, dBs, w, A + delta, B, round_=2, truncate=True)
    assert math.isinf(m["cond_fixed"])
    assert m["projection_loss"] == pytest.approx(1.0)  # nothing can be delivered through B = 0


def test_summary_is_the_median_per_class_and_over_all():
    rows = {
        "model.layers.0.self_attn.q_proj": {"x": 1.0},
        "model.layers.1.self_attn.q_proj": {"x": 3.0},
        "model.layers.0.mlp.up_proj": {"x": 10.0},
    }
    assert module_class("model.layers.0.mlp.up_proj") == "up_proj"
    s = summarise_by_class(rows)
    assert s["q_proj"]["x"] == 1.0  # torch's median of an even count is the lower middle
    assert s["up_proj"]["x"] == 10.0
    assert s["all"]["x"] == 3.0
