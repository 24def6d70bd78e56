"""``fedsrd``: command-line entry points (``fedsrd simulate``, ``fedsrd bench-model``)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

DEFAULT_CACHE = Path(os.environ.get("FEDSRD_CACHE", Path.home() / ".cache" / "fedsrd"))


def add_simulate_command(sub: Any) -> None:
    p = sub.add_parser(
        "simulate",
        help="run a whole federation in one process",
        description="Simulate N clients fine-tuning one LoRA adapter with a strategy; every "
        "exchange goes through the real wire codec. Writes record.json and report.md.",
    )
    p.add_argument(
        "--model",
        default="tiny",
        help="'tiny' (built and cached locally), 'bench' (the quality benchmark's model; "
        "`fedsrd bench-model` builds it) or a local path / hub id of a causal LM (never downloaded "
        "unless --allow-download)",
    )
    p.add_argument("--allow-download", action="store_true")
    p.add_argument(
        "--clients",
        type=int,
        default=None,
        help="clients of an iid or dirichlet partition (default 4); the domain partition has "
        "one client per domain, and --data one per file",
    )
    p.add_argument("--partition", choices=["domain", "iid", "dirichlet"], default="domain")
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration")
    p.add_argument("--train-per-domain", type=int, default=200)
    p.add_argument("--eval-per-domain", type=int, default=40)
    p.add_argument(
        "--data",
        nargs="*",
        default=None,
        help="per-client local files instead of generated domains: JSON lines (Alpaca "
        "instruction/input/output, chat {'messages': [...]}, or prompt/completion) or plain text",
    )
    p.add_argument(
        "--eval",
        nargs="+",
        default=None,
        metavar="FILE",
        help="held-out files (same formats as --data) to evaluate on, each its own set, "
        "instead of the generated domains' evaluation sets",
    )
    p.add_argument("--strategy", default="fedsrd", help="one of: " + ", ".join(_strategies()))
    p.add_argument("--strategy-config", default="{}", help="JSON overrides of its defaults")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--participation", type=float, default=1.0)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=384)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--value-dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--exact-match",
        type=int,
        default=0,
        help="eval examples per set scored by greedy exact match",
    )
    p.add_argument(
        "--diagnostics",
        action="store_true",
        help="record what FedSRD's server step did to each module, per round (dense: small "
        "models only)",
    )
    p.add_argument("--out", default="runs/simulation")
    p.add_argument("--cache-dir", default=str(DEFAULT_CACHE))
    p.add_argument("--quiet", action="store_true", help="no progress bar")


class UsageError(Exception):
    """A bad option or input file: one line on stderr and exit status 2, no traceback."""


def _strategies() -> list[str]:
    from fedsrd_core.strategies import available_strategies

    return list(available_strategies())


def run_simulate(args: argparse.Namespace) -> int:
    try:
        return _simulate(args)
    except UsageError as e:
        print(f"fedsrd simulate: error: {e}", file=sys.stderr)
        return 2


def _simulation_config(args: argparse.Namespace) -> Any:
    from fedsrd_core.simulation import SimulationConfig
    from fedsrd_core.training import TrainConfig

    if args.strategy not in _strategies():
        raise UsageError(f"unknown --strategy {args.strategy!r}; known: {', '.join(_strategies())}")
    try:
        overrides = json.loads(args.strategy_config)
    except json.JSONDecodeError as e:
        raise UsageError(f"--strategy-config is not valid JSON: {e}") from e
    if not isinstance(overrides, dict):
        raise UsageError("--strategy-config must be a JSON object, e.g. '{\"density\": 0.1}'")
    try:
        return SimulationConfig(
            strategy=args.strategy,
            strategy_config=overrides,
            rounds=args.rounds,
            participation=args.participation,
            dropout=args.dropout,
            rank=args.rank,
            train=TrainConfig(
                steps=args.steps,
                batch_size=args.batch_size,
                grad_accum=args.grad_accum,
                seq_len=args.seq_len,
                lr=args.lr,
            ),
            value_dtype=args.value_dtype,
            seed=args.seed,
            eval_exact_match=args.exact_match,
            diagnostics=args.diagnostics,
        )
    except (ValueError, TypeError) as e:  # the strategy's config validates itself
        raise UsageError(f"{e} (--strategy {args.strategy} --strategy-config)") from e


def _client_data(args: argparse.Namespace) -> list[list[Any]]:
    from fedsrd_core.data import (
        DOMAINS,
        generate,
        partition_by_domain,
        partition_dirichlet,
        partition_iid,
    )

    if args.data:
        if args.clients is not None and args.clients != len(args.data):
            raise UsageError(
                f"--clients {args.clients} with {len(args.data)} --data files: each file is "
                "one client's data"
            )
        return [_load(p) for p in args.data]
    if args.partition == "domain":
        # The API refuses the same combination: a domain partition has one client per domain.
        if args.clients is not None and args.clients != len(DOMAINS):
            raise UsageError(
                f"--clients {args.clients} with --partition domain: that partition has one "
                f"client per domain ({len(DOMAINS)}: {', '.join(DOMAINS)}); use --partition "
                "iid or dirichlet for another number"
            )
    elif args.clients is not None and args.clients < 1:
        raise UsageError(f"--clients must be >= 1, got {args.clients}")
    train = [e for d in DOMAINS for e in generate(d, args.train_per_domain, seed=args.seed)]
    clients = 4 if args.clients is None else args.clients
    if args.partition == "domain":
        return [list(c) for c in partition_by_domain(train)]
    if args.partition == "iid":
        return [list(c) for c in partition_iid(train, clients, seed=args.seed)]
    return [list(c) for c in partition_dirichlet(train, clients, args.alpha, seed=args.seed)]


def _load(path: str) -> list[Any]:
    from fedsrd_core.data import DataError, load_examples

    try:
        return load_examples(path)
    except DataError as e:
        raise UsageError(str(e)) from e


def _eval_sets(args: argparse.Namespace) -> dict[str, list[Any]]:
    from fedsrd_core.data import DOMAINS, OOD_DOMAINS, generate

    if not args.eval:
        return {
            d: generate(d, args.eval_per_domain, seed=args.seed, split="eval")
            for d in (*DOMAINS, *OOD_DOMAINS)
        }
    stems = [Path(f).stem for f in args.eval]
    # Each file is one set, named by its file name (its path where two names collide).
    names = [s if stems.count(s) == 1 else f for s, f in zip(stems, args.eval, strict=True)]
    return {name: _load(f) for name, f in zip(names, args.eval, strict=True)}


def _simulate(args: argparse.Namespace) -> int:
    from fedsrd_core.data import shortest_seq_len
    from fedsrd_core.modeling import ModelLoadError, load_causal_lm, load_tokenizer
    from fedsrd_core.simulation import simulate, write_outputs

    config = _simulation_config(args)
    clients = _client_data(args)
    eval_sets = _eval_sets(args)
    path = resolve_model(args.model, args.cache_dir)
    try:
        tokenizer = load_tokenizer(str(path), allow_download=args.allow_download)
        shortest = shortest_seq_len(tokenizer)
        prompted = any(
            not e.is_plain_text for data in (*clients, *eval_sets.values()) for e in data
        )
        if prompted and args.seq_len < shortest:
            raise UsageError(
                f"--seq-len {args.seq_len} cannot hold the prompt template with this model's "
                f"tokenizer: the smallest length that fits it and one response token is "
                f"{shortest}"
            )
        model, tokenizer = load_causal_lm(str(path), allow_download=args.allow_download)
    except ModelLoadError as e:
        raise UsageError(str(e)) from e

    bar: Any = None
    if not args.quiet and sys.stderr.isatty():
        from tqdm import tqdm  # type: ignore[import-untyped]

        bar = tqdm(
            total=config.rounds * max(1, round(config.participation * len(clients))),
            unit="client",
            file=sys.stderr,
        )

    def progress(msg: str) -> None:
        if bar is not None:
            bar.set_description(msg)
            bar.update(1)
        elif not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    result = simulate(model, tokenizer, clients, eval_sets, config, progress=progress)
    if bar is not None:
        bar.close()
    rec, rep = write_outputs(result, args.out)
    print(rep.read_text())
    print(f"record: {rec}\nreport: {rep}", file=sys.stderr)
    return 0


def resolve_model(name: str, cache_dir: str | Path) -> str:
    """The directory of a project-built model (``tiny``, ``bench``, ``bench-<width>``),
    built on first use; any other name is returned as it is (a path or hub id)."""
    if name == "tiny":
        from fedsrd_core.tiny_assets import tiny_model_path

        return str(tiny_model_path(cache_dir))
    if name == "bench" or name.startswith("bench-"):
        from fedsrd_core.modeling.bench import BenchModelSpec, bench_model_dir

        width = 256 if name == "bench" else int(name.removeprefix("bench-"))
        return str(
            bench_model_dir(
                cache_dir,
                BenchModelSpec.of_width(width),
                log=lambda line: print(f"bench model: {line}", file=sys.stderr, flush=True),
            )
        )
    return name


def add_bench_model_command(sub: Any) -> None:
    p = sub.add_parser(
        "bench-model",
        help="build (once) the quality benchmark's base model",
        description="Build and pre-train the quality testbed's Llama model offline (a BPE "
        "tokenizer and the model, on the Python standard library's sources and the generated "
        "domains), cache it, and print its directory and metadata. About 30 minutes on a "
        "2-core CPU for the default width; instant once cached.",
    )
    p.add_argument(
        "--width",
        type=int,
        default=256,
        help="hidden size (256; 64 and 512 for the width ablation)",
    )
    p.add_argument("--cache-dir", default=str(DEFAULT_CACHE))


def run_bench_model(args: argparse.Namespace) -> int:
    from fedsrd_core.modeling.bench import bench_model_metadata

    path = resolve_model(f"bench-{args.width}", args.cache_dir)
    meta = bench_model_metadata(path)
    summary = {
        "path": path,
        "num_parameters": meta.get("num_parameters"),
        "build_seconds": meta.get("build_seconds"),
        "final_held_out_loss": (meta.get("pretrain") or {}).get("final_held_out_loss"),
        "fingerprint": meta.get("fingerprint"),
    }
    print(json.dumps(summary))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fedsrd`` command."""
    parser = argparse.ArgumentParser(prog="fedsrd", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    add_simulate_command(sub)
    add_bench_model_command(sub)
    args = parser.parse_args(argv)
    commands = {"simulate": run_simulate, "bench-model": run_bench_model}
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
