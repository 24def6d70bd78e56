"""Platform-independent pseudo-random download masks (DARE-style random keeping).

The server and every client must agree bit for bit on which positions of a tensor a seeded
mask keeps, whatever the device (CPU or CUDA), the torch version or the platform. So the mask
is not drawn from a torch generator (whose streams differ between devices and versions) but
computed from a small, fully specified integer hash:

* a 64-bit key ``(k0, k1)`` is derived from ``(seed, round, name)`` with SHA-256
  (:func:`mask_key`);
* every flat position ``j`` gets a 32-bit pseudo-random number
  ``u[j] = hash32(hash32(j XOR k0) XOR k1)`` (:func:`mask_uniform32`);
* position ``j`` is kept iff ``u[j] < keep_threshold`` with
  ``keep_threshold = round(keep_prob * 2**32)`` (:func:`keep_threshold`,
  :func:`seeded_mask`).

All tensor arithmetic is on ``int64`` holding values below ``2**32``: the only products are a
value below ``2**32`` times the constant ``0x45D9F3B < 2**27``, so they stay below ``2**59`` and
never overflow; results are therefore identical on every device. The same equations are
specified byte for byte in ``docs/wire-format.md`` so a third party can regenerate masks.
"""

from __future__ import annotations

import hashlib
import math

import torch

__all__ = [
    "MASK_DOMAIN",
    "hash32",
    "keep_threshold",
    "mask_key",
    "mask_uniform32",
    "seeded_mask",
    "seeded_positions",
]

#: Domain-separation prefix of the key derivation (versioned: a new mask function gets v2).
MASK_DOMAIN = b"fedsrd-mask-v1\x00"

_U32 = 0xFFFFFFFF
_MULT = 0x45D9F3B  # < 2**27, so (x < 2**32) * _MULT < 2**59: no int64 overflow anywhere.
_MAX_U64 = 2**64
_THRESHOLD_ALL = 2**32
# Elements hashed per chunk: a chunk and its scratch buffer (2 x 2 MiB of int64) stay in the
# CPU cache, which measured ~10x faster than hashing a 4M-element tensor in one pass on a
# 2-core machine (0.029 s vs 0.30 s), and it bounds the scratch memory of large masks.
_CHUNK = 2**18


def mask_key(seed: int, round: int, name: str) -> tuple[int, int]:
    """Derive the 64-bit mask key ``(k0, k1)`` of tensor ``name`` in ``round``.

    ``digest = SHA-256(b"fedsrd-mask-v1\\x00" + seed.to_bytes(8, "little")
    + round.to_bytes(8, "little") + name.encode("utf-8"))``; ``k0`` is ``digest[0:4]`` and
    ``k1`` is ``digest[4:8]``, each read as a little-endian unsigned 32-bit integer.

    Args:
        seed: the federation's mask seed, in ``[0, 2**64)``.
        round: the round number, in ``[0, 2**64)``.
        name: the tensor's name (any string that is valid UTF-8, i.e. without lone
            surrogates).

    Returns:
        ``(k0, k1)``, two Python ints in ``[0, 2**32)``.

    Raises:
        ValueError: ``seed`` or ``round`` out of range, or ``name`` not encodable as UTF-8.
    """
    for label, v in (("seed", seed), ("round", round)):
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < _MAX_U64:
            raise ValueError(f"`{label}` must be an int in [0, 2**64), got {v!r}")
    try:
        name_bytes = name.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"mask name {name!r} is not valid UTF-8: {exc}") from None
    digest = hashlib.sha256(
        MASK_DOMAIN + seed.to_bytes(8, "little") + round.to_bytes(8, "little") + name_bytes
    ).digest()
    return int.from_bytes(digest[0:4], "little"), int.from_bytes(digest[4:8], "little")


def _hash32_(x: torch.Tensor, tmp: torch.Tensor) -> None:
    """In place ``x = hash32(x)``; ``tmp`` is an int64 scratch tensor of ``x``'s shape."""
    torch.bitwise_right_shift(x, 16, out=tmp)
    x.bitwise_xor_(tmp)
    x.mul_(_MULT).bitwise_and_(_U32)
    torch.bitwise_right_shift(x, 16, out=tmp)
    x.bitwise_xor_(tmp)
    x.mul_(_MULT).bitwise_and_(_U32)
    torch.bitwise_right_shift(x, 16, out=tmp)
    x.bitwise_xor_(tmp)


def hash32(x: torch.Tensor) -> torch.Tensor:
    """The 32-bit integer mixing function of the masks, elementwise.

    With ``M = 0x45D9F3B`` and all values as unsigned 32-bit integers held in int64::

        x ^= x >> 16;  x = (x * M) & 0xFFFFFFFF
        x ^= x >> 16;  x = (x * M) & 0xFFFFFFFF
        x ^= x >> 16

    It is a bijection of ``[0, 2**32)`` (each xor-shift and each multiplication by the odd
    ``M`` modulo ``2**32`` is invertible).

    Args:
        x: int64 tensor of any shape, every value in ``[0, 2**32)`` (not checked: values
            outside give unspecified results).

    Returns:
        A new int64 tensor of ``x``'s shape and device, values in ``[0, 2**32)``.
    """
    if x.dtype != torch.int64:
        raise ValueError(f"hash32 needs an int64 tensor, got {x.dtype}")
    out = x.clone()
    _hash32_(out, torch.empty_like(out))
    return out


def _check_numel(numel: int) -> None:
    if isinstance(numel, bool) or not isinstance(numel, int) or not 0 <= numel < 2**32:
        raise ValueError(f"mask numel must be an int in [0, 2**32), got {numel!r}")


def _uniform_chunk(out: torch.Tensor, tmp: torch.Tensor, start: int, k0: int, k1: int) -> None:
    """Fill int64 ``out`` with ``u[start : start + len(out)]`` (``tmp``: scratch, same size)."""
    torch.arange(start, start + out.numel(), dtype=torch.int64, device=out.device, out=out)
    out.bitwise_xor_(k0)
    _hash32_(out, tmp)
    out.bitwise_xor_(k1)
    _hash32_(out, tmp)


def mask_uniform32(
    seed: int,
    round: int,
    name: str,
    numel: int,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The per-position 32-bit pseudo-random numbers of a seeded mask.

    ``u[j] = hash32(hash32(j ^ k0) ^ k1)`` for every flat row-major position
    ``j in [0, numel)``, with ``(k0, k1) = mask_key(seed, round, name)``.

    Args:
        seed, round, name: see :func:`mask_key`.
        numel: number of positions, in ``[0, 2**32)``.
        device: where to compute and return the tensor (default CPU); the values are the
            same on every device.

    Returns:
        int64 tensor of shape ``(numel,)``, values in ``[0, 2**32)``.
    """
    _check_numel(numel)
    k0, k1 = mask_key(seed, round, name)
    out = torch.empty(numel, dtype=torch.int64, device=device)
    tmp = torch.empty(min(numel, _CHUNK), dtype=torch.int64, device=device)
    for start in range(0, numel, _CHUNK):
        chunk = out[start : start + _CHUNK]
        _uniform_chunk(chunk, tmp[: chunk.numel()], start, k0, k1)
    return out


def keep_threshold(keep_prob: float) -> int:
    """The integer keep threshold of a keep probability: ``round(keep_prob * 2**32)``.

    Rounding is Python's ``round`` (half to even) on the exact double product, clamped to
    ``[0, 2**32]``. A position is kept iff its ``u < threshold``, so 0 keeps nothing and
    ``2**32`` keeps everything.

    Raises:
        ValueError: ``keep_prob`` not a finite number in ``[0, 1]``.
    """
    p = float(keep_prob)
    if not math.isfinite(p) or not 0.0 <= p <= 1.0:
        raise ValueError(f"`keep_prob` must be finite and in [0, 1], got {keep_prob!r}")
    return min(max(round(p * 2**32), 0), _THRESHOLD_ALL)


def _check_threshold(threshold: int) -> None:
    if (
        isinstance(threshold, bool)
        or not isinstance(threshold, int)
        or not 0 <= threshold <= _THRESHOLD_ALL
    ):
        raise ValueError(f"`keep_threshold` must be an int in [0, 2**32], got {threshold!r}")


def seeded_mask(
    seed: int,
    round: int,
    name: str,
    shape: tuple[int, ...],
    keep_threshold: int,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The boolean keep-mask of tensor ``name`` in ``round``: ``u < keep_threshold``.

    ``u`` is :func:`mask_uniform32` over the flat row-major positions of ``shape``.

    Args:
        seed, round, name: see :func:`mask_key`.
        shape: the tensor's shape; its element count must be below ``2**32``.
        keep_threshold: integer in ``[0, 2**32]`` (see :func:`keep_threshold`).
        device: where to compute and return the mask (default CPU).

    Returns:
        bool tensor of ``shape``.
    """
    numel = math.prod(shape)
    _check_numel(numel)
    _check_threshold(keep_threshold)
    k0, k1 = mask_key(seed, round, name)
    out = torch.empty(numel, dtype=torch.bool, device=device)
    if keep_threshold in (0, _THRESHOLD_ALL):
        out.fill_(keep_threshold == _THRESHOLD_ALL)
        return out.view(shape)
    n = min(numel, _CHUNK)
    u = torch.empty(n, dtype=torch.int64, device=device)
    tmp = torch.empty(n, dtype=torch.int64, device=device)
    for start in range(0, numel, _CHUNK):
        m = min(_CHUNK, numel - start)
        _uniform_chunk(u[:m], tmp[:m], start, k0, k1)
        torch.lt(u[:m], keep_threshold, out=out[start : start + m])
    return out.view(shape)


def seeded_positions(
    seed: int,
    round: int,
    name: str,
    numel: int,
    keep_threshold: int,
    *,
    max_count: int | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor | None:
    """The kept flat positions of a seeded mask, in increasing order.

    Equivalent to ``seeded_mask(...).flatten().nonzero().flatten()`` but computed chunk by
    chunk, so the memory used is that of the result plus a fixed-size scratch buffer (never
    ``numel``-sized): the decoder relies on this to bound what a hostile blob can make it
    allocate.

    Args:
        seed, round, name: see :func:`mask_key`.
        numel: number of positions, in ``[0, 2**32)``.
        keep_threshold: integer in ``[0, 2**32]``.
        max_count: if given, stop and return ``None`` as soon as more than ``max_count``
            positions are kept (a decoder expecting exactly ``max_count`` values can then
            reject a blob without finishing the scan).
        device: where to compute (default CPU).

    Returns:
        int64 tensor ``(count,)`` of positions, or ``None`` if ``max_count`` was exceeded.
    """
    _check_numel(numel)
    _check_threshold(keep_threshold)
    k0, k1 = mask_key(seed, round, name)
    if keep_threshold == 0:
        return torch.empty(0, dtype=torch.int64, device=device)
    if keep_threshold == _THRESHOLD_ALL:
        if max_count is not None and numel > max_count:
            return None
        return torch.arange(numel, dtype=torch.int64, device=device)
    n = min(numel, _CHUNK)
    u = torch.empty(n, dtype=torch.int64, device=device)
    tmp = torch.empty(n, dtype=torch.int64, device=device)
    parts: list[torch.Tensor] = []
    total = 0
    for start in range(0, numel, _CHUNK):
        m = min(_CHUNK, numel - start)
        _uniform_chunk(u[:m], tmp[:m], start, k0, k1)
        idx = torch.nonzero(u[:m] < keep_threshold).view(-1)
        total += idx.numel()
        if max_count is not None and total > max_count:
            return None
        parts.append(idx.add_(start))
    if not parts:
        return torch.empty(0, dtype=torch.int64, device=device)
    return torch.cat(parts)
