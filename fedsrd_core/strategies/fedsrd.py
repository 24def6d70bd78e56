"""FedSRD, FedSRD-e and the paper's exact method (``fedsrd-paper``).

Yan, Xie, Shen, Fang, Wu. "FedSRD: Sparsify-Reconstruct-Decompose for Communication-Efficient
Federated Large Language Models Fine-Tuning." arXiv:2510.04601 (WWW 2026).

Client: importance-aware sparsification of the update with a kurtosis-adaptive ratio
(Eqs. 5-8). Server: full-rank reconstruction and aggregation (Eq. 9), rank-r truncation
(Eq. 10, FedSRD only), alternating closed-form decomposition into one factor's update
(Eqs. 11-13), and a random 20% of that update's entries for the download, at positions
clients regenerate from ``(seed, round, tensor name)``. The paper sends the exact solve's
values there, scaled by ``1 / (1 - p)`` (DARE); by default we send the values fitted to the
target in product space on the same positions (:func:`fitted_download`, beyond the paper:
a contraction where DARE adds noise twice the update's size).

The ``server`` switch gives the paper's ablations: ``"svd"`` downloads dense rank-r factors
(no alternating decomposition) and ``"average"`` averages A and B separately (no full-rank
reconstruction).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from fedsrd_core.aggregate import (
    ModuleTarget,
    TargetOperator,
    average_factors,
    one_factor_solve,
    truncated_factors,
    update_parity,
)
from fedsrd_core.aggregate_sparse import sparse_module_target
from fedsrd_core.codec import SeededSparse, ValueDType, quantize
from fedsrd_core.fit import masked_least_squares
from fedsrd_core.masks import keep_threshold, seeded_mask
from fedsrd_core.sparsify import SparsifierConfig
from fedsrd_core.state import A_SUFFIX, B_SUFFIX, GlobalState, rebalance_factors
from fedsrd_core.strategies.base import (
    DeltaTensor,
    RoundContext,
    Strategy,
    StrategyConfig,
    Upload,
    WireTensor,
    check_probability,
    dense_delta,
    register,
    sparse_upload,
)

ServerMode = Literal["alternating", "svd", "average"]
DownloadValues = Literal["dare", "fit"]
#: Upper bound of ``server_lr``: far above anything useful, low enough to refuse typos.
MAX_SERVER_LR = 16.0


@dataclass(frozen=True)
class FedSRDConfig(StrategyConfig):
    """FedSRD settings.

    Attributes:
        truncate: rank-r truncation of the aggregate (FedSRD); False gives FedSRD-e.
        sparsifier: the client's upload sparsifier (importance + adaptive ratio + L1 rescale).
        download_drop: drop probability ``p`` of the download's seeded mask (paper: 0.8):
            each entry of the factor update is sent with probability ``1 - p``.
        download_values: what is sent at the kept positions. ``"dare"`` (the paper): the
            exact solve's values scaled by ``1 / (1 - p)``, unbiased but with product-space
            noise about ``sqrt(p / (1 - p))`` = 2 times the update. ``"fit"`` (beyond the
            paper, the default): the least-squares fit of the target in product space
            restricted to the mask (:func:`fitted_download`), which never delivers more
            than the target and adds nothing orthogonal to it. Same positions, same bytes.
        server: ``"alternating"`` (the method), or the ablations ``"svd"`` / ``"average"``.
        rebalance: after each global delta, balance every rank component between ``B`` and
            ``A`` by an exact power of two (:func:`fedsrd_core.state.rebalance_factors`).
            Not in the paper: without it the alternating updates let the factor norms drift
            apart and local training diverges from round 3 in our simulations (README).
            ``B A`` is unchanged bit for bit; False reproduces the paper.
        server_lr: server step size ``eta`` (beyond the paper, which uses 1): the download
            delivers ``eta`` times the fitted (or DARE) solve, as a server learning rate in
            adaptive federated optimisation (Reddi et al., ICLR 2021). With fitted values a
            round delivers only a fraction of the target, so steps above 1 are safe.
        weighting: ``"uniform"`` (paper) or ``"samples"``.

    ``fedsrd-paper`` is the paper's method exactly as published, for reproduction:
    ``download_values="dare"``, ``rebalance=False``.
    """

    truncate: bool = True
    sparsifier: SparsifierConfig = field(default_factory=SparsifierConfig)
    download_drop: float = 0.8
    server: ServerMode = "alternating"
    rebalance: bool = True
    download_values: DownloadValues = "fit"
    server_lr: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.truncate, bool):
            raise ValueError(f"`truncate` must be a bool, got {self.truncate!r}")
        if not isinstance(self.sparsifier, SparsifierConfig):
            raise ValueError(f"`sparsifier` must be a SparsifierConfig, got {self.sparsifier!r}")
        check_probability("download_drop", self.download_drop)
        if not isinstance(self.rebalance, bool):
            raise ValueError(f"`rebalance` must be a bool, got {self.rebalance!r}")
        if self.download_values not in ("dare", "fit"):
            raise ValueError(
                f"`download_values` must be 'dare' or 'fit', got {self.download_values!r}"
            )
        if (
            isinstance(self.server_lr, bool)
            or not isinstance(self.server_lr, (int, float))
            or not 0.0 < self.server_lr <= MAX_SERVER_LR
        ):
            raise ValueError(
                f"`server_lr` must be a number in (0, {MAX_SERVER_LR:g}], got {self.server_lr!r}"
            )
        if self.server not in ("alternating", "svd", "average"):
            raise ValueError(
                f"`server` must be 'alternating', 'svd' or 'average', got {self.server!r}"
            )


def dare_download(
    delta: torch.Tensor,
    name: str,
    *,
    seed: int,
    round_: int,
    drop: float,
    value_dtype: ValueDType,
    scale: float = 1.0,
) -> SeededSparse:
    """DARE on a global update: keep each entry with probability ``1 - drop``, scale by
    ``scale / (1 - drop)`` (``scale``: the server step, 1 in the paper). The keep mask is
    :func:`fedsrd_core.masks.seeded_mask` of ``(seed, round, name)``, so the blob carries
    values only."""
    thr = keep_threshold(1.0 - drop)
    mask = seeded_mask(seed, round_, name, tuple(delta.shape), thr, device=delta.device)
    positions = torch.nonzero(mask.reshape(-1)).view(-1)
    values = delta.reshape(-1)[positions] * (scale / (1.0 - drop))
    return SeededSparse(
        tuple(delta.shape),
        seed,
        round_,
        thr,
        quantize(values, value_dtype),
        known_positions=(name, positions),
    )


def fitted_download(
    target: ModuleTarget | TargetOperator,
    A: torch.Tensor,
    B: torch.Tensor,
    which: str,
    name: str,
    *,
    seed: int,
    round_: int,
    drop: float,
    value_dtype: ValueDType,
    scale: float = 1.0,
) -> SeededSparse:
    """The download's values fitted to the target on the seeded mask (beyond the paper).

    Same positions as :func:`dare_download` (``seeded_mask(seed, round, name)``, kept with
    probability ``1 - drop``); the values minimise the product-space error row by row:

        B-round, ``dB`` (``d_out x r``), row u kept on S_u:
            dB[u, S_u] = argmin_x || x A[S_u, :] - T[u, :] ||,   G = A A^T,  C = T A^T
        A-round, ``dA`` (``r x d_in``), column v kept on S_v:
            dA[S_v, v] = argmin_y || B[:, S_v] y - T[:, v] ||,   G = B^T B,  C = T^T B

    (:func:`fedsrd_core.fit.masked_least_squares`). ``T`` (``d_out x d_in``) is never formed:
    ``C`` comes from the target's thin operator. The delivered change is the projection of
    ``T`` onto what the mask can express, so it is never larger than ``T``; ``scale`` (the
    server step ``eta``) multiplies it: the values fit ``eta T``.
    """
    shape = (B.shape[0], A.shape[0]) if which == "B" else (A.shape[0], A.shape[1])
    thr = keep_threshold(1.0 - drop)
    mask = seeded_mask(seed, round_, name, shape, thr, device=A.device)
    if which == "B":
        A64 = A.to(torch.float64)
        G = A64 @ A64.T
        C = target.times(A.T.contiguous())  # T A^T, d_out x r
        values = masked_least_squares(G, C, mask)
    else:
        B64 = B.to(torch.float64)
        G = B64.T @ B64
        C = target.times_left(B.T.contiguous()).T  # (B^T T)^T = T^T B, d_in x r
        values = masked_least_squares(G, C.contiguous(), mask.T.contiguous()).T
    positions = torch.nonzero(mask.reshape(-1)).view(-1)
    return SeededSparse(
        shape,
        seed,
        round_,
        thr,
        quantize(values.reshape(-1)[positions] * scale, value_dtype),
        known_positions=(name, positions),
    )


class FedSRD(Strategy):
    """FedSRD (Sparsify-Reconstruct-Decompose)."""

    name = "fedsrd"
    paper = "Yan et al., FedSRD, arXiv:2510.04601 (WWW 2026)"
    config_cls = FedSRDConfig
    config: FedSRDConfig

    @classmethod
    def default_config(cls) -> FedSRDConfig:
        return FedSRDConfig()

    def client_upload(
        self,
        start: GlobalState,
        trained: GlobalState,
        ctx: RoundContext,
        *,
        client_seed: int = 0,
    ) -> dict[str, WireTensor]:
        return sparse_upload(start, trained, self.config.sparsifier, client_seed)

    def after_apply(self, state: GlobalState) -> None:
        if self.config.rebalance and self.config.server == "alternating":
            rebalance_factors(state)

    def server_round(
        self, state: GlobalState, uploads: Sequence[Upload], ctx: RoundContext
    ) -> dict[str, DeltaTensor]:
        w = self.weights(uploads)
        cfg = self.config
        out: dict[str, DeltaTensor] = {}
        if cfg.server == "alternating":
            # The uploads' entries as they are: the sparse server math never densifies them.
            for module, eAs, eBs in self.module_entries(state, uploads):
                f = state[module]
                target = sparse_module_target(f.A, f.B, eAs, eBs, w, truncate=cfg.truncate)
                which = update_parity(ctx.round)
                name = module + (A_SUFFIX if which == "A" else B_SUFFIX)
                if cfg.download_values == "fit":
                    out[name] = fitted_download(
                        target,
                        f.A,
                        f.B,
                        which,
                        name,
                        seed=ctx.seed,
                        round_=ctx.round,
                        drop=cfg.download_drop,
                        value_dtype=ctx.value_dtype,
                        scale=cfg.server_lr,
                    )
                    continue
                _, delta = one_factor_solve(target, f.A, f.B, round_=ctx.round)
                out[name] = dare_download(
                    delta,
                    name,
                    seed=ctx.seed,
                    round_=ctx.round,
                    drop=cfg.download_drop,
                    value_dtype=ctx.value_dtype,
                    scale=cfg.server_lr,
                )
            return out
        for module, dAs, dBs in self.module_updates(state, uploads):
            f = state[module]
            if cfg.server == "svd":
                A_new, B_new = truncated_factors(f.A, f.B, dAs, dBs, w)
                dA, dB = A_new - f.A, B_new - f.B
            else:
                dA, dB = average_factors(dAs, dBs, w)
            out[module + A_SUFFIX] = dense_delta(dA, ctx.value_dtype)
            out[module + B_SUFFIX] = dense_delta(dB, ctx.value_dtype)
        return out


class FedSRDe(FedSRD):
    """FedSRD-e: FedSRD without the rank-r truncation of the aggregate (Eq. 10 skipped)."""

    name = "fedsrd-e"

    @classmethod
    def default_config(cls) -> FedSRDConfig:
        return FedSRDConfig(truncate=False)


class FedSRDPaper(FedSRD):
    """FedSRD exactly as published (for reproduction): DARE download values, no rebalancing."""

    name = "fedsrd-paper"

    @classmethod
    def default_config(cls) -> FedSRDConfig:
        return FedSRDConfig(download_values="dare", rebalance=False)


register("fedsrd", lambda c: FedSRD(c), FedSRD.default_config)
register("fedsrd-e", lambda c: FedSRDe(c), FedSRDe.default_config)
register("fedsrd-paper", lambda c: FedSRDPaper(c), FedSRDPaper.default_config)
