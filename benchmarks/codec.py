"""Benchmark of the wire codec on a LoRA-shaped tensor set.

Usage (from the repository root)::

    python benchmarks/codec.py [--quick] [--layers N] [--repeats R]

For each density (1/5/10/20% random positions) and value dtype (fp32, bf16) it encodes the
set with the three position encodings (Rice, bitmap, index32) and reports: blob bytes, encode
and decode throughput (MB/s of blob and M positions/s), position bits per kept value, their
ratio to the information floor ``log2 C(n, k)``, and the 1-bit-bitmap / 32-bit-index sizes
both by formula and as really encoded. Timings are the minimum over ``--repeats`` runs (the
machine may be shared). A human table goes to stderr; ONE JSON object is the last line of
stdout.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

import torch

from fedsrd_core.codec import (
    PositionEncoding,
    ValueDType,
    decode,
    encode,
    inspect,
    position_floor_bits,
)
from fedsrd_core.sparse import SparseTensor

# Llama-3.2-3B: hidden 3072, MLP 8192; LoRA rank 64. A (r x in) and B (out x r) factors.
FULL_MODULES = {
    "self_attn.q_proj.lora_A": (64, 3072),
    "self_attn.q_proj.lora_B": (3072, 64),
    "mlp.up_proj.lora_A": (64, 3072),
    "mlp.up_proj.lora_B": (8192, 64),
    "mlp.down_proj.lora_A": (64, 8192),
    "mlp.down_proj.lora_B": (3072, 64),
}
QUICK_MODULES = {
    "self_attn.q_proj.lora_A": (16, 768),
    "self_attn.q_proj.lora_B": (768, 16),
    "mlp.up_proj.lora_B": (2048, 16),
    "mlp.down_proj.lora_A": (16, 2048),
}
DENSITIES = [0.01, 0.05, 0.10, 0.20]
VALUE_DTYPES: list[ValueDType] = ["fp32", "bf16"]
ENCODINGS: list[PositionEncoding] = ["rice", "bitmap", "index32"]


def best_time(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    best, out = math.inf, None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def make_set(
    modules: dict[str, tuple[int, int]], layers: int, density: float, seed: int
) -> dict[str, SparseTensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for layer in range(layers):
        for mod, shape in modules.items():
            n = math.prod(shape)
            k = round(n * density)
            idx = torch.randperm(n, generator=g)[:k].sort().values
            out[f"layers.{layer}.{mod}"] = SparseTensor(shape, idx, torch.randn(k, generator=g))
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    modules = QUICK_MODULES if args.quick else FULL_MODULES
    layers = args.layers if args.layers is not None else (1 if args.quick else 4)
    results = []
    for density in DENSITIES:
        tensors = make_set(modules, layers, density, seed=int(density * 1000))
        numel = sum(t.numel for t in tensors.values())
        count = sum(t.nnz for t in tensors.values())
        floor = sum(position_floor_bits(t.numel, t.nnz) for t in tensors.values())
        for vd in VALUE_DTYPES:
            row: dict[str, Any] = {
                "density": density,
                "value_dtype": vd,
                "numel": numel,
                "count": count,
                "floor_position_bits": floor,
                "floor_bits_per_value": floor / count,
                "formula_bitmap_position_bytes": sum((t.numel + 7) // 8 for t in tensors.values()),
                "formula_index32_position_bytes": 4 * count,
            }
            for enc in ENCODINGS:
                t_enc, blob = best_time(
                    functools.partial(encode, tensors, value_dtype=vd, positions=enc),
                    args.repeats,
                )
                t_dec, out = best_time(functools.partial(decode, blob), args.repeats)
                for name, t in tensors.items():  # the benchmark also checks correctness
                    got = out[name]
                    assert isinstance(got, SparseTensor)
                    assert torch.equal(got.indices, t.indices), name
                infos = inspect(blob)
                pos_bytes = sum(i.position_bytes for i in infos)
                mb = len(blob) / 1e6
                row[enc] = {
                    "bytes": len(blob),
                    "position_bytes": pos_bytes,
                    "value_bytes": sum(i.value_bytes for i in infos),
                    "position_bits_per_value": 8 * pos_bytes / count,
                    "ratio_to_floor": 8 * pos_bytes / floor,
                    "encode_s": t_enc,
                    "decode_s": t_dec,
                    "encode_MBps": mb / t_enc,
                    "decode_MBps": mb / t_dec,
                    "encode_Mpos_per_s": count / 1e6 / t_enc,
                    "decode_Mpos_per_s": count / 1e6 / t_dec,
                }
                if enc == "rice":
                    row[enc]["rice_k"] = sorted({i.rice_k or 0 for i in infos})
            results.append(row)
    # One big tensor: the "~5 million positions well under a second" target, Rice + fp32.
    big_numel = 5_000_000 if args.quick else 50_000_000
    big = make_set({"big": (big_numel, 1)}, 1, 0.10, seed=7)
    count = sum(t.nnz for t in big.values())
    t_enc, blob = best_time(functools.partial(encode, big), args.repeats)
    t_dec, _ = best_time(functools.partial(decode, blob), args.repeats)
    single = {
        "numel": big_numel,
        "count": count,
        "bytes": len(blob),
        "encode_s": t_enc,
        "decode_s": t_dec,
        "encode_Mpos_per_s": count / 1e6 / t_enc,
        "decode_Mpos_per_s": count / 1e6 / t_dec,
    }
    return {
        "single_tensor_rice_fp32": single,
        "benchmark": "codec",
        "quick": bool(args.quick),
        "layers": layers,
        "modules": {k: list(v) for k, v in modules.items()},
        "repeats": args.repeats,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "results": results,
    }


def print_table(report: dict[str, Any]) -> None:
    err = sys.stderr
    print(
        f"codec benchmark: {report['layers']} layer(s) x {len(report['modules'])} modules, "
        f"torch {report['torch']}, {report['threads']} threads, min of {report['repeats']}",
        file=err,
    )
    head = (
        f"{'dens':>5} {'vals':>4} {'count':>9} {'enc':>7} {'bytes':>11} {'pos b/v':>7} "
        f"{'/floor':>6} {'enc MB/s':>9} {'dec MB/s':>9} {'enc Mp/s':>9} {'dec Mp/s':>9}"
    )
    print(head, file=err)
    print("-" * len(head), file=err)
    for r in report["results"]:
        for enc in ENCODINGS:
            e = r[enc]
            print(
                f"{r['density']:>5.2f} {r['value_dtype']:>4} {r['count']:>9} {enc:>7} "
                f"{e['bytes']:>11} {e['position_bits_per_value']:>7.3f} "
                f"{e['ratio_to_floor']:>6.3f} {e['encode_MBps']:>9.1f} {e['decode_MBps']:>9.1f} "
                f"{e['encode_Mpos_per_s']:>9.2f} {e['decode_Mpos_per_s']:>9.2f}",
                file=err,
            )
        print(
            f"{'':>5} floor {r['floor_bits_per_value']:.3f} bits/value; formula position bytes: "
            f"bitmap {r['formula_bitmap_position_bytes']}, "
            f"index32 {r['formula_index32_position_bytes']}",
            file=err,
        )
    b = report["single_tensor_rice_fp32"]
    print(
        f"single tensor, rice, fp32: {b['count']} positions in {b['numel']} elements: "
        f"encode {b['encode_s'] * 1e3:.1f} ms, decode {b['decode_s'] * 1e3:.1f} ms",
        file=err,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small tensor set, for CI")
    parser.add_argument("--layers", type=int, default=None, help="layers (default 4, quick 1)")
    parser.add_argument("--repeats", type=int, default=5, help="timing repeats (min is kept)")
    args = parser.parse_args(argv)
    report = run(args)
    print_table(report)
    print(json.dumps(_round_floats(report), sort_keys=True))


def _round_floats(x: Any) -> Any:
    """Floats to 5 significant digits (a shorter JSON line; timings are noisier than that)."""
    if isinstance(x, float):
        return float(f"{x:.5g}")
    if isinstance(x, dict):
        return {k: _round_floats(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_round_floats(v) for v in x]
    return x


if __name__ == "__main__":
    main()
