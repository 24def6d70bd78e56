"""The baselines FedSRD is measured against, each a short class over shared functions.

- ``fedavg``: FedIT. Zhang et al., "Towards Building the Federated GPT: Federated Instruction
  Tuning", ICASSP 2024. Clients upload dense LoRA updates; the server averages A and B
  separately and broadcasts both.
- ``fedprox``: Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020.
  FedAvg plus ``mu/2 ||theta - theta_global||^2`` in the client's local loss.
- ``ffa-lora``: Sun et al., "Improving LoRA in Privacy-preserving Federated Learning",
  ICLR 2024. ``A`` stays frozen at its initialisation; only ``B`` is trained and averaged.
- ``flexlora``: Bai et al., "Federated Fine-tuning of Large Language Models under
  Heterogeneous Tasks and Client Resources", NeurIPS 2024. The full-rank aggregate
  ``sum w_i B_i A_i`` is re-decomposed by truncated SVD into new dense factors.
- ``fed-dare``: FedAvg whose uploads are sparsified at random (drop 0.9) and rescaled by
  ``1/(1-p)``, after Yu et al., "Language Models are Super Mario" (DARE), ICML 2024.

For the paper's "sparsifier inside FedAvg" comparison, ``fedavg`` takes an optional upload
sparsifier (importance, random or magnitude at a fixed density).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

from fedsrd_core.aggregate import Factor, average_factors, truncated_factors
from fedsrd_core.sparsify import SparsifierConfig
from fedsrd_core.state import A_SUFFIX, B_SUFFIX, GlobalState
from fedsrd_core.strategies.base import (
    DeltaTensor,
    RoundContext,
    Strategy,
    StrategyConfig,
    Upload,
    WireTensor,
    check_probability,
    dense_delta,
    dense_upload,
    register,
    sparse_upload,
)


@dataclass(frozen=True)
class FedAvgConfig(StrategyConfig):
    """FedAvg (FedIT).

    Attributes:
        upload_sparsifier: None for dense uploads, or a fixed-ratio sparsifier for the
            paper's sparsifier comparison (Table 7).
    """

    upload_sparsifier: SparsifierConfig | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        sp: object = self.upload_sparsifier
        if isinstance(sp, dict):  # from_dict of an Optional nested config
            sp = SparsifierConfig.from_dict(sp)
            object.__setattr__(self, "upload_sparsifier", sp)
        if sp is not None and not isinstance(sp, SparsifierConfig):
            raise ValueError(f"`upload_sparsifier` must be a SparsifierConfig or None, got {sp!r}")


@dataclass(frozen=True)
class FedProxConfig(StrategyConfig):
    """FedProx: ``mu`` weights the proximal term of the local loss."""

    mu: float = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.mu, bool) or not isinstance(self.mu, int | float) or not self.mu >= 0:
            raise ValueError(f"`mu` must be a number >= 0, got {self.mu!r}")


@dataclass(frozen=True)
class FFALoRAConfig(StrategyConfig):
    """FFA-LoRA has no settings beyond the weighting."""


@dataclass(frozen=True)
class FlexLoRAConfig(StrategyConfig):
    """FlexLoRA has no settings beyond the weighting (the rank is the run's LoRA rank)."""


@dataclass(frozen=True)
class FedDAREConfig(StrategyConfig):
    """Fed-DARE: ``drop`` is the upload drop probability (0.9)."""

    drop: float = 0.9

    def __post_init__(self) -> None:
        super().__post_init__()
        check_probability("drop", self.drop)


class FedAvg(Strategy):
    """FedAvg on LoRA factors (FedIT): average A and B separately."""

    name = "fedavg"
    paper = "Zhang et al., FedIT, ICASSP 2024"
    config_cls: ClassVar[type[StrategyConfig]] = FedAvgConfig

    def client_upload(
        self, start: GlobalState, trained: GlobalState, ctx: RoundContext, *, client_seed: int = 0
    ) -> dict[str, WireTensor]:
        sp = getattr(self.config, "upload_sparsifier", None)
        if sp is not None:
            return sparse_upload(start, trained, sp, client_seed)
        return dense_upload(start, trained, self.trainable_factors())

    def server_round(
        self, state: GlobalState, uploads: Sequence[Upload], ctx: RoundContext
    ) -> dict[str, DeltaTensor]:
        w = self.weights(uploads)
        out: dict[str, DeltaTensor] = {}
        factors = self.trainable_factors()
        for module, dAs, dBs in self.module_updates(state, uploads):
            dA, dB = average_factors(dAs, dBs, w)
            if "A" in factors:
                out[module + A_SUFFIX] = dense_delta(dA, ctx.value_dtype)
            if "B" in factors:
                out[module + B_SUFFIX] = dense_delta(dB, ctx.value_dtype)
        return out


class FedProx(FedAvg):
    """FedProx: FedAvg with a proximal term in the local objective."""

    name = "fedprox"
    paper = "Li et al., FedProx, MLSys 2020"
    config_cls = FedProxConfig

    def proximal_mu(self) -> float:
        return float(getattr(self.config, "mu", 0.0))


class FFALoRA(FedAvg):
    """FFA-LoRA: A frozen at initialisation, only B trained, uploaded and averaged."""

    name = "ffa-lora"
    paper = "Sun et al., FFA-LoRA, ICLR 2024"
    config_cls = FFALoRAConfig

    def trainable_factors(self) -> frozenset[Factor]:
        return frozenset({"B"})


class FedDARE(FedAvg):
    """Fed-DARE: random upload sparsification with 1/(1-p) rescale, then FedAvg."""

    name = "fed-dare"
    paper = "Yu et al., DARE, ICML 2024 (applied to FedAvg uploads)"
    config_cls = FedDAREConfig

    def client_upload(
        self, start: GlobalState, trained: GlobalState, ctx: RoundContext, *, client_seed: int = 0
    ) -> dict[str, WireTensor]:
        drop = float(getattr(self.config, "drop", 0.9))
        cfg = SparsifierConfig(method="random", ratio="fixed", zero_fraction=drop, rescale="dare")
        return sparse_upload(start, trained, cfg, client_seed)


class FlexLoRA(Strategy):
    """FlexLoRA: truncated SVD of the full-rank aggregate, new dense factors downloaded."""

    name = "flexlora"
    paper = "Bai et al., FlexLoRA, NeurIPS 2024"
    config_cls = FlexLoRAConfig

    def client_upload(
        self, start: GlobalState, trained: GlobalState, ctx: RoundContext, *, client_seed: int = 0
    ) -> dict[str, WireTensor]:
        return dense_upload(start, trained, self.trainable_factors())

    def server_round(
        self, state: GlobalState, uploads: Sequence[Upload], ctx: RoundContext
    ) -> dict[str, DeltaTensor]:
        w = self.weights(uploads)
        out: dict[str, DeltaTensor] = {}
        for module, dAs, dBs in self.module_updates(state, uploads):
            f = state[module]
            A_new, B_new = truncated_factors(f.A, f.B, dAs, dBs, w)
            out[module + A_SUFFIX] = dense_delta(A_new - f.A, ctx.value_dtype)
            out[module + B_SUFFIX] = dense_delta(B_new - f.B, ctx.value_dtype)
        return out


def _factory(cls: type[Strategy]) -> Callable[[StrategyConfig | None], Strategy]:
    def build(config: StrategyConfig | None) -> Strategy:
        return cls(config)

    return build


for _cls in (FedAvg, FedProx, FFALoRA, FedDARE, FlexLoRA):
    register(_cls.name, _factory(_cls), _cls.config_cls)
