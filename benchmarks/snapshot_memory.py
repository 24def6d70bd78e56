"""What storing and loading a round's snapshot costs a worker: memory and time, two ways.

    python benchmarks/snapshot_memory.py           # Llama-3.2-3B, r=64 (389 MB of factors)
    python benchmarks/snapshot_memory.py --quick   # 2 layers of the same shapes

Every round the aggregation worker loads the previous round's snapshot (the whole global
state) from the blob store and stores the new one. Side by side, in one run:

* **whole blob** (how the worker did it before): ``decode_snapshot(store.read_bytes(sha))``
  and ``store.put_bytes(encode_snapshot(state))``, the blob held in memory as ``bytes``;
* **pieces** (now): ``decode_snapshot`` from ``store.mapped(sha)`` (the local store maps
  the file) and ``store.put_pieces(snapshot_pieces(state))`` (the header, then views of the
  state's own factors, written one by one).

Each case runs in a fresh process with a fixed mmap threshold (``_common.MEMORY_PROBE_ENV``)
that samples its anonymous resident memory (``RssAnon``: what the process owns; a mapped
file's pages are the page cache's and can be dropped) and its total RSS every 2 ms. Figures
are increases over the process's baseline: for "store", with the state already in memory;
for "load", from nothing. Times are the min of ``--repeats`` in-process runs, measured
separately from the memory probe.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import _common as c

from api.blobstore import LocalBlobStore
from fedsrd_core.snapshot import decode_snapshot, encode_snapshot, snapshot_pieces
from fedsrd_core.state import GlobalState, state_digest

RANK = 64


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


@contextmanager
def peak_memory() -> Iterator[dict[str, float]]:
    """Peak increase of RssAnon and of RSS (MiB) while the block runs, sampled every 2 ms."""
    base = {"anon": _status_kib("RssAnon"), "rss": _status_kib("VmRSS")}
    peak = dict(base)
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak["anon"] = max(peak["anon"], _status_kib("RssAnon"))
            peak["rss"] = max(peak["rss"], _status_kib("VmRSS"))
            time.sleep(0.002)

    out: dict[str, float] = {}
    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        yield out
    finally:
        stop.set()
        t.join()
        peak["anon"] = max(peak["anon"], _status_kib("RssAnon"))
        peak["rss"] = max(peak["rss"], _status_kib("VmRSS"))
        out["anon_mib"] = round((peak["anon"] - base["anon"]) / 1024, 1)
        out["rss_mib"] = round((peak["rss"] - base["rss"]) / 1024, 1)


def layout_of(quick: bool) -> dict[str, tuple[int, int]]:
    return dict(c.LAYOUTS["small" if quick else "llama-3.2-3b"])


def load_whole(store: LocalBlobStore, sha: str, layout: dict[str, tuple[int, int]]) -> GlobalState:
    return decode_snapshot(store.read_bytes(sha), layout, RANK)


def load_pieces(store: LocalBlobStore, sha: str, layout: dict[str, tuple[int, int]]) -> GlobalState:
    with store.mapped(sha) as view:
        return decode_snapshot(view, layout, RANK)


def store_whole(store: LocalBlobStore, state: GlobalState) -> str:
    return store.put_bytes(encode_snapshot(state)).sha256


def store_pieces(store: LocalBlobStore, state: GlobalState) -> str:
    return store.put_pieces(snapshot_pieces(state)).sha256


LOADERS: dict[str, Callable[[LocalBlobStore, str, dict[str, tuple[int, int]]], GlobalState]] = {
    "whole": load_whole,
    "pieces": load_pieces,
}
STORERS: dict[str, Callable[[LocalBlobStore, GlobalState], str]] = {
    "whole": store_whole,
    "pieces": store_pieces,
}


def probe(args: argparse.Namespace) -> None:
    """Child process: one operation, its peak memory, as JSON on stdout."""
    store = LocalBlobStore(args.store)
    layout = layout_of(args.quick)
    op, way = args.probe.split(":")
    if op == "load":
        with peak_memory() as mem:
            state = LOADERS[way](store, args.sha, layout)
        assert state_digest(state) == args.digest
    else:
        state = c.started_state(layout, RANK)
        with peak_memory() as mem:
            sha = STORERS[way](store, state)
        assert sha == args.sha
    print(json.dumps(mem))


def run_probe(args: argparse.Namespace, which: str, store: Path, sha: str, digest: str) -> Any:
    cmd = [sys.executable, __file__, "--probe", which, "--store", str(store), "--sha", sha]
    cmd += ["--digest", digest] + (["--quick"] if args.quick else [])
    proc = subprocess.run(
        cmd, env={**os.environ, **c.MEMORY_PROBE_ENV}, capture_output=True, text=True, check=True
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="2 layers instead of 28")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--probe", help=argparse.SUPPRESS)
    ap.add_argument("--store", help=argparse.SUPPRESS)
    ap.add_argument("--sha", help=argparse.SUPPRESS)
    ap.add_argument("--digest", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.probe:
        probe(args)
        return

    layout = layout_of(args.quick)
    state = c.started_state(layout, RANK)
    digest = state_digest(state)
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        store = LocalBlobStore(Path(tmp) / "blobs")
        sha = store_pieces(store, state)
        size = store.size(sha)
        c.log(f"snapshot: {len(layout)} modules, {size / c.MIB:.1f} MiB")
        for way in ("whole", "pieces"):
            # Each store rewrites the same content: the store finds it and keeps the file,
            # after doing all the work (hash, temp file, fsync) a new blob costs.
            secs, got = c.best_of(lambda w=way: STORERS[w](store, state), args.repeats)
            assert got == sha
            results[f"store_{way}"] = {"seconds": round(secs, 4)}
            secs, loaded = c.best_of(lambda w=way: LOADERS[w](store, sha, layout), args.repeats)
            assert state_digest(loaded) == digest
            del loaded
            results[f"load_{way}"] = {"seconds": round(secs, 4)}
        for key in results:
            op, way = key.split("_")
            results[key].update(run_probe(args, f"{op}:{way}", store.root, sha, digest))
            c.log(f"{key}: {results[key]}")

    summary: dict[str, Any] = {
        "benchmark": "snapshot_memory",
        "layout": "small" if args.quick else "llama-3.2-3b",
        "rank": RANK,
        "modules": len(layout),
        "snapshot_mib": round(size / c.MIB, 1),
        "results": results,
        "note": "anon_mib: peak RssAnon increase (private memory); rss_mib includes mapped "
        "file pages; store: over a process already holding the state; load: from nothing",
    }
    for op in ("store", "load"):
        whole, pieces = results[f"{op}_whole"], results[f"{op}_pieces"]
        summary[f"{op}_anon_pieces_over_whole"] = round(pieces["anon_mib"] / whole["anon_mib"], 3)
        summary[f"{op}_time_pieces_over_whole"] = round(pieces["seconds"] / whole["seconds"], 3)
    c.emit(summary)


if __name__ == "__main__":
    main()
