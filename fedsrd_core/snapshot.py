"""Snapshots: the whole global state as one wire-format blob (dense float32 factors).

A client that is far behind (or new) loads a snapshot instead of replaying every global
delta; the server keeps one per round and aggregates from the previous round's. Values are
float32, so a decoded snapshot is bit-identical to the state it was made from and has the
same :func:`fedsrd_core.state.state_digest`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fedsrd_core.codec import WireFormatError, decode, encode, encode_pieces, inspect
from fedsrd_core.sparse import SparseTensor
from fedsrd_core.state import A_SUFFIX, B_SUFFIX, GlobalState, LoraFactors


def snapshot_shapes(layout: Mapping[str, tuple[int, int]], rank: int) -> dict[str, tuple[int, int]]:
    """Wire name -> shape of every factor for ``layout`` (module -> ``(d_out, d_in)``)."""
    shapes: dict[str, tuple[int, int]] = {}
    for name in sorted(layout):
        d_out, d_in = layout[name]
        shapes[name + A_SUFFIX] = (rank, d_in)
        shapes[name + B_SUFFIX] = (d_out, rank)
    return shapes


def snapshot_tensors(state: GlobalState) -> dict[str, torch.Tensor]:
    """The entries of the state's snapshot: dense float32 ``<module>.lora_A`` (r x d_in) and
    ``<module>.lora_B`` (d_out x r), in sorted module order (CPU float32 factors are not
    copied)."""
    tensors: dict[str, torch.Tensor] = {}
    for name in sorted(state):
        f = state[name]
        tensors[name + A_SUFFIX] = f.A.detach().to("cpu", torch.float32)
        tensors[name + B_SUFFIX] = f.B.detach().to("cpu", torch.float32)
    return tensors


def encode_snapshot(state: GlobalState) -> bytes:
    """The state as one snapshot blob (:func:`snapshot_tensors`, float32 values)."""
    return encode(snapshot_tensors(state), value_dtype="fp32")


def snapshot_pieces(state: GlobalState) -> list[memoryview]:
    """The blob of :func:`encode_snapshot` in pieces (:func:`fedsrd_core.codec.encode_pieces`):
    the header, then views of the state's own factors. Write them before changing the state;
    the blob is never assembled in memory."""
    return encode_pieces(snapshot_tensors(state), value_dtype="fp32")


def decode_snapshot(
    data: bytes | bytearray | memoryview, layout: Mapping[str, tuple[int, int]], rank: int
) -> GlobalState:
    """Parse a snapshot of the given layout and rank back into a :class:`GlobalState`.

    Raises:
        WireFormatError: malformed blob, or names/shapes other than the layout's, or a
            sparse entry (snapshots are dense).
    """
    tensors = decode(data, expected_shapes=snapshot_shapes(layout, rank))
    return GlobalState({name: snapshot_factors(tensors, name) for name in sorted(layout)})


def snapshot_factors(
    entries: Mapping[str, torch.Tensor | SparseTensor], module: str
) -> LoraFactors:
    """One module's factors from a snapshot's (decoded or lazily decoded) entries.

    Raises:
        WireFormatError: an entry is sparse (snapshots are dense).
    """
    A, B = entries[module + A_SUFFIX], entries[module + B_SUFFIX]
    if not isinstance(A, torch.Tensor) or not isinstance(B, torch.Tensor):
        raise WireFormatError(f"snapshot entry of {module!r} is sparse; snapshots are dense")
    return LoraFactors(A, B)


def shape_state(layout: Mapping[str, tuple[int, int]], rank: int) -> GlobalState:
    """A state of ``meta`` tensors with the layout's shapes: answers shape questions
    (``Strategy.upload_shapes``) for a layout without allocating its factors."""
    return GlobalState(
        {
            name: LoraFactors(
                torch.empty(rank, d_in, device="meta"), torch.empty(d_out, rank, device="meta")
            )
            for name, (d_out, d_in) in sorted(layout.items())
        }
    )


def decode_global_delta(
    data: bytes | bytearray | memoryview, layout: Mapping[str, tuple[int, int]], rank: int
) -> dict[str, torch.Tensor | SparseTensor]:
    """Decode a global delta: any subset of the layout's factors (FedSRD's alternating step
    sends only ``A`` or only ``B`` updates), each with its factor's exact shape.

    Raises:
        WireFormatError: malformed blob, or a name outside the layout, or a wrong shape.
    """
    full = snapshot_shapes(layout, rank)
    names = [info.name for info in inspect(data, max_numel=_max_numel(full))]
    unknown = [n for n in names if n not in full]
    if unknown:
        raise WireFormatError(f"tensor {unknown[0]!r}: not a factor of this adapter")
    return decode(data, expected_shapes={n: full[n] for n in names})


def _max_numel(shapes: Mapping[str, tuple[int, int]]) -> int:
    return max((a * b for a, b in shapes.values()), default=1)
