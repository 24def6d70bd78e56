"""Tests of the wire codec: round trips, the documented byte layout, the floor bound, errors."""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Callable
from typing import Any

import pytest
import torch

from fedsrd_core import codec
from fedsrd_core.codec import (
    SeededSparse,
    WireFormatError,
    decode,
    encode,
    inspect,
    position_bits,
    position_floor_bits,
    quantize,
)
from fedsrd_core.masks import keep_threshold, seeded_positions
from fedsrd_core.sparse import SparseTensor

DTYPES = ["fp32", "bf16", "fp16"]
POSITIONS = ["rice", "bitmap", "index32"]
VSIZE = {"fp32": 4, "bf16": 2, "fp16": 2}
DCODE = {"fp32": 1, "bf16": 2, "fp16": 3}


def rand_sparse(shape: tuple[int, ...], density: float, seed: int = 0) -> SparseTensor:
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    k = round(n * density)
    idx = torch.randperm(n, generator=g)[:k].sort().values
    return SparseTensor(shape, idx, torch.randn(k, generator=g))


def rand_seeded(shape: tuple[int, ...], p: float, name: str, seed: int = 1) -> SeededSparse:
    thr = keep_threshold(p)
    pos = seeded_positions(seed, 3, name, math.prod(shape), thr)
    assert pos is not None
    vals = torch.randn(pos.numel(), generator=torch.Generator().manual_seed(seed))
    return SeededSparse(shape, seed, 3, thr, vals)


def assert_entry_equal(got: torch.Tensor | SparseTensor, want: object, vd: str, name: str) -> None:
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor)
        assert got.dtype == torch.float32
        assert got.shape == want.shape
        assert torch.equal(got, quantize(want, vd))  # type: ignore[arg-type]
        return
    assert isinstance(got, SparseTensor)
    assert got.values.dtype == torch.float32
    assert got.indices.dtype == torch.int64
    if isinstance(want, SeededSparse):
        assert got.shape == want.shape
        assert torch.equal(got.indices, want.positions(name))
    else:
        assert isinstance(want, SparseTensor)
        assert got.shape == want.shape
        assert torch.equal(got.indices, want.indices)
    assert torch.equal(got.values, quantize(want.values, vd))  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# An independent pure-Python decoder written from docs/wire-format.md (no torch, plain ints):
# if it agrees with the codec, the document describes the bytes the code writes.


def _bits_msb(data: bytes) -> list[int]:
    return [(b >> (7 - i)) & 1 for b in data for i in range(8)]


def _value(raw: bytes, vd: str) -> float:
    if vd == "fp32":
        return float(struct.unpack("<f", raw)[0])
    if vd == "fp16":
        return float(struct.unpack("<e", raw)[0])
    return float(struct.unpack("<f", b"\x00\x00" + raw)[0])  # bf16 = upper half of fp32


def _ref_u(seed: int, rnd: int, name: str, j: int) -> int:
    import hashlib

    d = hashlib.sha256(
        b"fedsrd-mask-v1\x00"
        + seed.to_bytes(8, "little")
        + rnd.to_bytes(8, "little")
        + name.encode()
    ).digest()
    k0, k1 = int.from_bytes(d[:4], "little"), int.from_bytes(d[4:8], "little")

    def h(x: int) -> int:
        x ^= x >> 16
        x = x * 0x45D9F3B & 0xFFFFFFFF
        x ^= x >> 16
        x = x * 0x45D9F3B & 0xFFFFFFFF
        return x ^ (x >> 16)

    return h(h(j ^ k0) ^ k1)


def ref_decode(blob: bytes) -> dict[str, tuple[tuple[int, ...], list[int] | None, list[float]]]:
    magic, version, dcode, reserved, n = struct.unpack_from("<4sHBBI", blob, 0)
    assert (magic, version, reserved) == (b"FSRD", 1, 0)
    vd = {1: "fp32", 2: "bf16", 3: "fp16"}[dcode]
    vs = VSIZE[vd]
    at = 12
    headers = []
    for _ in range(n):
        (ln,) = struct.unpack_from("<H", blob, at)
        name = blob[at + 2 : at + 2 + ln].decode()
        at += 2 + ln
        ndim = blob[at]
        shape = struct.unpack_from(f"<{ndim}Q", blob, at + 1)
        at += 1 + 8 * ndim
        enc, count = struct.unpack_from("<BQ", blob, at)
        at += 9
        extra: tuple[int, ...] = ()
        if enc == 1:
            extra = struct.unpack_from("<BQQ", blob, at)
            at += 17
        elif enc == 4:
            extra = struct.unpack_from("<QQQ", blob, at)
            at += 24
        (sec,) = struct.unpack_from("<Q", blob, at)
        at += 8
        headers.append((name, tuple(shape), enc, count, extra, sec))
    out = {}
    for name, shape, enc, count, extra, sec in headers:
        data = blob[at : at + sec]
        at += sec
        numel = math.prod(shape)
        pos: list[int] | None
        if enc == 0:
            pos, npos = None, 0
        elif enc == 1:
            k, ub, rb = extra
            ubits, rbits = _bits_msb(data[:ub]), _bits_msb(data[ub : ub + rb])
            pos, q, p = [], 0, -1
            for bit in ubits:
                if bit == 0:
                    q += 1
                    continue
                i = len(pos)
                r = 0
                for b in rbits[i * k : (i + 1) * k]:
                    r = 2 * r + b
                p = p + 1 + (q * 2**k + r)
                pos.append(p)
                q = 0
            npos = ub + rb
        elif enc == 2:
            npos = (numel + 7) // 8
            pos = [i for i, b in enumerate(_bits_msb(data[:npos])) if b]
        elif enc == 3:
            npos = 4 * count
            pos = list(struct.unpack_from(f"<{count}I", data, 0))
        else:
            seed, rnd, thr = extra
            pos = [j for j in range(numel) if _ref_u(seed, rnd, name, j) < thr]
            npos = 0
        vals = [_value(data[npos + i * vs : npos + (i + 1) * vs], vd) for i in range(count)]
        out[name] = (shape, pos, vals)
    assert at == len(blob)
    return out


# --------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("vd", DTYPES)
@pytest.mark.parametrize("positions", POSITIONS)
def test_round_trip_all_kinds(vd: str, positions: str) -> None:
    tensors: dict[str, torch.Tensor | SparseTensor | SeededSparse] = {
        "layers.0.q_proj.lora_B": rand_sparse((96, 8), 0.1, seed=1),
        "dense3d": torch.randn(3, 4, 5),
        "seeded": rand_seeded((40, 17), 0.3, "seeded"),
        "one": torch.tensor([2.5]),
        "one_sparse": SparseTensor((1,), torch.tensor([0]), torch.tensor([-1.0])),
        "scalar": torch.tensor(7.0),
        "empty_dense": torch.empty(0, 3),
        "empty_sparse": SparseTensor((0,), torch.empty(0, dtype=torch.int64), torch.empty(0)),
        "no_values": SparseTensor((5, 6), torch.empty(0, dtype=torch.int64), torch.empty(0)),
        "full": SparseTensor((2, 3, 4), torch.arange(24), torch.randn(24)),
        "sparse3d": rand_sparse((7, 9, 11), 0.05, seed=2),
        "seeded_empty": SeededSparse((4, 4), 1, 2, 0, torch.empty(0)),
        "seeded_all": SeededSparse((2, 5), 1, 2, 2**32, torch.randn(10)),
        "seeded_zero_numel": SeededSparse((0, 5), 1, 2, 2**31, torch.empty(0)),
    }
    blob = encode(tensors, value_dtype=vd, positions=positions)  # type: ignore[arg-type]
    out = decode(blob)
    assert list(out) == list(tensors)  # mapping order preserved
    for name, want in tensors.items():
        assert_entry_equal(out[name], want, vd, name)
    # The independent decoder agrees on every position and value.
    ref = ref_decode(blob)
    for name, got in out.items():
        shape, pos, vals = ref[name]
        if isinstance(got, SparseTensor):
            assert got.shape == shape
            assert got.indices.tolist() == pos
            assert got.values.tolist() == vals
        else:
            assert pos is None
            assert tuple(got.shape) == shape
            assert got.reshape(-1).tolist() == vals


@pytest.mark.parametrize("positions", POSITIONS)
def test_lazy_blob_decodes_each_entry_like_decode(positions: str) -> None:
    tensors: dict[str, torch.Tensor | SparseTensor | SeededSparse] = {
        "a.lora_A": rand_sparse((96, 8), 0.1, seed=3),
        "a.lora_B": torch.randn(8, 12),
        "b.lora_A": rand_seeded((40, 17), 0.3, "b.lora_A"),
        "b.lora_B": SparseTensor((5, 6), torch.empty(0, dtype=torch.int64), torch.empty(0)),
    }
    blob = encode(tensors, positions=positions)  # type: ignore[arg-type]
    whole = decode(blob)
    lazy = codec.LazyBlob(blob, expected_shapes={n: tuple(v.shape) for n, v in whole.items()})
    assert list(lazy) == list(whole)
    assert len(lazy) == 4
    for name in reversed(list(whole)):  # any order, any number of times
        for _ in range(2):
            got, want = lazy[name], whole[name]
            if isinstance(want, SparseTensor):
                assert isinstance(got, SparseTensor)
                assert torch.equal(got.indices, want.indices)
                assert torch.equal(got.values, want.values)
            else:
                assert torch.equal(got, want)
    assert lazy.get("missing") is None
    with pytest.raises(WireFormatError, match="differs from expected"):
        codec.LazyBlob(blob, expected_shapes={**{n: (1, 1) for n in whole}})
    with pytest.raises(WireFormatError, match="missing"):
        codec.LazyBlob(blob, expected_shapes={"other": (1,)})


def test_empty_blob_round_trip() -> None:
    blob = encode({})
    assert blob == b"FSRD\x01\x00\x01\x00\x00\x00\x00\x00"
    assert decode(blob) == {}


def test_expected_shapes_accepts_exact_match() -> None:
    blob = encode({"a": torch.zeros(2, 3), "b": rand_sparse((10,), 0.3)})
    out = decode(blob, expected_shapes={"b": (10,), "a": (2, 3)})
    assert set(out) == {"a", "b"}


def test_quantize_matches_decode_and_rounding() -> None:
    v = torch.tensor([1.0, 1.00390625, 1.0 + 2**-9, -3.1415926, 1e-3, 65504.0, 1e-8])
    for vd in DTYPES:
        got = decode(encode({"x": v}, value_dtype=vd))["x"]  # type: ignore[arg-type]
        assert isinstance(got, torch.Tensor)
        assert torch.equal(got, quantize(v, vd))  # type: ignore[arg-type]
    assert torch.equal(quantize(v, "fp32"), v)
    # bf16 keeps the upper 16 bits after round-to-nearest-even: 1 + 2**-8 is a tie -> 1.0.
    assert quantize(torch.tensor([1.0 + 2**-8]), "bf16").item() == 1.0
    assert quantize(torch.tensor([1.0 + 3 * 2**-8]), "bf16").item() == 1.0 + 2**-6
    with pytest.raises(ValueError, match="value_dtype"):
        quantize(v, "int8")  # type: ignore[arg-type]


def test_bf16_bytes_follow_documented_rounding() -> None:
    """bf16 on the wire = (bits32 + 0x7FFF + ((bits32 >> 16) & 1)) >> 16 (docs, section 3)."""
    g = torch.Generator().manual_seed(5)
    bits = torch.randint(-(2**31), 2**31, (20000,), generator=g, dtype=torch.int64)
    v = bits.to(torch.int32).view(torch.float32)
    v = v[torch.isfinite(v) & (v.abs() < 3.0e38)]
    v = torch.cat([v, torch.tensor([1.0 + 2**-8, 1.0 + 3 * 2**-8, -0.0, 1e-40])])
    blob = encode({"x": v}, value_dtype="bf16")
    wire = list(struct.unpack(f"<{v.numel()}H", blob[-2 * v.numel() :]))
    b32 = [x & 0xFFFFFFFF for x in v.view(torch.int32).tolist()]
    assert wire == [(b + 0x7FFF + ((b >> 16) & 1)) >> 16 for b in b32]


def test_tiny_example_bytes_match_document() -> None:
    """The worked example of docs/wire-format.md, byte for byte."""
    thr = keep_threshold(0.5)
    vals = torch.tensor([0.25 * (i + 1) for i in range(8)])
    blob = encode(
        {
            "b": SparseTensor((2, 8), torch.tensor([1, 2, 7, 12]), torch.tensor([1.0, -2, 0.5, 3])),
            "d": torch.tensor([1.5, -0.25]),
            "m": SeededSparse((4, 4), 42, 1, thr, vals),
        },
        value_dtype="bf16",
    )
    expected = bytes.fromhex(
        "46535244 0100 02 00 03000000"
        "0100 62 02 0200000000000000 0800000000000000 01 0400000000000000"
        "01 0100000000000000 0100000000000000 0a00000000000000"
        "0100 64 01 0200000000000000 00 0200000000000000 0400000000000000"
        "0100 6d 02 0400000000000000 0400000000000000 04 0800000000000000"
        "2a00000000000000 0100000000000000 0000008000000000 1000000000000000"
        "c9 80 803f 00c0 003f 4040"
        "c03f 80be"
        "803e 003f 403f 803f a03f c03f e03f 0040"
    )
    assert blob == expected
    out = decode(blob)
    m = out["m"]
    assert isinstance(m, SparseTensor)
    assert m.indices.tolist() == [1, 4, 5, 9, 10, 11, 12, 14]


# --------------------------------------------------------------------------------------------
# Sizes: every byte is where the document says


def _expected_rice(positions: list[int]) -> tuple[int, int, int]:
    """Brute-force optimal k over 0..40 and the two stream lengths, from the doc's formulas."""
    gaps = [p - (positions[i - 1] if i else -1) - 1 for i, p in enumerate(positions)]
    c = len(gaps)
    if c == 0:
        return 0, 0, 0
    costs = [sum(g >> k for g in gaps) + c * (k + 1) for k in range(41)]
    k = costs.index(min(costs))
    unary_bits = sum(g >> k for g in gaps) + c
    return k, (unary_bits + 7) // 8, (c * k + 7) // 8


@pytest.mark.parametrize("vd", DTYPES)
@pytest.mark.parametrize("positions", POSITIONS)
def test_byte_counts_match_document(vd: str, positions: str) -> None:
    tensors: dict[str, torch.Tensor | SparseTensor | SeededSparse] = {
        "a": rand_sparse((300, 7), 0.02, seed=3),
        "bb": rand_sparse((50, 40), 0.4, seed=4),
        "c": torch.randn(4, 2, 3),
        "dé": rand_seeded((33, 3), 0.5, "dé"),
        "e": SparseTensor((17,), torch.empty(0, dtype=torch.int64), torch.empty(0)),
        "f": rand_sparse((5000,), 0.001, seed=5),
    }
    blob = encode(tensors, value_dtype=vd, positions=positions)  # type: ignore[arg-type]
    vs = VSIZE[vd]
    total = 12
    infos = {i.name: i for i in inspect(blob)}
    for name, t in tensors.items():
        raw = name.encode()
        ndim = len(t.shape)
        header = 2 + len(raw) + 1 + 8 * ndim + 1 + 8 + 8
        info = infos[name]
        if isinstance(t, torch.Tensor):
            count, pos_bytes = t.numel(), 0
        elif isinstance(t, SeededSparse):
            header += 24
            count, pos_bytes = t.values.numel(), 0
        else:
            count = t.nnz
            if positions == "rice":
                header += 17
                k, ub, rb = _expected_rice(t.indices.tolist())
                assert (info.rice_k, info.rice_unary_bytes, info.rice_remainder_bytes) == (
                    k,
                    ub,
                    rb,
                )
                pos_bytes = ub + rb
            elif positions == "bitmap":
                pos_bytes = (t.numel + 7) // 8
            else:
                pos_bytes = 4 * count
        assert info.header_bytes == header
        assert info.count == count
        assert info.position_bytes == pos_bytes
        assert info.value_bytes == count * vs
        total += header + pos_bytes + count * vs
    assert len(blob) == total
    assert position_bits(blob) == 8 * sum(i.position_bytes for i in infos.values())


@pytest.mark.parametrize("density", [0.01, 0.02, 0.05, 0.1, 0.2, 0.3])
def test_rice_within_105_percent_of_floor(density: float) -> None:
    tensors = {
        "a": rand_sparse((3072, 64), density, seed=11),
        "b": rand_sparse((100_000,), density, seed=12),
        "c": rand_sparse((64, 8192), density, seed=13),
    }
    blob = encode(tensors)
    floor = sum(position_floor_bits(t.numel, t.nnz) for t in tensors.values())
    bits = position_bits(blob)
    assert bits <= 1.05 * floor, (bits / floor, density)
    assert bits >= floor  # sanity: nothing beats the floor on random sets


def test_position_floor_bits() -> None:
    assert position_floor_bits(10, 0) == 0.0
    assert position_floor_bits(10, 10) == 0.0
    assert position_floor_bits(10, 3) == pytest.approx(math.log2(120))
    with pytest.raises(ValueError, match="count"):
        position_floor_bits(3, 4)


def test_rice_large_gap_and_big_numel() -> None:
    """A single position beyond 2**32 (numel 2**33): needs k > 31, decodes exactly."""
    st = SparseTensor((2**33,), torch.tensor([2**32 + 5, 2**33 - 1]), torch.tensor([1.0, 2.0]))
    blob = encode({"x": st})
    info = inspect(blob, max_numel=2**34)[0]
    assert info.rice_k is not None
    assert info.rice_k > 20
    out = decode(blob)["x"]
    assert isinstance(out, SparseTensor)
    assert out.indices.tolist() == [2**32 + 5, 2**33 - 1]
    with pytest.raises(ValueError, match="below 2\\*\\*32"):
        encode({"x": st}, positions="index32")


def test_index32_positions_above_2_31() -> None:
    """u32 on the wire: positions in [2**31, 2**32) survive the int32 round trip."""
    idx = torch.tensor([5, 2**31 - 1, 2**31, 2**31 + 7, 2**32 - 1])
    st = SparseTensor((2**32,), idx, torch.arange(5.0))
    blob = encode({"x": st}, positions="index32")
    assert struct.unpack_from("<5I", blob, len(blob) - 40) == tuple(idx.tolist())
    out = decode(blob)["x"]
    assert isinstance(out, SparseTensor)
    assert torch.equal(out.indices, idx)


def test_gaps_to_positions_chunked_path_agrees() -> None:
    g = torch.randint(0, 50, (1000,))
    direct = codec._gaps_to_positions(g.clone(), 10**6, 51, "t")
    chunked = codec._gaps_to_positions(g.clone(), 10**6, 51, "t", step=7)
    assert torch.equal(direct, chunked)
    assert torch.equal(direct, torch.cumsum(g + 1, 0) - 1)
    with pytest.raises(WireFormatError, match="out of range"):
        codec._gaps_to_positions(g.clone(), 100, 51, "t", step=7)


def test_decode_does_not_alias_input_buffer() -> None:
    buf = bytearray(encode({"x": torch.ones(4)}))
    out = decode(buf)["x"]
    buf[-4:] = struct.pack("<f", 5.0)
    assert isinstance(out, torch.Tensor)
    assert out.tolist() == [1.0] * 4
    assert decode(memoryview(buf))["x"].tolist() == [1.0, 1.0, 1.0, 5.0]  # type: ignore[union-attr]


# --------------------------------------------------------------------------------------------
# Encode: invalid input is a ValueError (never a WireFormatError)


@pytest.mark.parametrize(
    ("tensors", "kwargs", "match"),
    [
        ({"x": torch.tensor([1.0, math.nan])}, {}, "non-finite value nan at index 1"),
        ({"x": torch.tensor([math.inf])}, {}, "non-finite"),
        ({"x": torch.tensor([70000.0])}, {"value_dtype": "fp16"}, "overflows fp16"),
        ({"x": torch.tensor([3.4e38])}, {"value_dtype": "bf16"}, "overflows bf16"),
        ({"x": torch.tensor([1, 2])}, {}, "floating point"),
        ({"x": torch.zeros(1)}, {"value_dtype": "fp8"}, "value_dtype"),
        ({"x": torch.zeros(1)}, {"positions": "golomb"}, "positions"),
        ({"\ud800": torch.zeros(1)}, {}, "not valid UTF-8"),
        ({"n" * 65536: torch.zeros(1)}, {}, "65535"),
        ({"x": torch.zeros([1] * 9)}, {}, "at most 8 dims"),
        (
            {"x": SparseTensor((4,), torch.tensor([0, 4]), torch.zeros(2))},
            {},
            "positions must lie in",
        ),
        (
            {"x": SparseTensor((4,), torch.tensor([-1, 2]), torch.zeros(2))},
            {},
            "positions must lie in",
        ),
        (
            {"x": SparseTensor((4,), torch.tensor([2, 2]), torch.zeros(2))},
            {"positions": "bitmap"},
            "not strictly increasing at index 1",
        ),
        (
            {"x": SeededSparse((4, 4), 1, 2, 2**32, torch.zeros(15))},
            {},
            "15 values but its mask keeps more than 15 positions",
        ),
        (
            {"x": SeededSparse((4, 4), 1, 2, 0, torch.zeros(1))},
            {},
            "1 values but its mask keeps 0",
        ),
        (
            {"x": SeededSparse((4, 4), 1, 2, 2**31, torch.zeros(1))},
            {},
            "mask keeps more than 1",
        ),
    ],
)
def test_encode_rejects_invalid_input(
    tensors: dict[str, Any], kwargs: dict[str, Any], match: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(match)) as info:
        encode(tensors, **kwargs)
    assert not isinstance(info.value, WireFormatError)


def test_encode_rejects_bad_types() -> None:
    with pytest.raises(TypeError, match="SeededSparse"):
        encode({"x": [1.0, 2.0]})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="names must be str"):
        encode({1: torch.zeros(1)})  # type: ignore[dict-item]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"seed": -1}, "seed"),
        ({"round": 2**64}, "round"),
        ({"keep_threshold": 2**32 + 1}, "keep_threshold"),
        ({"shape": (2**16, 2**16)}, "fewer than 2\\*\\*32"),
        ({"values": torch.zeros(2, 2)}, "1-D"),
    ],
)
def test_seeded_sparse_validation(kwargs: dict[str, Any], match: str) -> None:
    args: dict[str, Any] = {
        "shape": (4,),
        "seed": 0,
        "round": 0,
        "keep_threshold": 5,
        "values": torch.zeros(0),
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        SeededSparse(**args)


# --------------------------------------------------------------------------------------------
# Decode: every malformed blob is a WireFormatError whose message names the problem


def entry(
    name: bytes = b"t",
    shape: tuple[int, ...] = (12,),
    enc: int = 3,
    count: int = 2,
    extra: bytes = b"",
    data: bytes = b"\x01\x00\x00\x00\x05\x00\x00\x00" + struct.pack("<2f", 1.0, 2.0),
    section_len: int | None = None,
    ndim: int | None = None,
) -> tuple[bytes, bytes]:
    """(header, section) of one entry; defaults: index32 positions [1, 5] in 12 elements."""
    header = (
        struct.pack("<H", len(name))
        + name
        + struct.pack("<B", len(shape) if ndim is None else ndim)
        + struct.pack(f"<{len(shape)}Q", *shape)
        + struct.pack("<BQ", enc, count)
        + extra
        + struct.pack("<Q", len(data) if section_len is None else section_len)
    )
    return header, data


def blob(
    *entries: tuple[bytes, bytes],
    magic: bytes = b"FSRD",
    version: int = 1,
    dcode: int = 1,
    reserved: int = 0,
    n: int | None = None,
) -> bytes:
    prefix = struct.pack(
        "<4sHBBI", magic, version, dcode, reserved, len(entries) if n is None else n
    )
    return prefix + b"".join(h for h, _ in entries) + b"".join(d for _, d in entries)


def rice_entry(
    unary: bytes, rem: bytes, k: int, count: int, numel: int = 12
) -> tuple[bytes, bytes]:
    extra = struct.pack("<BQQ", k, len(unary), len(rem))
    vals = struct.pack(f"<{count}f", *([1.0] * count))
    return entry(shape=(numel,), enc=1, count=count, extra=extra, data=unary + rem + vals)


def seeded_entry(thr: int, count: int, shape: tuple[int, ...] = (4, 4)) -> tuple[bytes, bytes]:
    extra = struct.pack("<QQQ", 42, 1, thr)
    vals = struct.pack(f"<{count}f", *([1.0] * count))
    return entry(name=b"m", shape=shape, enc=4, count=count, extra=extra, data=vals)


GOOD = blob(entry())


def _good_bitmap() -> tuple[bytes, bytes]:
    # 12 elements -> 2 bytes; positions 0 and 9: 1000 0000, 0100 0000.
    return entry(enc=2, data=b"\x80\x40" + struct.pack("<2f", 1.0, 2.0))


BAD_BLOBS: list[tuple[str, Callable[[], bytes], str]] = [
    ("empty", lambda: b"", "truncated: prefix"),
    ("truncated", lambda: GOOD[:-1], "truncated"),
    ("truncated header", lambda: GOOD[:20], "truncated"),
    ("trailing", lambda: GOOD + b"\x00", "1 trailing bytes"),
    ("magic", lambda: blob(entry(), magic=b"FSRX"), "bad magic"),
    ("version", lambda: blob(entry(), version=2), "unsupported version 2"),
    ("dtype", lambda: blob(entry(), dcode=9), "unknown value dtype code 9"),
    ("reserved", lambda: blob(entry(), reserved=1), "reserved byte is 1"),
    ("n_tensors", lambda: blob(entry(), n=2**32 - 1), "truncated: 4294967295 tensors"),
    ("ndim", lambda: blob(entry(shape=(1,) * 9)), "tensor 't': ndim 9 too large"),
    ("numel", lambda: blob(entry(shape=(2**20, 2**20))), "exceeds max_numel"),
    ("numel u64 overflow", lambda: blob(entry(shape=(2**63, 2**63))), "exceeds max_numel"),
    ("encoding", lambda: blob(entry(enc=7)), "tensor 't': unknown position encoding 7"),
    ("count>numel", lambda: blob(entry(count=13)), "count 13 > numel 12"),
    ("dense count", lambda: blob(entry(enc=0, count=2)), "dense count 2 != numel 12"),
    ("section len", lambda: blob(entry(section_len=15)), "section length 15 disagrees"),
    (
        "section len huge",
        lambda: blob(entry(section_len=2**64 - 1)),
        "section length 18446744073709551615 disagrees",
    ),
    (
        "index32 range",
        lambda: blob(entry(data=struct.pack("<2I", 3, 12) + struct.pack("<2f", 1, 2))),
        "tensor 't': position 12 out of range for 12 elements",
    ),
    (
        "index32 order",
        lambda: blob(entry(data=struct.pack("<2I", 5, 5) + struct.pack("<2f", 1, 2))),
        "not strictly increasing at index 1",
    ),
    ("bitmap ok", lambda: blob(_good_bitmap()), ""),
    (
        "bitmap popcount",
        lambda: blob(entry(enc=2, data=b"\x80\x00" + struct.pack("<2f", 1, 2))),
        "bitmap popcount 1 != count 2",
    ),
    (
        "bitmap padding",
        lambda: blob(entry(enc=2, data=b"\x80\x08" + struct.pack("<2f", 1, 2))),
        "non-zero padding",
    ),
    ("bitmap length", lambda: blob(entry(enc=2)), "section length 16 disagrees"),
    # Rice, count 2 in 12 elements: gaps 1, 3 with k=1: unary 1 01 -> 101 -> 0xA0; rem 1,1.
    ("rice ok", lambda: blob(rice_entry(b"\xa0", b"\xc0", 1, 2)), ""),
    ("rice ones", lambda: blob(rice_entry(b"\xa8", b"\xc0", 1, 2)), "3 one bits, expected"),
    (
        "rice last byte",
        lambda: blob(rice_entry(b"\xa0\x00", b"\xc0", 1, 2, numel=100)),
        "does not end in its last byte",
    ),
    ("rice rem padding", lambda: blob(rice_entry(b"\xa0", b"\xc1", 1, 2)), "non-zero padding"),
    ("rice empty with unary", lambda: blob(rice_entry(b"\x01", b"", 0, 0)), "unary stream length"),
    ("rice k", lambda: blob(rice_entry(b"\xa0", b"\xc0", 41, 2)), "Rice parameter k=41"),
    ("rice rem length", lambda: blob(rice_entry(b"\xa0", b"\xc0\x00", 1, 2)), "remainder"),
    ("rice unary length", lambda: blob(rice_entry(b"\x00" * 5 + b"\xa0", b"\xc0", 1, 2)), "unary"),
    (
        "rice range",
        lambda: blob(rice_entry(b"\x03", b"\xc0", 1, 2)),  # quotient 6 -> gap 13
        "Rice quotient 6 puts a position out of range for 12 elements",
    ),
    (
        "rice range sum",
        lambda: blob(rice_entry(b"\x09", b"\xc0", 1, 2)),  # gaps 9, 5: position 15
        "position 15 out of range for 12 elements",
    ),
    ("seeded ok", lambda: blob(seeded_entry(2**31, 8)), ""),
    ("seeded thr", lambda: blob(seeded_entry(2**32 + 1, 8)), "keep_threshold 4294967297 > 2**32"),
    ("seeded count", lambda: blob(seeded_entry(2**31, 7)), "keeps more than 7 positions"),
    ("seeded count low", lambda: blob(seeded_entry(2**31, 9)), "keeps 8 positions"),
    ("seeded numel", lambda: blob(seeded_entry(5, 0, shape=(2**32,))), "numel < 2**32"),
    (
        "nan",
        lambda: blob(entry(data=struct.pack("<2I", 1, 5) + struct.pack("<2f", 1, math.nan))),
        "tensor 't': non-finite value nan at value index 1",
    ),
    (
        "inf dense",
        lambda: blob(entry(shape=(1,), enc=0, count=1, data=struct.pack("<f", -math.inf))),
        "non-finite value -inf",
    ),
    (
        "inf bf16",
        lambda: blob(entry(shape=(1,), enc=0, count=1, data=b"\x80\x7f"), dcode=2),
        "non-finite value inf",
    ),
    (
        "nan fp16",
        lambda: blob(entry(shape=(1,), enc=0, count=1, data=b"\x00\x7e"), dcode=3),
        "non-finite value nan",
    ),
    ("duplicate", lambda: blob(entry(), entry()), "tensor 't': duplicate name"),
    ("utf8", lambda: blob(entry(name=b"\xff\xfe")), "entry 0: invalid UTF-8 name"),
]


@pytest.mark.parametrize(("label", "make", "match"), BAD_BLOBS, ids=[b[0] for b in BAD_BLOBS])
def test_decode_errors(label: str, make: Callable[[], bytes], match: str) -> None:
    data = make()
    if not match:  # a control: the well-formed variant of the cases around it decodes
        decode(data)
        return
    with pytest.raises(WireFormatError, match=re.escape(match)):
        decode(data)


def test_decode_max_numel_is_configurable() -> None:
    data = blob(entry(shape=(100, 100), count=2))
    decode(data)
    with pytest.raises(WireFormatError, match="numel 10000 exceeds max_numel 9999"):
        decode(data, max_numel=9999)


@pytest.mark.parametrize(
    ("expected", "match"),
    [
        ({"t": (12,), "u": (3,)}, "tensor 'u': expected but missing"),
        ({}, "tensor 't': unexpected name"),
        ({"t": (3, 4)}, "tensor 't': shape (12,) differs from expected (3, 4)"),
    ],
)
def test_decode_expected_shapes(expected: dict[str, tuple[int, ...]], match: str) -> None:
    with pytest.raises(WireFormatError, match=re.escape(match)):
        decode(GOOD, expected_shapes=expected)


def test_decode_type_errors_and_non_contiguous() -> None:
    with pytest.raises(TypeError):
        decode("FSRD")  # type: ignore[arg-type]
    arr = memoryview(bytes(range(24))).cast("B", (4, 6))
    with pytest.raises(WireFormatError, match="bad magic"):
        decode(arr)
    with pytest.raises(WireFormatError, match="not contiguous"):
        decode(memoryview(GOOD * 2)[::2])


@pytest.mark.parametrize("vd", ["fp32", "bf16", "fp16"])
def test_concatenated_blobs_are_the_encoding_of_all_their_entries(vd: Any) -> None:
    g = torch.Generator().manual_seed(21)
    thr = keep_threshold(0.2)
    kept = seeded_positions(3, 2, "s", 500, thr)
    assert kept is not None
    parts: list[dict[str, Any]] = [
        {"d": torch.randn(4, 6, generator=g)},
        {},  # a module with no delta
        {
            "r": SparseTensor((300,), torch.tensor([0, 7, 299]), torch.randn(3, generator=g)),
            "s": SeededSparse((500,), 3, 2, thr, torch.randn(kept.numel(), generator=g)),
        },
        {"e": torch.zeros(0, 5)},
    ]
    merged = {k: v for p in parts for k, v in p.items()}
    blobs = [encode(p, value_dtype=vd) for p in parts]
    assert b"".join(codec.concatenate_pieces(blobs)) == encode(merged, value_dtype=vd)
    # Each part keeps its own position encoding: the join decodes to every part's entries.
    mixed = [
        encode(p, value_dtype=vd, positions="bitmap" if i == 2 else "rice")
        for i, p in enumerate(parts)
    ]
    joined = decode(b"".join(codec.concatenate_pieces(mixed)))
    assert list(joined) == list(merged)
    for blob in mixed:
        for name, t in decode(blob).items():
            other = joined[name]
            if isinstance(t, torch.Tensor):
                assert isinstance(other, torch.Tensor) and torch.equal(t, other)
            else:
                assert isinstance(other, SparseTensor)
                assert torch.equal(t.indices, other.indices) and torch.equal(t.values, other.values)


def test_concatenate_refuses_what_it_cannot_join() -> None:
    a = encode({"x": torch.ones(3)})
    with pytest.raises(ValueError, match="nothing to concatenate"):
        codec.concatenate_pieces([])
    with pytest.raises(ValueError, match="more than one blob"):
        codec.concatenate_pieces([a, a])
    with pytest.raises(ValueError, match="different value dtypes"):
        codec.concatenate_pieces([a, encode({"y": torch.ones(2)}, value_dtype="bf16")])
    with pytest.raises(WireFormatError):
        codec.concatenate_pieces([a[:-1]])
