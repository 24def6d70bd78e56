"""The paper's experiment in miniature: every strategy, the ablation, the sparsifiers.

    python benchmarks/quality.py            # 3 seeds, 5 rounds (about 12 min on 2 cores)
    python benchmarks/quality.py --quick    # 1 seed, 3 rounds, no exact match (< 2 min)

Four clients, one domain each (arithmetic, code, facts, rewrite), full participation, on the
project's tiny pre-trained model (nothing downloaded). Per configuration and seed it runs
``fedsrd_core.simulation.simulate`` (every exchange through the wire codec) and reports the
final round's mean in-domain and out-of-domain (letter counting) evaluation loss, greedy
exact-match accuracy, and MiB per client per round (upload + download). Mean and standard
deviation over seeds; a markdown table to stderr and ``--markdown FILE``; the JSON summary
on the last line of stdout.

Configurations (the paper's Tables 3, 4 and 7): the seven strategies; FedSRD's cumulative
ablation (fixed ratio, then random instead of importance, then a dense SVD download instead
of the alternating decomposition, then plain A/B averaging instead of reconstruction);
FedAvg with importance, random or magnitude upload sparsification at 5% density; and two
diagnostics: FedSRD without DARE on the download, and without factor rebalancing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import _common as c
from transformers.utils import logging as hf_logging

from fedsrd_core.data import DOMAINS, OOD_DOMAINS, generate
from fedsrd_core.modeling import load_causal_lm
from fedsrd_core.simulation import SimulationConfig, simulate
from fedsrd_core.tiny_assets import tiny_model_path
from fedsrd_core.training import TrainConfig

_FIXED = {"ratio": "fixed", "zero_fraction": 0.95}
_ABLATION_1 = {"sparsifier": _FIXED}
_ABLATION_2 = {"sparsifier": {**_FIXED, "method": "random"}}
_ABLATION_3 = {**_ABLATION_2, "server": "svd"}
_ABLATION_4 = {**_ABLATION_2, "server": "average"}


def _sparse_fedavg(method: str) -> dict[str, Any]:
    return {"upload_sparsifier": {**_FIXED, "method": method}}


#: name -> (strategy, config overrides, group)
CONFIGS: dict[str, tuple[str, dict[str, Any], str]] = {
    "fedavg": ("fedavg", {}, "strategies"),
    "fedprox": ("fedprox", {}, "strategies"),
    "ffa-lora": ("ffa-lora", {}, "strategies"),
    "flexlora": ("flexlora", {}, "strategies"),
    "fed-dare": ("fed-dare", {}, "strategies"),
    "fedsrd-e": ("fedsrd-e", {}, "strategies"),
    "fedsrd": ("fedsrd", {}, "strategies"),
    "fedsrd w/o adaptive ratio": ("fedsrd", _ABLATION_1, "ablation"),
    "  w/o importance (random)": ("fedsrd", _ABLATION_2, "ablation"),
    "  w/o alternating decomposition": ("fedsrd", _ABLATION_3, "ablation"),
    "  w/o full-rank reconstruction": ("fedsrd", _ABLATION_4, "ablation"),
    "fedavg + importance 5%": ("fedavg", _sparse_fedavg("importance"), "sparsifier"),
    "fedavg + random 5%": ("fedavg", _sparse_fedavg("random"), "sparsifier"),
    "fedavg + magnitude 5%": ("fedavg", _sparse_fedavg("magnitude"), "sparsifier"),
    # Diagnostics (not in the paper): which part of FedSRD costs quality at this scale.
    "fedsrd, no DARE on the download": ("fedsrd", {"download_drop": 0.0}, "diagnostic"),
    "fedsrd, rebalance=false (the paper)": ("fedsrd", {"rebalance": False}, "diagnostic"),
}

#: The paper's in-domain average scores (higher is better; Llama-3.2-3B), for the table.
PAPER = {
    "fedavg": 33.90,
    "fedsrd-e": 34.26,
    "fedsrd": 35.12,
    "fedsrd w/o adaptive ratio": 35.05,
    "  w/o importance (random)": 32.93,
    "  w/o alternating decomposition": 32.48,
    "  w/o full-rank reconstruction": 32.32,
    "fedavg + importance 5%": 34.04,
    "fedavg + random 5%": 33.57,
    "fedavg + magnitude 5%": 31.61,
}


def run_one(
    model_dir: Path, strategy: str, overrides: dict[str, Any], seed: int, args: argparse.Namespace
) -> dict[str, float]:
    model, tok = load_causal_lm(str(model_dir))
    clients = [generate(d, args.train_per_domain, seed=seed) for d in DOMAINS]
    evals = {
        d: generate(d, args.eval_per_domain, seed=seed, split="eval")
        for d in (*DOMAINS, *OOD_DOMAINS)
    }
    cfg = SimulationConfig(
        strategy=strategy,
        strategy_config=overrides,
        rounds=args.rounds,
        rank=args.rank,
        train=TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=384, lr=args.lr),
        seed=seed,
        eval_exact_match=0 if args.quick else args.exact_match,
    )
    result = simulate(model, tok, clients, evals, cfg)
    last = result.rounds[-1].eval
    out = {
        "in_domain_loss": statistics.fmean(last[d]["loss"] for d in DOMAINS),
        "ood_loss": statistics.fmean(last[d]["loss"] for d in OOD_DOMAINS),
        "mib_per_client_round": result.mean_bytes_per_client_round()["total"] / c.MIB,
    }
    if "exact_match" in last[DOMAINS[0]]:
        out["in_domain_exact_match"] = statistics.fmean(last[d]["exact_match"] for d in DOMAINS)
        out["ood_exact_match"] = statistics.fmean(last[d]["exact_match"] for d in OOD_DOMAINS)
    return out


def summarise(runs: list[dict[str, float]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for key in runs[0]:
        vals = [r[key] for r in runs]
        out[key] = round(statistics.fmean(vals), 4)
        out[key + "_std"] = round(statistics.stdev(vals), 4) if len(vals) > 1 else 0.0
    return out


def markdown(summary: dict[str, dict[str, float]], seeds: int) -> str:
    head = (
        "| configuration | in-domain loss | OOD loss | in-domain EM | OOD EM | MiB/client/round "
        "| paper in-domain score |"
    )
    lines = [head, "|---|---|---|---|---|---|---|"]

    def pm(s: dict[str, float], k: str) -> str:
        if k not in s:
            return "-"
        return f"{s[k]:.3f} ± {s[k + '_std']:.3f}" if seeds > 1 else f"{s[k]:.3f}"

    for name, s in summary.items():
        paper = PAPER.get(name)
        lines.append(
            f"| {name.strip() if not name.startswith('  ') else '&nbsp;&nbsp;' + name.strip()} "
            f"| {pm(s, 'in_domain_loss')} | {pm(s, 'ood_loss')} "
            f"| {pm(s, 'in_domain_exact_match')} | {pm(s, 'ood_exact_match')} "
            f"| {s['mib_per_client_round']:.4f} | {paper if paper is not None else '-'} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="1 seed, 3 rounds, no exact match")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--train-per-domain", type=int, default=200)
    ap.add_argument("--eval-per-domain", type=int, default=20)
    ap.add_argument("--exact-match", type=int, default=10)
    ap.add_argument("--only", nargs="*", help="run only these configurations")
    ap.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir()) / "fedsrd-cache"))
    ap.add_argument("--markdown", help="also write the markdown table to this file")
    args = ap.parse_args()
    if args.quick:
        args.seeds, args.rounds = 1, 3
    hf_logging.disable_progress_bar()  # one "Loading weights" bar per run buries the table
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")
    model_dir = tiny_model_path(args.cache_dir)
    names = [n for n in CONFIGS if not args.only or n.strip() in args.only]
    t0 = time.perf_counter()
    summary: dict[str, dict[str, float]] = {}
    for name in names:
        strategy, overrides, _ = CONFIGS[name]
        runs = []
        for seed in range(args.seeds):
            runs.append(run_one(model_dir, strategy, overrides, seed, args))
        summary[name] = summarise(runs)
        s = summary[name]
        c.log(
            f"{name.strip():>32}: in-domain {s['in_domain_loss']:.3f} ± "
            f"{s['in_domain_loss_std']:.3f}, OOD {s['ood_loss']:.3f}, "
            f"{s['mib_per_client_round']:.4f} MiB ({time.perf_counter() - t0:.0f}s)"
        )
    table = markdown(summary, args.seeds)
    print(table, file=sys.stderr)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    checks: dict[str, Any] = {}
    if {"fedsrd", "fedavg"} <= set(summary):
        a, b = summary["fedsrd"], summary["fedavg"]
        spread = max(a["in_domain_loss_std"], b["in_domain_loss_std"])
        checks["fedsrd_in_domain_loss_minus_fedavg"] = round(
            a["in_domain_loss"] - b["in_domain_loss"], 4
        )
        checks["fedsrd_no_worse_than_fedavg_within_spread"] = (
            a["in_domain_loss"] <= b["in_domain_loss"] + spread
        )
        checks["fedsrd_bytes_over_fedavg"] = round(
            a["mib_per_client_round"] / b["mib_per_client_round"], 4
        )
    sp = [f"fedavg + {m} 5%" for m in ("importance", "random", "magnitude")]
    if set(sp) <= set(summary):
        losses = [summary[n]["in_domain_loss"] for n in sp]
        checks["importance_lt_random_lt_magnitude_loss"] = losses[0] < losses[1] < losses[2]
    c.emit(
        {
            "benchmark": "quality",
            "seeds": args.seeds,
            "rounds": args.rounds,
            "clients": len(DOMAINS),
            "model": "tiny (fedsrd_core.tiny_assets)",
            "seconds": round(time.perf_counter() - t0, 1),
            "results": summary,
            "paper_in_domain_scores": PAPER,
            "checks": checks,
        }
    )


if __name__ == "__main__":
    main()
