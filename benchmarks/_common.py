"""Shared helpers for the benchmarks: import path, synthetic rounds, timing, peak RSS."""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from fedsrd_core.layouts import LLAMA_3_2_3B, llama_layout
from fedsrd_core.state import GlobalState, Layout, LoraFactors, init_state

#: glibc raises its mmap threshold as large blocks are freed, after which freed tensors stay
#: in the heap and resident memory stops tracking live memory. A fixed threshold keeps every
#: tensor above 128 KiB in its own mapping, so peak RSS means what it says; it also makes
#: every large allocation fault its pages in, so memory is measured in a separate process
#: with this environment and never in the same run as the timings.
MEMORY_PROBE_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}

#: Two Llama-3.2-3B-shaped layers: the same module shapes at 1/14 of the size.
SMALL_LAYOUT: Layout = llama_layout(
    hidden=3072, intermediate=8192, n_layers=2, n_heads=24, n_kv_heads=8, head_dim=128
)
LAYOUTS: dict[str, Layout] = {"llama-3.2-3b": LLAMA_3_2_3B, "small": SMALL_LAYOUT}


def started_state(
    layout: Layout, rank: int, *, seed: int = 0, b_scale: float = 0.01
) -> GlobalState:
    """Global factors as after some rounds: peft-style random ``A`` and a non-zero ``B``."""
    s = init_state(layout, rank, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    for _, f in s.items():
        f.B.copy_(torch.randn(f.B.shape, generator=g) * b_scale)
    return s


def trained_copy(start: GlobalState, *, seed: int, scale: float = 1e-3) -> GlobalState:
    """A client's factors after local training, simulated as small random steps."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, f in start.items():
        out[name] = LoraFactors(
            f.A + torch.randn(f.A.shape, generator=g) * scale,
            f.B + torch.randn(f.B.shape, generator=g) * scale,
        )
    return GlobalState(out)


def _rss_bytes() -> tuple[int, int]:
    """Resident memory: all of it, and the anonymous part (``RssAnon``: what the process
    owns, without mapped files' pages, which belong to the page cache)."""
    rss = anon = 0
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
            elif line.startswith("RssAnon:"):
                anon = int(line.split()[1]) * 1024
    return rss, anon


@contextmanager
def peak_rss() -> Iterator[dict[str, int]]:
    """Sample resident memory every 2 ms; yields a dict filled with ``baseline`` and
    ``peak`` of the resident set and ``anon_baseline`` and ``anon_peak`` of its anonymous
    part (bytes)."""
    rss, anon = _rss_bytes()
    result = {"baseline": rss, "peak": 0, "anon_baseline": anon, "anon_peak": 0}
    stop = threading.Event()

    def sample() -> None:
        peak, anon_peak = result["baseline"], result["anon_baseline"]
        while True:
            rss, anon = _rss_bytes()
            peak, anon_peak = max(peak, rss), max(anon_peak, anon)
            if stop.is_set():
                break
            time.sleep(0.002)
        result["peak"], result["anon_peak"] = peak, anon_peak

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        yield result
    finally:
        stop.set()
        t.join()


def best_of(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Minimum wall time of ``repeats`` calls (the least-disturbed run) and the last result."""
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def emit(summary: dict[str, Any]) -> None:
    """Print the JSON summary as the last line of stdout."""
    sys.stdout.flush()
    print(json.dumps(summary, sort_keys=True))


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


MIB = 1024 * 1024
