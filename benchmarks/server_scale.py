"""FedSRD's server step as the federation grows: seconds per round against the client count.

    python benchmarks/server_scale.py --clients 4,16,64,256           # layer 0 of Llama-3.2-3B
    python benchmarks/server_scale.py --quick --clients 4,16,64,256   # q_proj, k_proj, r=32

For each client count ``m`` it builds ``m`` real FedSRD uploads (importance sparsifier,
adaptive ratio) of simulated local training on a sample of Llama-3.2-3B modules, then times,
side by side in one process (min of ``--repeats``, rounds 2 and 3 averaged):

- ``fedsrd``: ``strategy.server_round`` as shipped (thin subspace iteration from
  ``aggregate._THIN_MIN_CLIENTS`` clients on, the Gram path below);
- ``fedsrd_gram``: the same with the Gram path forced (skipped above ``--gram-max-k``
  stacked columns: its ``(m r)^3`` eigendecomposition);
- ``fedsrd-e``: no truncation;
- ``dense``: the plain reference (form ``W``, full SVD, pinv; float32) on the ``--dense``
  modules only, once per round, with the relative error of the shipped factored step
  against the float64 dense reference (product change).

Without ``--quick`` the sample is layer 0 (all seven shapes) and the per-round figures are
scaled by 28 layers to the whole model. Peak memory (resident set increase of one FedSRD
round, uploads already built) is measured in a child process per ``m``. All timings are on
the CPU; compare only ratios from the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from typing import Any

import _common as c
import torch

import fedsrd_core.aggregate as agg
from fedsrd_core.layouts import LLAMA_3_2_3B
from fedsrd_core.reference import dense_fedsrd_module_delta
from fedsrd_core.state import GlobalState
from fedsrd_core.strategies import RoundContext, Upload, get_strategy

ROUNDS = (2, 3)
N_LAYERS = 28


def sample_layout(quick: bool) -> dict[str, tuple[int, int]]:
    keep = ("q_proj", "k_proj") if quick else ()
    return {
        k: v
        for k, v in LLAMA_3_2_3B.items()
        if k.startswith("model.layers.0.") and (not keep or k.rsplit(".", 1)[1] in keep)
    }


def build(
    layout: dict[str, tuple[int, int]], rank: int, m: int
) -> tuple[GlobalState, list[Upload]]:
    start = c.started_state(layout, rank)
    client = get_strategy("fedsrd")
    ctx = RoundContext(round=1)
    uploads = []
    for i in range(m):
        trained = c.trained_copy(start, seed=100 + i)
        uploads.append(Upload(client.client_upload(start, trained, ctx, client_seed=i), 1))
    return start, uploads


def paths_taken(start: GlobalState, uploads: list[Upload]) -> dict[str, int]:
    """How the shipped step truncated each module: thin iteration or why not."""
    strat = get_strategy("fedsrd")
    w = strat.weights(uploads)
    out: dict[str, int] = {}
    for module, dAs, dBs in strat.module_updates(start, uploads):
        f = start[module]
        if len(dAs) < agg._THIN_MIN_CLIENTS:
            why = "gram (below switch)"
        else:
            L_D, R_D = agg._centered_factors(f.A, f.B, dAs, dBs, w)
            _, why = agg._thin_target(L_D, R_D, f.A.shape[0])
        out[why] = out.get(why, 0) + 1
    return out


def time_rounds(fn: Any, repeats: int) -> float:
    total = 0.0
    for round_ in ROUNDS:
        secs, _ = c.best_of(lambda r=round_: fn(r), repeats)
        total += secs
    return total / len(ROUNDS)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))


def measure(args: argparse.Namespace, m: int) -> dict[str, Any]:
    layout = sample_layout(args.quick)
    start, uploads = build(layout, args.rank, m)
    fedsrd, fedsrd_e = get_strategy("fedsrd"), get_strategy("fedsrd-e")
    out: dict[str, Any] = {"paths": paths_taken(start, uploads)}

    def run(strat: Any, round_: int) -> None:
        strat.server_round(start, uploads, RoundContext(round=round_, seed=1))

    out["fedsrd_s"] = time_rounds(lambda r: run(fedsrd, r), args.repeats)
    out["fedsrd_e_s"] = time_rounds(lambda r: run(fedsrd_e, r), args.repeats)
    if m * args.rank <= args.gram_max_k:
        saved = agg._THIN_MIN_CLIENTS
        agg._THIN_MIN_CLIENTS = 1 << 30
        try:
            out["fedsrd_gram_s"] = time_rounds(lambda r: run(fedsrd, r), args.repeats)
        finally:
            agg._THIN_MIN_CLIENTS = saved
    dense_modules = [k for k in layout if k.rsplit(".", 1)[1] in args.dense.split(",")]
    w = fedsrd.weights(uploads)
    dense_s = fact_s = 0.0
    worst = 0.0
    for module, dAs, dBs in fedsrd.module_updates(start, uploads):
        if module not in dense_modules:
            continue
        f = start[module]
        for round_ in ROUNDS:
            t_d, _ = c.best_of(
                lambda f=f, dAs=dAs, dBs=dBs, round_=round_: dense_fedsrd_module_delta(
                    f.A, f.B, dAs, dBs, w, round_=round_, dtype=torch.float32
                ),
                1,
            )
            t_f, (_, fast) = c.best_of(
                lambda f=f, dAs=dAs, dBs=dBs, round_=round_: agg.fedsrd_module_delta(
                    f.A, f.B, dAs, dBs, w, round_=round_
                ),
                args.repeats,
            )
            dense_s += t_d / len(ROUNDS)
            fact_s += t_f / len(ROUNDS)
            if not args.no_error:
                _, ref = dense_fedsrd_module_delta(f.A, f.B, dAs, dBs, w, round_=round_)
                worst = max(worst, rel_err(fast, ref))
    out["dense_modules"] = [k.rsplit(".", 1)[1] for k in dense_modules]
    out["dense_s"] = dense_s
    out["factored_on_dense_modules_s"] = fact_s
    if not args.no_error:
        out["max_rel_error_vs_dense_fp64"] = float(f"{worst:.2e}")
    return out


def memory_probe(args: argparse.Namespace, m: int) -> None:
    """Child process: peak resident increase of one FedSRD round (round 2)."""
    start, uploads = build(sample_layout(args.quick), args.rank, m)
    strat = get_strategy("fedsrd")
    with c.peak_rss() as mem:
        strat.server_round(start, uploads, RoundContext(round=2, seed=1))
    coded = sum(
        t.nbytes if isinstance(t, torch.Tensor) else t.values.nbytes + t.indices.nbytes
        for u in uploads
        for t in u.tensors.values()
    )
    print(
        json.dumps(
            {
                "peak_mib": round((mem["peak"] - mem["baseline"]) / c.MIB, 1),
                "uploads_in_memory_mib": round(coded / c.MIB, 1),
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="q_proj and k_proj of layer 0")
    ap.add_argument("--clients", default="4,16,64,256")
    ap.add_argument("--rank", type=int, default=None, help="default 64 (32 with --quick)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dense", default="k_proj", help="module suffixes run densely")
    ap.add_argument("--gram-max-k", type=int, default=2048, help="largest m r for the Gram path")
    ap.add_argument("--no-error", action="store_true", help="skip the float64 dense check")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--memory-probe", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rank is None:
        args.rank = 32 if args.quick else 64
    if args.memory_probe:
        memory_probe(args, args.memory_probe)
        return
    torch.manual_seed(0)
    layout = sample_layout(args.quick)
    per_m: dict[str, dict[str, Any]] = {}
    for m in [int(x) for x in args.clients.split(",")]:
        c.log(f"m = {m} ...")
        res = measure(args, m)
        res["fedsrd_over_fedsrd_e"] = round(res["fedsrd_s"] / res["fedsrd_e_s"], 3)
        res["dense_over_factored"] = round(res["dense_s"] / res["factored_on_dense_modules_s"], 1)
        if "fedsrd_gram_s" in res:
            res["gram_over_thin"] = round(res["fedsrd_gram_s"] / res["fedsrd_s"], 3)
        if not args.quick:
            res["fedsrd_s_whole_model"] = round(res["fedsrd_s"] * N_LAYERS, 2)
            res["fedsrd_e_s_whole_model"] = round(res["fedsrd_e_s"] * N_LAYERS, 2)
        if not args.no_memory:
            child = [sys.executable, __file__, "--memory-probe", str(m), "--rank", str(args.rank)]
            child += ["--quick"] if args.quick else []
            proc = subprocess.run(
                child,
                env={**os.environ, **c.MEMORY_PROBE_ENV},
                capture_output=True,
                text=True,
                check=True,
            )
            res["memory"] = json.loads(proc.stdout.strip().splitlines()[-1])
        for key, val in res.items():
            if isinstance(val, float) and not key.startswith("max_rel"):
                res[key] = round(val, 4)
        c.log(f"m = {m}: {json.dumps(res)}")
        per_m[str(m)] = res
    ms = sorted(int(x) for x in per_m)
    summary: dict[str, Any] = {
        "benchmark": "server_scale",
        "modules": sorted(k.rsplit(".", 1)[1] for k in layout),
        "rank": args.rank,
        "thin_min_clients": agg._THIN_MIN_CLIENTS,
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "per_clients": per_m,
    }
    if len(ms) > 1 and ms[0] >= 16:
        lo, hi = str(ms[0]), str(ms[-1])
        summary["growth_fedsrd"] = round(per_m[hi]["fedsrd_s"] / per_m[lo]["fedsrd_s"], 2)
        summary["growth_clients"] = ms[-1] / ms[0]
    elif len(ms) > 2:
        lo, hi = str(ms[1]), str(ms[-1])
        summary["growth_fedsrd_from_" + lo] = round(
            per_m[hi]["fedsrd_s"] / per_m[lo]["fedsrd_s"], 2
        )
        summary["growth_clients_from_" + lo] = ms[-1] / ms[1]
    c.emit(summary)


if __name__ == "__main__":
    main()
