"""The strategy interface (client upload + server round), its configs, and the registry.

A strategy has two paired verbs, as in Flower:

- ``client_upload(start, trained, ctx)``: what a client sends after local training that
  started from the global state ``start`` and ended at ``trained``;
- ``server_round(state, uploads, ctx)``: the global delta of the round, computed module by
  module (one module's factors in memory at a time), with values already rounded to the
  wire dtype, so that the server applies exactly what every client decodes.

Both sides name tensors ``"<module>.lora_A"`` / ``"<module>.lora_B"`` and carry *updates*
(differences against the round's starting factors), never absolute factors.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Self

import torch

from fedsrd_core.aggregate import Factor, Weighting, aggregation_weights
from fedsrd_core.codec import SeededSparse, ValueDType, quantize
from fedsrd_core.sparse import SparseTensor
from fedsrd_core.sparsify import SparsifierConfig, sparsify_module_update
from fedsrd_core.state import A_SUFFIX, B_SUFFIX, GlobalState, apply_delta, split_wire_name

#: One wire entry of an upload or a global delta.
WireTensor = torch.Tensor | SparseTensor
DeltaTensor = torch.Tensor | SparseTensor | SeededSparse

_VALUE_DTYPES = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class RoundContext:
    """What both sides know about a round: its number (from 1), the run seed, wire dtype."""

    round: int
    seed: int = 0
    value_dtype: ValueDType = "fp32"

    def __post_init__(self) -> None:
        if self.round < 1:
            raise ValueError(f"`round` counts from 1, got {self.round}")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"`seed` must be in [0, 2**63), got {self.seed}")
        if self.value_dtype not in _VALUE_DTYPES:
            raise ValueError(
                f"`value_dtype` must be one of {_VALUE_DTYPES}, got {self.value_dtype!r}"
            )


@dataclass(frozen=True)
class Upload:
    """A client's upload: wire tensors (updates) and its number of local samples."""

    tensors: Mapping[str, WireTensor]
    num_samples: int = 1

    def __post_init__(self) -> None:
        if self.num_samples < 0:
            raise ValueError(f"`num_samples` must be >= 0, got {self.num_samples}")


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


@dataclass(frozen=True)
class StrategyConfig:
    """Base of the per-strategy config dataclasses: validation and dict round-trips.

    Subclasses validate themselves in ``__post_init__`` with messages naming the bad field;
    ``from_dict`` rejects unknown keys and builds nested config dataclasses.
    """

    weighting: Weighting = "uniform"

    def __post_init__(self) -> None:
        if self.weighting not in ("uniform", "samples"):
            raise ValueError(f"`weighting` must be 'uniform' or 'samples', got {self.weighting!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        if not isinstance(data, Mapping):
            raise ValueError(f"{cls.__name__} must be given a mapping, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}; known: {sorted(names)}")
        hints = _field_types(cls)
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            hint = hints[key]
            if (
                isinstance(hint, type)
                and dataclasses.is_dataclass(hint)
                and isinstance(value, Mapping)
            ):
                sub = typing.cast(Any, hint)
                value = sub.from_dict(value) if hasattr(sub, "from_dict") else sub(**value)
            kwargs[key] = value
        return cls(**kwargs)


def check_probability(name: str, value: object, *, allow_zero: bool = True) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is a float in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"`{name}` must be a finite number, got {value!r}")
    lo_ok = value >= 0 if allow_zero else value > 0
    if not lo_ok or value >= 1:
        raise ValueError(f"`{name}` must be in {'[0' if allow_zero else '(0'}, 1), got {value}")


def check_type(name: str, value: object, expected: type | types.UnionType) -> None:
    if isinstance(value, bool) and expected is not bool:
        raise ValueError(f"`{name}` must be {expected}, got {value!r}")
    if not isinstance(value, expected):
        raise ValueError(f"`{name}` must be {expected}, got {value!r}")


class Strategy(ABC):
    """A federated LoRA strategy: what clients upload and how the server aggregates."""

    #: Registry name, e.g. ``"fedsrd"``.
    name: ClassVar[str]
    #: The paper the strategy comes from.
    paper: ClassVar[str]
    config_cls: ClassVar[type[StrategyConfig]]

    def __init__(self, config: StrategyConfig | None = None) -> None:
        cfg = config if config is not None else self.default_config()
        if not isinstance(cfg, self.config_cls):
            raise ValueError(
                f"strategy {self.name!r} needs a {self.config_cls.__name__}, "
                f"got {type(cfg).__name__}"
            )
        self.config = cfg

    @classmethod
    def default_config(cls) -> StrategyConfig:
        return cls.config_cls()

    # -- client side -------------------------------------------------------------------------
    def trainable_factors(self) -> frozenset[Factor]:
        """Which LoRA factors local training updates (FFA-LoRA freezes ``A``)."""
        return frozenset({"A", "B"})

    def upload_shapes(self, state: GlobalState) -> dict[str, tuple[int, ...]]:
        """The tensors (wire name -> shape) every upload must carry, exactly: the update of
        each trainable factor of each module. The server decodes uploads against this."""
        factors = self.trainable_factors()
        return {
            name: shape
            for name, shape in state.wire_shapes().items()
            if split_wire_name(name)[1] in factors
        }

    def proximal_mu(self) -> float:
        """Weight ``mu`` of the FedProx term ``mu/2 ||theta - theta_global||^2`` (0: none)."""
        return 0.0

    @abstractmethod
    def client_upload(
        self,
        start: GlobalState,
        trained: GlobalState,
        ctx: RoundContext,
        *,
        client_seed: int = 0,
    ) -> dict[str, WireTensor]:
        """The wire tensors a client uploads after training from ``start`` to ``trained``."""

    # -- server side -------------------------------------------------------------------------
    @abstractmethod
    def server_round(
        self, state: GlobalState, uploads: Sequence[Upload], ctx: RoundContext
    ) -> dict[str, DeltaTensor]:
        """The global delta of the round (wire-rounded values; ``state`` is not changed)."""

    def apply_global(self, state: GlobalState, delta: Mapping[str, DeltaTensor]) -> None:
        """Apply a global delta to ``state`` in place, then the strategy's post-step.

        The server passes the delta its ``server_round`` returned (seeded entries are expanded
        here to the positions their mask keeps); a client passes what it decoded. The values
        are the same wire-rounded float32 numbers, so the states stay bit-identical.
        """
        apply_delta(
            state,
            {
                name: t.to_sparse(name) if isinstance(t, SeededSparse) else t
                for name, t in delta.items()
            },
        )
        self.after_apply(state)

    def after_apply(self, state: GlobalState) -> None:  # noqa: B027 - optional hook
        """A deterministic, platform-independent step after each global delta (default: none)."""

    # -- helpers shared by the strategies ----------------------------------------------------
    def weights(self, uploads: Sequence[Upload]) -> list[float]:
        return aggregation_weights([u.num_samples for u in uploads], self.config.weighting)

    @staticmethod
    def module_updates(
        state: GlobalState, uploads: Sequence[Upload]
    ) -> Iterator[tuple[str, list[torch.Tensor], list[torch.Tensor]]]:
        """Per module, in order: the dense ``dA_i`` and ``dB_i`` of every upload.

        A factor an upload does not carry (FFA-LoRA's ``A``) counts as a zero update. Only one
        module's updates are materialised at a time.
        """
        for module, f in state.items():
            dAs, dBs = [], []
            for u in uploads:
                dAs.append(_dense(u.tensors.get(module + A_SUFFIX), f.A))
                dBs.append(_dense(u.tensors.get(module + B_SUFFIX), f.B))
            yield module, dAs, dBs

    @staticmethod
    def module_entries(
        state: GlobalState, uploads: Sequence[Upload]
    ) -> Iterator[tuple[str, list[WireTensor | None], list[WireTensor | None]]]:
        """Per module, in order: every upload's ``dA_i`` and ``dB_i`` entries as they are on
        the wire (sparse stays sparse; None where an upload does not carry the factor).

        Only one module's entries are decoded at a time (from lazily decoded uploads)."""
        for module in state:
            dAs = [u.tensors.get(module + A_SUFFIX) for u in uploads]
            dBs = [u.tensors.get(module + B_SUFFIX) for u in uploads]
            yield module, dAs, dBs


def _dense(t: WireTensor | None, like: torch.Tensor) -> torch.Tensor:
    if t is None:
        return torch.zeros_like(like)
    if isinstance(t, SparseTensor):
        return t.to_dense(torch.float32).to(like.device)
    return t.to(device=like.device, dtype=torch.float32)


def dense_upload(
    start: GlobalState, trained: GlobalState, factors: frozenset[Factor]
) -> dict[str, WireTensor]:
    """Dense updates ``trained - start`` of the given factors of every module."""
    out: dict[str, WireTensor] = {}
    for module, f0 in start.items():
        fi = trained[module]
        if "A" in factors:
            out[module + A_SUFFIX] = (fi.A - f0.A).contiguous()
        if "B" in factors:
            out[module + B_SUFFIX] = (fi.B - f0.B).contiguous()
    return out


def sparse_upload(
    start: GlobalState, trained: GlobalState, config: SparsifierConfig, seed: int
) -> dict[str, WireTensor]:
    """Sparse updates of both factors of every module, sparsified by ``config``.

    ``seed`` seeds the generator of the random sparsifier (one stream over all modules, in
    sorted module order), so an upload is reproducible.
    """
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, WireTensor] = {}
    for module, f0 in start.items():
        fi = trained[module]
        sA, sB = sparsify_module_update(f0.A, f0.B, fi.A, fi.B, config, generator=gen)
        out[module + A_SUFFIX] = sA
        out[module + B_SUFFIX] = sB
    return out


def dense_delta(t: torch.Tensor, value_dtype: ValueDType) -> torch.Tensor:
    """A dense delta rounded to the wire dtype (what clients will decode)."""
    return quantize(t.contiguous(), value_dtype)


_REGISTRY: dict[str, Callable[[StrategyConfig | None], Strategy]] = {}
_CONFIGS: dict[str, Callable[[], StrategyConfig]] = {}


def register(
    name: str,
    factory: Callable[[StrategyConfig | None], Strategy],
    default: Callable[[], StrategyConfig],
) -> None:
    """Register a strategy ``factory(config)`` and its default config under ``name``."""
    if name in _REGISTRY:
        raise ValueError(f"strategy {name!r} is already registered")
    _REGISTRY[name] = factory
    _CONFIGS[name] = default


def available_strategies() -> list[str]:
    """Registered strategy names, sorted."""
    return sorted(_REGISTRY)


def default_config(name: str) -> StrategyConfig:
    """The default config of the strategy ``name``."""
    _check_name(name)
    return _CONFIGS[name]()


def get_strategy(name: str, config: StrategyConfig | Mapping[str, Any] | None = None) -> Strategy:
    """Build the strategy ``name`` with ``config`` (a config object, a dict of overrides
    applied to the strategy's defaults, or None for the defaults)."""
    _check_name(name)
    if isinstance(config, Mapping):
        base = _CONFIGS[name]().to_dict()
        base.update(config)
        config = type(_CONFIGS[name]()).from_dict(base)
    return _REGISTRY[name](config)


def _check_name(name: str) -> None:
    if name not in _REGISTRY:
        raise ValueError(f"unknown strategy {name!r}; available: {available_strategies()}")
