"""Bytes per client per round, per strategy, on the Llama-3.2-3B r=64 all-linear layout.

    python benchmarks/comm.py            # Llama-3.2-3B (97,255,424 LoRA parameters)
    python benchmarks/comm.py --quick    # 2 layers of the same shapes

Every figure is the length of a real blob from ``fedsrd_core.codec.encode``: an upload
built by the strategy's own client rule from a simulated local round (random steps on the
factors; FedSRD's adaptive rule picks its own density), and the download the strategy's
server round produces from two such uploads. MiB = 2**20 bytes, as the paper counts them
(FedAvg: 97,255,424 fp32 values = 371 MiB each way).
"""

from __future__ import annotations

import argparse

import _common as c

from fedsrd_core.codec import encode
from fedsrd_core.layouts import lora_parameter_count
from fedsrd_core.sparse import SparseTensor
from fedsrd_core.strategies import RoundContext, Upload, available_strategies, get_strategy

#: Per client per round, MiB, Llama-3.2-3B (paper, Sec. 4 / Table 3; fp32 values).
PAPER_MIB = {
    "fedavg": {"up": 371, "down": 371, "total": 742},
    "fedsrd": {"up": 31, "down": 43, "total": 74},
}
TARGETS_MIB = {"fedsrd_total_fp32": 62, "fedsrd_total_bf16": 34}


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="2 layers instead of 28")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--strategies", nargs="*", default=available_strategies())
    args = ap.parse_args()

    layout_name = "small" if args.quick else "llama-3.2-3b"
    layout = c.LAYOUTS[layout_name]
    n_params = lora_parameter_count(layout, args.rank)
    start = c.started_state(layout, args.rank)
    c.log(f"layout {layout_name}: {len(layout)} modules, {n_params:,} LoRA parameters")

    rows: dict[str, dict[str, float]] = {}
    for name in args.strategies:
        strat = get_strategy(name)
        ctx = RoundContext(round=1, seed=7)
        uploads = []
        for i in range(2):
            trained = c.trained_copy(start, seed=10 + i)
            uploads.append(Upload(strat.client_upload(start, trained, ctx, client_seed=i)))
            del trained
        kept = sum(
            t.nnz if isinstance(t, SparseTensor) else t.numel() for t in uploads[0].tensors.values()
        )
        delta = strat.server_round(start, uploads, ctx)
        row: dict[str, float] = {"upload_density": round(kept / n_params, 5)}
        for dtype in ("fp32", "bf16"):
            up = len(encode(uploads[0].tensors, value_dtype=dtype))
            down = len(encode(delta, value_dtype=dtype))
            row[f"up_mib_{dtype}"] = round(up / c.MIB, 2)
            row[f"down_mib_{dtype}"] = round(down / c.MIB, 2)
            row[f"total_mib_{dtype}"] = round((up + down) / c.MIB, 2)
        rows[name] = row
        c.log(
            f"{name:>9}: up {row['up_mib_fp32']:8.2f} down {row['down_mib_fp32']:8.2f} "
            f"total {row['total_mib_fp32']:8.2f} MiB fp32 | total {row['total_mib_bf16']:8.2f} MiB "
            f"bf16 | upload density {row['upload_density']:.2%}"
        )
        del uploads, delta

    summary: dict[str, object] = {
        "benchmark": "comm",
        "layout": layout_name,
        "rank": args.rank,
        "lora_parameters": n_params,
        "per_client_per_round": rows,
        "paper_mib_llama_3_2_3b": PAPER_MIB,
        "targets_mib": TARGETS_MIB,
    }
    if "fedsrd" in rows and "fedavg" in rows:
        summary["fedsrd_over_fedavg_bytes_fp32"] = round(
            rows["fedsrd"]["total_mib_fp32"] / rows["fedavg"]["total_mib_fp32"], 4
        )
    c.emit(summary)


if __name__ == "__main__":
    main()
