"""One FedSRD server round on Llama-3.2-3B shapes: factored FedSRD and FedSRD-e vs dense.

    python benchmarks/server_step.py            # Llama-3.2-3B, r=64, 196 modules, 4 clients
    python benchmarks/server_step.py --quick    # 2 layers of the same shapes (14 modules)

A server round here is ``strategy.server_round``: densify each module's sparse uploads,
reconstruct and aggregate (Eq. 9), truncate (Eq. 10, FedSRD only), solve for one factor
(Eqs. 11-13), DARE-sample the download with the seeded mask and round it to the wire dtype.
Decoding uploads and encoding the download are the codec's cost (``benchmarks/codec.py``).

The dense reference (form W, full SVD, pinv) runs on layer 0's seven modules, one of each
shape, and is scaled by the number of layers; the JSON says so. Rounds 2 (an A update) and
3 (a B update) start from a non-zero global B, as every round after the first does.
All timings are on the CPU in float32, min of ``--repeats`` runs; ratios compare runs made
side by side in this process.
"""

from __future__ import annotations

import argparse
import platform

import _common as c
import torch

from fedsrd_core.aggregate import fedsrd_module_delta
from fedsrd_core.reference import dense_fedsrd_module_delta
from fedsrd_core.state import GlobalState
from fedsrd_core.strategies import RoundContext, Upload, get_strategy


def make_uploads(start: GlobalState, m: int) -> list[Upload]:
    """Real FedSRD client uploads (importance + adaptive ratio) from simulated training."""
    client = get_strategy("fedsrd")
    ctx = RoundContext(round=1)
    uploads = []
    for i in range(m):
        trained = c.trained_copy(start, seed=100 + i)
        uploads.append(Upload(client.client_upload(start, trained, ctx, client_seed=i), 1))
        del trained
    return uploads


def dense_sample(start: GlobalState, uploads: list[Upload], round_: int, layer0: list[str]):
    """Dense fp32 reference and factored FedSRD on layer 0's modules: times and errors."""
    strat = get_strategy("fedsrd")
    w = strat.weights(uploads)
    dense_s = fact_s = 0.0
    worst = 0.0
    for module, dAs, dBs in strat.module_updates(start, uploads):
        if module not in layer0:
            continue
        f = start[module]
        t_d, (_, ref) = c.best_of(
            lambda f=f, dAs=dAs, dBs=dBs: dense_fedsrd_module_delta(
                f.A, f.B, dAs, dBs, w, round_=round_, dtype=torch.float32
            ),
            1,
        )
        t_f, (_, fast) = c.best_of(
            lambda f=f, dAs=dAs, dBs=dBs: fedsrd_module_delta(f.A, f.B, dAs, dBs, w, round_=round_),
            3,
        )
        dense_s += t_d
        fact_s += t_f
        err = float((fast.double() - ref.double()).norm() / ref.double().norm())
        worst = max(worst, err)
        c.log(f"  {module}: dense {t_d:.2f}s factored {t_f * 1e3:.1f}ms rel.err {err:.1e}")
    return dense_s, fact_s, worst


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="2 layers instead of 28")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-dense", action="store_true", help="skip the dense reference")
    ap.add_argument(
        "--dense-modules",
        default=None,
        help="comma-separated module suffixes of layer 0 to run densely "
        "(default: all seven; with --quick: k_proj,v_proj, the cheapest shapes)",
    )
    args = ap.parse_args()
    torch.manual_seed(0)

    layout_name = "small" if args.quick else "llama-3.2-3b"
    layout = c.LAYOUTS[layout_name]
    n_layers = len({k.split(".")[2] for k in layout})
    start = c.started_state(layout, args.rank)
    c.log(f"layout {layout_name}: {len(layout)} modules, {start.num_parameters():,} LoRA params")
    uploads = make_uploads(start, args.clients)
    density = sum(t.nnz for u in uploads for t in u.tensors.values()) / (
        args.clients * start.num_parameters()
    )
    c.log(f"{args.clients} uploads built, mean kept density {density:.3%}")

    results: dict[str, dict[str, float]] = {}
    for name in ("fedsrd-e", "fedsrd"):
        strat = get_strategy(name)
        for round_ in (2, 3):
            ctx = RoundContext(round=round_, seed=1)
            with c.peak_rss() as mem:
                secs, _ = c.best_of(
                    lambda s=strat, x=ctx: s.server_round(start, uploads, x), args.repeats
                )
            key = f"{name}_round{round_}"
            results[key] = {
                "seconds": round(secs, 4),
                "peak_rss_increase_mib": round((mem["peak"] - mem["baseline"]) / c.MIB, 1),
            }
            c.log(f"{key}: {secs:.3f}s, peak RSS +{results[key]['peak_rss_increase_mib']} MiB")

    summary: dict[str, object] = {
        "benchmark": "server_step",
        "layout": layout_name,
        "modules": len(layout),
        "lora_parameters": start.num_parameters(),
        "rank": args.rank,
        "clients": args.clients,
        "upload_density": round(density, 5),
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "results": results,
        "largest_dense_module_matrix_mib": round(
            max(o * i for o, i in layout.values()) * 4 / c.MIB, 1
        ),
    }
    for round_ in (2, 3):
        a = results[f"fedsrd_round{round_}"]["seconds"]
        b = results[f"fedsrd-e_round{round_}"]["seconds"]
        summary[f"fedsrd_over_fedsrd_e_round{round_}"] = round(a / b, 3)

    if not args.no_dense:
        wanted = args.dense_modules or ("k_proj,v_proj" if args.quick else "")
        layer0 = [
            k
            for k in layout
            if k.startswith("model.layers.0.")
            and (not wanted or k.rsplit(".", 1)[1] in wanted.split(","))
        ]
        dense_total = fact_total = 0.0
        worst = 0.0
        for round_ in (2, 3):
            c.log(f"dense reference, round {round_}, layer 0 ({len(layer0)} modules):")
            d, f, e = dense_sample(start, uploads, round_, layer0)
            dense_total += d
            fact_total += f
            worst = max(worst, e)
        summary["dense_reference"] = {
            "sampled_modules": len(layer0) * 2,
            "modules": [k.rsplit(".", 1)[1] for k in layer0],
            "note": f"layer 0's modules above x rounds 2 and 3; the per-round figures are the "
            f"sample scaled by {n_layers} layers (all seven shapes: the whole model)",
            "dense_seconds_per_round_scaled": round(dense_total / 2 * n_layers, 2),
            "factored_seconds_per_round_scaled": round(fact_total / 2 * n_layers, 3),
            "speedup_factored_vs_dense": round(dense_total / fact_total, 1),
            "max_rel_error_vs_dense_fp32": float(f"{worst:.2e}"),
        }
    c.emit(summary)


if __name__ == "__main__":
    main()
