"""FedSRD's server step as the federation grows: seconds per round against the client count.

    python benchmarks/server_scale.py --clients 4,16,64,256           # layer 0 of Llama-3.2-3B
    python benchmarks/server_scale.py --quick --clients 4,16,64,256   # q_proj, k_proj, r=32

For each client count ``m`` it builds ``m`` real FedSRD uploads (importance sparsifier,
adaptive ratio) of simulated local training on a sample of Llama-3.2-3B modules, then times,
side by side in one process (min of ``--repeats``, rounds 2 and 3 averaged):

- ``fedsrd``: ``strategy.server_round`` as shipped (the sparse server math of
  ``aggregate_sparse`` from ``SPARSE_MIN_CLIENTS`` clients on, the dense path below);
- ``fedsrd_densified``: the same with the uploads densified first (the dense path: the thin
  iteration from ``aggregate._THIN_MIN_CLIENTS`` clients on, the Gram path below);
- ``fedsrd-e``: no truncation (shipped);
- ``dense``: the plain reference (form ``W``, full SVD, pinv; float32) on the ``--dense``
  modules (default: the whole sample), once per round, with the relative error of the
  shipped step's solve against the float64 dense reference (product change).

Without ``--quick`` the sample is layer 0 (all seven shapes) and the per-round figures are
scaled by 28 layers to the whole model. Peak memory is measured in a child process per ``m``
and path: the uploads are encoded into blobs first (what the blob store holds) and the round
reads them through ``LazyBlob``, one module's entries at a time, as the aggregation worker
does; reported is the resident-set increase during the round over the coded uploads. All
timings are on the CPU; compare only ratios from the same run.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import _common as c
import torch

import fedsrd_core.aggregate as agg
import fedsrd_core.aggregate_sparse as sp
from fedsrd_core.aggregate_sparse import SparseUpdates, sparse_module_target
from fedsrd_core.codec import LazyBlob, encode
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
    """How the shipped step truncated each module: sparse thin iteration or why not."""
    strat = get_strategy("fedsrd")
    w = strat.weights(uploads)
    out: dict[str, int] = {}
    for module, eAs, eBs in strat.module_entries(start, uploads):
        f = start[module]
        u = SparseUpdates(f.A, f.B, eAs, eBs, w)
        if len(w) < sp.SPARSE_MIN_CLIENTS or u.density > sp.SPARSE_MAX_DENSITY:
            why = "dense (below switch)"
        else:
            _, why = agg.thin_truncation(
                u.dB_bar, f.B + u.dB_bar, f.A, u.dA_bar, sp._SparseDelta(u)
            )
            why = "sparse " + why
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


@contextmanager
def densified() -> Iterator[None]:
    """The shipped strategy with the sparse path switched off (uploads densified first)."""
    saved = sp.SPARSE_MIN_CLIENTS
    sp.SPARSE_MIN_CLIENTS = 1 << 30
    try:
        yield
    finally:
        sp.SPARSE_MIN_CLIENTS = saved


def measure(args: argparse.Namespace, m: int) -> dict[str, Any]:
    layout = sample_layout(args.quick)
    start, uploads = build(layout, args.rank, m)
    fedsrd, fedsrd_e = get_strategy("fedsrd"), get_strategy("fedsrd-e")
    out: dict[str, Any] = {"paths": paths_taken(start, uploads)}

    def run(strat: Any, round_: int) -> None:
        strat.server_round(start, uploads, RoundContext(round=round_, seed=1))

    out["fedsrd_s"] = time_rounds(lambda r: run(fedsrd, r), args.repeats)
    out["fedsrd_e_s"] = time_rounds(lambda r: run(fedsrd_e, r), args.repeats)
    if not args.no_densified:
        with densified():
            out["fedsrd_densified_s"] = time_rounds(lambda r: run(fedsrd, r), args.repeats)
    wanted = args.dense.split(",") if args.dense else None
    w = fedsrd.weights(uploads)
    dense_s = 0.0
    worst = 0.0
    ran = []
    for module, dAs, dBs in fedsrd.module_updates(start, uploads):
        if wanted is not None and module.rsplit(".", 1)[1] not in wanted:
            continue
        ran.append(module.rsplit(".", 1)[1])
        f = start[module]
        _, eAs, eBs = next(iter(fedsrd.module_entries(GlobalState({module: f}), uploads)))
        for round_ in ROUNDS:
            t_d, _ = c.best_of(
                lambda f=f, dAs=dAs, dBs=dBs, round_=round_: dense_fedsrd_module_delta(
                    f.A, f.B, dAs, dBs, w, round_=round_, dtype=torch.float32
                ),
                1,
            )
            dense_s += t_d / len(ROUNDS)
            if not args.no_error:
                for truncate in (True, False):
                    target = sparse_module_target(f.A, f.B, eAs, eBs, w, truncate=truncate)
                    _, fast = agg.one_factor_solve(target, f.A, f.B, round_=round_)
                    _, ref = dense_fedsrd_module_delta(
                        f.A, f.B, dAs, dBs, w, round_=round_, truncate=truncate
                    )
                    worst = max(worst, rel_err(fast, ref))
    out["dense_modules"] = ran
    out["dense_s"] = dense_s
    if wanted is None:
        out["dense_over_fedsrd"] = round(dense_s / out["fedsrd_s"], 1)
        out["dense_over_fedsrd_e"] = round(dense_s / out["fedsrd_e_s"], 1)
    if not args.no_error:
        out["max_rel_error_vs_dense_fp64"] = float(f"{worst:.2e}")
    return out


def memory_probe(args: argparse.Namespace, m: int, path: str) -> None:
    """Child process: peak resident increase of one FedSRD round (round 2) read from coded
    uploads through LazyBlob (one module's entries decoded at a time)."""
    start, uploads = build(sample_layout(args.quick), args.rank, m)
    shapes = get_strategy("fedsrd").upload_shapes(start)
    blobs = [encode(u.tensors) for u in uploads]
    del uploads
    gc.collect()
    lazy = [Upload(LazyBlob(b, expected_shapes=shapes), 1) for b in blobs]
    strat = get_strategy("fedsrd")
    ctx = RoundContext(round=2, seed=1)
    with c.peak_rss() as mem:
        if path == "densified":
            with densified():
                strat.server_round(start, lazy, ctx)
        else:
            strat.server_round(start, lazy, ctx)
    print(
        json.dumps(
            {
                "peak_mib": round((mem["peak"] - mem["baseline"]) / c.MIB, 1),
                "coded_uploads_mib": round(sum(len(b) for b in blobs) / c.MIB, 1),
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
    ap.add_argument("--dense", default="", help="module suffixes run densely (default: all)")
    ap.add_argument("--no-densified", action="store_true", help="skip the densified path")
    ap.add_argument("--no-error", action="store_true", help="skip the float64 dense check")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--memory-probe", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--memory-path", default="shipped", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rank is None:
        args.rank = 32 if args.quick else 64
    if args.memory_probe:
        memory_probe(args, args.memory_probe, args.memory_path)
        return
    torch.manual_seed(0)
    layout = sample_layout(args.quick)
    per_m: dict[str, dict[str, Any]] = {}
    for m in [int(x) for x in args.clients.split(",")]:
        c.log(f"m = {m} ...")
        res = measure(args, m)
        res["fedsrd_over_fedsrd_e"] = round(res["fedsrd_s"] / res["fedsrd_e_s"], 3)
        if "fedsrd_densified_s" in res:
            res["densified_over_fedsrd"] = round(res["fedsrd_densified_s"] / res["fedsrd_s"], 2)
        if not args.quick:
            for key in ("fedsrd_s", "fedsrd_e_s", "dense_s"):
                res[key.removesuffix("_s") + "_s_whole_model"] = round(res[key] * N_LAYERS, 2)
        if not args.no_memory:
            res["memory"] = {}
            paths = ("shipped",) if args.no_densified else ("shipped", "densified")
            for path in paths:
                child = [sys.executable, __file__, "--memory-probe", str(m)]
                child += ["--rank", str(args.rank), "--memory-path", path]
                child += ["--quick"] if args.quick else []
                proc = subprocess.run(
                    child,
                    env={**os.environ, **c.MEMORY_PROBE_ENV},
                    capture_output=True,
                    text=True,
                    check=True,
                )
                res["memory"][path] = json.loads(proc.stdout.strip().splitlines()[-1])
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
        "sparse_min_clients": sp.SPARSE_MIN_CLIENTS,
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
