"""What a worker's aggregation round costs in memory, and its snapshot I/O, two ways each.

    python benchmarks/snapshot_memory.py           # Llama-3.2-3B, r=64 (389 MB of factors)
    python benchmarks/snapshot_memory.py --quick   # 2 layers of the same shapes

Every round the aggregation worker loads the previous round's snapshot (the whole global
state) from the blob store, runs the server step on the clients' uploads, and stores the
global delta and the new snapshot. Side by side, in one run:

* **round**: the whole aggregation as the worker did it before (``load_state`` by
  ``read_bytes`` + ``decode_snapshot``, ``strategy.server_round`` on the whole state,
  encode and apply the delta, ``state_digest``, ``put_bytes`` of the delta and of
  ``encode_snapshot``) against ``fedsrd_core.server.stream_server_round`` from
  ``store.mapped`` into a blob writer (what it does now), on 4 real FedSRD uploads (round 2);

* **whole blob** (how the worker did it before): ``decode_snapshot(store.read_bytes(sha))``
  and ``store.put_bytes(encode_snapshot(state))``, the blob held in memory as ``bytes``;
* **pieces** (now): ``decode_snapshot`` from ``store.mapped(sha)`` (the local store maps
  the file) and ``store.put_pieces(snapshot_pieces(state))`` (the header, then views of the
  state's own factors, written one by one).

Each case runs in a fresh process with a fixed mmap threshold (``_common.MEMORY_PROBE_ENV``)
that samples its anonymous resident memory (``RssAnon``: what the process owns; a mapped
file's pages are the page cache's and can be dropped) and its total RSS every 2 ms. Figures
are increases over the process's baseline: for "store", with the state already in memory;
for "load", from nothing; for "round", from a process holding the coded uploads. Times are
the min of ``--repeats`` in-process runs (one for "round"), measured apart from the memory
probes; both rounds must produce the same delta, snapshot and digest.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import _common as c
from server_step import make_uploads as server_upload

from api.blobstore import LocalBlobStore
from fedsrd_core.codec import LazyBlob, encode
from fedsrd_core.server import stream_server_round
from fedsrd_core.snapshot import (
    decode_global_delta,
    decode_snapshot,
    encode_snapshot,
    snapshot_pieces,
)
from fedsrd_core.state import GlobalState, state_digest
from fedsrd_core.strategies import RoundContext, Upload, get_strategy

CLIENTS = 4
ROUND = RoundContext(round=2, seed=1)

RANK = 64


@contextmanager
def peak_memory() -> Iterator[dict[str, float]]:
    """Peak increase of RssAnon and of RSS (MiB) while the block runs (``_common.peak_rss``)."""
    out: dict[str, float] = {}
    with c.peak_rss() as mem:
        yield out
    out["anon_mib"] = round((mem["anon_peak"] - mem["anon_baseline"]) / c.MIB, 1)
    out["rss_mib"] = round((mem["peak"] - mem["baseline"]) / c.MIB, 1)


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


def round_whole(
    store: LocalBlobStore, sha: str, layout: dict[str, tuple[int, int]], uploads: list[Upload]
) -> tuple[str, str, str]:
    strategy = get_strategy("fedsrd")
    state = load_whole(store, sha, layout)
    down = encode(strategy.server_round(state, uploads, ROUND))
    strategy.apply_global(state, decode_global_delta(down, layout, RANK))
    digest = state_digest(state)
    delta = store.put_bytes(down).sha256
    return delta, store.put_bytes(encode_snapshot(state)).sha256, digest


def round_streamed(
    store: LocalBlobStore, sha: str, layout: dict[str, tuple[int, int]], uploads: list[Upload]
) -> tuple[str, str, str]:
    strategy = get_strategy("fedsrd")
    with store.mapped(sha) as view, store.writer() as w:
        done = stream_server_round(strategy, view, layout, RANK, uploads, ROUND, w.write)
        snap = w.commit().sha256
    return store.put_pieces(done.delta_pieces).sha256, snap, done.digest


ROUNDS = {"whole": round_whole, "streamed": round_streamed}


def read_uploads(store: LocalBlobStore, shas: list[str]) -> list[Upload]:
    """The round's uploads as the worker holds them: coded blobs, decoded lazily."""
    return [Upload(LazyBlob(store.read_bytes(s))) for s in shas]


def make_uploads(store: LocalBlobStore, start: GlobalState) -> list[str]:
    """Real FedSRD client uploads (``server_step.make_uploads``), stored as blobs."""
    return [store.put_bytes(encode(u.tensors)).sha256 for u in server_upload(start, CLIENTS)]


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
    elif op == "round":
        uploads = read_uploads(store, args.uploads.split(","))
        with peak_memory() as mem:
            got = ROUNDS[way](store, args.sha, layout, uploads)
        assert ",".join(got) == args.digest
    else:
        state = c.started_state(layout, RANK)
        with peak_memory() as mem:
            sha = STORERS[way](store, state)
        assert sha == args.sha
    print(json.dumps(mem))


def run_probe(
    args: argparse.Namespace, which: str, store: Path, sha: str, digest: str, uploads: list[str]
) -> Any:
    cmd = [sys.executable, __file__, "--probe", which, "--store", str(store), "--sha", sha]
    cmd += ["--digest", digest, "--uploads", ",".join(uploads)]
    cmd += ["--quick"] if args.quick else []
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
    ap.add_argument("--uploads", help=argparse.SUPPRESS)
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
        shas = make_uploads(store, state)
        upload_mib = sum(store.size(u) for u in shas) / c.MIB
        c.log(f"{CLIENTS} uploads, {upload_mib:.1f} MiB coded")
        outputs = {}
        for way in ("whole", "streamed"):
            uploads = read_uploads(store, shas)
            secs, got = c.best_of(lambda w=way, u=uploads: ROUNDS[w](store, sha, layout, u), 1)
            results[f"round_{way}"] = {"seconds": round(secs, 4)}
            outputs[way] = ",".join(got)
        if outputs["whole"] != outputs["streamed"]:
            raise RuntimeError(f"the two rounds disagree: {outputs}")
        for key in results:
            op, way = key.split("_")
            expect = outputs["whole"] if op == "round" else digest
            results[key].update(run_probe(args, f"{op}:{way}", store.root, sha, expect, shas))
            c.log(f"{key}: {results[key]}")

    summary: dict[str, Any] = {
        "benchmark": "snapshot_memory",
        "layout": "small" if args.quick else "llama-3.2-3b",
        "rank": RANK,
        "modules": len(layout),
        "snapshot_mib": round(size / c.MIB, 1),
        "uploads_mib": round(upload_mib, 1),
        "round_outputs_identical": True,
        "results": results,
        "note": "anon_mib: peak RssAnon increase (private memory); rss_mib includes mapped "
        "file pages; store: over a process already holding the state; load: from nothing; "
        "round: over a process holding the coded uploads; new = pieces / streamed",
    }
    for op, new_way in (("store", "pieces"), ("load", "pieces"), ("round", "streamed")):
        whole, pieces = results[f"{op}_whole"], results[f"{op}_{new_way}"]
        summary[f"{op}_anon_new_over_whole"] = round(pieces["anon_mib"] / whole["anon_mib"], 3)
        summary[f"{op}_time_new_over_whole"] = round(pieces["seconds"] / whole["seconds"], 3)
    c.emit(summary)


if __name__ == "__main__":
    main()
