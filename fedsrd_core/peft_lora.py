"""The bridge between peft's LoRA layers and the global state of :mod:`fedsrd_core.state`.

peft names an adapted layer ``base_model.model.<module path>`` and stores its factors as
``lora_A[adapter].weight`` (``r x d_in``) and ``lora_B[adapter].weight`` (``d_out x r``): the
same shapes and meaning as ``LoraFactors.A`` / ``.B``, so the mapping is a rename. The
module path (``model.layers.0.self_attn.q_proj`` for a Llama) is the global state's module
name, and peft applies the ``lora_alpha / r`` scale in its forward pass, so it is not stored
in the factors.

Mixture-of-experts models (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, ... in transformers 5) hold
their routed experts as one fused 3-D parameter per projection (``experts.gate_up_proj`` of
shape ``(experts, 2 * ffn, hidden)``, ``experts.down_proj``), not as ``nn.Linear`` modules.
peft adapts such a parameter through ``target_parameters`` with a ``ParamWrapper`` that stacks
one rank-``r`` LoRA per expert: ``lora_A`` is ``(experts * r) x d_in`` (expert ``e``'s ``A`` is
rows ``e*r .. e*r + r - 1``) and ``lora_B`` is ``d_out x (r * experts)`` (expert ``e``'s ``B``
is columns ``e, e + experts, ...``). Each expert is one module of the global state, named
``<parameter path>[<expert>]`` (``model.layers.0.mlp.experts.down_proj[3]``), so every
strategy sees ordinary 2-D factors. The routers (``mlp.gate``) are not adapted: in
transformers 5 they are not linear layers, and the expert choice stays the base model's.
"""

from __future__ import annotations

import copy
import logging
import re
from dataclasses import dataclass
from typing import Any, Final

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer, ParamWrapper
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from fedsrd_core.state import GlobalState, LoraFactors

PEFT_PREFIX = "base_model.model."
ADAPTER = "default"
#: peft's shorthand for "every linear layer except the output head".
ALL_LINEAR: Final = "all-linear"
#: A global-state module that is one routed expert's share of a fused expert weight.
EXPERT_SLOT: Final = re.compile(r"^(?P<param>.+)\[(?P<expert>0|[1-9][0-9]*)\]$")
_BASE_LAYER: Final = ".base_layer"

log = logging.getLogger(__name__)


class LoraSettingError(ValueError):
    """A LoRA setting the model cannot take; ``setting`` names it (``"target_modules"``,
    ``"dropout"``), so a caller can point at the field."""

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(message)
        self.setting = setting


def expert_slot(parameter: str, expert: int) -> str:
    """The global-state name of routed expert ``expert`` of the fused weight ``parameter``."""
    return f"{parameter}[{expert}]"


def lora_config(
    *,
    rank: int,
    alpha: int | None = None,
    dropout: float = 0.0,
    target_modules: str | list[str] = ALL_LINEAR,
) -> LoraConfig:
    """A peft ``LoraConfig`` for a causal LM; ``alpha`` defaults to ``2 * rank`` (paper)."""
    if rank < 1:
        raise ValueError(f"`rank` must be >= 1, got {rank}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"`dropout` must be in [0, 1), got {dropout}")
    return LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else 2 * rank,
        lora_dropout=dropout,
        target_modules=target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )


def _is_linear(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.Linear | Conv1D)


def expert_parameters(model: torch.nn.Module) -> list[str]:
    """Paths of the routed experts' fused weights (``model.layers.0.mlp.experts.gate_up_proj``).

    A fused expert weight is a floating-point 3-D parameter held directly by a module whose
    ``num_experts`` (transformers' name in every MoE experts class) is its first dimension.
    Biases (2-D) and convolution kernels (no ``num_experts``) are not.
    """
    out = []
    for module_name, module in model.named_modules():
        experts = getattr(module, "num_experts", None)
        if isinstance(module, LoraLayer) or not isinstance(experts, int):
            continue
        for param_name, p in module.named_parameters(recurse=False):
            if p.dim() == 3 and p.is_floating_point() and p.shape[0] == experts:
                out.append(f"{module_name}.{param_name}" if module_name else param_name)
    return sorted(out)


def _selects(name: str, target_modules: str | list[str]) -> bool:
    """peft's matching: a regular expression must match the whole name; a list entry matches
    the name or a dotted suffix of it."""
    if isinstance(target_modules, str):
        return target_modules == ALL_LINEAR or re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith(f".{t}") for t in target_modules)


def resolve_lora_config(model: torch.nn.Module, config: LoraConfig) -> LoraConfig:
    """``config`` with ``target_modules`` and ``target_parameters`` spelled out for ``model``.

    ``target_modules`` (``"all-linear"``, a list of name suffixes, or a regular expression)
    selects linear layers (``nn.Linear``, GPT-2's ``Conv1D``; never the output head) and the
    routed experts' fused weights (:func:`expert_parameters`, matched by parameter path). The
    result names them explicitly, so peft does not reinterpret it: for Mixtral and Qwen2-MoE,
    peft 0.22 would otherwise translate ``"all-linear"`` into its transformers-4 meaning (the
    routers too, and rank ``2r`` on the fused ``gate_up_proj``), which the global state's one
    rank per module cannot hold. ``fan_in_fan_out`` is set when the layers are ``Conv1D``
    (peft would correct it with a warning; an exported config must carry the right value).

    Raises:
        LoraSettingError: nothing is selected (``target_modules``), or LoRA dropout is asked
            for on routed experts (``dropout``: peft cannot apply it inside fused experts).
    """
    given: Any = config.target_modules  # peft types it loosely: str, list, set or None
    wanted: str | list[str] = given if isinstance(given, str) else sorted(given or [])
    head = None
    if isinstance(model, PreTrainedModel):
        head = model.get_output_embeddings()  # type: ignore[no-untyped-call]
    modules = sorted(
        name
        for name, module in model.named_modules()
        if _is_linear(module) and module is not head and _selects(name, wanted)
    )
    parameters = [p for p in expert_parameters(model) if _selects(p, wanted)]
    if not modules and not parameters:
        raise LoraSettingError(
            "target_modules",
            f"target_modules={config.target_modules!r} selects no linear layer and no routed "
            "expert weight of the model",
        )
    if parameters and config.lora_dropout:
        raise LoraSettingError(
            "dropout",
            f"LoRA dropout {config.lora_dropout} cannot be applied to the routed experts of this "
            "mixture-of-experts model (peft adapts fused expert weights without dropout): use "
            "dropout 0, or target_modules without the experts (e.g. the attention projections)",
        )
    resolved = copy.deepcopy(config)
    resolved.target_modules = modules
    resolved.target_parameters = parameters or None
    resolved.fan_in_fan_out = any(isinstance(model.get_submodule(name), Conv1D) for name in modules)
    return resolved


def attach_lora(model: torch.nn.Module, config: LoraConfig) -> PeftModel:
    """Wrap ``model`` with LoRA adapters (base weights frozen), targets resolved by
    :func:`resolve_lora_config`; routed experts, when adapted, are logged."""
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"attach_lora needs a transformers model, got {type(model).__name__}")
    resolved = resolve_lora_config(model, config)
    if resolved.target_parameters:
        experts = {p: int(model.get_parameter(p).shape[0]) for p in resolved.target_parameters}
        log.info(
            "mixture of experts: LoRA on %d fused expert weights (%s), one rank-%d adapter per "
            "routed expert (%d in all); routers are not adapted",
            len(experts),
            ", ".join(sorted({p.rsplit(".", 1)[-1] for p in experts})),
            resolved.r,
            sum(experts.values()),
        )
    peft_model = get_peft_model(model, resolved)
    if not isinstance(peft_model, PeftModel):  # pragma: no cover - peft's contract
        raise TypeError(f"get_peft_model returned {type(peft_model).__name__}")
    return peft_model


@dataclass(frozen=True)
class LoraSlot:
    """Where one global-state module lives in a peft model.

    Attributes:
        module: the peft layer's module path (without peft's prefix); a fused expert weight's
            wrapper can sit under ``.base_layer`` of another one on the same experts module.
        layer: the peft LoRA layer.
        expert: the routed expert (``None``: the whole layer is the module).
        experts: how many experts share the layer's stacked factors (1 for a plain layer).
    """

    module: str
    layer: LoraLayer
    expert: int | None = None
    experts: int = 1

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` of this module: the layer's weights, or views of one expert's share."""
        A, B = _factor_weights(self.layer)
        if self.expert is None:
            return A, B
        r = A.shape[0] // self.experts
        e = self.expert
        return A[e * r : (e + 1) * r], B.view(B.shape[0], r, self.experts)[:, :, e]


def lora_slots(model: torch.nn.Module) -> dict[str, LoraSlot]:
    """``{global-state module name: slot}`` for every LoRA layer, in sorted name order."""
    found: dict[str, LoraSlot] = {}
    for name, module in model.named_modules():
        if not (isinstance(module, LoraLayer) and ADAPTER in module.lora_A):
            continue
        short = name[len(PEFT_PREFIX) :] if name.startswith(PEFT_PREFIX) else name
        if isinstance(module, ParamWrapper):
            # Nested wrappers (two fused weights on one experts module) live under
            # ``.base_layer``; the weight's own path has no such segment.
            parameter = f"{short.replace(_BASE_LAYER, '')}.{module.parameter_name}"
            experts = int(module.num_experts)
            if experts == 1:
                found[parameter] = LoraSlot(short, module)
            else:
                for e in range(experts):
                    found[expert_slot(parameter, e)] = LoraSlot(short, module, e, experts)
        else:
            found[short] = LoraSlot(short, module)
    if not found:
        raise ValueError("the model has no LoRA layers (attach them with `attach_lora`)")
    return {k: found[k] for k in sorted(found)}


def _factor_weights(layer: LoraLayer) -> tuple[torch.nn.Parameter, torch.nn.Parameter]:
    A = layer.lora_A[ADAPTER].weight
    B = layer.lora_B[ADAPTER].weight
    if not isinstance(A, torch.nn.Parameter) or not isinstance(B, torch.nn.Parameter):
        raise TypeError("peft LoRA layer without weight parameters")  # pragma: no cover
    return A, B


def adapter_layout(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """``module -> (d_out, d_in)`` of every adapted layer (and routed expert)."""
    out = {}
    for name, slot in lora_slots(model).items():
        A, B = slot.factors()
        out[name] = (int(B.shape[0]), int(A.shape[1]))
    return out


def peft_to_state(model: torch.nn.Module) -> GlobalState:
    """The model's LoRA factors as a :class:`GlobalState` (float32 copies on the CPU)."""
    modules = {}
    for name, slot in lora_slots(model).items():
        A, B = slot.factors()
        modules[name] = LoraFactors(
            A.detach().to("cpu", torch.float32).clone(), B.detach().to("cpu", torch.float32).clone()
        )
    return GlobalState(modules)


def state_to_peft(state: GlobalState, model: torch.nn.Module) -> None:
    """Copy the global factors into the model's LoRA layers (in place, any device/dtype).

    The model's adapted modules and the state's must be the same set with the same shapes;
    a mismatch raises ``ValueError`` naming the first difference.
    """
    slots = lora_slots(model)
    if set(slots) != set(state):
        missing = sorted(set(state) - set(slots))[:3]
        extra = sorted(set(slots) - set(state))[:3]
        raise ValueError(
            f"adapter layout differs from the global state: state-only {missing}, "
            f"model-only {extra}"
        )
    with torch.no_grad():
        for name, f in state.items():
            A, B = slots[name].factors()
            if tuple(A.shape) != tuple(f.A.shape) or tuple(B.shape) != tuple(f.B.shape):
                raise ValueError(
                    f"{name}: model factors A {tuple(A.shape)} / B {tuple(B.shape)} differ "
                    f"from the state's {tuple(f.A.shape)} / {tuple(f.B.shape)}"
                )
            A.copy_(f.A.to(device=A.device, dtype=A.dtype))
            B.copy_(f.B.to(device=B.device, dtype=B.dtype))


def set_trainable(model: torch.nn.Module, factors: frozenset[str]) -> list[torch.nn.Parameter]:
    """Make exactly the LoRA factors in ``factors`` (``"A"``, ``"B"``) trainable.

    Returns them, in sorted module order (A before B), for the optimizer; the experts of a
    fused weight share one stacked parameter, listed once. FFA-LoRA trains ``{"B"}`` only.
    """
    params: list[torch.nn.Parameter] = []
    for p in model.parameters():
        p.requires_grad_(False)
    seen: set[int] = set()
    for slot in lora_slots(model).values():
        if id(slot.layer) in seen:
            continue
        seen.add(id(slot.layer))
        A, B = _factor_weights(slot.layer)
        for which, weight in (("A", A), ("B", B)):
            on = which in factors
            weight.requires_grad_(on)
            if on:
                params.append(weight)
    return params
