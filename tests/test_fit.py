"""Download values fitted on a mask, against a row-by-row dense least-squares reference."""

from __future__ import annotations

import pytest
import torch

from fedsrd_core.fit import masked_least_squares


def reference(A: torch.Tensor, T: torch.Tensor, mask: torch.Tensor, ridge: float) -> torch.Tensor:
    """Row by row: argmin_x ||x A[S] - T[i]||^2 + ridge ||x||^2, by an augmented lstsq."""
    n, r = mask.shape
    out = torch.zeros(n, r, dtype=torch.float64)
    for i in range(n):
        S = mask[i].nonzero().view(-1)
        if S.numel() == 0:
            continue
        M = A[S].double().T  # d_in x |S|
        y = T[i].double()
        if ridge > 0:
            M = torch.cat([M, ridge**0.5 * torch.eye(S.numel(), dtype=torch.float64)])
            y = torch.cat([y, torch.zeros(S.numel(), dtype=torch.float64)])
        out[i, S] = torch.linalg.lstsq(M, y.unsqueeze(1), driver="gelsd").solution.view(-1)
    return out


@pytest.mark.parametrize(
    ("n", "r", "d_in", "keep"), [(40, 8, 30, 0.2), (25, 16, 64, 0.35), (9, 4, 50, 1.0)]
)
@pytest.mark.parametrize("ridge", [0.0, 0.3])
def test_matches_rowwise_lstsq(n, r, d_in, keep, ridge):
    g = torch.Generator().manual_seed(n * r + d_in)
    A = torch.randn(r, d_in, generator=g)
    T = torch.randn(n, d_in, generator=g)
    mask = torch.rand(n, r, generator=g) < keep
    X = masked_least_squares(A @ A.T, T @ A.T, mask, ridge=ridge)
    ref = reference(A, T, mask, ridge)
    assert X.dtype == torch.float32
    assert bool((X[~mask] == 0).all())
    torch.testing.assert_close(X.double(), ref, rtol=1e-4, atol=1e-5)


def test_full_mask_is_the_pinv_solve_and_empty_rows_are_zero():
    g = torch.Generator().manual_seed(3)
    A = torch.randn(6, 20, generator=g)
    T = torch.randn(12, 20, generator=g)
    full = masked_least_squares(A @ A.T, T @ A.T, torch.ones(12, 6, dtype=torch.bool))
    torch.testing.assert_close(
        full.double(), T.double() @ torch.linalg.pinv(A.double()), rtol=1e-4, atol=1e-5
    )
    empty = masked_least_squares(A @ A.T, T @ A.T, torch.zeros(12, 6, dtype=torch.bool))
    assert bool((empty == 0).all())


def test_rank_deficient_fixed_factor_gives_the_minimum_norm_solution():
    g = torch.Generator().manual_seed(4)
    base = torch.randn(3, 30, generator=g)
    A = torch.cat([base, base[:1] * 2.0, torch.zeros(1, 30)])  # rank 3 of 5
    T = torch.randn(7, 30, generator=g)
    mask = torch.ones(7, 5, dtype=torch.bool)
    mask[0, 1] = False
    X = masked_least_squares(A @ A.T, T @ A.T, mask)
    torch.testing.assert_close(X.double(), reference(A, T, mask, 0.0), rtol=1e-4, atol=1e-5)
    assert float(X.abs().max()) < 10  # no blow-up along the null directions


def test_delivered_change_is_a_contraction_of_the_target():
    """The fitted change is a projection of T: never larger, and T - D is orthogonal to D."""
    g = torch.Generator().manual_seed(5)
    A = torch.randn(8, 40, generator=g) * torch.logspace(0, -3, 8).unsqueeze(1)  # ill-conditioned
    T = torch.randn(30, 40, generator=g)
    mask = torch.rand(30, 8, generator=g) < 0.2
    D = masked_least_squares(A @ A.T, T @ A.T, mask).double() @ A.double()
    assert float(D.norm()) <= float(T.norm())
    assert abs(float(((T.double() - D) * D).sum())) < 1e-4 * float(T.norm()) ** 2


def test_bad_arguments():
    with pytest.raises(ValueError, match="shapes"):
        masked_least_squares(torch.eye(3), torch.zeros(4, 2), torch.ones(4, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="ridge"):
        masked_least_squares(
            torch.eye(2), torch.zeros(4, 2), torch.ones(4, 2, dtype=torch.bool), ridge=-1
        )
