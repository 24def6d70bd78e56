"""The bridge between peft's LoRA layers and the global state of :mod:`fedsrd_core.state`.

peft names an adapted layer ``base_model.model.<module path>`` and stores its factors as
``lora_A[adapter].weight`` (``r x d_in``) and ``lora_B[adapter].weight`` (``d_out x r``): the
same shapes and meaning as ``LoraFactors.A`` / ``.B``, so the mapping is a rename. The
module path (``model.layers.0.self_attn.q_proj`` for a Llama) is the global state's module
name, and peft applies the ``lora_alpha / r`` scale in its forward pass, so it is not stored
in the factors.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers import PreTrainedModel

from fedsrd_core.state import GlobalState, LoraFactors

PEFT_PREFIX = "base_model.model."
ADAPTER = "default"


def lora_config(
    *,
    rank: int,
    alpha: int | None = None,
    dropout: float = 0.0,
    target_modules: str | list[str] = "all-linear",
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


def attach_lora(model: torch.nn.Module, config: LoraConfig) -> PeftModel:
    """Wrap ``model`` with LoRA adapters (base weights frozen)."""
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"attach_lora needs a transformers model, got {type(model).__name__}")
    peft_model = get_peft_model(model, config)
    if not isinstance(peft_model, PeftModel):  # pragma: no cover - peft's contract
        raise TypeError(f"get_peft_model returned {type(peft_model).__name__}")
    return peft_model


def lora_layers(model: torch.nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    """``(module name, layer)`` for every LoRA layer, names without peft's prefix, sorted."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and ADAPTER in module.lora_A:
            short = name[len(PEFT_PREFIX) :] if name.startswith(PEFT_PREFIX) else name
            found.append((short, module))
    if not found:
        raise ValueError("the model has no LoRA layers (attach them with `attach_lora`)")
    yield from sorted(found, key=lambda item: item[0])


def _factor_weights(layer: LoraLayer) -> tuple[torch.nn.Parameter, torch.nn.Parameter]:
    A = layer.lora_A[ADAPTER].weight
    B = layer.lora_B[ADAPTER].weight
    if not isinstance(A, torch.nn.Parameter) or not isinstance(B, torch.nn.Parameter):
        raise TypeError("peft LoRA layer without weight parameters")  # pragma: no cover
    return A, B


def adapter_layout(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """``module -> (d_out, d_in)`` of every adapted layer."""
    out = {}
    for name, layer in lora_layers(model):
        A, B = _factor_weights(layer)
        out[name] = (int(B.shape[0]), int(A.shape[1]))
    return out


def peft_to_state(model: torch.nn.Module) -> GlobalState:
    """The model's LoRA factors as a :class:`GlobalState` (float32 copies on the CPU)."""
    modules = {}
    for name, layer in lora_layers(model):
        A, B = _factor_weights(layer)
        modules[name] = LoraFactors(
            A.detach().to("cpu", torch.float32).clone(), B.detach().to("cpu", torch.float32).clone()
        )
    return GlobalState(modules)


def state_to_peft(state: GlobalState, model: torch.nn.Module) -> None:
    """Copy the global factors into the model's LoRA layers (in place, any device/dtype).

    The model's adapted modules and the state's must be the same set with the same shapes;
    a mismatch raises ``ValueError`` naming the first difference.
    """
    layers = dict(lora_layers(model))
    if set(layers) != set(state):
        missing = sorted(set(state) - set(layers))[:3]
        extra = sorted(set(layers) - set(state))[:3]
        raise ValueError(
            f"adapter layout differs from the global state: state-only {missing}, "
            f"model-only {extra}"
        )
    with torch.no_grad():
        for name, f in state.items():
            A, B = _factor_weights(layers[name])
            if tuple(A.shape) != tuple(f.A.shape) or tuple(B.shape) != tuple(f.B.shape):
                raise ValueError(
                    f"{name}: model factors A {tuple(A.shape)} / B {tuple(B.shape)} differ "
                    f"from the state's {tuple(f.A.shape)} / {tuple(f.B.shape)}"
                )
            A.copy_(f.A.to(device=A.device, dtype=A.dtype))
            B.copy_(f.B.to(device=B.device, dtype=B.dtype))


def set_trainable(model: torch.nn.Module, factors: frozenset[str]) -> list[torch.nn.Parameter]:
    """Make exactly the LoRA factors in ``factors`` (``"A"``, ``"B"``) trainable.

    Returns them, in sorted module order (A before B), for the optimizer. FFA-LoRA trains
    ``{"B"}`` only.
    """
    params: list[torch.nn.Parameter] = []
    for p in model.parameters():
        p.requires_grad_(False)
    for _, layer in lora_layers(model):
        A, B = _factor_weights(layer)
        for which, weight in (("A", A), ("B", B)):
            on = which in factors
            weight.requires_grad_(on)
            if on:
                params.append(weight)
    return params
