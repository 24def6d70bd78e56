"""What a FedSRD server round did to each module, measured densely (small models only).

For the quality benchmark's diagnosis (``benchmarks/quality.py --diagnose``): given the
global factors a round started from, the clients' updates, and the delta the round actually
broadcast, it recomputes the round's quantities with the dense references of
:mod:`fedsrd_core.reference` and reports, per module:

* ``cond_fixed``: the condition number of the factor held fixed (``A`` on B-rounds, ``B`` on
  A-rounds), ``sigma_max / sigma_min`` (``inf`` while it is rank deficient);
* ``target``: ``||T||_F``, the target ``T = W_r - B A`` (plus the server's carried residual,
  when the strategy keeps one) of Eqs. 11-13;
* ``solved``: ``||T P||_F`` (B-round, ``P`` the projector on ``A``'s row space) or
  ``||P T||_F`` (A-round, on ``B``'s column space): what the exact one-factor solve delivers;
* ``projection_loss``: ``||T - solved|| / ||T||``, the share of ``T`` no one-factor update can
  deliver this round;
* ``delivered``: ``||B' A' - B A||_F``, the product change the broadcast delta made;
* ``download_noise``: ``||delivered - solved|| / ||solved||``, what the download's sparse
  values changed against the exact solve (DARE: about ``sqrt(p / (1 - p))`` = 2 at p = 0.8);
* ``residual``: ``||T - delivered|| / ||T||``, and ``alignment``: the cosine between ``T`` and
  the delivered change;
* ``truncation_loss``: ``||W - W_r|| / ||W - B A||``, the share of the aggregate's change that
  the rank-r truncation removed (0 for FedSRD-e);
* ``norm_A``, ``norm_B``: the factors' Frobenius norms before the round.

Everything is float64 and dense: ``O(d_out d_in)`` memory per module, meant for the testbed's
models, never for a production server.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fedsrd_core.aggregate import update_parity
from fedsrd_core.reference import dense_aggregate, dense_pinv, dense_truncate
from fedsrd_core.state import GlobalState
from fedsrd_core.strategies.base import Strategy, Upload
from fedsrd_core.strategies.fedsrd import FedSRDConfig

__all__ = [
    "MODULE_METRICS",
    "module_class",
    "module_diagnostics",
    "round_diagnostics",
    "summarise_by_class",
]

MODULE_METRICS = (
    "cond_fixed",
    "target",
    "solved",
    "projection_loss",
    "delivered",
    "download_noise",
    "residual",
    "alignment",
    "truncation_loss",
    "norm_A",
    "norm_B",
)


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else (0.0 if a == 0 else math.inf)


def _cond(X: torch.Tensor) -> float:
    s = torch.linalg.svdvals(X)
    return _ratio(float(s[0]), float(s[-1])) if float(s[0]) > 0 else math.inf


def module_diagnostics(
    A: torch.Tensor,
    B: torch.Tensor,
    dAs: Sequence[torch.Tensor],
    dBs: Sequence[torch.Tensor],
    weights: Sequence[float],
    new_A: torch.Tensor,
    new_B: torch.Tensor,
    *,
    round_: int,
    truncate: bool,
    carried: torch.Tensor | None = None,
) -> dict[str, float]:
    """The metrics of the module docstring for one module.

    Args:
        A, B: the global factors the round started from (``r x d_in``, ``d_out x r``).
        dAs, dBs: the clients' dense updates; weights: their aggregation weights.
        new_A, new_B: the global factors after the round's broadcast delta was applied.
        round_: the round number (its parity says which factor was solved for).
        truncate: FedSRD (rank-r truncation) or FedSRD-e.
        carried: the server's residual added to the target this round (``d_out x d_in``),
            if the strategy keeps one.
    """
    d = torch.float64
    A64, B64 = A.to(d), B.to(d)
    W = dense_aggregate(A, B, dAs, dBs, weights, d)
    base = B64 @ A64
    W_r = dense_truncate(W, A.shape[0]) if truncate else W
    T = W_r - base
    if carried is not None:
        T = T + carried.to(d)
    if update_parity(round_) == "B":
        fixed = A64
        solved = T @ dense_pinv(A64) @ A64
    else:
        fixed = B64
        solved = B64 @ dense_pinv(B64) @ T
    delivered = new_B.to(d) @ new_A.to(d) - base
    t, s, dl = (float(torch.linalg.matrix_norm(x)) for x in (T, solved, delivered))
    return {
        "cond_fixed": _cond(fixed),
        "target": t,
        "solved": s,
        "projection_loss": _ratio(float(torch.linalg.matrix_norm(T - solved)), t),
        "delivered": dl,
        "download_noise": _ratio(float(torch.linalg.matrix_norm(delivered - solved)), s),
        "residual": _ratio(float(torch.linalg.matrix_norm(T - delivered)), t),
        "alignment": _ratio(float((T * delivered).sum()), t * dl),
        "truncation_loss": _ratio(
            float(torch.linalg.matrix_norm(W - W_r)), float(torch.linalg.matrix_norm(W - base))
        ),
        "norm_A": float(torch.linalg.matrix_norm(A64)),
        "norm_B": float(torch.linalg.matrix_norm(B64)),
    }


def module_class(module: str) -> str:
    """The kind of a module, its last name part (``model.layers.3.self_attn.q_proj`` ->
    ``q_proj``): diagnostics are summarised per kind across layers."""
    return module.rsplit(".", 1)[-1]


def summarise_by_class(per_module: Mapping[str, Mapping[str, float]]) -> dict[str, Any]:
    """Median of every metric per module class, and over all modules (``"all"``)."""
    groups: dict[str, list[Mapping[str, float]]] = {}
    for module, metrics in per_module.items():
        groups.setdefault(module_class(module), []).append(metrics)
        groups.setdefault("all", []).append(metrics)
    out: dict[str, Any] = {}
    for cls, rows in sorted(groups.items()):
        out[cls] = {
            k: float(torch.tensor([r[k] for r in rows], dtype=torch.float64).median())
            for k in rows[0]
        }
    return out


def round_diagnostics(
    strategy: Strategy,
    before: GlobalState,
    uploads: Sequence[Upload],
    after: GlobalState,
    *,
    round_: int,
) -> dict[str, dict[str, float]] | None:
    """:func:`module_diagnostics` of every module for one round of an alternating FedSRD
    strategy, or None for any other strategy (there is no one-factor solve to measure).

    ``before`` is the global state the round started from, ``after`` the state after the
    broadcast delta (and the strategy's post-step) was applied.
    """
    cfg = strategy.config
    if not isinstance(cfg, FedSRDConfig) or cfg.server != "alternating":
        return None
    weights = strategy.weights(uploads)
    return {
        module: module_diagnostics(
            before[module].A,
            before[module].B,
            dAs,
            dBs,
            weights,
            after[module].A,
            after[module].B,
            round_=round_,
            truncate=cfg.truncate,
        )
        for module, dAs, dBs in strategy.module_updates(before, uploads)
    }
