"""One FedSRD server round on Llama-3.2-3B shapes: factored FedSRD and FedSRD-e vs dense.

    python benchmarks/server_step.py            # Llama-3.2-3B, r=64, 196 modules, 4 clients
    python benchmarks/server_step.py --quick    # 2 layers of the same shapes (14 modules)

A server step here is ``strategy.server_round``: densify each module's sparse uploads,
reconstruct and aggregate (Eq. 9), truncate (Eq. 10, FedSRD only), solve for one factor
(Eqs. 11-13), DARE-sample the download with the seeded mask and round it to the wire dtype.
``with_codec_seconds`` adds what a server also does each round: decode and validate every
upload blob and encode the download blob.

The dense reference (form W, full SVD, pinv) runs on layer 0's seven modules, one of each
shape, and is scaled by the number of layers; the JSON says so. Rounds 2 (an A update) and
3 (a B update) start from a non-zero global B, as every round after the first does.
All timings are on the CPU in float32, min of ``--repeats`` runs; ratios compare runs made
side by side in this process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import _common as c
import torch

from fedsrd_core.aggregate import fedsrd_module_delta
from fedsrd_core.codec import decode, encode
from fedsrd_core.reference import dense_fedsrd_module_delta
from fedsrd_core.state import GlobalState, LoraFactors
from fedsrd_core.strategies import RoundContext, Strategy, Upload, get_strategy


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


ROUNDS = (2, 3)
STRATEGIES = ("fedsrd-e", "fedsrd")


def save_round_inputs(start: GlobalState, uploads: list[Upload], folder: Path) -> None:
    """State and uploads as wire-format blobs (the project never pickles)."""
    tensors: dict[str, torch.Tensor] = {}
    for name, f in start.items():
        tensors[name + ".lora_A"] = f.A
        tensors[name + ".lora_B"] = f.B
    (folder / "state.fsrd").write_bytes(encode(tensors))
    for i, u in enumerate(uploads):
        (folder / f"upload{i}.fsrd").write_bytes(encode(u.tensors))


def load_round_inputs(folder: Path) -> tuple[GlobalState, list[Upload]]:
    raw = decode((folder / "state.fsrd").read_bytes())
    modules: dict[str, LoraFactors] = {}
    for name in {k.rsplit(".", 1)[0] for k in raw}:
        A, B = raw[name + ".lora_A"], raw[name + ".lora_B"]
        assert isinstance(A, torch.Tensor)
        assert isinstance(B, torch.Tensor)
        modules[name] = LoraFactors(A, B)
    uploads = [Upload(decode(p.read_bytes())) for p in sorted(folder.glob("upload*.fsrd"))]
    return GlobalState(modules), uploads


def memory_probe(folder: Path) -> None:
    """Child process: peak RSS increase of one server round per strategy and round."""
    start, uploads = load_round_inputs(folder)
    out: dict[str, float] = {}
    for name in STRATEGIES:
        strat = get_strategy(name)
        for round_ in ROUNDS:
            ctx = RoundContext(round=round_, seed=1)
            with c.peak_rss() as mem:
                strat.server_round(start, uploads, ctx)
            out[f"{name}_round{round_}"] = round((mem["peak"] - mem["baseline"]) / c.MIB, 1)
    print(json.dumps(out))


def measure_memory(start: GlobalState, uploads: list[Upload]) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        save_round_inputs(start, uploads, Path(tmp))
        proc = subprocess.run(
            [sys.executable, __file__, "--memory-probe", tmp],
            env={**os.environ, **c.MEMORY_PROBE_ENV},
            capture_output=True,
            text=True,
            check=True,
        )
    result: dict[str, float] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="2 layers instead of 28")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-dense", action="store_true", help="skip the dense reference")
    ap.add_argument("--memory-probe", metavar="DIR", help=argparse.SUPPRESS)
    ap.add_argument(
        "--dense-modules",
        default=None,
        help="comma-separated module suffixes of layer 0 to run densely "
        "(default: all seven; with --quick: k_proj,v_proj, the cheapest shapes)",
    )
    args = ap.parse_args()
    if args.memory_probe:
        memory_probe(Path(args.memory_probe))
        return
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
    for name in STRATEGIES:
        strat = get_strategy(name)
        for round_ in ROUNDS:
            ctx = RoundContext(round=round_, seed=1)
            secs, _ = c.best_of(
                lambda s=strat, x=ctx: s.server_round(start, uploads, x), args.repeats
            )
            results[f"{name}_round{round_}"] = {"seconds": round(secs, 4)}
            c.log(f"{name}_round{round_}: {secs:.3f}s")
    # The whole round a server runs: decode and validate every upload, aggregate, encode the
    # download. The codec's share is the same for both strategies.
    blobs = [encode(u.tensors) for u in uploads]
    shapes = start.wire_shapes()

    def full_round(s: Strategy, ctx: RoundContext) -> bytes:
        decoded = [Upload(decode(b, expected_shapes=shapes)) for b in blobs]
        return encode(s.server_round(start, decoded, ctx))

    for name in STRATEGIES:
        strat = get_strategy(name)
        for round_ in ROUNDS:
            ctx = RoundContext(round=round_, seed=1)
            secs, _ = c.best_of(lambda s=strat, x=ctx: full_round(s, x), max(1, args.repeats - 1))
            results[f"{name}_round{round_}"]["with_codec_seconds"] = round(secs, 4)
            c.log(f"{name}_round{round_} with decode + encode: {secs:.3f}s")
    memory = measure_memory(start, uploads)
    for key, mib in memory.items():
        results[key]["peak_rss_increase_mib"] = mib
        c.log(f"{key}: peak RSS +{mib} MiB (separate process, fixed mmap threshold)")

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
    for round_ in ROUNDS:
        a = results[f"fedsrd_round{round_}"]["seconds"]
        b = results[f"fedsrd-e_round{round_}"]["seconds"]
        summary[f"fedsrd_over_fedsrd_e_round{round_}"] = round(a / b, 3)
        a = results[f"fedsrd_round{round_}"]["with_codec_seconds"]
        b = results[f"fedsrd-e_round{round_}"]["with_codec_seconds"]
        summary[f"with_codec_fedsrd_over_fedsrd_e_round{round_}"] = round(a / b, 3)

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
        for round_ in ROUNDS:
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
