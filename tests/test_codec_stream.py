"""Tests of the incremental validator (codec.StreamValidator) against the reference, decode:
the same blobs accepted, the same first error raised (message included), whatever the
chunking, with or without the size announced; plus its memory and its fast value checks.
(Random and mutated inputs: tests/test_codec_fuzz.py.)"""

from __future__ import annotations

import math
import random
import struct
import tracemalloc
from collections.abc import Callable, Mapping
from typing import Any

import pytest
import torch

from fedsrd_core import codec
from fedsrd_core.codec import (
    EntryInfo,
    SeededSparse,
    StreamValidator,
    WireFormatError,
    decode,
    encode,
    inspect,
)
from fedsrd_core.sparse import SparseTensor
from tests.test_codec import BAD_BLOBS, DTYPES, GOOD, POSITIONS, blob, entry, rand_seeded
from tests.test_codec import rand_sparse as _rand_sparse


def rand_sparse(shape: tuple[int, ...], density: float, seed: int = 0) -> SparseTensor:
    return _rand_sparse(shape, density, seed)


def cuts_for(n: int, rng: random.Random, style: str) -> list[int]:
    """Chunk boundaries (cumulative offsets) for a blob of ``n`` bytes."""
    if style == "whole":
        return []
    if style == "bytes":
        return list(range(1, n))
    if style == "odd":  # 1..7-byte pieces: every field and value straddles a boundary
        out, at = [], 0
        while True:
            at += rng.randint(1, 7)
            if at >= n:
                return out
            out.append(at)
    return sorted(rng.sample(range(1, n), min(n - 1, rng.randint(0, 12)))) if n > 1 else []


def feed_all(
    data: bytes,
    cuts: list[int],
    *,
    total: bool,
    expected: Mapping[str, tuple[int, ...]] | None = None,
    max_numel: int = 2**34,
    check_headers: Callable[[list[EntryInfo]], None] | None = None,
) -> tuple[str, Any]:
    """("ok", entries) or ("error", message), feeding ``data`` cut at ``cuts``."""
    v = StreamValidator(
        expected_shapes=expected,
        max_numel=max_numel,
        total_size=len(data) if total else None,
        check_headers=check_headers,
    )
    try:
        prev = 0
        for c in [*cuts, len(data)]:
            v.feed(data[prev:c])
            prev = c
        return "ok", v.finish()
    except WireFormatError as e:
        return "error", str(e)


def decode_outcome(
    data: bytes, expected: Mapping[str, tuple[int, ...]] | None = None, max_numel: int = 2**34
) -> tuple[str, Any]:
    try:
        decode(data, expected_shapes=expected, max_numel=max_numel)
    except WireFormatError as e:
        return "error", str(e)
    return "ok", inspect(data, max_numel=max_numel)


STYLES = ["whole", "bytes", "odd", "random"]


def assert_same_as_decode(
    data: bytes,
    expected: Mapping[str, tuple[int, ...]] | None = None,
    seed: int = 0,
    max_numel: int = 2**34,
) -> tuple[str, Any]:
    want = decode_outcome(data, expected, max_numel)
    rng = random.Random(seed)
    for style in STYLES if len(data) <= 4096 else ["whole", "odd", "random"]:
        for total in (True, False):
            cuts = cuts_for(len(data), rng, style)
            got = feed_all(data, cuts, total=total, expected=expected, max_numel=max_numel)
            assert got == want, (style, total, cuts[:20])
    return want


# --------------------------------------------------------------------------------------------
# Valid blobs of every kind, random chunkings


def every_kind() -> dict[str, torch.Tensor | SparseTensor | SeededSparse]:
    return {
        "layers.0.q_proj.lora_B": rand_sparse((96, 8), 0.1, seed=1),
        "dense3d": torch.randn(3, 4, 5),
        "seeded": rand_seeded((40, 17), 0.3, "seeded"),
        "one": torch.tensor([2.5]),
        "scalar": torch.tensor(7.0),
        "empty_dense": torch.empty(0, 3),
        "empty_sparse": SparseTensor((0,), torch.empty(0, dtype=torch.int64), torch.empty(0)),
        "no_values": SparseTensor((5, 6), torch.empty(0, dtype=torch.int64), torch.empty(0)),
        "full": SparseTensor((2, 3, 4), torch.arange(24), torch.randn(24)),
        "sparse3d": rand_sparse((7, 9, 11), 0.05, seed=2),
        "seeded_empty": SeededSparse((4, 4), 1, 2, 0, torch.empty(0)),
        "seeded_all": SeededSparse((2, 5), 1, 2, 2**32, torch.randn(10)),
        "seeded_zero_numel": SeededSparse((0, 5), 1, 2, 2**31, torch.empty(0)),
        "big_dense": torch.randn(300, 70),  # values spanning several pieces
    }


@pytest.mark.parametrize("vd", DTYPES)
@pytest.mark.parametrize("positions", POSITIONS)
def test_valid_blobs_of_every_kind_in_random_chunks(vd: str, positions: str) -> None:
    tensors = every_kind()
    data = encode(tensors, value_dtype=vd, positions=positions)  # type: ignore[arg-type]
    shapes = {n: tuple(t.shape) for n, t in tensors.items()}
    for seed in range(4):
        for expected in (None, shapes):
            result = assert_same_as_decode(data, expected, seed=seed)
            assert result == ("ok", inspect(data))


@pytest.mark.parametrize("vd", DTYPES)
def test_empty_and_single_entry_blobs(vd: str) -> None:
    for tensors in ({}, {"x": torch.randn(5)}, {"": torch.empty(0)}):
        data = encode(tensors, value_dtype=vd)  # type: ignore[arg-type]
        assert assert_same_as_decode(data)[0] == "ok"


def test_entries_and_bytes_fed() -> None:
    data = encode({"a": torch.randn(40), "b": rand_sparse((30, 30), 0.1)})
    v = StreamValidator()
    assert v.entries is None
    v.feed(data[:12])
    assert v.entries is None and v.bytes_fed == 12
    v.feed(data[12:200])
    assert v.entries == inspect(data)  # every header is in
    v.feed(data[200:])
    assert v.finish() == inspect(data)
    assert v.finish() == inspect(data)  # idempotent
    with pytest.raises(ValueError, match="after finish"):
        v.feed(b"")


# --------------------------------------------------------------------------------------------
# Every malformed blob: decode's error, message included


@pytest.mark.parametrize(("label", "make", "match"), BAD_BLOBS, ids=[b[0] for b in BAD_BLOBS])
def test_bad_blobs_raise_decodes_error(label: str, make: Callable[[], bytes], match: str) -> None:
    data = make()
    outcome, detail = assert_same_as_decode(data)
    assert outcome == ("ok" if not match else "error")
    if match:
        assert match in detail


# Decode checks an entry's values before its positions: a section bad in both reports the
# value. The stream sees the positions first and must hold their error back.
BAD_TWICE = [
    blob(entry(data=struct.pack("<2I", 5, 5) + struct.pack("<2f", 1, math.nan))),  # index32
    blob(entry(enc=2, data=b"\x80\x00" + struct.pack("<2f", math.inf, 2))),  # bitmap
    blob(
        entry(
            shape=(12,),
            enc=1,
            count=2,
            extra=struct.pack("<BQQ", 1, 1, 1),
            data=b"\xa8\xc0" + struct.pack("<2f", 1, -math.inf),  # rice: 3 one bits
        )
    ),
    blob(  # seeded: the mask keeps 8, the header says 7
        entry(
            name=b"m",
            shape=(4, 4),
            enc=4,
            count=7,
            extra=struct.pack("<QQQ", 42, 1, 2**31),
            data=struct.pack("<7f", 1, 1, 1, 1, 1, 1, math.nan),
        )
    ),
]


@pytest.mark.parametrize("data", BAD_TWICE, ids=["index32", "bitmap", "rice", "seeded"])
def test_a_bad_value_is_reported_before_bad_positions(data: bytes) -> None:
    outcome, message = assert_same_as_decode(data)
    assert outcome == "error" and "non-finite value" in message


@pytest.mark.parametrize(
    "expected",
    [{"t": (12,), "u": (3,)}, {}, {"t": (3, 4)}, {"t": (12,)}],
)
def test_expected_shapes_as_decode(expected: dict[str, tuple[int, ...]]) -> None:
    assert_same_as_decode(GOOD, expected)
    assert_same_as_decode(GOOD[:-1], expected)  # truncation is reported first
    assert_same_as_decode(GOOD + b"\x00", expected)


def test_max_numel_as_decode() -> None:
    data = blob(entry(shape=(100, 100), count=2))
    assert assert_same_as_decode(data, max_numel=10000)[0] == "ok"
    assert "exceeds max_numel 9999" in assert_same_as_decode(data, max_numel=9999)[1]


def _nan_first() -> bytes:
    """A blob whose first entry holds a NaN, followed by a large valid entry."""
    return encode({"a": torch.tensor([1.0, math.nan]), "b": torch.randn(50_000)})


def test_with_total_size_an_error_is_raised_by_the_feed_that_reveals_it() -> None:
    # encode refuses NaN: write one into the first entry's values by hand.
    good = encode({"a": torch.tensor([1.0, 2.0]), "b": torch.randn(50_000)})
    info = inspect(good)[0]
    at = info.offset + 4
    data = good[:at] + struct.pack("<f", math.nan) + good[at + 4 :]
    v = StreamValidator(total_size=len(data))
    v.feed(data[:at])
    with pytest.raises(WireFormatError, match="tensor 'a': non-finite value nan at value index 1"):
        v.feed(data[at : at + 4096])
    # Sticky: every later call raises the same error.
    with pytest.raises(WireFormatError, match="value index 1"):
        v.feed(data[at + 4096 :])
    with pytest.raises(WireFormatError, match="value index 1"):
        v.finish()
    # Without the size the same error waits for the end (the blob might be truncated).
    v = StreamValidator()
    v.feed(data[: at + 4096])
    v.feed(data[at + 4096 :])
    with pytest.raises(WireFormatError, match="value index 1"):
        v.finish()
    # ... and truncation, which decode reports first, wins over it.
    v = StreamValidator()
    v.feed(data[:-1])
    with pytest.raises(WireFormatError, match="truncated: data sections declare"):
        v.finish()
    with pytest.raises(WireFormatError, match="truncated: data sections declare"):
        decode(data[:-1])


def test_header_errors_are_raised_at_once_even_without_the_size() -> None:
    data = blob(entry(shape=(1,) * 9))
    v = StreamValidator()
    with pytest.raises(WireFormatError, match="ndim 9 too large"):
        v.feed(data)
    v = StreamValidator()
    with pytest.raises(WireFormatError, match="bad magic"):
        v.feed(b"FSRX" + data[4:12])


def test_a_forged_entry_count_waits_for_the_size() -> None:
    """n_tensors is checked against the bytes present before any header: without the size,
    nothing can be said until the bytes are there or the blob ends."""
    data = blob(entry(), n=2**32 - 1)
    v = StreamValidator()
    v.feed(data)
    with pytest.raises(WireFormatError, match="truncated: 4294967295 tensors need"):
        v.finish()
    v = StreamValidator(total_size=len(data))
    with pytest.raises(WireFormatError, match="truncated: 4294967295 tensors need"):
        v.feed(data[:12])


def test_check_headers_runs_once_in_decodes_order() -> None:
    seen: list[list[EntryInfo]] = []

    def rule(infos: list[EntryInfo]) -> None:
        seen.append(infos)
        raise LookupError("caller's rule")

    data = encode({"a": torch.randn(3), "b": torch.randn(4)})
    heads = sum(i.header_bytes for i in inspect(data)) + 12
    # Size known: raised by the feed that completes the headers.
    v = StreamValidator(total_size=len(data), check_headers=rule)
    v.feed(data[: heads - 1])
    assert seen == []
    with pytest.raises(LookupError, match="caller's rule"):
        v.feed(data[heads - 1 : heads + 2])
    assert seen == [inspect(data)]
    # Size unknown: held until finish; a truncated blob reports truncation instead.
    for body, match in ((data, "caller's rule"), (data[:-1], "truncated")):
        seen.clear()
        v = StreamValidator(check_headers=rule)
        v.feed(body)
        with pytest.raises((LookupError, WireFormatError), match=match):
            v.finish()
        assert len(seen) == 1
    # Before expected_shapes: the caller's rule is reported first.
    v = StreamValidator(expected_shapes={"x": (1,)}, check_headers=rule, total_size=len(data))
    with pytest.raises(LookupError):
        v.feed(data)
    # Not called when a header is invalid.
    seen.clear()
    outcome = feed_all(blob(entry(enc=7)), [], total=True, check_headers=rule)
    assert outcome == ("error", "tensor 't': unknown position encoding 7")
    assert seen == []


def test_size_contract_and_argument_errors() -> None:
    data = encode({"a": torch.randn(3)})
    v = StreamValidator(total_size=len(data))
    with pytest.raises(ValueError, match="more than total_size"):
        v.feed(data + b"x")
    v.feed(data[:-1])
    with pytest.raises(ValueError, match=f"fed {len(data) - 1} bytes, total_size is"):
        v.finish()
    v.feed(data[-1:])
    assert v.finish() == inspect(data)
    with pytest.raises(TypeError):
        StreamValidator().feed("FSRD")  # type: ignore[arg-type]
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="total_size"):
            StreamValidator(total_size=bad)  # type: ignore[arg-type]
    # Any bytes-like piece, multi-dimensional views included (as decode takes them).
    v = StreamValidator()
    v.feed(bytearray(data[:5]))
    v.feed(memoryview(data[5:])[:])
    assert v.finish() == inspect(data)


# --------------------------------------------------------------------------------------------
# Memory: values are checked where they arrive, never accumulated; nothing is sized from a
# declared length


def test_values_are_never_accumulated() -> None:
    data = encode({"big": torch.randn(4 << 20), "sp": rand_sparse((512, 512), 0.05)})  # 17 MiB
    step = 1 << 20
    pieces = [data[i : i + step] for i in range(0, len(data), step)]
    for total in (len(data), None):
        v = StreamValidator(total_size=total)
        tracemalloc.start()
        try:
            for p in pieces:
                v.feed(p)
            v.finish()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 3 * step, peak  # a piece's temporaries, never the blob


def _feed_then_finish(v: StreamValidator, pieces: list[bytes]) -> None:
    for p in pieces:
        v.feed(p)
    v.finish()


def test_hostile_headers_allocate_nothing() -> None:
    n = 1 << 17  # dense (n, n): 2**34 elements declared
    hostile = [
        struct.pack("<4sHBBI", b"FSRD", 1, 1, 0, 1)
        + struct.pack("<H1sB2QBQQ", 1, b"x", 2, n, n, 0, n * n, 4 * n * n),
        struct.pack("<4sHBBI", b"FSRD", 1, 1, 0, 1)
        + struct.pack("<H1sB2QBQQ", 1, b"x", 2, n, n, 2, 1, n * n // 8 + 4),
        struct.pack("<4sHBBI", b"FSRD", 1, 1, 0, 2**32 - 1) + bytes(64),
    ]
    for data in hostile:
        for total in (len(data), None):
            v = StreamValidator(total_size=total)
            tracemalloc.start()
            try:
                with pytest.raises(WireFormatError, match="truncated"):
                    _feed_then_finish(v, [data, bytes(4096 if total is None else 0)])
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            assert peak < 64 * 1024, peak


# --------------------------------------------------------------------------------------------
# The fast finite checks against plain references


def _with_specials(v: torch.Tensor, rng: random.Random) -> torch.Tensor:
    v = v.clone()
    for _ in range(rng.randint(0, 3)):
        v[rng.randrange(v.numel())] = rng.choice([math.nan, math.inf, -math.inf])
    return v


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_first_non_finite_matches_isfinite(dtype: torch.dtype) -> None:
    rng = random.Random(5)
    big = {torch.float32: 3e38, torch.bfloat16: 3e38, torch.float16: 6e4}[dtype]
    for trial in range(200):
        n = rng.choice([0, 1, 2, 17, 1000, 70_000])
        scale = rng.choice([1.0, big])  # big: finite values whose sum overflows
        v = _with_specials((torch.rand(n) * 2 - 1) * scale, rng).to(dtype) if n else torch.empty(0)
        bad = torch.nonzero(~torch.isfinite(v)).view(-1)
        want = int(bad[0]) if bad.numel() else None
        assert codec._first_non_finite(v) == want, trial
        raw = memoryview(codec._le_bytes(v).numpy().tobytes()) if n else memoryview(b"")
        vd = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
        assert codec._first_non_finite_raw(raw, vd) == want, trial  # type: ignore[arg-type]


@pytest.mark.parametrize("vd", DTYPES)
def test_first_non_finite_raw_on_every_exponent(vd: str) -> None:
    """Random bit patterns hitting every exponent, including all-ones (inf and NaN)."""
    g = torch.Generator().manual_seed(3)
    if vd == "fp32":
        bits = torch.randint(-(2**31), 2**31, (100_000,), generator=g, dtype=torch.int64)
        v = bits.to(torch.int32).view(torch.float32)
    else:
        bits = torch.randint(-(2**15), 2**15, (100_000,), generator=g, dtype=torch.int64)
        v = bits.to(torch.int16).view(torch.bfloat16 if vd == "bf16" else torch.float16)
    finite = torch.isfinite(v.to(torch.float32))
    raw = codec._le_bytes(v).numpy().tobytes()
    size = {"fp32": 4, "bf16": 2, "fp16": 2}[vd]
    for start in range(0, v.numel(), 997):
        part = finite[start : start + 997]
        bad = torch.nonzero(~part).view(-1)
        want = int(bad[0]) if bad.numel() else None
        got = codec._first_non_finite_raw(
            memoryview(raw)[start * size : (start + 997) * size],
            vd,  # type: ignore[arg-type]
        )
        assert got == want
