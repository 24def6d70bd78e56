"""Snapshots written in pieces and read from a mapped file: same bytes, no blob-sized copy.

A worker stores a snapshot (the whole global state, 389 MB for Llama-3.2-3B at r=64) every
round and loads the previous one. These tests check that the piecewise writer produces the
exact blob ``encode_snapshot`` does, that the pieces of float32 factors are views of the
state (no copy), and, with ``tracemalloc`` (which sees every Python buffer, not torch's
storage, but does see the decoded factors, which the codec builds on bytearrays), that
neither storing nor loading through the store makes a Python copy of the blob, while the
all-in-memory path it replaced does (so the measurement can fail).
"""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from api.blobstore import LocalBlobStore
from fedsrd_core.codec import encode, encode_pieces
from fedsrd_core.snapshot import (
    decode_snapshot,
    encode_snapshot,
    snapshot_pieces,
)
from fedsrd_core.sparse import SparseTensor
from fedsrd_core.state import GlobalState, LoraFactors, state_digest

LAYOUT = {f"model.layers.{i}.mlp.up_proj": (768, 256) for i in range(6)}
RANK = 16


def make_state(seed: int = 0) -> GlobalState:
    g = torch.Generator().manual_seed(seed)
    return GlobalState(
        {
            name: LoraFactors(
                torch.randn(RANK, d_in, generator=g), torch.randn(d_out, RANK, generator=g)
            )
            for name, (d_out, d_in) in LAYOUT.items()
        }
    )


def traced_peak(fn: Callable[[], Any]) -> tuple[int, Any]:
    """Peak bytes of Python allocations while ``fn`` runs, and its result."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        out = fn()
        return tracemalloc.get_traced_memory()[1] - base, out
    finally:
        tracemalloc.stop()


def test_pieces_join_to_the_encoded_blob_and_alias_float32_factors() -> None:
    state = make_state()
    blob = encode_snapshot(state)
    pieces = snapshot_pieces(state)
    assert b"".join(pieces) == blob
    assert len(pieces) == 1 + 2 * len(LAYOUT)  # the header, then one piece per factor
    for piece, name in zip(pieces[1::2], sorted(LAYOUT), strict=True):
        assert np.shares_memory(np.frombuffer(piece, dtype=np.uint8), state[name].A.numpy())


def test_encode_pieces_of_mixed_entries_and_its_errors() -> None:
    g = torch.Generator().manual_seed(3)
    tensors = {
        "dense": torch.randn(5, 7, generator=g),
        "sparse": SparseTensor((40,), torch.tensor([1, 9, 30]), torch.randn(3, generator=g)),
        "empty": torch.zeros(0, 3),
    }
    for vd in ("fp32", "bf16", "fp16"):
        assert b"".join(encode_pieces(tensors, value_dtype=vd)) == encode(tensors, value_dtype=vd)
    bad = {**tensors, "later": torch.tensor([1.0, float("nan")])}
    with pytest.raises(ValueError, match="'later': non-finite value"):
        encode_pieces(bad)  # raised before a single piece is handed out


def test_store_in_pieces_makes_no_copy_of_the_blob(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    state = make_state(1)
    size = len(encode_snapshot(state))
    peak_pieces, ref = traced_peak(lambda: store.put_pieces(snapshot_pieces(state)))
    peak_bytes, ref_bytes = traced_peak(lambda: store.put_bytes(encode_snapshot(state)))
    assert ref == ref_bytes and ref.size == size
    assert peak_bytes >= size  # the whole-blob path holds it (at least once)
    assert peak_pieces < size // 8, (peak_pieces, size)


def test_decode_from_the_mapped_file_makes_no_copy_of_the_blob(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    state = make_state(2)
    ref = store.put_pieces(snapshot_pieces(state))

    def mapped() -> GlobalState:
        with store.mapped(ref.sha256) as view:
            return decode_snapshot(view, LAYOUT, RANK)

    peak_mapped, loaded = traced_peak(mapped)
    peak_read, loaded_read = traced_peak(
        lambda: decode_snapshot(store.read_bytes(ref.sha256), LAYOUT, RANK)
    )
    assert state_digest(loaded) == state_digest(loaded_read) == state_digest(state)
    # Decoded factors are Python buffers too (the codec copies into a bytearray the tensor
    # then owns), so both paths trace the state; reading the blob into memory adds its copy.
    factors = state.num_parameters() * 4
    assert peak_read >= factors + ref.size
    assert peak_mapped < factors + ref.size // 8, (peak_mapped, factors, ref.size)
    # The decoded factors own their memory: they outlive the map.
    assert torch.equal(loaded[sorted(LAYOUT)[0]].A, state[sorted(LAYOUT)[0]].A)
