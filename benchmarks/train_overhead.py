"""Local round overhead: ``fedsrd_core.training.local_round`` against a plain loop.

    python benchmarks/train_overhead.py            # 7 alternating repeats
    python benchmarks/train_overhead.py --quick    # 3 repeats

On the project's tiny model with LoRA r=8 on all linear layers: the library's local round
(template, tokenisation, batching, fresh AdamW, loss, reading the factors back) against a
hand-written transformers + peft loop doing the same steps on the same batches (same
tokenisation, same order), run alternately in one process (min of the repeats; the ratio is
what to read on a shared machine). Then the FedSRD client's sparsify + encode as a share of
the local round, for the tiny model, and its absolute time for a Llama-3.2-3B-shaped adapter
(r=64, 196 modules; a 3B local round cannot run on this CPU, so that share is left to a GPU),
and the peak resident-memory increase of that sparsify + encode, measured in a separate
process, next to the size of the largest dense ``d_out x d_in`` module matrix.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings

import _common as c
import torch
from transformers.utils import logging as hf_logging

from fedsrd_core.codec import encode
from fedsrd_core.data import generate
from fedsrd_core.modeling import load_causal_lm
from fedsrd_core.peft_lora import (
    adapter_layout,
    attach_lora,
    lora_config,
    set_trainable,
    state_to_peft,
)
from fedsrd_core.state import init_state
from fedsrd_core.strategies import RoundContext, get_strategy
from fedsrd_core.tiny_assets import tiny_model_path
from fedsrd_core.training import TrainConfig, collate, local_round, tokenize


def plain_loop(model, tokenizer, examples, cfg: TrainConfig, seed: int) -> float:
    """The reference: a plain peft training loop over the same batches."""
    data = [tokenize(e, tokenizer, cfg.seq_len) for e in examples]
    params = set_trainable(model, frozenset({"A", "B"}))
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    model.train()
    t0 = time.perf_counter()
    for _ in range(cfg.steps):
        opt.zero_grad(set_to_none=True)
        idx: list[int] = []
        while len(idx) < cfg.batch_size:
            if not order:
                order = torch.randperm(len(data), generator=gen).tolist()
            idx.append(order.pop())
        ids, mask, labels = collate([data[i] for i in idx], tokenizer.pad_token_id)
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or 1e9)
        opt.step()
    model.eval()
    return time.perf_counter() - t0


def memory_probe(layout_name: str) -> None:
    """Child process: peak RSS increase while one Llama-3B-shaped upload is sparsified and
    encoded (inputs are rebuilt from seeds; the fixed mmap threshold makes RSS track live
    memory, see benchmarks/_common.py)."""
    start = c.started_state(c.LAYOUTS[layout_name], 64)
    trained = c.trained_copy(start, seed=1)
    strat = get_strategy("fedsrd")
    with c.peak_rss() as mem:
        blob = encode(strat.client_upload(start, trained, RoundContext(round=1)))
    print(
        json.dumps(
            {
                "peak_rss_increase_mib": (mem["peak"] - mem["baseline"]) / c.MIB,
                "blob_mib": len(blob) / c.MIB,
            }
        )
    )


def measure_memory(layout_name: str) -> dict[str, float]:
    proc = subprocess.run(
        [sys.executable, __file__, "--memory-probe", layout_name],
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
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--cache-dir", default="/tmp/fedsrd-cache")
    ap.add_argument("--memory-probe", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_probe:
        memory_probe(args.memory_probe)
        return
    repeats = 3 if args.quick else args.repeats
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")

    model, tok = load_causal_lm(str(tiny_model_path(args.cache_dir)))
    pm = attach_lora(model, lora_config(rank=8))
    examples = generate("arithmetic", 128, seed=0)
    cfg = TrainConfig(steps=10, batch_size=8, seq_len=384, lr=1e-3)
    start = init_state(adapter_layout(pm), 8, seed=0)
    ours, plain = [], []
    trained = start
    for i in range(repeats):
        t0 = time.perf_counter()
        trained, _ = local_round(pm, tok, examples, start, cfg, seed=i)
        ours.append(time.perf_counter() - t0)
        state_to_peft(start, pm)
        plain.append(plain_loop(pm, tok, examples, cfg, seed=i))
        c.log(f"repeat {i}: local_round {ours[-1]:.3f}s, plain loop {plain[-1]:.3f}s")
    round_s = min(ours)

    strat = get_strategy("fedsrd")
    ctx = RoundContext(round=1)

    def sparsify_encode(s, t) -> bytes:
        return encode(strat.client_upload(s, t, ctx))

    tiny_se, _ = c.best_of(lambda: sparsify_encode(start, trained), repeats)

    big_layout = "small" if args.quick else "llama-3.2-3b"
    big_start = c.started_state(c.LAYOUTS[big_layout], 64)
    big_trained = c.trained_copy(big_start, seed=1)
    big_se, blob = c.best_of(lambda: sparsify_encode(big_start, big_trained), 1)
    summary = {
        "benchmark": "train_overhead",
        "model": "tiny (124k parameters), LoRA r=8 all-linear",
        "round": cfg.to_dict(),
        "repeats": repeats,
        "local_round_seconds": round(round_s, 4),
        "plain_loop_seconds": round(min(plain), 4),
        "local_round_over_plain": round(round_s / min(plain), 4),
        "tiny_sparsify_encode_seconds": round(tiny_se, 4),
        "tiny_sparsify_encode_share_of_round": round(tiny_se / round_s, 4),
        "llama_3b_adapter": "small (2 layers)" if args.quick else "llama-3.2-3b (196 modules)",
        "llama_3b_sparsify_encode_seconds": round(big_se, 3),
        "llama_3b_upload_mib": round(len(blob) / c.MIB, 2),
        "llama_3b_sparsify_encode_peak_rss_increase_mib": round(
            measure_memory(big_layout)["peak_rss_increase_mib"], 1
        ),
        "largest_dense_module_matrix_mib": round(
            max(o * i for o, i in c.LAYOUTS[big_layout].values()) * 4 / c.MIB, 1
        ),
        "targets": {"local_round_over_plain": 1.05, "sparsify_encode_share": 0.02},
    }
    c.emit(summary)


if __name__ == "__main__":
    main()
