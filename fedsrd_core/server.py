"""A whole server round streamed module by module, from the previous snapshot to the next.

The server's round is: read the global state (the previous round's snapshot), compute the
strategy's global delta from the clients' uploads, apply to the state exactly what clients
will apply (the encoded and decoded delta), then publish the delta, the new snapshot and the
new state digest. Done on the whole state, it holds the state (371 MiB for Llama-3.2-3B at
r=64) for the whole round. Every step is per module, so :func:`stream_server_round` walks
the modules in the snapshot's (sorted) order instead: decode one module's factors from the
previous snapshot, run the strategy's server step on that module, apply its delta, hash it
into the digest and hand its bytes to ``write``, then drop it. It holds one module's factors
and updates, the round's delta coded (for FedSRD's seeded download, the values of a fifth of
one factor per module), and the coded uploads; the previous snapshot can be a mapped file.

The results are bit-identical to the whole-state round: the same delta blob, the same
snapshot bytes, the same digest (tests compare them for every strategy, round parity and
wire dtype).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from fedsrd_core.codec import (
    LazyBlob,
    concatenate_pieces,
    dense_header,
    encode,
    encode_pieces,
)
from fedsrd_core.snapshot import (
    decode_global_delta,
    snapshot_factors,
    snapshot_shapes,
    snapshot_tensors,
)
from fedsrd_core.state import GlobalState, StateHasher
from fedsrd_core.strategies import RoundContext, Strategy, Upload


@dataclass(frozen=True)
class StreamedRound:
    """What a streamed round produced besides the snapshot bytes it wrote."""

    #: the global delta as broadcast to clients (wire format), in pieces: write them in order
    delta_pieces: list[memoryview]
    digest: str  #: :func:`fedsrd_core.state.state_digest` of the new global state
    snapshot_bytes: int  #: size of the new snapshot blob handed to ``write``
    #: Seconds spent, summed over modules: ``server_round_s`` (the strategy's step, which
    #: also decodes the uploads' entries lazily), ``encode_s`` (the delta's wire blob),
    #: ``apply_s`` (decode it and apply it, as clients do) and ``write_s`` (the snapshot).
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def delta_blob(self) -> bytes:
        """The global delta's blob, joined."""
        return b"".join(self.delta_pieces)


def stream_server_round(
    strategy: Strategy,
    previous: bytes | bytearray | memoryview,
    layout: Mapping[str, tuple[int, int]],
    rank: int,
    uploads: Sequence[Upload],
    ctx: RoundContext,
    write: Callable[[memoryview], object],
) -> StreamedRound:
    """Run one server round from the ``previous`` snapshot blob, writing the new snapshot.

    Args:
        strategy: the run's strategy (its ``server_round`` and ``apply_global`` run on one
            module at a time).
        previous: the snapshot of the state the round started from (a mapped file is fine:
            each module is copied out when it is reached).
        layout: module -> ``(d_out, d_in)``; rank: the LoRA rank.
        uploads: the round's uploads (lazily decoded blobs are fine).
        ctx: round number, seed and wire dtype.
        write: called with the new snapshot's pieces in order (the header, then each
            factor's bytes); their concatenation is ``encode_snapshot`` of the new state.
            A piece is valid only during the call.

    Returns:
        The delta blob (in pieces), the new digest and the snapshot's size.

    Raises:
        WireFormatError: ``previous`` is not a snapshot of ``layout`` and ``rank`` (a
            section is checked when its module is reached, after earlier pieces were
            written: the caller discards what it wrote, as on any error).
    """
    shapes = snapshot_shapes(layout, rank)
    old = LazyBlob(previous, expected_shapes=shapes)
    header = dense_header(shapes, value_dtype="fp32")
    write(memoryview(header))
    written = len(header)
    hasher = StateHasher()
    # Each module's delta is kept coded (values only, for a seeded download), not as tensors
    # with their positions: for Llama-3.2-3B that is 36 MiB instead of 109 MiB.
    coded: list[bytes] = []
    spent = dict.fromkeys(("server_round_s", "encode_s", "apply_s", "write_s"), 0.0)
    for module in sorted(layout):
        t0 = time.perf_counter()
        one = GlobalState({module: snapshot_factors(old, module)})
        delta = strategy.server_round(one, uploads, ctx)
        t1 = time.perf_counter()
        # What clients apply: the delta through the codec, as the whole-state round does.
        blob = encode(delta, value_dtype=ctx.value_dtype)
        del delta
        t2 = time.perf_counter()
        strategy.apply_global(one, decode_global_delta(blob, {module: layout[module]}, rank))
        coded.append(blob)
        f = one[module]
        hasher.add(module, f)
        t3 = time.perf_counter()
        for piece in encode_pieces(snapshot_tensors(one), value_dtype="fp32")[1:]:
            write(piece)
            written += piece.nbytes
        t4 = time.perf_counter()
        for key, dt in zip(spent, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
            spent[key] += dt
    return StreamedRound(
        delta_pieces=concatenate_pieces(coded),
        digest=hasher.hexdigest(),
        snapshot_bytes=written,
        timings=spent,
    )
