"""The streamed server round against the whole-state round: bit-identical outputs."""

from __future__ import annotations

import time

import pytest
import torch

from fedsrd_core.codec import LazyBlob, WireFormatError, dense_header, encode
from fedsrd_core.server import stream_server_round
from fedsrd_core.snapshot import (
    decode_global_delta,
    decode_snapshot,
    encode_snapshot,
    snapshot_shapes,
)
from fedsrd_core.state import (
    GlobalState,
    LoraFactors,
    StateHasher,
    init_state,
    state_digest,
)
from fedsrd_core.strategies import RoundContext, Upload, available_strategies, get_strategy

LAYOUT = {
    "model.layers.0.self_attn.q_proj": (48, 32),
    "model.layers.0.mlp.down_proj": (32, 80),
    "model.layers.1.self_attn.q_proj": (48, 32),
    "model.layers.1.mlp.up_proj": (80, 32),
}
RANK = 4


def started(seed: int) -> GlobalState:
    s = init_state(LAYOUT, RANK, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    for _, f in s.items():
        f.B.copy_(torch.randn(f.B.shape, generator=g) * 0.05)
    return s


def uploads_for(name: str, start: GlobalState, round_: int, m: int = 3) -> list[Upload]:
    strat = get_strategy(name)
    out = []
    for i in range(m):
        g = torch.Generator().manual_seed(100 * round_ + i)
        trained = GlobalState(
            {
                k: LoraFactors(
                    f.A + torch.randn(f.A.shape, generator=g) * 1e-2,
                    f.B + torch.randn(f.B.shape, generator=g) * 1e-2,
                )
                for k, f in start.items()
            }
        )
        tensors = strat.client_upload(start, trained, RoundContext(round=round_), client_seed=i)
        # As the worker reads them: stored blobs, decoded lazily.
        out.append(Upload(LazyBlob(encode(tensors)), num_samples=10 + i))
    return out


def whole_state_round(
    name: str, start: GlobalState, uploads: list[Upload], ctx: RoundContext
) -> tuple[bytes, bytes, str]:
    """What the worker did before streaming: the whole state in memory."""
    strat = get_strategy(name)
    state = start.clone()
    down = encode(strat.server_round(state, uploads, ctx), value_dtype=ctx.value_dtype)
    strat.apply_global(state, decode_global_delta(down, LAYOUT, RANK))
    return down, encode_snapshot(state), state_digest(state)


@pytest.mark.parametrize("name", available_strategies())
@pytest.mark.parametrize("vd", ["fp32", "bf16"])
def test_streamed_round_is_bit_identical_to_the_whole_state_round(name: str, vd: str) -> None:
    state = started(7)
    for round_ in (1, 2, 3):  # both parities of FedSRD's alternation
        ctx = RoundContext(round=round_, seed=11, value_dtype=vd)  # type: ignore[arg-type]
        uploads = uploads_for(name, state, round_)
        down, snapshot, digest = whole_state_round(name, state, uploads, ctx)
        pieces: list[bytes] = []
        t0 = time.perf_counter()
        got = stream_server_round(
            get_strategy(name),
            memoryview(encode_snapshot(state)),
            LAYOUT,
            RANK,
            uploads,
            ctx,
            lambda p, out=pieces: out.append(bytes(p)),
        )
        wall = time.perf_counter() - t0
        # Its parts' times: each measured, together no more than the call took.
        assert set(got.timings) == {"server_round_s", "encode_s", "apply_s", "write_s"}
        assert all(v >= 0 for v in got.timings.values())
        assert sum(got.timings.values()) <= wall
        assert got.delta_blob == down
        assert b"".join(pieces) == snapshot
        assert got.snapshot_bytes == len(snapshot)
        assert got.digest == digest
        # The next round starts from the streamed round's own snapshot.
        state = decode_snapshot(b"".join(pieces), LAYOUT, RANK)
        assert state_digest(state) == digest


def test_streamed_round_refuses_a_snapshot_of_another_layout() -> None:
    other = {**LAYOUT, "model.layers.1.mlp.up_proj": (81, 32)}
    state = init_state(other, RANK, seed=1)
    written: list[int] = []
    with pytest.raises(WireFormatError, match="up_proj"):
        stream_server_round(
            get_strategy("fedsrd"),
            encode_snapshot(state),
            LAYOUT,
            RANK,
            [],
            RoundContext(round=1),
            lambda p: written.append(p.nbytes),
        )
    assert written == []  # checked against the layout before the first piece


def test_dense_header_is_encodes_header() -> None:
    state = started(3)
    blob = encode_snapshot(state)
    header = dense_header(snapshot_shapes(LAYOUT, RANK))
    assert blob.startswith(header)
    assert len(blob) == len(header) + 4 * state.num_parameters()
    for vd in ("bf16", "fp16"):
        t = {"x": torch.randn(3, 5), "y": torch.randn(7)}
        head = dense_header({"x": (3, 5), "y": (7,)}, value_dtype=vd)  # type: ignore[arg-type]
        assert encode(t, value_dtype=vd).startswith(head)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at most 8 dims"):
        dense_header({"x": (1,) * 9})


def test_state_hasher_is_state_digest_and_wants_sorted_modules() -> None:
    state = started(5)
    h = StateHasher()
    for module, f in state.items():
        h.add(module, f)
    assert h.hexdigest() == state_digest(state)
    modules = list(state.items())
    h = StateHasher()
    h.add(*modules[1])
    with pytest.raises(ValueError, match="sorted order"):
        h.add(*modules[0])


def test_a_sparse_snapshot_entry_is_refused_by_both_readers() -> None:
    from fedsrd_core.sparse import SparseTensor
    from fedsrd_core.state import A_SUFFIX, B_SUFFIX

    state = started(9)
    tensors: dict[str, torch.Tensor | SparseTensor] = {}
    for name, f in state.items():
        tensors[name + A_SUFFIX] = f.A
        tensors[name + B_SUFFIX] = f.B
    first = sorted(LAYOUT)[0]
    A = state[first].A
    tensors[first + A_SUFFIX] = SparseTensor(tuple(A.shape), torch.tensor([0, 3]), A.flatten()[:2])
    blob = encode(tensors)
    with pytest.raises(WireFormatError, match="is sparse; snapshots are dense"):
        decode_snapshot(blob, LAYOUT, RANK)
    with pytest.raises(WireFormatError, match="is sparse; snapshots are dense"):
        stream_server_round(
            get_strategy("fedsrd"), blob, LAYOUT, RANK, [], RoundContext(round=1), lambda p: None
        )
