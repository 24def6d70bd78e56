"""Server-side aggregation in factored form (FedSRD Sec. 3.3, Eqs. 9-13).

For one module with global factors ``A`` (``r x d_in``), ``B`` (``d_out x r``) and ``m``
client updates ``(dA_i, dB_i)`` with weights ``w_i`` (``sum w_i = 1``), the aggregate of
Eq. 9 is ``W = sum_i w_i B_i A_i`` with ``B_i = B + dB_i`` and ``A_i = A + dA_i``.

No ``d_out x d_in`` matrix is ever formed. With ``dB_bar = sum w_i dB_i``,
``dA_bar = sum w_i dA_i``, ``B~ = B + dB_bar`` and ``A~ = A + dA_bar``, the weighted
covariance identity gives exactly::

    W - B A = dB_bar A + B~ dA_bar + sum_{i<m} E_i G_i                              (*)
    W       = B~ A~               + sum_{i<m} E_i G_i
    E_i = w_i (dB_i - dB_bar)   (d_out x r),      G_i = dA_i - dA_m   (r x d_in)

(use ``sum_i w_i (dB_i - dB_bar) = 0`` to fold the m-th term into the others). So
``W = L_W R_W`` with ``L_W = [B~, E_1..E_{m-1}]`` (``d_out x m r``) and
``R_W = [A~; G_1..G_{m-1}]`` (``m r x d_in``), and the target of Eqs. 11-13 is
``T = W_r - B A = (W - B A) - W_perp`` where ``W_perp = W - W_r`` is the part of ``W``
beyond its best rank-``r`` approximation (Eq. 10; zero for FedSRD-e). Writing ``T`` through
the small differences of (*) instead of as ``W_r - B A`` avoids the cancellation that costs
the dense fp32 path its accuracy once the updates are small against ``B A``.

``W_perp`` comes from a Cholesky-QR of ``L_W`` alone (column-scaled Gram matrix, an
eigendecomposition fallback when it is rank deficient or ill-conditioned): in those
coordinates the top-r left singular subspace of ``W`` is the top-r eigenspace of the
``m r x m r`` matrix ``N (R_W R_W^T) N^T``, found by subspace iteration started from ``B~``'s
axes with a Davis-Kahan stopping bound, or an exact eigendecomposition when the spectral gap
is small. ``R_W``'s Gram matrix is only multiplied, never factored. Every product is thin:
``O((d_out + d_in) (m r)^2)`` time and ``O((d_out + d_in) m r)`` memory per module, against
``O(d_out d_in min(d_out, d_in))`` and ``O(d_out d_in)`` for the dense path in
:mod:`fedsrd_core.reference`.

From ``_THIN_MIN_CLIENTS`` clients on, FedSRD's truncation takes a path linear in ``m``
instead (:func:`_thin_target`): subspace iteration on ``W`` applied to ``r``-wide blocks,
started from ``B~``'s columns, with a Davis-Kahan stop and a Weyl bound on the spectral gap;
it returns ``T`` as ``4 r`` thin factors, ``O((d_out + d_in) m r^2)`` time, and falls back
to the Gram path above when ``B~`` is rank deficient or the gap cannot be shown.

All inputs and outputs are float32 on any device; small ``(m r)``-sized matrices are
handled in float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import torch

Factor = Literal["A", "B"]
Weighting = Literal["uniform", "samples"]

_EPS32 = float(torch.finfo(torch.float32).eps)
_EPS64 = float(torch.finfo(torch.float64).eps)
# Cholesky-QR on a float32 Gram loses about eps32 * ||U^-1||_2^2 of orthogonality (bounded
# here by the Frobenius norm, i.e. eps32 * sum(1 / lambda_i)); above this the Gram is rebuilt
# in float64 and factored by eigendecomposition instead.
_CHOLQR_MAX_ORTHO_ERR = 1e-4


def aggregation_weights(num_samples: Sequence[int], mode: Weighting = "uniform") -> list[float]:
    """Client weights ``w_i`` summing to 1: ``1/m`` (paper) or proportional to samples."""
    m = len(num_samples)
    if m == 0:
        raise ValueError("no client updates to aggregate")
    if mode == "uniform":
        return [1.0 / m] * m
    if mode == "samples":
        if any(n < 0 for n in num_samples) or sum(num_samples) <= 0:
            raise ValueError(f"sample counts must be >= 0 with a positive sum, got {num_samples}")
        total = float(sum(num_samples))
        return [n / total for n in num_samples]
    raise ValueError(f"`weighting` must be 'uniform' or 'samples', got {mode!r}")


def update_parity(round_: int) -> Factor:
    """The factor a round updates (Eqs. 11-13): ``B`` on odd rounds (round 1 first), else ``A``.

    Counting from 1 and starting with ``B`` matters: in round 1 ``B`` is still zero, so
    ``pinv(B) = 0`` and an ``A`` update would be a no-op.
    """
    if round_ < 1:
        raise ValueError(f"rounds count from 1, got {round_}")
    return "B" if round_ % 2 == 1 else "A"


def _pinv_gram(X: torch.Tensor, *, rtol: float | None = None) -> torch.Tensor:
    """``(X X^T)^+`` (float64, ``s x s``) for a wide ``s x d`` matrix ``X``.

    Singular values of ``X`` at or below ``rtol * sigma_max`` count as zero, with
    ``rtol = max(s, d) * eps(float32)`` by default, the threshold ``torch.linalg.pinv`` uses
    for a float32 matrix. Since ``X^+ = X^T (X X^T)^+``, products with ``X^+`` need only this
    ``s x s`` matrix. The Gram is accumulated in float64 (float32 products are exact there),
    so squaring the condition number costs nothing at float32 accuracy.
    """
    s, d = X.shape
    X64 = X.to(torch.float64)
    G = X64 @ X64.T
    lam, V = torch.linalg.eigh(G)
    tol = (rtol if rtol is not None else max(s, d) * _EPS32) ** 2 * lam.max().clamp_min(0)
    inv = torch.where(lam > tol, 1.0 / lam, torch.zeros_like(lam))
    if bool((lam.max() <= 0).item()):
        inv = torch.zeros_like(lam)
    return torch.matmul(V * inv, V.T)


def right_pinv_product(Y: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """``Y @ pinv(A)`` for ``Y`` (``n x d_in``) and a wide ``A`` (``r x d_in``); float32 out.

    Uses ``pinv(A) = A^T (A A^T)^+``; cost ``O(n r d_in)``, nothing ``d_in x d_in``.
    """
    return ((Y @ A.T).to(torch.float64) @ _pinv_gram(A)).to(Y.dtype)


def left_pinv_product(B: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """``pinv(B) @ Y`` for a tall ``B`` (``d_out x r``) and ``Y`` (``d_out x n``); float32 out."""
    return (_pinv_gram(B.T) @ (B.T @ Y).to(torch.float64)).to(Y.dtype)


@dataclass(frozen=True)
class _GramFactor:
    """For ``X`` (``n x k``): ``Q = X @ M`` has orthonormal columns and ``X = Q @ N``."""

    M: torch.Tensor  # k x k', float64
    N: torch.Tensor  # k' x k, float64
    method: Literal["cholesky", "eigh"]


def _gram(X: torch.Tensor, *, rows: bool) -> torch.Tensor:
    """``X^T X`` (``X``: ``n x k``) or, with ``rows``, ``X X^T`` (``X``: ``k x n``).

    Computed block by block on and below the diagonal and mirrored: the Gram is symmetric,
    so this does about 60% of a full matrix product's work (for ``k = 4 r``).
    """
    k = X.shape[0] if rows else X.shape[1]
    G = torch.zeros(k, k, dtype=X.dtype, device=X.device)
    step = 64
    for i in range(0, k, step):
        j = min(i + step, k)
        G[i:, i:j] = X[i:] @ X[i:j].T if rows else X[:, i:].T @ X[:, i:j]
    lower = G.tril()
    return lower + lower.T - torch.diag(G.diagonal())


def _orthonormal_factor(G32: torch.Tensor, exact_gram: Callable[[], torch.Tensor]) -> _GramFactor:
    """Cholesky-QR of a column-scaled ``X`` (``n x k``) from its Gram, without forming ``Q``.

    Fast path: the float32 Gram ``G32`` (given in float64), Cholesky ``U^T U``, ``M = U^-1``,
    ``N = U``. When it is singular or too ill-conditioned for float32 (estimated orthogonality
    loss ``eps32 * ||U^-1||_F^2`` above 1e-4), fall back to the float64 Gram ``exact_gram()``
    and its eigendecomposition, dropping directions whose squared singular value is below
    ``1e4 * k * eps64`` of the largest: ``M = V L^-1/2``, ``N = L^1/2 V^T``.
    """
    k = G32.shape[0]
    U, info = torch.linalg.cholesky_ex(G32, upper=True)
    if int(info.item()) == 0:
        eye = torch.eye(k, dtype=torch.float64, device=G32.device)
        Minv = torch.linalg.solve_triangular(U, eye, upper=True)
        if _EPS32 * float(Minv.square().sum()) < _CHOLQR_MAX_ORTHO_ERR:
            return _GramFactor(Minv, U, "cholesky")
    lam, V = torch.linalg.eigh(exact_gram())
    keep = lam > 1e4 * k * _EPS64 * lam.max().clamp_min(0)
    lam, V = lam[keep], V[:, keep]
    root = lam.sqrt()
    return _GramFactor(V / root, root.unsqueeze(1) * V.T, "eigh")


def _scaled_factor(X: torch.Tensor, *, rows: bool) -> tuple[_GramFactor, torch.Tensor]:
    """Orthonormal factor of ``X`` with its columns (rows) scaled to unit norm, and the
    scales (float64; 1 for a zero column). The norms come from the Gram's diagonal."""
    G = _gram(X, rows=rows).to(torch.float64)
    scale = G.diagonal().sqrt()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    G32 = G / scale / scale.unsqueeze(1)

    def exact() -> torch.Tensor:
        X64 = X.to(torch.float64)
        X64 = X64 / scale.unsqueeze(1) if rows else X64 / scale
        return _gram(X64, rows=rows)

    return _orthonormal_factor(G32, exact), scale


# Subspace iteration stops when the Davis-Kahan bound on the angle to the exact top-r
# subspace is below this, and gives up (exact eigendecomposition) after _SUBSPACE_MAX_ITERS.
_SUBSPACE_TOL = 1e-10
_SUBSPACE_MAX_ITERS = 12
# Cholesky-QR2 of an iterate is accepted when ||Q^T Q - I||_F is below this (float64).
_ORTHO_TOL = 1e-12


def _orthonormal_columns(Y: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis (``k x r``, float64) of the columns of a full-rank ``Y``.

    Cholesky-QR applied twice (two thin products and two ``r x r`` factorisations instead of
    a Householder QR, whose LAPACK call costs several times more at these sizes), accepted
    only when the result is orthonormal to ``_ORTHO_TOL``; otherwise, or when the Gram is not
    positive definite, Householder QR.
    """
    Q = Y
    for _ in range(2):
        U, info = torch.linalg.cholesky_ex(Q.T @ Q, upper=True)
        if int(info.item()) != 0:
            return _householder_q(Y)
        Q = torch.linalg.solve_triangular(U, Q, upper=True, left=False)
    defect = Q.T @ Q
    defect.diagonal().sub_(1.0)
    if float(torch.linalg.matrix_norm(defect)) > _ORTHO_TOL:
        return _householder_q(Y)
    return Q


def _householder_q(Y: torch.Tensor) -> torch.Tensor:
    q: torch.Tensor = torch.linalg.qr(Y).Q
    return q


def _top_eigenspace(M: torch.Tensor, r: int, *, warm: bool) -> tuple[torch.Tensor, str]:
    """Orthonormal basis (``k x r``, float64) of the top-``r`` eigenvectors of a symmetric
    positive semi-definite ``M`` (``k x k``, float64).

    With ``warm`` (Cholesky coordinates, whose first ``r`` axes span ``B~``, the dominant
    part of ``W`` once the run is under way) it runs subspace iteration from those axes,
    two products with ``M`` per orthonormalisation (each pass shrinks the error by
    ``(lambda_{r+1} / lambda_r)^2``; at these sizes the fixed cost of the small factorisations
    outweighs the products). It stops when the Davis-Kahan bound
    ``||M X - X H||_F / (theta_min - tau)`` on ``sin`` of the angle to the exact subspace is
    below 1e-10, where ``H = X^T M X`` has Ritz values ``theta`` and
    ``tau = trace(M) - trace(H)`` bounds every eigenvalue outside the top ``r`` from above
    (Ky Fan). Otherwise, or when the bound does not hold within a few passes (a small
    spectral gap), it takes the exact eigendecomposition.

    Returns the basis and ``"iteration"`` or ``"eigh"``.
    """
    if warm:
        trace_M = float(M.diagonal().sum())
        # M @ e_1..e_r is M's first r columns: the first pass starts one product in.
        Y = M[:, :r]
        for _ in range(_SUBSPACE_MAX_ITERS // 2):
            X = _orthonormal_columns(M @ Y)
            Y = M @ X
            H = X.T @ Y
            theta_min = float(torch.linalg.eigvalsh(H)[0])
            tau = trace_M - float(H.trace())
            gap = theta_min - max(tau, 0.0)
            if gap > 0 and float(torch.linalg.vector_norm(Y - X @ H)) <= _SUBSPACE_TOL * gap:
                return X, "iteration"
    _, V = torch.linalg.eigh(M)  # ascending eigenvalues
    top: torch.Tensor = V[:, -r:]
    return top, "eigh"


@dataclass(frozen=True)
class _Projection:
    """The best rank-``r`` approximation of ``W = L R`` (``L``: ``d_out x k``, ``R``:
    ``k x d_in``) in the orthonormal coordinates ``Q_L = L ML`` of ``L``'s column space.

    With ``Q_L^T W = NS R`` and ``X`` the top-``r`` left singular vectors of ``W`` in those
    coordinates: ``W_r = Q_L X X^T Q_L^T W = (L Z)(Y^T R)`` with ``Z = ML X`` and
    ``Y = NS^T X``, and the tail ``W - W_r = L K R`` with ``K = ML (I - X X^T) NS``, applied
    without forming it. ``K`` goes through ``Q_L``'s coordinates rather than being written as
    ``I - Z Y^T``: both give ``W - W_r``, but the latter is a difference of two large
    coefficient vectors that cancel only once multiplied by ``L``, which the float32 products
    that follow would not resolve when ``L``'s columns are nearly dependent.
    """

    ML: torch.Tensor  # k x kL, float64, includes the column scaling of L
    NS: torch.Tensor  # kL x k, float64
    X: torch.Tensor  # kL x r, float64, orthonormal
    eigenvalues: torch.Tensor | None  # the r squared singular values (``exact`` only)

    @property
    def Z(self) -> torch.Tensor:
        """``k x r``: ``L Z`` = the top-``r`` left singular vectors of ``W``."""
        return self.ML @ self.X

    @property
    def Y(self) -> torch.Tensor:
        """``k x r``: ``Y^T R = (L Z)^T W``."""
        return self.NS.T @ self.X

    def right(self, P: torch.Tensor) -> torch.Tensor:
        """``K @ P`` for a thin ``P`` (``k x n``, float64)."""
        V = self.NS @ P
        return self.ML @ (V - self.X @ (self.X.T @ V))

    def left(self, Q: torch.Tensor) -> torch.Tensor:
        """``Q @ K`` for a thin ``Q`` (``n x k``, float64)."""
        U = Q @ self.ML
        return (U - (U @ self.X) @ self.X.T) @ self.NS


def _rank_r_projection(
    L: torch.Tensor, R: torch.Tensor, r: int, *, exact: bool = False
) -> _Projection | None:
    """Top-``r`` left singular subspace of ``W = L @ R`` (``L``: ``d_out x k``, ``R``:
    ``k x d_in``, float32), never forming ``W``; None when ``rank(L) <= r`` (``W_r = W``).

    One-sided: only ``L`` is orthonormalised. With ``L S^-1 = Q_L N`` (column scales ``S``,
    Cholesky-QR of :func:`_scaled_factor`, ``Q_L = L S^-1 M``), ``Q_L^T W = N S R`` and
    ``Q_L^T W W^T Q_L = (N S)(R R^T)(N S)^T``, a ``k x k`` matrix whose top-``r``
    eigenvectors ``X`` give ``Q_L X``, the top-``r`` left singular vectors of ``W``, and
    whose eigenvalues are their squared singular values. ``R R^T`` is only multiplied, never
    inverted, so its conditioning does not matter. The two Gram matrices cost
    ``(d_out + d_in) k^2 / 2`` multiply-adds in float32; the rest is ``k x k`` in float64.

    With ``exact`` the eigenvectors come from a full eigendecomposition, sorted by decreasing
    eigenvalue, which are returned too (and a projection is returned for any rank).
    """
    fL, sL = _scaled_factor(L, rows=False)
    kL = fL.M.shape[1]
    if kL <= r and not exact:
        return None
    NS = fL.N * sL  # kL x k: Q_L^T L
    G_R = _gram(R, rows=True).to(torch.float64)
    M = NS @ G_R @ NS.T
    M = 0.5 * (M + M.T)
    eigenvalues = None
    if exact:
        lam, V = torch.linalg.eigh(M)
        kk = min(r, kL)
        X = V[:, -kk:].flip(1)
        eigenvalues = lam[-kk:].flip(0).clamp_min(0)
    else:
        X, _ = _top_eigenspace(M, r, warm=fL.method == "cholesky")
    return _Projection(fL.M / sL.unsqueeze(1), NS, X, eigenvalues)


def _centered_factors(
    A: torch.Tensor,
    B: torch.Tensor,
    dAs: Sequence[torch.Tensor],
    dBs: Sequence[torch.Tensor],
    weights: Sequence[float],
) -> tuple[torch.Tensor, torch.Tensor]:
    """``L_D = [dB_bar, B~, E_1..E_{m-1}]`` and ``R_D = [A; dA_bar; G_1..G_{m-1}]`` of (*).

    Written in place into the two outputs (one copy of each update, then in-place
    arithmetic on the blocks), so building them costs a few passes over the updates however
    many clients there are, not one temporary per client.
    """
    m, r = len(dBs), A.shape[0]
    d_out, d_in = B.shape[0], A.shape[1]
    w = torch.tensor(list(weights), dtype=B.dtype, device=B.device)
    L_D = torch.empty(d_out, (m + 1) * r, dtype=B.dtype, device=B.device)
    R_D = torch.empty((m + 1) * r, d_in, dtype=A.dtype, device=A.device)
    E3 = L_D[:, 2 * r :].view(d_out, m - 1, r)
    G3 = R_D[2 * r :].view(m - 1, r, d_in)
    for i in range(m - 1):
        E3[:, i].copy_(dBs[i])
        G3[i].copy_(dAs[i])
    dB_bar = torch.einsum("dir,i->dr", E3, w[: m - 1]) + w[m - 1] * dBs[-1]
    dA_bar = torch.einsum("ird,i->rd", G3, w[: m - 1]) + w[m - 1] * dAs[-1]
    E3.sub_(dB_bar.unsqueeze(1)).mul_(w[: m - 1].view(1, m - 1, 1))
    G3.sub_(dAs[-1])
    L_D[:, :r] = dB_bar
    torch.add(B, dB_bar, out=L_D[:, r : 2 * r])
    R_D[:r] = A
    R_D[r : 2 * r] = dA_bar
    return L_D, R_D


def _check_inputs(
    A: torch.Tensor,
    B: torch.Tensor,
    dAs: Sequence[torch.Tensor],
    dBs: Sequence[torch.Tensor],
    weights: Sequence[float],
) -> None:
    if not (len(dAs) == len(dBs) == len(weights)) or not dAs:
        raise ValueError(
            f"need one dA, dB and weight per client, got {len(dAs)}, {len(dBs)}, {len(weights)}"
        )
    if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
        raise ValueError(f"bad factor shapes: A {tuple(A.shape)}, B {tuple(B.shape)}")
    for i, (dA, dB) in enumerate(zip(dAs, dBs, strict=True)):
        if dA.shape != A.shape or dB.shape != B.shape:
            raise ValueError(
                f"client {i}: dA {tuple(dA.shape)} / dB {tuple(dB.shape)} do not match "
                f"A {tuple(A.shape)} / B {tuple(B.shape)}"
            )
    if not math.isclose(sum(weights), 1.0, rel_tol=1e-6):
        raise ValueError(f"weights must sum to 1, got {sum(weights)}")


@dataclass(frozen=True)
class ModuleTarget:
    """The target ``T = W_r - B A`` of Eqs. 11-13 for one module, as an operator on thin
    matrices: ``T`` (``d_out x d_in``) is never formed.

    ``T = L_D R_D - L_W K R_W`` with ``L_D = [dB_bar, B~, E...]``, ``R_D = [A; dA_bar; G...]``
    (``k = (m + 1) r`` columns / rows, see (*) in the module docstring) and the tail
    ``L_W K R_W = W - W_r`` of the rank-r truncation (absent for FedSRD-e, or when
    ``rank(W) <= r``); ``L_W = L_D[:, r:]`` and ``R_W = J R_D`` with ``J`` adding ``R_D``'s
    first two blocks. Products with ``T`` therefore reduce to ``k``-sized coefficients:
    ``T X = L_D c(X)`` and ``Z T = c'(Z) R_D``.
    """

    L: torch.Tensor  # L_D, d_out x k, float32
    R: torch.Tensor  # R_D, k x d_in, float32
    r: int
    tail: _Projection | None

    def right_coefficients(self, RX: torch.Tensor) -> torch.Tensor:
        """``c`` (``k x n``, float64) with ``T X = L_D c``, given ``RX = R_D X``."""
        P = RX.to(torch.float64)
        if self.tail is not None:
            r = self.r
            P = P.clone()
            # K R_W X, with R_W X = J R_D X.
            P[r:] -= self.tail.right(torch.cat([P[:r] + P[r : 2 * r], P[2 * r :]], dim=0))
        return P

    def left_coefficients(self, ZL: torch.Tensor) -> torch.Tensor:
        """``c'`` (``n x k``, float64) with ``Z T = c' R_D``, given ``ZL = Z L_D``."""
        Q = ZL.to(torch.float64)
        if self.tail is not None:
            r = self.r
            Q = Q.clone()
            Y = self.tail.left(Q[:, r:])  # Z L_W K, to be multiplied by R_W = J R_D
            Q[:, :r] -= Y[:, :r]
            Q[:, r : 2 * r] -= Y[:, :r]
            Q[:, 2 * r :] -= Y[:, r:]
        return Q

    def times(self, X: torch.Tensor) -> torch.Tensor:
        """``T @ X`` for a thin ``X`` (``d_in x n``), float32 out."""
        return self.L @ self.right_coefficients(self.R @ X).to(self.L.dtype)

    def times_left(self, Z: torch.Tensor) -> torch.Tensor:
        """``Z @ T`` for a thin ``Z`` (``n x d_out``), float32 out."""
        return self.left_coefficients(Z @ self.L).to(self.R.dtype) @ self.R


# The thin truncation (:func:`_thin_target`) replaces the Gram path once the stacked factors
# are wide: at ``(m - 1) r`` columns its cost is a few products of ``W`` with ``r``-wide
# blocks, linear in ``m``, against the Gram path's ``(d_out + d_in) (m r)^2`` products and
# ``(m r)^3`` eigendecomposition. At m = 4 the Gram path is as fast; at m = 16 the thin one
# is about 2x faster (benchmarks/server_scale.py, r = 32).
_THIN_MIN_CLIENTS = 8
_THIN_MAX_ITERS = 6
# The thin iteration stops when the Davis-Kahan bound on the angle to the exact subspace,
# times ||W|| / ||W - B A|| (what that angle costs the target, relative), is below this ...
_THIN_TOL = 1e-7
# ... or when the residual is at the float32 rounding floor of the update products (its
# estimate times this safety factor); it then has to be below this angle to be accepted.
_THIN_FLOOR_FACTOR = 8.0
_THIN_MAX_FLOOR_ANGLE = 1e-3


def _delta_norm_bound(L_E: torch.Tensor, R_G: torch.Tensor, r: int) -> float:
    """An upper bound on ``||Delta||_2`` for ``Delta = sum_i E_i G_i = L_E R_G``:
    ``sum_i ||E_i||_2 ||G_i||_2``, spectral norms from each block's ``r x r`` Gram."""
    n = L_E.shape[1] // r
    if n == 0:
        return 0.0
    E3 = L_E.reshape(L_E.shape[0], n, r)
    G3 = R_G.reshape(n, r, R_G.shape[1])
    gE = torch.einsum("dis,dit->ist", E3, E3).to(torch.float64)
    gG = torch.einsum("isd,itd->ist", G3, G3).to(torch.float64)
    nE = torch.linalg.eigvalsh(gE)[:, -1].clamp_min(0).sqrt()
    nG = torch.linalg.eigvalsh(gG)[:, -1].clamp_min(0).sqrt()
    # Each Gram is float32: its largest eigenvalue carries a relative error of about
    # d * eps32; the margin keeps the bound an upper bound.
    margin = 1.0 + 4.0 * max(L_E.shape[0], R_G.shape[1]) * _EPS32
    return float((nE * nG).sum()) * margin


class DeltaOperator(Protocol):
    """``Delta = sum_i w_i (dB_i - dB_bar)(dA_i - dA_bar)``, the part of ``W`` beyond
    ``B~ A~`` (see (*)), as the thin iteration uses it: products with thin blocks only."""

    #: the accumulation width of the products (``m r``): sets the float32 rounding floor
    width: int

    def times(self, Z: torch.Tensor) -> torch.Tensor:
        """``Delta Z`` (``Z``: ``d_in x n`` float64) in float64."""
        ...

    def t_times(self, P: torch.Tensor) -> torch.Tensor:
        """``Delta^T P`` (``P``: ``d_out x n`` float64) in float64."""
        ...

    def norm_bound(self) -> float:
        """An upper bound on ``||Delta||_2``."""
        ...

    def rounding_scale(self) -> float:
        """The Frobenius size of the factors the products round in (``||L|| ||R||``)."""
        ...


class _DenseDelta:
    """:class:`DeltaOperator` of the stacked centred factors ``L_E R_G`` (dense float32)."""

    def __init__(self, L_E: torch.Tensor, R_G: torch.Tensor, r: int) -> None:
        self.L_E, self.R_G, self.r = L_E, R_G, r
        self.width = L_E.shape[1]

    def times(self, Z: torch.Tensor) -> torch.Tensor:
        return (self.L_E @ (self.R_G @ Z.to(self.R_G.dtype))).to(torch.float64)

    def t_times(self, P: torch.Tensor) -> torch.Tensor:
        return (self.R_G.T @ (self.L_E.T @ P.to(self.L_E.dtype))).to(torch.float64)

    def norm_bound(self) -> float:
        return _delta_norm_bound(self.L_E, self.R_G, self.r)

    def rounding_scale(self) -> float:
        if not self.width:
            return 0.0
        return float(torch.linalg.vector_norm(self.L_E)) * float(torch.linalg.vector_norm(self.R_G))


def _thin_target(L_D: torch.Tensor, R_D: torch.Tensor, r: int) -> tuple[ModuleTarget | None, str]:
    """:func:`thin_truncation` of the stacked centred factors of :func:`_centered_factors`."""
    return thin_truncation(
        L_D[:, :r],
        L_D[:, r : 2 * r],
        R_D[:r],
        R_D[r : 2 * r],
        _DenseDelta(L_D[:, 2 * r :], R_D[2 * r :], r),
    )


def thin_truncation(
    dB_bar: torch.Tensor,
    Bt: torch.Tensor,
    A: torch.Tensor,
    dA_bar: torch.Tensor,
    delta: DeltaOperator,
) -> tuple[ModuleTarget | None, str]:
    """FedSRD's target ``T = W_r - B A`` by subspace iteration on ``W`` as a thin operator.

    ``W = B~ A~ + Delta`` (``B~ = B + dB_bar``, given as ``Bt``; ``A~ = A + dA_bar``; see
    (*)). ``W`` is only ever applied to ``r``-wide blocks: ``W X = B~ (A~ X) + Delta X``, the
    first term in float64, the second through ``delta`` (float32 products of the client
    factors, dense or sparse: it is small). Subspace iteration on ``W W^T`` starts
    from the columns of ``B~`` (the top-``r`` left singular subspace of ``W`` once ``B`` is
    established) and stops on the Davis-Kahan bound ``||W W^T P - P H||_F / (theta_min -
    tau)`` with ``tau = delta.norm_bound()^2 >= ||Delta||_2^2 >= sigma_{r+1}(W)^2``
    (Weyl: ``rank(B~ A~) <= r``). With ``P`` (``d_out x r``, orthonormal) converged::

        T = (W - B A) - (I - P P^T) W
          = dB_bar A + B~ dA_bar - F A~ + P H,    F = (I - P P^T) B~,   H = P^T Delta

    every term a small difference computed directly (``F`` in float64), so no cancellation
    against ``B A``; ``T`` is returned factored with ``4 r`` columns and no tail. Cost: a few
    products of ``Delta`` with ``r``-wide blocks (``O((d_out + d_in) m r^2)`` for dense
    client factors, ``O(nnz r)`` for sparse ones).

    Returns ``(target, "iteration")``, or ``(None, why)`` when ``B~`` is rank deficient, the
    bound shows no spectral gap, or the iteration does not converge: the caller then takes
    the exact Gram path.
    """
    r = A.shape[0]
    At = A + dA_bar
    k = delta.width
    Bt64, At64 = Bt.to(torch.float64), At.to(torch.float64)
    qr = torch.linalg.qr(Bt64)
    diag = qr.R.diagonal().abs()
    if float(diag.min()) <= max(Bt.shape) * _EPS32 * float(diag.max()):
        return None, "rank_deficient"
    P = qr.Q

    def w_times(Z64: torch.Tensor) -> torch.Tensor:  # W Z, d_out x r
        return Bt64 @ (At64 @ Z64) + delta.times(Z64)

    # The target's own scale: the first-order part dB_bar A + B~ dA_bar of W - B A.
    def fro2(X: torch.Tensor, Y: torch.Tensor) -> float:  # ||X Y||_F^2 via r x r Grams
        X64, Y64 = X.to(torch.float64), Y.to(torch.float64)
        return float(((X64.T @ X64) * (Y64 @ Y64.T)).sum())

    scale = math.sqrt(max(fro2(dB_bar, A), 0.0) + max(fro2(Bt, dA_bar), 0.0))
    bound = delta.norm_bound()
    rounding = delta.rounding_scale()
    dim = max(Bt.shape[0], A.shape[1])
    Y = w_times(At64.T @ (Bt64.T @ P) + delta.t_times(P))  # one step before the first check
    for _ in range(_THIN_MAX_ITERS):
        P = _orthonormal_columns(Y)
        DtP = delta.t_times(P)
        Z = At64.T @ (Bt64.T @ P) + DtP  # W^T P
        Y = w_times(Z)  # W W^T P
        H = P.T @ Y
        H = 0.5 * (H + H.T)
        theta = torch.linalg.eigvalsh(H)
        sigma1 = math.sqrt(max(float(theta[-1]), 0.0))
        gap = float(theta[0]) - bound**2
        if gap <= 0:
            return None, "no_gap"
        res = float(torch.linalg.vector_norm(Y - P @ H))
        # float32 rounding of the Delta products, a standard estimate.
        floor = _THIN_FLOOR_FACTOR * _EPS32 * (math.sqrt(k) + math.sqrt(dim)) * rounding
        floor *= float(torch.linalg.vector_norm(Z)) + sigma1 * math.sqrt(r)
        angle = res / gap
        if angle * sigma1 <= _THIN_TOL * scale or (res <= floor and angle <= _THIN_MAX_FLOOR_ANGLE):
            F = Bt64 - P @ (P.T @ Bt64)
            dtype = Bt.dtype
            L = torch.cat([dB_bar, Bt, (-F).to(dtype), P.to(dtype)], dim=1)
            R = torch.cat([A, dA_bar, At, DtP.T.to(dtype)], dim=0)
            return ModuleTarget(L, R, r, None), "iteration"
    return None, "not_converged"


def module_target(
    A: torch.Tensor,
    B: torch.Tensor,
    dAs: Sequence[torch.Tensor],
    dBs: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    truncate: bool = True,
) -> ModuleTarget:
    """The target ``T = W_r - B A`` of one module (Eqs. 9-10) as a :class:`ModuleTarget`.

    Reconstructs each client's factors, aggregates in full-rank space (Eq. 9) and, for FedSRD
    (``truncate``), finds the rank-``r`` truncation's tail (Eq. 10); FedSRD-e
    (``truncate=False``) keeps ``W``. Shapes as in :func:`fedsrd_module_delta`.
    """
    _check_inputs(A, B, dAs, dBs, weights)
    r = A.shape[0]
    L_D, R_D = _centered_factors(A, B, dAs, dBs, weights)
    if truncate and len(dAs) >= _THIN_MIN_CLIENTS:
        thin, _ = _thin_target(L_D, R_D, r)
        if thin is not None:
            return thin
    tail = None  # W - W_r = L_W K R_W (None: rank(W) <= r, or FedSRD-e)
    if truncate:
        # L_W = L_D[:, r:] and R_W = [A + dA_bar; G...] = J R_D: W = L_W R_W.
        R_W = torch.cat([R_D[:r] + R_D[r : 2 * r], R_D[2 * r :]], dim=0)
        tail = _rank_r_projection(L_D[:, r:], R_W, r)
    return ModuleTarget(L_D, R_D, r, tail)


def fedsrd_module_delta(
    A: torch.Tensor,
    B: torch.Tensor,
    dAs: Sequence[torch.Tensor],
    dBs: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    round_: int,
    truncate: bool = True,
) -> tuple[Factor, torch.Tensor]:
    """The global update of one module for round ``round_`` (before DARE), factored form.

    Reconstructs each client's factors, aggregates in full-rank space (Eq. 9), truncates to
    rank ``r`` (Eq. 10, FedSRD; skipped for FedSRD-e with ``truncate=False``), forms the target
    ``T = W_r - B A`` and solves for one factor (Eqs. 11-13)::

        odd round:  dB = T pinv(A)   (d_out x r),   dA = 0
        even round: dA = pinv(B) T   (r x d_in),    dB = 0

    Args:
        A: ``r x d_in`` and B: ``d_out x r``, the current global factors (float32).
        dAs, dBs: per-client dense updates with the shapes of ``A`` and ``B``.
        weights: per-client weights summing to 1 (:func:`aggregation_weights`).
        round_: the round number, from 1.
        truncate: FedSRD (True) or FedSRD-e (False).

    Returns:
        ``("B", dB)`` or ``("A", dA)``: which factor changes and its float32 update.
    """
    target = module_target(A, B, dAs, dBs, weights, truncate=truncate)
    return one_factor_solve(target, A, B, round_=round_)


class TargetOperator(Protocol):
    """A target ``T`` held some other way than :class:`ModuleTarget` (the sparse FedSRD-e
    target of :mod:`fedsrd_core.aggregate_sparse`): thin products and its own solve."""

    def times(self, X: torch.Tensor) -> torch.Tensor: ...

    def times_left(self, Z: torch.Tensor) -> torch.Tensor: ...

    def solve(
        self, A: torch.Tensor, B: torch.Tensor, *, round_: int
    ) -> tuple[Factor, torch.Tensor]: ...


def one_factor_solve(
    target: ModuleTarget | TargetOperator, A: torch.Tensor, B: torch.Tensor, *, round_: int
) -> tuple[Factor, torch.Tensor]:
    """Eqs. 11-13 on a target: ``("B", T pinv(A))`` on odd rounds, ``("A", pinv(B) T)`` on
    even ones (float32), through ``r x r`` Gram pseudo-inverses in float64."""
    if not isinstance(target, ModuleTarget):
        return target.solve(A, B, round_=round_)
    if update_parity(round_) == "B":
        P = target.right_coefficients(right_pinv_product(target.R, A))  # R_D pinv(A), fixed
        return "B", target.L @ P.to(target.L.dtype)
    Q = target.left_coefficients(left_pinv_product(B, target.L))  # pinv(B) L_D, fixed
    return "A", Q.to(target.R.dtype) @ target.R


def truncated_factors(
    A: torch.Tensor,
    B: torch.Tensor,
    dAs: Sequence[torch.Tensor],
    dBs: Sequence[torch.Tensor],
    weights: Sequence[float],
) -> tuple[torch.Tensor, torch.Tensor]:
    """New balanced factors ``(A', B')`` with ``B' A' = W_r``, the rank-r SVD of Eq. 9's W.

    ``B' = U_r S_r^(1/2)`` (``d_out x r``) and ``A' = S_r^(1/2) V_r^T`` (``r x d_in``), as
    FlexLoRA redistributes them; computed in factored form (columns beyond the rank of
    ``W`` are zero).
    """
    _check_inputs(A, B, dAs, dBs, weights)
    r = A.shape[0]
    L_D, R_D = _centered_factors(A, B, dAs, dBs, weights)
    L_W = L_D[:, r:]
    R_W = torch.cat([R_D[:r] + R_D[r : 2 * r], R_D[2 * r :]], dim=0)
    proj = _rank_r_projection(L_W, R_W, r, exact=True)
    assert proj is not None
    assert proj.eigenvalues is not None
    # B' = U_r S_r^(1/2) = L_W Z S_r^(1/2) and A' = S_r^(-1/2) U_r^T W = S_r^(-1/2) Y^T R_W.
    sigma = proj.eigenvalues.sqrt()
    kk = sigma.numel()
    pos = sigma > sigma.max().clamp_min(0) * max(L_W.shape[1], kk) * _EPS64 if kk else sigma > 0
    root = torch.where(pos, sigma.sqrt(), torch.zeros_like(sigma))
    inv_root = torch.where(pos, 1.0 / sigma.clamp_min(1e-300).sqrt(), torch.zeros_like(sigma))
    B_new = torch.zeros_like(B)
    A_new = torch.zeros_like(A)
    B_new[:, :kk] = L_W @ (proj.Z * root).to(L_W.dtype)
    A_new[:kk] = (inv_root.unsqueeze(1) * proj.Y.T).to(R_W.dtype) @ R_W
    return A_new, B_new


def average_factors(
    dAs: Sequence[torch.Tensor], dBs: Sequence[torch.Tensor], weights: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """FedAvg / FedIT: ``(sum w_i dA_i, sum w_i dB_i)``, i.e. A and B averaged separately."""
    dA = sum((w * d for w, d in zip(weights, dAs, strict=True)), torch.zeros_like(dAs[0]))
    dB = sum((w * d for w, d in zip(weights, dBs, strict=True)), torch.zeros_like(dBs[0]))
    return dA, dB
