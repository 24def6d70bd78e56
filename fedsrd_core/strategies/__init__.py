"""Strategies behind one interface and a registry: ``get_strategy("fedsrd")``."""

from fedsrd_core.strategies.base import (
    DeltaTensor,
    RoundContext,
    Strategy,
    StrategyConfig,
    Upload,
    WireTensor,
    available_strategies,
    default_config,
    get_strategy,
    register,
)
from fedsrd_core.strategies.baselines import (
    FedAvg,
    FedAvgConfig,
    FedDARE,
    FedDAREConfig,
    FedProx,
    FedProxConfig,
    FFALoRA,
    FFALoRAConfig,
    FlexLoRA,
    FlexLoRAConfig,
)
from fedsrd_core.strategies.fedsrd import FedSRD, FedSRDConfig, FedSRDe, dare_download

__all__ = [
    "DeltaTensor",
    "FFALoRA",
    "FFALoRAConfig",
    "FedAvg",
    "FedAvgConfig",
    "FedDARE",
    "FedDAREConfig",
    "FedProx",
    "FedProxConfig",
    "FedSRD",
    "FedSRDConfig",
    "FedSRDe",
    "FlexLoRA",
    "FlexLoRAConfig",
    "RoundContext",
    "Strategy",
    "StrategyConfig",
    "Upload",
    "WireTensor",
    "available_strategies",
    "dare_download",
    "default_config",
    "get_strategy",
    "register",
]
