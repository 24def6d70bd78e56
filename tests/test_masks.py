"""Tests of the seeded download masks against an independent pure-Python implementation."""

from __future__ import annotations

import hashlib
import math

import pytest
import torch

from fedsrd_core import masks
from fedsrd_core.masks import (
    hash32,
    keep_threshold,
    mask_key,
    mask_uniform32,
    seeded_mask,
    seeded_positions,
)

# --------------------------------------------------------------------------------------------
# Independent reference: plain Python ints only, written from the spec in docs/wire-format.md.


def ref_key(seed: int, rnd: int, name: str) -> tuple[int, int]:
    msg = b"fedsrd-mask-v1\x00" + seed.to_bytes(8, "little") + rnd.to_bytes(8, "little")
    d = hashlib.sha256(msg + name.encode("utf-8")).digest()
    return int.from_bytes(d[:4], "little"), int.from_bytes(d[4:8], "little")


def ref_hash32(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x45D9F3B) % 2**32
    x ^= x >> 16
    x = (x * 0x45D9F3B) % 2**32
    x ^= x >> 16
    return x


def ref_u(seed: int, rnd: int, name: str, j: int) -> int:
    k0, k1 = ref_key(seed, rnd, name)
    return ref_hash32(ref_hash32(j ^ k0) ^ k1)


# Frozen golden values (from the reference above when the format was fixed): they make any
# change of the mask function, in the code or in the reference, fail loudly.
GOLDEN_KEY = ((42, 1, "m"), (880661055, 1991550659))
GOLDEN_U = [4167992963, 316400226, 3270910062, 3824249871, 573497842, 1510190318]


def test_golden_key_and_values() -> None:
    args, key = GOLDEN_KEY
    assert ref_key(*args) == key
    assert mask_key(*args) == key
    u = mask_uniform32(*args, 6)
    assert u.dtype == torch.int64
    assert u.tolist() == GOLDEN_U
    assert [ref_u(*args, j) for j in range(6)] == GOLDEN_U


@pytest.mark.parametrize(
    ("seed", "rnd", "name"),
    [
        (0, 0, ""),
        (2**64 - 1, 2**64 - 1, "layers.0.self_attn.q_proj.lora_B"),
        (123456789, 7, "é漢字🙂"),
    ],
)
def test_matches_reference(seed: int, rnd: int, name: str) -> None:
    assert mask_key(seed, rnd, name) == ref_key(seed, rnd, name)
    # Crosses a chunk boundary of the chunked implementation.
    n = masks._CHUNK + 37
    u = mask_uniform32(seed, rnd, name, n)
    for j in [0, 1, 2, 1000, masks._CHUNK - 1, masks._CHUNK, n - 1]:
        assert int(u[j]) == ref_u(seed, rnd, name, j)
    assert int(u.min()) >= 0
    assert int(u.max()) < 2**32


def test_hash32_reference_and_bijection_sample() -> None:
    xs = [0, 1, 2, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 123456789]
    got = hash32(torch.tensor(xs, dtype=torch.int64)).tolist()
    assert got == [ref_hash32(x) for x in xs]
    # A bijection has no collisions: check on a structured sample.
    sample = torch.arange(0, 2**32, 4093, dtype=torch.int64)
    assert torch.unique(hash32(sample)).numel() == sample.numel()


def test_hash32_rejects_other_dtypes() -> None:
    with pytest.raises(ValueError, match="int64"):
        hash32(torch.tensor([1, 2], dtype=torch.int32))


def test_keep_threshold() -> None:
    assert keep_threshold(0.0) == 0
    assert keep_threshold(1.0) == 2**32
    assert keep_threshold(0.5) == 2**31
    assert keep_threshold(0.1) == round(0.1 * 2**32)
    for bad in [-0.01, 1.01, math.nan, math.inf, -math.inf]:
        with pytest.raises(ValueError, match="keep_prob"):
            keep_threshold(bad)


@pytest.mark.parametrize("bad", [-1, 2**64, 1.5, True])
def test_key_range_checks(bad: object) -> None:
    with pytest.raises(ValueError, match="seed"):
        mask_key(bad, 0, "x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="round"):
        mask_key(0, bad, "x")  # type: ignore[arg-type]


def test_numel_limit_checked_before_allocating() -> None:
    with pytest.raises(ValueError, match="2\\*\\*32"):
        mask_uniform32(0, 0, "x", 2**32)
    with pytest.raises(ValueError, match="2\\*\\*32"):
        seeded_mask(0, 0, "x", (2**16, 2**16), 5)
    with pytest.raises(ValueError, match="keep_threshold"):
        seeded_mask(0, 0, "x", (4,), 2**32 + 1)


@pytest.mark.parametrize("p", [0.01, 0.1, 0.5, 0.9])
def test_kept_fraction_close_to_keep_prob(p: float) -> None:
    n = 1_000_000
    mask = seeded_mask(3, 11, "layers.3.mlp.down_proj.lora_A", (1000, 1000), keep_threshold(p))
    assert mask.dtype == torch.bool
    assert mask.shape == (1000, 1000)
    frac = mask.float().mean().item()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(frac - p) < 6 * sigma, (frac, p)


def test_extreme_thresholds() -> None:
    assert not seeded_mask(1, 2, "x", (3, 5), 0).any()
    assert seeded_mask(1, 2, "x", (3, 5), 2**32).all()
    u = mask_uniform32(1, 2, "x", 15)
    # Threshold 1 keeps exactly the positions with u == 0 (almost surely none).
    assert torch.equal(seeded_mask(1, 2, "x", (15,), 1), u < 1)
    assert seeded_mask(1, 2, "x", (0, 4), 7).shape == (0, 4)
    assert seeded_mask(1, 2, "x", (), 2**32).shape == ()


def test_different_inputs_give_different_masks() -> None:
    p, shape = 0.3, (300, 200)
    thr = keep_threshold(p)
    base = seeded_mask(5, 9, "a.lora_B", shape, thr)
    others = [
        seeded_mask(6, 9, "a.lora_B", shape, thr),
        seeded_mask(5, 10, "a.lora_B", shape, thr),
        seeded_mask(5, 9, "a.lora_A", shape, thr),
        seeded_mask(2**32 + 5, 9, "a.lora_B", shape, thr),  # high bits of the seed matter
    ]
    n = base.numel()
    # Independent masks agree on a fraction p^2 + (1-p)^2 of positions.
    expect = p * p + (1 - p) * (1 - p)
    for m in others:
        agree = (m == base).float().mean().item()
        assert abs(agree - expect) < 6 * math.sqrt(expect * (1 - expect) / n)
    # Same inputs: same mask (deterministic).
    assert torch.equal(seeded_mask(5, 9, "a.lora_B", shape, thr), base)


def test_seeded_positions_match_mask() -> None:
    thr = keep_threshold(0.2)
    n = 2 * masks._CHUNK + 11
    mask = seeded_mask(8, 1, "w", (n,), thr)
    pos = seeded_positions(8, 1, "w", n, thr)
    assert pos is not None
    assert torch.equal(pos, torch.nonzero(mask).view(-1))
    count = pos.numel()
    assert seeded_positions(8, 1, "w", n, thr, max_count=count - 1) is None
    same = seeded_positions(8, 1, "w", n, thr, max_count=count)
    assert same is not None
    assert torch.equal(same, pos)
    assert seeded_positions(8, 1, "w", 10, 2**32, max_count=9) is None
    all_pos = seeded_positions(8, 1, "w", 10, 2**32)
    assert all_pos is not None
    assert all_pos.tolist() == list(range(10))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    thr = keep_threshold(0.37)
    shape = (3072, 64)
    cpu = seeded_mask(17, 4, "x", shape, thr)
    gpu = seeded_mask(17, 4, "x", shape, thr, device="cuda")
    assert torch.equal(cpu, gpu.cpu())
    assert torch.equal(
        mask_uniform32(1, 2, "y", 5000), mask_uniform32(1, 2, "y", 5000, "cuda").cpu()
    )
