"""Property tests of the wire codec: random round trips, and hostile bytes that must either
decode or raise WireFormatError, quickly and without allocating far more than the blob; and
the incremental validator (StreamValidator), fed the same inputs in random pieces, must
reach decode's verdict with decode's message, under the same allocation bound.

Allocation accounting: torch's CPU tensor memory is invisible to ``tracemalloc``, so every
tensor the decoder creates is seen through a ``TorchDispatchMode`` (each aten op's outputs
whose storage is not one of its inputs' is a fresh allocation; its bytes are summed), and the
Python-side copies (the ``bytearray`` each section is copied into) through ``tracemalloc``.
The *sum* of all fresh torch allocations bounds the torch peak from above, so the check
``torch_total + python_peak < 64 * len(blob) + 1 MiB`` is conservative and can fail for real
(e.g. if decode trusted a declared length and allocated from it). Seeded entries are
excluded: regenerating a mask legitimately costs work proportional to ``numel``
(bounded by ``max_numel``), not to the blob size.
"""

from __future__ import annotations

import itertools
import math
import random
import struct
import tracemalloc
from datetime import timedelta
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from fedsrd_core.codec import (
    SeededSparse,
    StreamValidator,
    WireFormatError,
    decode,
    encode,
    inspect,
    quantize,
)
from fedsrd_core.masks import seeded_positions
from fedsrd_core.sparse import SparseTensor

FUZZ: dict[str, Any] = dict(
    deadline=timedelta(seconds=5),  # generous: the CI machine is small and shared
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,  # reproducible CI runs
)


def fuzz(max_examples: int) -> settings:
    return settings(max_examples=max_examples, **FUZZ)


# Small enough that a mutated shape can never make mask regeneration slow.
MAX_NUMEL = 1 << 16


class AllocCounter(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """Sums the bytes of every fresh tensor storage created by aten ops while active."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.total = 0
        self.largest = 0

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        inputs = {
            t.untyped_storage().data_ptr()
            for t in tree_flatten((args, kwargs))[0]
            if isinstance(t, torch.Tensor)
        }
        out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                if storage.nbytes() and storage.data_ptr() not in inputs:
                    self.total += storage.nbytes()
                    self.largest = max(self.largest, storage.nbytes())
        return out


def decode_checked(data: bytes) -> None:
    """Decode hostile ``data``: only WireFormatError may escape, allocation stays bounded."""
    counter = AllocCounter()
    tracemalloc.start()
    try:
        with counter:
            decode(data, max_numel=MAX_NUMEL)
    except WireFormatError:
        pass
    finally:
        _, py_peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    try:
        seeded = any(i.kind == "seeded" for i in inspect(data, max_numel=MAX_NUMEL))
    except WireFormatError:
        seeded = False  # failed in the headers: nothing was decoded
    if not seeded:
        bound = 64 * len(data) + (1 << 20)
        assert counter.total + py_peak < bound, (counter.total, py_peak, len(data))


# --------------------------------------------------------------------------------------------
# Random entry sets round-trip exactly

names = st.text(alphabet=st.characters(exclude_categories=["Cs"]), min_size=0, max_size=12)
shapes = st.lists(st.integers(0, 12), min_size=0, max_size=3).map(tuple)


@st.composite
def entry_sets(draw: st.DrawFn) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in draw(st.lists(names, min_size=0, max_size=5, unique=True)):
        shape = draw(shapes)
        numel = math.prod(shape)
        gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
        kind = draw(st.sampled_from(["dense", "sparse", "seeded"]))
        scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
        if kind == "dense":
            out[name] = torch.randn(shape, generator=gen) * scale
        elif kind == "sparse":
            density = draw(st.floats(0.0, 1.0))
            mask = torch.rand(numel, generator=gen) < density
            idx = torch.nonzero(mask).view(-1)
            out[name] = SparseTensor(shape, idx, torch.randn(idx.numel(), generator=gen) * scale)
        else:
            seed = draw(st.integers(0, 2**64 - 1))
            rnd = draw(st.integers(0, 2**64 - 1))
            thr = draw(st.integers(0, 2**32))
            pos = seeded_positions(seed, rnd, name, numel, thr)
            assert pos is not None
            vals = torch.randn(pos.numel(), generator=gen) * scale
            out[name] = SeededSparse(shape, seed, rnd, thr, vals)
    return out


@fuzz(200)
@given(
    tensors=entry_sets(),
    vd=st.sampled_from(["fp32", "bf16", "fp16"]),
    positions=st.sampled_from(["rice", "bitmap", "index32"]),
)
def test_random_sets_round_trip(tensors: dict[str, Any], vd: Any, positions: Any) -> None:
    data = encode(tensors, value_dtype=vd, positions=positions)
    out = decode(data, expected_shapes={n: tuple(t.shape) for n, t in tensors.items()})
    assert list(out) == list(tensors)
    for name, want in tensors.items():
        got = out[name]
        if isinstance(want, torch.Tensor):
            assert isinstance(got, torch.Tensor)
            assert torch.equal(got, quantize(want, vd))
            continue
        assert isinstance(got, SparseTensor)
        want_idx = want.positions(name) if isinstance(want, SeededSparse) else want.indices
        assert torch.equal(got.indices, want_idx)
        assert torch.equal(got.values, quantize(want.values, vd))


# --------------------------------------------------------------------------------------------
# Hostile bytes


@fuzz(1000)
@given(data=st.binary(max_size=400))
def test_random_bytes(data: bytes) -> None:
    decode_checked(data)


@fuzz(1000)
@given(
    dcode=st.integers(0, 4),
    n=st.integers(0, 4),
    rest=st.binary(max_size=400),
)
def test_random_bytes_after_valid_prefix(dcode: int, n: int, rest: bytes) -> None:
    decode_checked(struct.pack("<4sHBBI", b"FSRD", 1, dcode, 0, n) + rest)


def _valid_blobs() -> list[bytes]:
    g = torch.Generator().manual_seed(0)
    idx = torch.nonzero(torch.rand(300, generator=g) < 0.2).view(-1)
    sp = SparseTensor((20, 15), idx, torch.randn(idx.numel(), generator=g))
    pos = seeded_positions(9, 2, "s", 64, 2**30)
    assert pos is not None
    seeded = SeededSparse((8, 8), 9, 2, 2**30, torch.randn(pos.numel(), generator=g))
    blobs = []
    for vd in ["fp32", "bf16", "fp16"]:
        for positions in ["rice", "bitmap", "index32"]:
            tensors = {"d": torch.randn(2, 3, generator=g), "x": sp}
            blobs.append(encode(tensors, value_dtype=vd, positions=positions))  # type: ignore[arg-type]
    blobs.append(encode({"s": seeded, "d": torch.randn(3, generator=g)}))
    return blobs


VALID = _valid_blobs()


def _warm_up() -> None:
    """Run every decode path once under the counter before anything is measured: the first
    use of a dispatch mode imports torch._dynamo, onnx, sympy... (~70 MB of Python objects),
    a one-time cost of the instrument that must not be charged to decode."""
    for data in VALID:
        with AllocCounter():
            decode(data)
    for bad in (b"", VALID[0][:-1], VALID[0] + b"x"):
        try:
            with AllocCounter():
                decode(bad)
        except WireFormatError:
            pass


_warm_up()


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(VALID)))
    # Positions come from a hypothesis-controlled Random: uniform over the blob, whereas
    # st.integers() favours small values and would mostly hit the magic bytes.
    rnd = draw(st.randoms(use_true_random=False))
    for _ in range(draw(st.integers(1, 3))):
        op = draw(
            st.sampled_from(["flip", "truncate", "insert", "delete", "u64", "u16", "byte", "inf"])
        )
        at = rnd.randrange(len(data)) if data else 0
        if op == "flip" and data:
            data[at] ^= 1 << rnd.randrange(8)
        elif op == "truncate":
            del data[at:]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[at : at + rnd.randrange(1, 17)]
        elif op == "byte" and data:
            data[at] = rnd.randrange(256)
        elif op == "inf" and len(data) >= 4:
            # An inf or NaN (fp32 or 16-bit pattern) somewhere, most likely among the values.
            at = rnd.randrange(len(data) - 3)
            data[at : at + 4] = rnd.choice(
                [b"\x00\x00\x80\x7f", b"\x00\x00\xc0\xff", b"\x00\x7c\x00\xfe"]
            )
        elif op in ("u64", "u16") and len(data) >= 16:
            # Length-like fields live in the headers: overwrite one there with an edge value.
            size = 8 if op == "u64" else 2
            at = rnd.randrange(4, min(len(data), 200) - size)
            value = draw(
                st.sampled_from([0, 1, 2, 7, 255, 2**16 - 1, 2**31, 2**32, 2**63, 2**64 - 1])
            )
            data[at : at + size] = (value % (1 << (8 * size))).to_bytes(size, "little")
    return bytes(data)


@fuzz(2000)
@given(data=mutated())
def test_mutated_blobs(data: bytes) -> None:
    decode_checked(data)


def test_valid_blobs_pass_the_allocation_check() -> None:
    """The bound is met with room on valid blobs (so the fuzz check is not vacuous)."""
    for data in VALID[:-1]:
        counter = AllocCounter()
        with counter:
            decode(data)
        assert 0 < counter.total < 64 * len(data)


def test_allocation_counter_catches_length_trusting_decoder() -> None:
    """The check fails for code that allocates from a declared length (a sanity check)."""
    counter = AllocCounter()
    with counter:
        torch.empty(2**24, dtype=torch.uint8)
    assert counter.total == 2**24


def test_hostile_headers_allocate_nothing() -> None:
    """Headers declaring huge tensors are rejected from the headers alone: no tensor at all
    is allocated (the declared sizes are checked against the bytes present first)."""
    n = 1 << 17  # dense (n, n) = 2**34 elements = max_numel: accepted by the numel check
    hostile = [
        # dense 2**34 fp32 values declared, 0 present
        struct.pack("<4sHBBI", b"FSRD", 1, 1, 0, 1)
        + struct.pack("<H1sB2QBQQ", 1, b"x", 2, n, n, 0, n * n, 4 * n * n),
        # bitmap over 2**34 elements with one value: 2 GiB of bitmap declared
        struct.pack("<4sHBBI", b"FSRD", 1, 1, 0, 1)
        + struct.pack("<H1sB2QBQQ", 1, b"x", 2, n, n, 2, 1, n * n // 8 + 4),
        # 2**32 - 1 entries declared
        struct.pack("<4sHBBI", b"FSRD", 1, 1, 0, 2**32 - 1) + bytes(64),
    ]
    for data in hostile:
        counter = AllocCounter()
        with counter, pytest.raises(WireFormatError, match="truncated"):
            decode(data)
        assert counter.total == 0


# --------------------------------------------------------------------------------------------
# The incremental validator reaches decode's verdict, message included


def _outcome(run: Any) -> tuple[str, Any]:
    try:
        return "ok", run()
    except WireFormatError as e:
        return "error", str(e)


def _pieces(data: bytes, rnd: random.Random) -> list[bytes]:
    """``data`` cut at random places: often tiny pieces, sometimes none at all."""
    style = rnd.choice(["whole", "small", "any"])
    if style == "whole" or len(data) < 2:
        return [data]
    if style == "small":
        cuts, at = [], 0
        while (at := at + rnd.randint(1, 9)) < len(data):
            cuts.append(at)
    else:
        cuts = sorted(rnd.sample(range(1, len(data)), min(len(data) - 1, rnd.randint(1, 8))))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def stream_checked(
    data: bytes,
    rnd: random.Random,
    expected: dict[str, tuple[int, ...]] | None = None,
) -> tuple[str, Any]:
    """Feed ``data`` in random pieces, size announced and not: decode's outcome (the entries,
    as inspect describes them, or the message of decode's error), and the allocation bound
    of decode_checked."""
    want = _outcome(lambda: (decode(data, expected_shapes=expected, max_numel=MAX_NUMEL), 0)[1])
    if want[0] == "ok":
        want = ("ok", inspect(data, max_numel=MAX_NUMEL))
    try:
        seeded = any(i.kind == "seeded" for i in inspect(data, max_numel=MAX_NUMEL))
    except WireFormatError:
        seeded = False
    for total in (len(data), None):
        pieces = _pieces(data, rnd)
        v = StreamValidator(expected_shapes=expected, max_numel=MAX_NUMEL, total_size=total)

        def run(v: StreamValidator = v, pieces: list[bytes] = pieces) -> Any:
            for p in pieces:
                v.feed(p)
            return v.finish()

        counter = AllocCounter()
        tracemalloc.start()
        try:
            with counter:
                got = _outcome(run)
        finally:
            _, py_peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
        assert got == want, (total, [len(p) for p in pieces])
        if not seeded:
            bound = 64 * len(data) + (1 << 20)
            assert counter.total + py_peak < bound, (counter.total, py_peak, len(data))
    return want


@fuzz(500)
@given(data=st.binary(max_size=400), rnd=st.randoms(use_true_random=False))
def test_stream_random_bytes(data: bytes, rnd: random.Random) -> None:
    stream_checked(data, rnd)


@fuzz(500)
@given(
    dcode=st.integers(0, 4),
    n=st.integers(0, 4),
    rest=st.binary(max_size=400),
    rnd=st.randoms(use_true_random=False),
)
def test_stream_random_bytes_after_valid_prefix(
    dcode: int, n: int, rest: bytes, rnd: random.Random
) -> None:
    stream_checked(struct.pack("<4sHBBI", b"FSRD", 1, dcode, 0, n) + rest, rnd)


@fuzz(1500)
@given(data=mutated(), rnd=st.randoms(use_true_random=False))
def test_stream_mutated_blobs(data: bytes, rnd: random.Random) -> None:
    stream_checked(data, rnd)


@fuzz(1000)
@given(data=mutated(), rnd=st.randoms(use_true_random=False))
def test_stream_mutated_blobs_with_expected_shapes(data: bytes, rnd: random.Random) -> None:
    stream_checked(data, rnd, expected={"d": (2, 3), "x": (20, 15)})


@fuzz(200)
@given(
    tensors=entry_sets(),
    vd=st.sampled_from(["fp32", "bf16", "fp16"]),
    positions=st.sampled_from(["rice", "bitmap", "index32"]),
    rnd=st.randoms(use_true_random=False),
    wrong_shape=st.booleans(),
)
def test_stream_random_sets(
    tensors: dict[str, Any], vd: Any, positions: Any, rnd: random.Random, wrong_shape: bool
) -> None:
    data = encode(tensors, value_dtype=vd, positions=positions)
    expected = {n: tuple(t.shape) for n, t in tensors.items()}
    if wrong_shape and expected:
        name = rnd.choice(sorted(expected))
        expected[name] = (*expected[name], 1)
    verdict, _ = stream_checked(data, rnd, expected=expected)
    assert verdict == ("error" if wrong_shape and expected else "ok")
