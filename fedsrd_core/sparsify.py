"""Client-side upload sparsification (FedSRD Sec. 3.2, Eqs. 5-8) and the ablation sparsifiers.

Notation for one module: the round starts from the global factors ``A0`` (``r x d_in``) and
``B0`` (``d_out x r``); local training ends at ``A_i = A0 + dA``, ``B_i = B0 + dB``. The exact
change of the adapted weight is (Eq. 5)::

    B_i A_i - B0 A0 = dB A0 + B_i dA

so the element ``dB[u, v]`` contributes the rank-1 matrix ``dB[u, v] * e_u A0[v, :]`` and the
element ``dA[u, v]`` contributes ``B_i[:, u] dA[u, v] e_v^T``. Their Frobenius norms are the
importance scores of Eq. 6.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch

from fedsrd_core.sparse import SparseTensor

SparsifyMethod = Literal["importance", "magnitude", "random"]
RatioRule = Literal["adaptive", "fixed"]
Rescale = Literal["l1", "dare", "none"]


def exact_update(
    A0: torch.Tensor, B0: torch.Tensor, A_i: torch.Tensor, B_i: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The factor updates ``(dA, dB) = (A_i - A0, B_i - B0)`` of one module.

    Shapes: ``A*`` are ``r x d_in``, ``B*`` are ``d_out x r``; float32 in, float32 out.
    Together they give the exact weight change ``dB @ A0 + B_i @ dA`` (Eq. 5).
    """
    return A_i - A0, B_i - B0


def importance_scores(
    A0: torch.Tensor, B_i: torch.Tensor, dA: torch.Tensor, dB: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Importance of every update element (Eq. 6): the norm of its rank-1 contribution.

    ``I_B[u, v] = |dB[u, v]| * ||A0[v, :]||_2`` (row ``v`` of the round's *starting* ``A``)
    and ``I_A[u, v] = |dA[u, v]| * ||B_i[:, u]||_2`` (column ``u`` of the *trained* ``B``).

    Args:
        A0: ``r x d_in``, the round's starting ``A``.
        B_i: ``d_out x r``, the client's trained ``B``.
        dA: ``r x d_in``; dB: ``d_out x r``.

    Returns:
        ``(I_A, I_B)`` with the shapes of ``dA`` and ``dB``, float32, non-negative.
    """
    row_norm_A0 = torch.linalg.vector_norm(A0, dim=1)  # r
    col_norm_Bi = torch.linalg.vector_norm(B_i, dim=0)  # r
    I_B = dB.abs() * row_norm_A0.unsqueeze(0)
    I_A = dA.abs() * col_norm_Bi.unsqueeze(1)
    return I_A, I_B


def pearson_kurtosis(x: torch.Tensor) -> float:
    """Pearson kurtosis ``E[(x - mu)^4] / sigma^4`` of all entries (a normal sample gives 3).

    Population moments, accumulated in float64. Returns ``nan`` when the variance is zero
    (all entries equal), which :func:`adaptive_zero_fraction` treats as "no tail".
    """
    v = x.detach().reshape(-1).to(torch.float64)
    if v.numel() == 0:
        return math.nan
    c = v - v.mean()
    m2 = float((c * c).mean())
    if m2 == 0.0:
        return math.nan
    m4 = float((c * c * c * c).mean())
    return m4 / (m2 * m2)


def adaptive_zero_fraction(
    importance: torch.Tensor, *, alpha: float = 0.85, c: float = 0.1, cap: float = 0.11
) -> float:
    """The fraction of entries to zero for one matrix (Eq. 7).

    ``rho = alpha + min(cap, c * ln(max(kurtosis(I), 1)))`` with Pearson kurtosis and the
    natural log. Heavier-tailed importance (few elements matter) zeroes more.
    """
    k = pearson_kurtosis(importance)
    bonus = 0.0 if math.isnan(k) else min(cap, c * math.log(max(k, 1.0)))
    return alpha + bonus


def _keep_count(numel: int, zero_fraction: float) -> int:
    """Entries kept when a fraction ``zero_fraction`` is zeroed: ``numel - floor(rho * numel)``."""
    return numel - math.floor(zero_fraction * numel)


def top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` largest ``scores`` (any shape), ties broken by ``topk``.

    This is Eq. 8: with ``k = numel - floor(rho * numel)`` every entry below the
    ``rho``-quantile of the scores is zeroed. Entries with a zero score are never kept (they
    carry no update).
    """
    flat = scores.reshape(-1)
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    k = max(0, min(k, flat.numel()))
    if k:
        idx = torch.topk(flat, k, sorted=False).indices
        mask[idx] = True
        mask &= flat > 0
    return mask.view(scores.shape)


def random_keep_mask(
    shape: tuple[int, ...], density: float, generator: torch.Generator, device: torch.device
) -> torch.Tensor:
    """Bernoulli(``density``) keep mask of ``shape`` drawn from ``generator`` (on CPU)."""
    return (torch.rand(shape, generator=generator) < density).to(device)


@dataclass(frozen=True)
class SparsifierConfig:
    """How a client sparsifies its upload.

    Attributes:
        method: ``"importance"`` (FedSRD, Eq. 6), ``"magnitude"`` (largest ``|delta|``) or
            ``"random"`` (Bernoulli keep mask).
        ratio: ``"adaptive"`` (Eq. 7, importance only) or ``"fixed"`` (``zero_fraction``).
        alpha, c, cap: Eq. 7 constants (paper: 0.85, 0.1, 0.11).
        zero_fraction: the fixed fraction zeroed for ``ratio="fixed"``, and for the
            magnitude / random sparsifiers.
        rescale: ``"l1"`` keeps each matrix's L1 norm (authors' code), ``"dare"`` multiplies
            survivors by ``1 / (1 - zero_fraction)`` (DARE), ``"none"`` leaves them.
    """

    method: SparsifyMethod = "importance"
    ratio: RatioRule = "adaptive"
    alpha: float = 0.85
    c: float = 0.1
    cap: float = 0.11
    zero_fraction: float = 0.95
    rescale: Rescale = "l1"

    def __post_init__(self) -> None:
        if self.method not in ("importance", "magnitude", "random"):
            raise ValueError(
                f"`method` must be importance, magnitude or random, got {self.method!r}"
            )
        if self.ratio not in ("adaptive", "fixed"):
            raise ValueError(f"`ratio` must be adaptive or fixed, got {self.ratio!r}")
        if self.ratio == "adaptive" and self.method != "importance":
            raise ValueError("`ratio='adaptive'` is defined only for `method='importance'`")
        if self.rescale not in ("l1", "dare", "none"):
            raise ValueError(f"`rescale` must be l1, dare or none, got {self.rescale!r}")
        for field in ("alpha", "c", "cap", "zero_fraction"):
            v = getattr(self, field)
            if not isinstance(v, int | float) or not math.isfinite(v):
                raise ValueError(f"`{field}` must be a finite number, got {v!r}")
        if not 0.0 <= self.alpha < 1.0:
            raise ValueError(f"`alpha` must be in [0, 1), got {self.alpha}")
        if self.c < 0 or self.cap < 0:
            raise ValueError(f"`c` and `cap` must be >= 0, got c={self.c}, cap={self.cap}")
        if self.alpha + self.cap >= 1.0:
            raise ValueError(
                f"`alpha + cap` must be < 1 (got {self.alpha + self.cap}): nothing kept"
            )
        if not 0.0 <= self.zero_fraction < 1.0:
            raise ValueError(f"`zero_fraction` must be in [0, 1), got {self.zero_fraction}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SparsifierConfig:
        return cls(**d)


def _rescale(
    full: torch.Tensor, kept: torch.Tensor, mode: Rescale, zero_fraction: float
) -> torch.Tensor:
    if mode == "l1":
        kept_l1 = kept.abs().sum()
        if kept_l1 > 0:
            return kept * (full.abs().sum() / kept_l1)
        return kept
    if mode == "dare":
        return kept / (1.0 - zero_fraction)
    return kept


def sparsify_matrix(
    delta: torch.Tensor,
    importance: torch.Tensor | None,
    config: SparsifierConfig,
    *,
    generator: torch.Generator | None = None,
) -> tuple[SparseTensor, float]:
    """Sparsify one update matrix; returns the sparse update and the zeroed fraction used.

    Args:
        delta: the dense update (``dA`` or ``dB``), float32.
        importance: its importance scores (same shape), required for ``method="importance"``.
        config: the sparsifier.
        generator: the CPU generator for ``method="random"``.
    """
    n = delta.numel()
    if config.method == "random":
        if generator is None:
            raise ValueError("`method='random'` needs a `generator`")
        rho = config.zero_fraction
        mask = random_keep_mask(tuple(delta.shape), 1.0 - rho, generator, delta.device)
        mask &= delta != 0
    else:
        if config.method == "importance":
            if importance is None:
                raise ValueError("`method='importance'` needs the importance scores")
            scores = importance
            if config.ratio == "adaptive":
                rho = adaptive_zero_fraction(scores, alpha=config.alpha, c=config.c, cap=config.cap)
            else:
                rho = config.zero_fraction
        else:
            scores = delta.abs()
            rho = config.zero_fraction
        mask = top_k_mask(scores, _keep_count(n, rho))
    sp = SparseTensor.from_mask(delta, mask)
    values = _rescale(delta, sp.values, config.rescale, rho)
    return SparseTensor(sp.shape, sp.indices, values), rho


def sparsify_module_update(
    A0: torch.Tensor,
    B0: torch.Tensor,
    A_i: torch.Tensor,
    B_i: torch.Tensor,
    config: SparsifierConfig,
    *,
    generator: torch.Generator | None = None,
) -> tuple[SparseTensor, SparseTensor]:
    """The sparse upload ``(dA, dB)`` of one module from its start and trained factors."""
    dA, dB = exact_update(A0, B0, A_i, B_i)
    I_A: torch.Tensor | None = None
    I_B: torch.Tensor | None = None
    if config.method == "importance":
        I_A, I_B = importance_scores(A0, B_i, dA, dB)
    sA, _ = sparsify_matrix(dA, I_A, config, generator=generator)
    sB, _ = sparsify_matrix(dB, I_B, config, generator=generator)
    return sA, sB
