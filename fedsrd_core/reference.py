"""Plain dense reference implementations, for tests and benchmarks only.

These form the ``d_out x d_in`` aggregate, take its full SVD and use ``torch.linalg.pinv``
exactly as the paper states Eqs. 9-13. They are obviously correct and slow; the factored
fast paths in :mod:`fedsrd_core.aggregate` are checked against them. They compute in
``dtype`` (float64 by default, so that they are the more accurate side of a comparison).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedsrd_core.aggregate import Factor, update_parity

_EPS32 = float(torch.finfo(torch.float32).eps)


def dense_aggregate(
    A: torch.Tensor,
    B: torch.Tensor,
    dAs: Sequence[torch.Tensor],
    dBs: Sequence[torch.Tensor],
    weights: Sequence[float],
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Eq. 9: ``W = sum_i w_i (B + dB_i)(A + dA_i)``, ``d_out x d_in`` in ``dtype``."""
    W = torch.zeros(B.shape[0], A.shape[1], dtype=dtype, device=A.device)
    for w, dA, dB in zip(weights, dAs, dBs, strict=True):
        W += w * ((B + dB).to(dtype) @ (A + dA).to(dtype))
    return W


def dense_truncate(W: torch.Tensor, r: int) -> torch.Tensor:
    """Eq. 10: best rank-``r`` approximation of ``W`` by a full SVD."""
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    return torch.matmul(U[:, :r] * S[:r], Vh[:r])


def dense_pinv(X: torch.Tensor) -> torch.Tensor:
    """``torch.linalg.pinv`` with the float32 cut-off ``max(shape) * eps32`` in any dtype."""
    out: torch.Tensor = torch.linalg.pinv(X, rtol=max(X.shape) * _EPS32)
    return out


def dense_fedsrd_module_delta(
    A: torch.Tensor,
    B: torch.Tensor,
    dAs: Sequence[torch.Tensor],
    dBs: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    round_: int,
    truncate: bool = True,
    dtype: torch.dtype = torch.float64,
) -> tuple[Factor, torch.Tensor]:
    """Eqs. 9-13 done densely: the reference for ``aggregate.fedsrd_module_delta``."""
    which = update_parity(round_)
    W = dense_aggregate(A, B, dAs, dBs, weights, dtype)
    if truncate:
        W = dense_truncate(W, A.shape[0])
    T = W - B.to(dtype) @ A.to(dtype)
    if which == "B":
        return "B", T @ dense_pinv(A.to(dtype))
    return "A", dense_pinv(B.to(dtype)) @ T


def dense_exact_update(
    A0: torch.Tensor, B0: torch.Tensor, A_i: torch.Tensor, B_i: torch.Tensor
) -> torch.Tensor:
    """``B_i A_i - B0 A0`` formed densely in float64."""
    d = torch.float64
    return B_i.to(d) @ A_i.to(d) - B0.to(d) @ A0.to(d)
