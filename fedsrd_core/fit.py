"""Download values fitted on a seeded mask (beyond the paper).

FedSRD broadcasts one factor's update ``dB`` (odd rounds) or ``dA`` (even rounds) with only a
random 20% of its entries, at positions every client regenerates from the run's seed, so no
position is sent. The paper (DARE) sends the exact solution's values at those positions,
scaled by ``1 / (1 - p)``: unbiased, but the product change it delivers, ``dB_kept A``, is the
target plus element-wise noise twice its size (``sqrt(p / (1 - p))`` at ``p = 0.8``), and
that noise accumulates over rounds.

The positions are fixed by the mask, but the values are the server's to choose. Here they are
the least-squares fit of the target in product space: on a B-round, for each row ``u`` of
``dB`` with kept set ``S_u``,

    dB[u, S_u] = argmin_x || x A[S_u, :] - T[u, :] ||^2  (+ ridge ||x||^2)
               = (G[S_u, S_u] + ridge I)^+ C[u, S_u],     G = A A^T,  C = T A^T,

and on an A-round the same for each column of ``dA`` with ``G = B^T B`` and ``C = T^T B``.
The delivered change is then the orthogonal projection of ``T`` onto what the mask can
express: never larger than ``T`` (a contraction, which error feedback needs to converge), and
nothing orthogonal to ``T`` is added. It costs the same bytes: the same positions, the same
number of values.
"""

from __future__ import annotations

import torch

__all__ = ["masked_least_squares"]

_EPS64 = float(torch.finfo(torch.float64).eps)


def masked_least_squares(
    G: torch.Tensor, C: torch.Tensor, mask: torch.Tensor, *, ridge: float = 0.0
) -> torch.Tensor:
    """Row-wise least squares restricted to a mask: ``X`` (``n x r``, float32, zero off the mask).

    For every row ``i`` with kept set ``S = {j : mask[i, j]}``::

        X[i, S] = (G[S, S] + ridge I)^+ C[i, S]

    the minimiser of ``x^T G x - 2 x^T C[i] + ridge ||x||^2`` over ``x`` supported on ``S``.
    With ``G = A A^T`` (``r x r``) and ``C = T A^T`` (``n x r``) that is
    ``argmin_x ||x A - T[i]||^2`` over such ``x``, row by row. Directions of ``G[S, S]`` whose
    eigenvalue is at most ``|S| * eps64 * ||G||`` count as zero (pseudo-inverse), so a rank
    deficient fixed factor gives the minimum-norm solution instead of huge values.

    Args:
        G: ``r x r`` symmetric positive semi-definite (the fixed factor's Gram matrix).
        C: ``n x r``, the target times the fixed factor's transpose.
        mask: ``n x r`` bool, the kept positions.
        ridge: added to the diagonal of every ``G[S, S]`` (>= 0).

    Cost: ``O(n k^3)`` for ``k`` the largest kept count of a row (batched, in float64), on
    top of nothing ``d_out x d_in``.
    """
    n, r = C.shape
    if G.shape != (r, r) or mask.shape != (n, r):
        raise ValueError(
            f"shapes differ: G {tuple(G.shape)}, C {tuple(C.shape)}, mask {tuple(mask.shape)}"
        )
    if ridge < 0:
        raise ValueError(f"`ridge` must be >= 0, got {ridge}")
    out = torch.zeros(n, r, dtype=torch.float64, device=C.device)
    counts = mask.sum(dim=1)
    k = int(counts.max()) if n else 0
    if k == 0:
        return out.to(C.dtype)
    G64 = G.to(torch.float64)
    C64 = C.to(torch.float64)
    # Eigenvalues at or below this count as zero; G's largest eigenvalue bounds every
    # principal submatrix's from above.
    top = float(torch.linalg.eigvalsh(G64)[-1].clamp_min(0))
    tol = max(k, 1) * _EPS64 * top
    # The kept column indices of every row, kept first in their order, padded to k: padded
    # slots get a decoupled diagonal entry (G's scale) and a zero right-hand side, so they
    # solve to 0 and never touch the real unknowns.
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :k]
    valid = torch.arange(k, device=C.device).unsqueeze(0) < counts.unsqueeze(1)  # n x k
    both = valid.unsqueeze(2) & valid.unsqueeze(1)
    sub = torch.where(both, G64[order.unsqueeze(2), order.unsqueeze(1)], 0.0)  # n x k x k
    eye = torch.eye(k, dtype=torch.float64, device=C.device)
    sub = sub + eye * torch.where(valid, ridge, max(top, 1.0)).unsqueeze(1)
    rhs = torch.where(valid, torch.gather(C64, 1, order), 0.0)
    lam, V = torch.linalg.eigh(sub)
    inv = torch.where(lam > tol, 1.0 / lam.clamp_min(1e-300), 0.0)
    x = V @ (inv.unsqueeze(2) * (V.transpose(1, 2) @ rhs.unsqueeze(2)))
    x = torch.where(valid, x.squeeze(2), 0.0)
    out.scatter_(1, order, x)
    return out.to(C.dtype)
