"""Adapter layouts (``module -> (d_out, d_in)``) of common base models, for benchmarks/tests."""

from __future__ import annotations

from fedsrd_core.state import Layout


def llama_layout(
    *,
    hidden: int,
    intermediate: int,
    n_layers: int,
    n_heads: int,
    n_kv_heads: int,
    head_dim: int | None = None,
) -> dict[str, tuple[int, int]]:
    """LoRA on all linear layers of a Llama decoder (q, k, v, o, gate, up, down per layer).

    Names follow transformers' module paths, e.g. ``model.layers.0.self_attn.q_proj``.
    """
    hd = head_dim if head_dim is not None else hidden // n_heads
    out: dict[str, tuple[int, int]] = {}
    for i in range(n_layers):
        p = f"model.layers.{i}"
        out[f"{p}.self_attn.q_proj"] = (n_heads * hd, hidden)
        out[f"{p}.self_attn.k_proj"] = (n_kv_heads * hd, hidden)
        out[f"{p}.self_attn.v_proj"] = (n_kv_heads * hd, hidden)
        out[f"{p}.self_attn.o_proj"] = (hidden, n_heads * hd)
        out[f"{p}.mlp.gate_proj"] = (intermediate, hidden)
        out[f"{p}.mlp.up_proj"] = (intermediate, hidden)
        out[f"{p}.mlp.down_proj"] = (hidden, intermediate)
    return out


#: Llama-3.2-3B: 28 layers, hidden 3072, MLP 8192, 24 heads, 8 KV heads of 128 (196 modules).
LLAMA_3_2_3B: Layout = llama_layout(
    hidden=3072, intermediate=8192, n_layers=28, n_heads=24, n_kv_heads=8, head_dim=128
)


def lora_parameter_count(layout: Layout, rank: int) -> int:
    """``sum over modules of rank * (d_out + d_in)``: 97,255,424 for Llama-3.2-3B at r=64."""
    return sum(rank * (d_out + d_in) for d_out, d_in in layout.values())
