"""FedSRD's server math on the sparse uploads as they are, never densified.

FedSRD's uploads keep about 5% of each factor update, yet :func:`aggregate.module_target`
takes dense ``dA_i``, ``dB_i``: every product with the stacked client factors then costs the
dense update size, ``(d_out + d_in) m r`` per output column, and one module's dense updates
are held for every client. Here the aggregate of Eq. 9 is written as::

    W - B A = dB_bar A + B dA_bar + S,        S = sum_i w_i dB_i dA_i = L_S R_S
    L_S = [w_1 dB_1, .., w_m dB_m]  (d_out x m r),   R_S = [dA_1; ..; dA_m]  (m r x d_in)

with ``L_S`` and ``R_S`` stored as CSR matrices of the uploads' non-zeros (and their
transposes, built once per module by a stable sort), so a product with a thin block costs
``O(nnz r)``, with MKL's sparse kernels, against ``O((d_out + d_in) m r^2)`` dense. Measured
on one thread (3072 x 3072, r = 32, 5% dense, m = 256): a CSR product 3 ms, the dense one
46 ms, ``index_add`` over the (position, value) pairs 250 ms, a COO product 52 ms, and
multiplying by a transposed CSR view (``csr.t() @ X``) 106 ms, hence the explicit transposes.

- FedSRD-e's target ``T = W - B A`` is :class:`SparseModuleTarget` (the three terms above,
  each applied to thin blocks; no cancellation against ``B A``, ``S`` is second order).
- FedSRD's truncation is the thin subspace iteration of :func:`aggregate.thin_truncation`
  with ``Delta = W - B~ A~ = S - dB_bar dA_bar`` applied through the CSR products; its
  spectral-gap test needs an upper bound on ``||Delta||_2``, here
  ``sum_i w_i ||dB_i||_2 ||dA_i||_2 + ||dB_bar||_2 ||dA_bar||_2`` with each client's norm
  bounded by a Collatz-Wielandt bound on ``|X|`` (:meth:`SparseUpdates.client_norm_bounds`,
  linear in the non-zeros, about 1.4 times the spectral norm on real uploads; the cheaper
  ``sqrt(||X||_1 ||X||_inf)``, 2.5 times, showed no gap on them). When it cannot, the updates
  are densified and :func:`aggregate.module_target` decides (its centred bound is tighter,
  then the exact Gram path).

:func:`sparse_module_target` picks the path: sparse from ``SPARSE_MIN_CLIENTS`` clients on
while the uploads are at most ``SPARSE_MAX_DENSITY`` dense, the dense path otherwise.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from functools import cached_property

import torch

from fedsrd_core.aggregate import (
    Factor,
    ModuleTarget,
    _pinv_gram,
    module_target,
    thin_truncation,
    update_parity,
)
from fedsrd_core.sparse import SparseTensor

#: An upload's entry for one factor: sparse, dense, or absent (a zero update).
WireEntry = torch.Tensor | SparseTensor | None

# The switch (benchmarks/server_scale.py --quick, one thread, 2026-12-08, a shared 2-core
# machine): below 16 clients the densified path is as fast or faster (at m = 4 the sparse
# round took 1.3x its time, at 8 1.1x, at 16 0.95x, at 64 0.67x): its products are few and
# small, while the sparse one pays for sorting three CSR orientations and the per-client norm
# bounds. Above SPARSE_MAX_DENSITY a CSR product stops beating a dense one.
SPARSE_MIN_CLIENTS = 16
SPARSE_MAX_DENSITY = 0.25
# Power steps of the Collatz-Wielandt bound on each client's spectral norms.
_CW_STEPS = 3


def _flat(t: WireEntry, shape: tuple[int, int], what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat row-major positions (int64, increasing) and float32 values of one entry."""
    if t is None:
        return torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.float32)
    if tuple(t.shape) != shape:
        raise ValueError(f"{what}: shape {tuple(t.shape)} does not match {shape}")
    if isinstance(t, SparseTensor):
        return t.indices, t.values.to(torch.float32)
    flat = t.reshape(-1).to(torch.float32)
    idx = torch.nonzero(flat).view(-1)
    return idx, flat[idx]


def _csr(
    rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]
) -> torch.Tensor:
    """A CSR matrix from COO entries already sorted by row (int32 indices where they fit:
    MKL's kernel is a little faster with them)."""
    counts = torch.bincount(rows, minlength=shape[0])
    crow = torch.zeros(shape[0] + 1, dtype=torch.int64)
    torch.cumsum(counts, 0, out=crow[1:])
    itype = torch.int32 if max(shape[1], values.numel()) < 2**31 - 1 else torch.int64
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
        return torch.sparse_csr_tensor(
            crow.to(itype), cols.to(itype), values, shape, dtype=values.dtype
        )


class SparseUpdates:
    """One module's client updates, stacked as CSR: ``L_S``, ``R_S`` and their transposes.

    Built from each client's (positions, values) without a dense update: ``R_S``'s rows
    are the clients' ``dA_i`` rows in order, so the concatenated row-major positions are
    already sorted; the other three orientations come from one stable sort each, built when
    first used (FedSRD-e needs two of them per round, FedSRD's iteration all four).
    """

    def __init__(
        self,
        A: torch.Tensor,
        B: torch.Tensor,
        dAs: Iterable[WireEntry],
        dBs: Iterable[WireEntry],
        weights: Sequence[float],
    ) -> None:
        r, d_in = A.shape
        d_out = B.shape[0]
        m = len(weights)
        self.r, self.d_in, self.d_out, self.m = r, d_in, d_out, m
        a_idx, a_val, b_idx, b_val = [], [], [], []
        for i, (dA, dB) in enumerate(zip(dAs, dBs, strict=True)):
            ia, va = _flat(dA, (r, d_in), f"client {i}: dA")
            ib, vb = _flat(dB, (d_out, r), f"client {i}: dB")
            a_idx.append(ia)
            a_val.append(va)
            b_idx.append(ib)
            b_val.append(vb)
        if len(a_idx) != m:
            raise ValueError(f"need one dA, dB and weight per client, got {len(a_idx)} and {m}")
        w = torch.tensor(list(weights), dtype=torch.float64)
        self.weights = w
        self.nnz_A = sum(int(x.numel()) for x in a_idx)
        self.nnz_B = sum(int(x.numel()) for x in b_idx)
        ca = torch.repeat_interleave(torch.arange(m), torch.tensor([x.numel() for x in a_idx]))
        cb = torch.repeat_interleave(torch.arange(m), torch.tensor([x.numel() for x in b_idx]))
        pa, pb = torch.cat(a_idx), torch.cat(b_idx)
        del a_idx, b_idx
        self._a_val, self._b_val = torch.cat(a_val), torch.cat(b_val)
        del a_val, b_val
        # R_S (m r x d_in): row i r + s, column v; L_S (d_out x m r): row u, column i r + s.
        self._a_row, self._a_col = ca * r + pa // d_in, pa % d_in
        self._b_row, self._b_col = pb // r, cb * r + pb % r
        self._b_wval = (self._b_val.to(torch.float64) * w[cb]).to(torch.float32)
        # The means, accumulated in float64 (a value's weight rounds once, at the end).
        a_bar = torch.zeros(r * d_in, dtype=torch.float64)
        a_bar.index_add_(0, pa, self._a_val.to(torch.float64) * w[ca])
        b_bar = torch.zeros(d_out * r, dtype=torch.float64)
        b_bar.index_add_(0, pb, self._b_wval.to(torch.float64))
        self.dA_bar = a_bar.view(r, d_in).to(torch.float32)
        self.dB_bar = b_bar.view(d_out, r).to(torch.float32)
        self._ca, self._cb, self._pa, self._pb = ca, cb, pa, pb

    @property
    def density(self) -> float:
        """Stored non-zeros over the dense size of all clients' updates."""
        return (self.nnz_A + self.nnz_B) / max(self.m * self.r * (self.d_in + self.d_out), 1)

    def dense(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The dense per-client updates (for the dense path and the fallback)."""
        dAs = torch.zeros(self.m * self.r * self.d_in)
        dAs[self._ca * (self.r * self.d_in) + self._pa] = self._a_val
        dBs = torch.zeros(self.m * self.d_out * self.r)
        dBs[self._cb * (self.d_out * self.r) + self._pb] = self._b_val
        A3 = dAs.view(self.m, self.r, self.d_in)
        B3 = dBs.view(self.m, self.d_out, self.r)
        return list(A3.unbind(0)), list(B3.unbind(0))

    # -- the four orientations ---------------------------------------------------------------
    # Each sort is stable over the concatenation, which is ordered (client, row, column) of
    # each client's factor, so one key sorts each orientation fully.
    @cached_property
    def _order_RT(self) -> torch.Tensor:  # (v, i, s)
        return torch.sort(self._a_col.to(torch.int32), stable=True).indices

    @cached_property
    def _order_L(self) -> torch.Tensor:  # (u, i, s)
        return torch.sort(self._b_row.to(torch.int32), stable=True).indices

    @cached_property
    def _order_LT(self) -> torch.Tensor:  # (i, s, u)
        return torch.sort(self._b_col.to(torch.int32), stable=True).indices

    @cached_property
    def R_S(self) -> torch.Tensor:
        """``[dA_1; ..; dA_m]``, ``m r x d_in``."""
        return _csr(self._a_row, self._a_col, self._a_val, (self.m * self.r, self.d_in))

    @cached_property
    def R_S_T(self) -> torch.Tensor:
        """``R_S^T``, ``d_in x m r``."""
        o = self._order_RT
        return _csr(self._a_col[o], self._a_row[o], self._a_val[o], (self.d_in, self.m * self.r))

    @cached_property
    def L_S(self) -> torch.Tensor:
        """``[w_1 dB_1, .., w_m dB_m]``, ``d_out x m r``."""
        o = self._order_L
        return _csr(self._b_row[o], self._b_col[o], self._b_wval[o], (self.d_out, self.m * self.r))

    @cached_property
    def L_S_T(self) -> torch.Tensor:
        """``L_S^T``, ``m r x d_out``."""
        o = self._order_LT
        return _csr(self._b_col[o], self._b_row[o], self._b_wval[o], (self.m * self.r, self.d_out))

    # -- S = L_S R_S on thin blocks ----------------------------------------------------------
    def s_times(self, X: torch.Tensor) -> torch.Tensor:
        """``S X`` for ``X`` (``d_in x n``, float32), float32."""
        return self.L_S @ (self.R_S @ X)

    def s_t_times(self, P: torch.Tensor) -> torch.Tensor:
        """``S^T P`` for ``P`` (``d_out x n``, float32), float32."""
        return self.R_S_T @ (self.L_S_T @ P)

    def client_norm_bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Upper bounds on every ``||dA_i||_2`` and ``||dB_i||_2`` (float64, ``m`` each).

        ``||X||_2^2 = rho(X^T X) <= rho(|X|^T |X|)`` (``|X^T X| <= |X|^T |X|`` entrywise), and
        for the non-negative ``M = |X|^T |X|`` and any positive ``x``,
        ``rho(M) <= max_s (M x)_s / x_s`` (Collatz-Wielandt): rigorous for any ``x``, tight
        as ``x`` approaches ``M``'s Perron vector, so a few power steps from the ones vector
        (whose ratio is already the bound ``||X||_1 ||X||_inf``). All clients at once, by
        products with the block-diagonal ``|dA_i|``, ``|dB_i|``: linear in the non-zeros.
        For 4%-dense uploads it is about 1.3 times the spectral norm (``||X||_1 ||X||_inf``:
        2.5 times).
        Capped by the Frobenius norm.
        """
        m, r, d_in, d_out = self.m, self.r, self.d_in, self.d_out
        av = self._a_val.abs().to(torch.float64)
        bv = self._b_val.abs().to(torch.float64)
        # Block-diagonal |dA_i| (rows i r + s, columns v m + i) and |dB_i| (rows u m + i,
        # columns i r + s) as scatter-adds over the (row, column, value) triplets: for a
        # single vector these cost less than building CSR copies of them.
        a_row, a_col = self._a_row, self._a_col * m + self._ca
        b_row, b_col = self._b_row * m + self._cb, self._b_col

        def step_A(x: torch.Tensor) -> torch.Tensor:  # |dA_i| |dA_i|^T x_i
            t = torch.zeros(d_in * m, dtype=torch.float64).index_add_(0, a_col, av * x[a_row])
            return torch.zeros(m * r, dtype=torch.float64).index_add_(0, a_row, av * t[a_col])

        def step_B(x: torch.Tensor) -> torch.Tensor:  # |dB_i|^T |dB_i| x_i
            t = torch.zeros(d_out * m, dtype=torch.float64).index_add_(0, b_row, bv * x[b_col])
            return torch.zeros(m * r, dtype=torch.float64).index_add_(0, b_col, bv * t[b_row])

        def bound(step: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
            x = torch.ones(m * r, dtype=torch.float64)
            for _ in range(_CW_STEPS):
                y = step(x).view(m, r)
                # Per block rescaled (ratios are scale-free), kept positive (zero columns).
                top = y.amax(dim=1, keepdim=True).clamp_min(1e-300)
                x = (y / top).clamp_min(1e-6).reshape(m * r)
            ratio = (step(x).view(m, r) / x.view(m, r)).amax(dim=1)
            return (ratio * (1.0 + 1e-9)).sqrt()

        nA = bound(step_A)
        nB = bound(step_B)
        ca, cb = self._ca, self._cb
        fA = torch.zeros(m, dtype=torch.float64).index_add_(0, ca, av * av).sqrt()
        fB = torch.zeros(m, dtype=torch.float64).index_add_(0, cb, bv * bv).sqrt()
        return torch.minimum(nA, fA), torch.minimum(nB, fB)

    def norm_bound(self) -> float:
        """``sum_i w_i ||dB_i||_2 ||dA_i||_2 + ||dB_bar||_2 ||dA_bar||_2 >= ||Delta||_2``."""
        nA, nB = self.client_norm_bounds()
        b = self.dB_bar.to(torch.float64)
        a = self.dA_bar.to(torch.float64)
        nb = float(torch.linalg.eigvalsh(b.T @ b)[-1].clamp_min(0).sqrt())
        na = float(torch.linalg.eigvalsh(a @ a.T)[-1].clamp_min(0).sqrt())
        # float64 sums of float32 values: a relative margin far above their rounding.
        return (float((self.weights * nA * nB).sum()) + nb * na) * (1.0 + 1e-9)

    def rounding_scale(self) -> float:
        """``||L_S||_F ||R_S||_F + ||dB_bar||_F ||dA_bar||_F``: what the float32 products
        of ``Delta = L_S R_S - dB_bar dA_bar`` round against."""
        nL = float(torch.linalg.vector_norm(self._b_wval.to(torch.float64)))
        nR = float(torch.linalg.vector_norm(self._a_val.to(torch.float64)))
        nb = float(torch.linalg.vector_norm(self.dB_bar.to(torch.float64)))
        na = float(torch.linalg.vector_norm(self.dA_bar.to(torch.float64)))
        return nL * nR + nb * na


class _SparseDelta:
    """:class:`aggregate.DeltaOperator` of ``Delta = S - dB_bar dA_bar`` (``S`` sparse)."""

    def __init__(self, u: SparseUpdates) -> None:
        self.u = u
        self.width = u.m * u.r
        self.b64 = u.dB_bar.to(torch.float64)
        self.a64 = u.dA_bar.to(torch.float64)

    def times(self, Z: torch.Tensor) -> torch.Tensor:
        s = self.u.s_times(Z.to(torch.float32).contiguous()).to(torch.float64)
        return s - self.b64 @ (self.a64 @ Z)

    def t_times(self, P: torch.Tensor) -> torch.Tensor:
        s = self.u.s_t_times(P.to(torch.float32).contiguous()).to(torch.float64)
        return s - self.a64.T @ (self.b64.T @ P)

    def norm_bound(self) -> float:
        return self.u.norm_bound()

    def rounding_scale(self) -> float:
        return self.u.rounding_scale()


class SparseModuleTarget:
    """FedSRD-e's target ``T = W - B A = dB_bar A + B dA_bar + L_S R_S`` as an operator on
    thin matrices, with ``L_S``, ``R_S`` sparse (:class:`SparseUpdates`). Same interface
    as :class:`aggregate.ModuleTarget`: ``times``, ``times_left`` and ``solve``."""

    def __init__(self, A: torch.Tensor, B: torch.Tensor, updates: SparseUpdates) -> None:
        self.A, self.B, self.u = A, B, updates

    def times(self, X: torch.Tensor) -> torch.Tensor:
        """``T @ X`` for a thin ``X`` (``d_in x n``), float32 out."""
        X = X.to(torch.float32).contiguous()
        u = self.u
        return u.dB_bar @ (self.A @ X) + self.B @ (u.dA_bar @ X) + u.s_times(X)

    def times_left(self, Z: torch.Tensor) -> torch.Tensor:
        """``Z @ T`` for a thin ``Z`` (``n x d_out``), float32 out."""
        Z = Z.to(torch.float32)
        u = self.u
        st = u.s_t_times(Z.T.contiguous()).T  # (S^T Z^T)^T = Z S
        return (Z @ u.dB_bar) @ self.A + (Z @ self.B) @ u.dA_bar + st

    def solve(
        self, A: torch.Tensor, B: torch.Tensor, *, round_: int
    ) -> tuple[Factor, torch.Tensor]:
        """Eqs. 11-13: ``T pinv(A)`` or ``pinv(B) T``, the pseudo-inverse applied to each
        term's ``r``-sized coefficients in float64 before the last product, as
        :func:`aggregate.one_factor_solve` does for the dense target."""
        u = self.u
        if update_parity(round_) == "B":
            G = _pinv_gram(A)  # (A A^T)^+, float64

            def right(Y: torch.Tensor) -> torch.Tensor:  # Y A^T (A A^T)^+ for Y (n x d_in)
                return ((Y @ A.T).to(torch.float64) @ G).to(torch.float32)

            cS = ((u.R_S @ A.T.contiguous()).to(torch.float64) @ G).to(torch.float32)
            return "B", u.dB_bar @ right(A) + B @ right(u.dA_bar) + u.L_S @ cS
        Gb = _pinv_gram(B.T)  # (B^T B)^+

        def left(Y: torch.Tensor) -> torch.Tensor:  # (B^T B)^+ B^T Y for Y (d_out x n)
            return (Gb @ (B.T @ Y).to(torch.float64)).to(torch.float32)

        # (B^T B)^+ B^T L_S, as its transpose (m r x r), then times R_S via R_S^T.
        cS_T = ((u.L_S_T @ B.contiguous()).to(torch.float64) @ Gb).to(torch.float32)
        tail = (u.R_S_T @ cS_T).T
        return "A", left(u.dB_bar) @ A + left(B) @ u.dA_bar + tail


def sparse_module_target(
    A: torch.Tensor,
    B: torch.Tensor,
    dAs: Sequence[WireEntry],
    dBs: Sequence[WireEntry],
    weights: Sequence[float],
    *,
    truncate: bool = True,
) -> ModuleTarget | SparseModuleTarget:
    """The target ``T = W_r - B A`` of one module from the uploads' entries as they are.

    Like :func:`aggregate.module_target`, but ``dAs`` / ``dBs`` may be sparse (or absent: a
    zero update) and are never densified on the sparse path: from ``SPARSE_MIN_CLIENTS``
    clients on, when at most ``SPARSE_MAX_DENSITY`` of the updates' entries are stored.
    FedSRD (``truncate``) returns the thin iteration's :class:`ModuleTarget` (``4 r``
    columns), or, when that cannot show a spectral gap, the dense path's; FedSRD-e a
    :class:`SparseModuleTarget`.
    """
    if len(dAs) != len(dBs) or len(dAs) != len(weights) or not dAs:
        raise ValueError(
            f"need one dA, dB and weight per client, got {len(dAs)}, {len(dBs)}, {len(weights)}"
        )
    if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
        raise ValueError(f"bad factor shapes: A {tuple(A.shape)}, B {tuple(B.shape)}")
    if not math.isclose(sum(weights), 1.0, rel_tol=1e-6):
        raise ValueError(f"weights must sum to 1, got {sum(weights)}")
    u = SparseUpdates(A, B, dAs, dBs, weights)
    # The CSR kernels here are the CPU's; on an accelerator the dense path's products run.
    dense = A.device.type != "cpu" or len(weights) < SPARSE_MIN_CLIENTS
    if dense or u.density > SPARSE_MAX_DENSITY:
        return _dense_target(A, B, u, weights, truncate)
    if not truncate:
        return SparseModuleTarget(A, B, u)
    Bt = B + u.dB_bar
    target, _ = thin_truncation(u.dB_bar, Bt, A, u.dA_bar, _SparseDelta(u))
    if target is not None:
        return target
    return _dense_target(A, B, u, weights, truncate)


def _dense_target(
    A: torch.Tensor, B: torch.Tensor, u: SparseUpdates, weights: Sequence[float], truncate: bool
) -> ModuleTarget:
    dAs, dBs = u.dense()
    return module_target(A, B, dAs, dBs, weights, truncate=truncate)
