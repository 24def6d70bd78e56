"""FedSRD against its baselines on the quality testbed: loss per round and per MiB, 3 seeds.

    python benchmarks/quality.py               # the full protocol (hours on 2 cores; resumable)
    python benchmarks/quality.py --quick       # fedavg, fedsrd, the paper's: 1 seed, r=8,
                                               # 8 rounds, no sweep (< 5 min once built)
    python benchmarks/quality.py --ablation    # the diagnosis: the paper's method, ablated, at
                                               # widths 64 / 256 / 512, with per-module records

The testbed (``fedsrd bench-model``): a 256-wide Llama pre-trained offline (built on first
use, about 30 minutes on 2 cores, then cached). Four clients, one domain each (arithmetic,
code, facts, rewrite), full participation, 10 local steps of 8 sequences per round, LoRA on
every linear layer at r = 8 and 16, 3 seeds. Every exchange goes through the wire codec, so
the bytes are the real ones. Each swept strategy runs at the best of a 3-point learning-rate
sweep (seed 0, lowest mean in-domain loss over the last 3 rounds); the others at FedAvg's best.

Per strategy and rank it reports (mean and standard deviation over seeds): the final and the
best in-domain and out-of-domain (letter counting) evaluation loss, MiB per client and round,
the round and the cumulative MiB at which the in-domain loss first reaches FedAvg's final one,
and the largest round-to-round rise of the in-domain loss. It writes ``record.json`` (every
run, every round; with ``--diagnose`` or ``--ablation`` FedSRD's per-module diagnostics),
``report.md`` and SVG plots of in-domain loss against round and against cumulative MiB into
``--out``, and prints the JSON summary as its last line. Finished runs are cached in
``--out/runs``: an interrupted benchmark resumes where it stopped.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import multiprocessing as mp
import statistics
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import _common as c
from _svg import line_chart

from fedsrd_core.cli import DEFAULT_CACHE, resolve_model
from fedsrd_core.data import DOMAINS, OOD_DOMAINS, generate

#: name -> (strategy, strategy_config overrides). The paper's method exactly as published:
#: DARE values, no factor rebalancing, no server residual.
STRATEGIES: dict[str, tuple[str, dict[str, Any]]] = {
    "fedavg": ("fedavg", {}),
    "fedsrd": ("fedsrd", {}),
    "fedsrd-e": ("fedsrd-e", {}),
    "fed-dare": ("fed-dare", {}),
    "flexlora": ("flexlora", {}),
    "ffa-lora": ("ffa-lora", {}),
    "fedsrd (paper)": ("fedsrd-paper", {}),
}
#: The strategies whose learning rate is swept; the others run at FedAvg's best.
SWEPT = ("fedavg", "fedsrd")
LR_GRID = (1e-3, 3e-3, 1e-2)

#: The diagnosis (``--ablation``): the paper's method with one component changed at a time.
ABLATIONS: dict[str, dict[str, Any]] = {
    "paper": {},
    "no DARE (dense download)": {"download_drop": 0.0},
    "DARE p=0.5": {"download_drop": 0.5},
    "no truncation (FedSRD-e)": {"truncate": False},
    "upload sparsifier off": {
        "sparsifier": {
            "method": "magnitude",
            "ratio": "fixed",
            "zero_fraction": 0.0,
            "rescale": "none",
        }
    },
}
ABLATION_WIDTHS = (64, 256, 512)


@dataclass(frozen=True)
class Job:
    """One simulated federation."""

    label: str
    strategy: str
    overrides: dict[str, Any]
    model: str
    rank: int
    lr: float
    seed: int
    rounds: int
    train_per_domain: int
    eval_per_domain: int
    seq_len: int
    diagnose: bool = False
    tags: dict[str, Any] = field(default_factory=dict)
    #: The strategy's whole resolved configuration (defaults included), so that a changed
    #: default gives a new cache key instead of silently reusing a run of the old one.
    config: dict[str, Any] = field(default_factory=dict)

    def key(self) -> str:
        material = {k: v for k, v in self.__dict__.items() if k not in ("label", "tags")}
        return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:20]


def _run_job(job: Job, cache_dir: str, runs_dir: str) -> dict[str, Any]:
    """Run ``job`` (in a worker process, one thread) unless its result is cached."""
    path = Path(runs_dir) / f"{job.key()}.json"
    if path.is_file():
        return json.loads(path.read_text())  # type: ignore[no-any-return]
    import torch
    from transformers.utils import logging as hf_logging

    from fedsrd_core.modeling import load_causal_lm
    from fedsrd_core.simulation import SimulationConfig, simulate
    from fedsrd_core.training import TrainConfig

    torch.set_num_threads(1)
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    model, tok = load_causal_lm(resolve_model(job.model, cache_dir), device="cpu")
    clients = [generate(d, job.train_per_domain, seed=job.seed) for d in DOMAINS]
    evals = {
        d: generate(d, job.eval_per_domain, seed=job.seed, split="eval")
        for d in (*DOMAINS, *OOD_DOMAINS)
    }
    cfg = SimulationConfig(
        strategy=job.strategy,
        strategy_config=job.overrides,
        rounds=job.rounds,
        rank=job.rank,
        train=TrainConfig(steps=10, batch_size=8, seq_len=job.seq_len, lr=job.lr),
        seed=job.seed,
        diagnostics=job.diagnose,
    )
    t0 = time.perf_counter()
    result = simulate(model, tok, clients, evals, cfg)
    out = {"job": job.__dict__, "seconds": time.perf_counter() - t0, **result.to_dict()}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(out))
    tmp.rename(path)
    return out


def _in_domain(evals: dict[str, dict[str, float]]) -> float:
    return statistics.fmean(evals[d]["loss"] for d in DOMAINS)


def _ood(evals: dict[str, dict[str, float]]) -> float:
    return statistics.fmean(evals[d]["loss"] for d in OOD_DOMAINS)


def curves(run: dict[str, Any]) -> dict[str, list[float]]:
    """Per round (round 0 = the base model): in-domain and OOD loss, cumulative MiB per
    client (upload + download of each round, averaged over its participants)."""
    rounds = run["rounds"]
    ind = [_in_domain(run["base_eval"])] + [_in_domain(r["eval"]) for r in rounds]
    ood = [_ood(run["base_eval"])] + [_ood(r["eval"]) for r in rounds]
    mib, total = [0.0], 0.0
    for r in rounds:
        ups = list(r["bytes_up"].values())
        total += (statistics.fmean(ups) if ups else 0.0) + r["bytes_down"]
        mib.append(total / c.MIB)
    return {"in_domain": ind, "ood": ood, "cum_mib": mib}


def run_metrics(run: dict[str, Any], target: float | None) -> dict[str, float]:
    cv = curves(run)
    ind, ood, mib = cv["in_domain"], cv["ood"], cv["cum_mib"]
    out = {
        "final_in_domain": ind[-1],
        "best_in_domain": min(ind[1:]),
        "final_ood": ood[-1],
        "best_ood": min(ood[1:]),
        "mib_per_client_round": mib[-1] / (len(ind) - 1),
        # from the base model (round 0) on: a first round that makes it worse counts too
        "largest_rise": max([b - a for a, b in itertools.pairwise(ind)] + [0.0]),
        "tail_in_domain": statistics.fmean(ind[-3:]),
    }
    if target is not None:
        hit = next((t for t in range(1, len(ind)) if ind[t] <= target), None)
        out["round_to_fedavg_final"] = float(hit) if hit is not None else math.nan
        out["mib_to_fedavg_final"] = mib[hit] if hit is not None else math.nan
    return out


def aggregate(values: Sequence[float]) -> dict[str, float]:
    finite = [v for v in values if math.isfinite(v)]
    return {
        "mean": statistics.fmean(finite) if finite else math.nan,
        "std": statistics.stdev(finite) if len(finite) > 1 else 0.0,
        "n": float(len(finite)),
        "of": float(len(values)),
    }


def reuse_runs(records: Sequence[str], runs_dir: Path) -> int:
    """Seed the run cache from committed ``record.json`` files: a run is reused only when its
    job (model, protocol, seed, learning rate and the strategy's whole resolved config) has
    the same key as a job of this invocation; runs recorded without a resolved config are
    skipped. Returns how many runs were added."""
    runs_dir.mkdir(parents=True, exist_ok=True)
    added = 0
    for record in records:
        data = json.loads(Path(record).read_text())
        for run in [*data.get("runs", []), *data.get("sweep_runs", [])]:
            if not run.get("job", {}).get("config"):
                continue
            path = runs_dir / f"{Job(**run['job']).key()}.json"
            if not path.exists():
                path.write_text(json.dumps(run))
                added += 1
    return added


def _pool_map(jobs: list[Job], args: argparse.Namespace) -> list[dict[str, Any]]:
    runs_dir = Path(args.out) / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    todo = [j for j in jobs if not (runs_dir / f"{j.key()}.json").is_file()]
    cached = len(jobs) - len(todo)
    c.log(f"{len(jobs)} runs, {cached} cached, {len(todo)} to do ({args.jobs} at a time)")
    t0 = time.perf_counter()
    if todo:
        ctx = mp.get_context("spawn")
        with ctx.Pool(args.jobs, maxtasksperchild=1) as pool:
            pending = [
                (j, pool.apply_async(_run_job, (j, args.cache_dir, str(runs_dir)))) for j in todo
            ]
            for j, res in pending:
                r = res.get()
                last = curves(r)["in_domain"][-1]
                c.log(
                    f"  {j.label:<28} r={j.rank:<3} lr={j.lr:<7g} seed={j.seed}: in-domain "
                    f"{last:.3f} ({r['seconds']:.0f} s; {time.perf_counter() - t0:.0f} s so far)"
                )
    return [_run_job(j, args.cache_dir, str(runs_dir)) for j in jobs]  # all cached now


def _job(args: argparse.Namespace, label: str, rank: int, lr: float, seed: int, **kw: Any) -> Job:
    strategy, overrides = STRATEGIES[label] if label in STRATEGIES else kw.pop("spec")
    from fedsrd_core.strategies import get_strategy

    return Job(
        label=label,
        strategy=strategy,
        overrides=overrides,
        model=kw.pop("model", args.model),
        rank=rank,
        lr=lr,
        seed=seed,
        rounds=args.rounds,
        train_per_domain=args.train_per_domain,
        eval_per_domain=args.eval_per_domain,
        seq_len=args.seq_len,
        diagnose=kw.pop("diagnose", args.diagnose and strategy.startswith("fedsrd")),
        tags=kw,
        config=get_strategy(strategy, dict(overrides)).config.to_dict(),
    )


def main_protocol(args: argparse.Namespace) -> dict[str, Any]:
    labels = [n for n in STRATEGIES if not args.only or n in args.only]
    ranks = args.ranks

    def seeds(label: str) -> range:
        main = label in (*SWEPT, "fedsrd (paper)")
        return range(args.seeds if main or args.baseline_seeds is None else args.baseline_seeds)

    # 1. The sweep (seed 0).
    best_lr: dict[tuple[str, int], float] = {}
    sweep_record: dict[str, dict[str, float]] = {}
    sweep_runs: list[dict[str, Any]] = []
    if args.sweep:
        sweep_jobs = [
            _job(args, n, r, lr, 0) for n in SWEPT if n in labels for r in ranks for lr in args.lrs
        ]
        sweep_runs = _pool_map(sweep_jobs, args)
        for j, run in zip(sweep_jobs, sweep_runs, strict=True):
            tail = run_metrics(run, None)["tail_in_domain"]
            sweep_record.setdefault(f"{j.label} r={j.rank}", {})[f"{j.lr:g}"] = round(tail, 4)
            key = (j.label, j.rank)
            if (
                key not in best_lr
                or tail < sweep_record[f"{j.label} r={j.rank}"][f"{best_lr[key]:g}"]
            ):
                best_lr[key] = j.lr
    for r in ranks:
        default = best_lr.get(("fedavg", r), args.lr)
        for n in labels:
            best_lr.setdefault((n, r), default)
    # 2. Every strategy, every seed, at its learning rate.
    jobs = [_job(args, n, r, best_lr[(n, r)], s) for n in labels for r in ranks for s in seeds(n)]
    runs = _pool_map(jobs, args)
    by: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for j, run in zip(jobs, runs, strict=True):
        by.setdefault((j.label, j.rank), []).append(run)
    results: dict[str, Any] = {}
    for r in ranks:
        fedavg_runs = by.get(("fedavg", r), [])
        target = (
            statistics.fmean(run_metrics(x, None)["final_in_domain"] for x in fedavg_runs)
            if fedavg_runs
            else None
        )
        if fedavg_runs:
            fedavg_mib = _mean_curve(fedavg_runs, "cum_mib")
            fedavg_loss = _mean_curve(fedavg_runs, "in_domain")
        for n in labels:
            per_seed = [run_metrics(x, target) for x in by[(n, r)]]
            summary = {k: aggregate([m[k] for m in per_seed]) for k in per_seed[0]}
            summary["lr"] = best_lr[(n, r)]  # type: ignore[assignment]
            if fedavg_runs:
                # FedAvg's in-domain loss after as many MiB as this strategy moved in all its
                # rounds (FedAvg's seed-mean curve, interpolated in cumulative MiB).
                spent = statistics.fmean(curves(x)["cum_mib"][-1] for x in by[(n, r)])
                summary["fedavg_at_same_mib"] = aggregate(
                    [_interpolate(fedavg_mib, fedavg_loss, spent)]
                )
            results[f"{n} r={r}"] = summary
        _plots(args, r, labels, by)
    record = {
        "protocol": _protocol(args),
        "sweep": sweep_record,
        "runs": runs,
        # The sweep's other points (its best point is also in "runs"), for --reuse.
        "sweep_runs": [x for x in sweep_runs if x not in runs],
    }
    (Path(args.out) / "record.json").write_text(json.dumps(record))
    diagnosis = {
        f"{n} r={r}": diagnosis_table(by[(n, r)][0])
        for n in labels
        for r in ranks
        if by[(n, r)][0]["rounds"][0].get("diagnostics")
    }
    (Path(args.out) / "report.md").write_text(report(args, sweep_record, results, diagnosis, ranks))
    return {"sweep": sweep_record, "results": results}


def diagnosis_table(run: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Mean over the B-rounds and over the A-rounds of the per-round medians (all modules)."""
    out: dict[str, dict[str, float]] = {}
    for parity, name in ((1, "B-rounds"), (0, "A-rounds")):
        rows = [
            r["diagnostics"]["all"]
            for r in run["rounds"]
            if r.get("diagnostics") and r["round"] % 2 == parity
        ]
        if rows:
            out[name] = {
                k: statistics.fmean(x[k] for x in rows if math.isfinite(x[k]))
                for k in rows[0]
                if any(math.isfinite(x[k]) for x in rows)
            }
    return out


#: The diagnosis columns of the reports (see fedsrd_core/diagnostics.py).
DIAGNOSIS_COLUMNS = (
    "cond_fixed",
    "projection_loss",
    "download_noise",
    "residual",
    "alignment",
    "truncation_loss",
    "norm_A",
    "norm_B",
)


def diagnosis_lines(diagnosis: dict[str, dict[str, dict[str, float]]]) -> list[str]:
    """A markdown table of :func:`diagnosis_table` results, one row per run and parity."""
    lines = [
        "| run | rounds | " + " | ".join(DIAGNOSIS_COLUMNS) + " |",
        "|---|---|" + "---|" * len(DIAGNOSIS_COLUMNS),
    ]
    for run, table in diagnosis.items():
        for parity, vals in table.items():
            cells = [f"{vals[m]:.3g}" if m in vals else "inf" for m in DIAGNOSIS_COLUMNS]
            lines.append(f"| {run} | {parity} | " + " | ".join(cells) + " |")
    return lines


def _fmt(a: dict[str, float], digits: int = 3) -> str:
    if not math.isfinite(a["mean"]):
        return "never"
    txt = f"{a['mean']:.{digits}f}"
    if a["of"] > 1:
        txt += f" ± {a['std']:.{digits}f}"
    if a["n"] < a["of"]:
        txt += f" ({a['n']:.0f}/{a['of']:.0f} seeds)"
    return txt


def report(
    args: argparse.Namespace,
    sweep: dict[str, dict[str, float]],
    results: dict[str, Any],
    diagnosis: dict[str, dict[str, dict[str, float]]],
    ranks: list[int],
) -> str:
    """``report.md``: the protocol, the sweep, the results table per rank, the diagnosis."""
    lines = [
        "# Quality benchmark",
        "",
        f"Model `{args.model}`, {args.rounds} rounds, 4 clients (one domain each), 10 local "
        f"steps, {args.seeds} seed(s), eval {args.eval_per_domain} examples per domain. "
        "In-domain: mean eval loss over arithmetic / code / facts / rewrite; OOD: letter "
        "counting, which no client trains on. Mean ± standard deviation over seeds.",
        "",
    ]
    if sweep:
        lines += ["## Learning-rate sweep (seed 0, mean in-domain loss of the last 3 rounds)", ""]
        lrs = sorted({lr for v in sweep.values() for lr in v}, key=float)
        lines.append("| strategy | " + " | ".join(f"lr {x}" for x in lrs) + " |")
        lines.append("|---|" + "---|" * len(lrs))
        for k, v in sweep.items():
            lines.append(f"| {k} | " + " | ".join(f"{v.get(x, math.nan):.3f}" for x in lrs) + " |")
        lines.append("")
    cols = [
        ("final_in_domain", "final in-domain"),
        ("best_in_domain", "best in-domain"),
        ("final_ood", "final OOD"),
        ("best_ood", "best OOD"),
        ("mib_per_client_round", "MiB / client / round"),
        ("round_to_fedavg_final", "round to FedAvg's final"),
        ("mib_to_fedavg_final", "MiB to FedAvg's final"),
        ("largest_rise", "largest rise"),
        ("fedavg_at_same_mib", "FedAvg's in-domain after the same MiB"),
    ]
    for r in ranks:
        lines += [f"## r = {r}", ""]
        lines.append("| strategy | lr | seeds | " + " | ".join(h for _, h in cols) + " |")
        lines.append("|---|---|---|" + "---|" * len(cols))
        for key, res in results.items():
            if not key.endswith(f" r={r}"):
                continue
            cells = [
                _fmt(res[k], 1 if k == "round_to_fedavg_final" else 3) if k in res else "-"
                for k, _ in cols
            ]
            lines.append(
                f"| {key[: -len(f' r={r}')]} | {res['lr']:g} | "
                f"{res['final_in_domain']['of']:.0f} | " + " | ".join(cells) + " |"
            )
        lines += [
            "",
            f"![loss against round](loss_vs_round_r{r}.svg) "
            f"![loss against MiB](loss_vs_mib_r{r}.svg)",
            "",
        ]
    if diagnosis:
        lines += [
            "## Diagnosis (seed 0; median over modules, mean over rounds)",
            "",
            "See `fedsrd_core/diagnostics.py` for the definitions.",
            "",
        ]
        lines += [*diagnosis_lines(diagnosis), ""]
    return "\n".join(lines)


def _interpolate(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
    """``ys`` at ``x`` on the piecewise-linear curve through ``(xs, ys)`` (``xs`` increasing);
    NaN past its end."""
    for (x0, y0), (x1, y1) in itertools.pairwise(zip(xs, ys, strict=True)):
        if x0 <= x <= x1:
            return y0 + (y1 - y0) * ((x - x0) / (x1 - x0) if x1 > x0 else 0.0)
    return math.nan


def _mean_curve(runs: list[dict[str, Any]], key: str) -> list[float]:
    cs = [curves(r)[key] for r in runs]
    return [statistics.fmean(v) for v in zip(*cs, strict=True)]


def _plots(
    args: argparse.Namespace, rank: int, labels: list[str], by: dict[tuple[str, int], Any]
) -> None:
    out = Path(args.out)
    per_round = []
    per_mib = []
    for n in labels:
        runs = by[(n, rank)]
        ind, mib = _mean_curve(runs, "in_domain"), _mean_curve(runs, "cum_mib")
        per_round.append((n, list(enumerate(ind))))
        per_mib.append((n, list(zip(mib[1:], ind[1:], strict=True))))
    suffix = f"r{rank}"
    (out / f"loss_vs_round_{suffix}.svg").write_text(
        line_chart(
            f"In-domain eval loss, r={rank} (mean over seeds)",
            "round (0 = base model)",
            "in-domain loss (nats/token)",
            per_round,
        )
    )
    (out / f"loss_vs_mib_{suffix}.svg").write_text(
        line_chart(
            f"In-domain eval loss against traffic, r={rank}",
            "cumulative MiB per client (log scale)",
            "in-domain loss (nats/token)",
            per_mib,
            log_x=True,
        )
    )


def _ablation_model(args: argparse.Namespace, width: int) -> str:
    """The model of one ablation width: the 256-wide testbed is ``bench``; ``--tiny-for-64``
    takes the tiny model (hidden 64) instead of building a 64-wide bench model."""
    if width == 64 and args.tiny_for_64:
        return "tiny"
    return "bench" if width == 256 else f"bench-{width}"


def ablation_protocol(args: argparse.Namespace) -> dict[str, Any]:
    """The paper's method with one component changed at a time, at several widths, with
    per-module diagnostics (seed 0, r = 8, the paper's method at FedAvg's lr)."""
    jobs = []
    for width in args.widths:
        model = _ablation_model(args, width)
        for name, change in ABLATIONS.items():
            spec = ("fedsrd-paper", change)
            jobs.append(
                _job(
                    args,
                    f"{name} @{width}",
                    8,
                    args.lr,
                    0,
                    spec=spec,
                    model=model,
                    diagnose=True,
                    width=width,
                )
            )
    runs = _pool_map(jobs, args)
    results = {}
    diagnosis = {}
    for j, run in zip(jobs, runs, strict=True):
        m = run_metrics(run, None)
        results[j.label] = {k: round(v, 4) for k, v in m.items()}
        diagnosis[j.label] = diagnosis_table(run)
    (Path(args.out) / "ablation_record.json").write_text(json.dumps({"runs": runs}))
    lines = [
        "# Ablation of the paper's method",
        "",
        "| run | final in-domain | best in-domain | largest rise | final OOD |",
        "|---|---|---|---|---|",
    ]
    for k, m in results.items():
        lines.append(
            f"| {k} | {m['final_in_domain']:.3f} | {m['best_in_domain']:.3f} | "
            f"{m['largest_rise']:.3f} | {m['final_ood']:.3f} |"
        )
    lines += ["", *diagnosis_lines(diagnosis)]
    (Path(args.out) / "ablation.md").write_text("\n".join(lines) + "\n")
    return {"ablation": results, "diagnosis": diagnosis}


def _protocol(args: argparse.Namespace) -> dict[str, Any]:
    return {
        k: getattr(args, k)
        for k in (
            "model",
            "rounds",
            "ranks",
            "seeds",
            "baseline_seeds",
            "lrs",
            "train_per_domain",
            "eval_per_domain",
            "seq_len",
            "sweep",
        )
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--quick", action="store_true", help="3 strategies, 1 seed, r=8, 8 rounds, no sweep"
    )
    ap.add_argument("--ablation", action="store_true", help="the diagnosis instead")
    ap.add_argument("--model", default="bench", help="bench (256 wide), bench-512, tiny, ...")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--ranks", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument(
        "--baseline-seeds",
        type=int,
        default=None,
        help="seeds for the strategies other than fedavg, fedsrd and the paper's (default: "
        "--seeds); the report says how many each row has",
    )
    ap.add_argument("--lrs", type=float, nargs="+", default=list(LR_GRID))
    ap.add_argument("--lr", type=float, default=3e-3, help="without a sweep")
    ap.add_argument("--no-sweep", dest="sweep", action="store_false")
    ap.add_argument("--train-per-domain", type=int, default=200)
    ap.add_argument("--eval-per-domain", type=int, default=60)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--only", nargs="*", help="only these strategies")
    ap.add_argument("--diagnose", action="store_true", help="per-module FedSRD diagnostics")
    ap.add_argument("--widths", type=int, nargs="+", default=list(ABLATION_WIDTHS))
    ap.add_argument("--tiny-for-64", action="store_true", help="width 64: the tiny model")
    ap.add_argument("--jobs", type=int, default=2, help="simulations at a time (1 thread each)")
    ap.add_argument("--cache-dir", default=str(DEFAULT_CACHE))
    ap.add_argument("--out", default="benchmarks/results/quality")
    ap.add_argument(
        "--reuse",
        nargs="*",
        default=[],
        metavar="RECORD",
        help="record.json files whose runs are reused where the job is identical",
    )
    args = ap.parse_args()
    if args.quick:
        args.seeds, args.rounds, args.ranks, args.sweep = 1, 8, [8], False
        args.eval_per_domain = 40
        args.only = args.only or ["fedavg", "fedsrd", "fedsrd (paper)"]
        if args.out == "benchmarks/results/quality":
            args.out = "benchmarks/results/quality-quick"
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.reuse:
        c.log(f"reused {reuse_runs(args.reuse, Path(args.out) / 'runs')} recorded runs")
    # Build the base model(s) first, once, in this process (two workers must not both do it).
    models = {_ablation_model(args, w) for w in args.widths} if args.ablation else {args.model}
    for m in sorted(models):
        resolve_model(m, args.cache_dir)
    t0 = time.perf_counter()
    summary = ablation_protocol(args) if args.ablation else main_protocol(args)
    summary.update(
        benchmark="quality", seconds=round(time.perf_counter() - t0, 1), protocol=_protocol(args)
    )
    (Path(args.out) / "summary.json").write_text(json.dumps(summary, indent=1))
    c.emit(summary)


if __name__ == "__main__":
    main()
