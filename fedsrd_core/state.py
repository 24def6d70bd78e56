"""The global LoRA state shared bit-identically by the server and every in-sync client.

For every adapted linear layer ("module") the state holds the LoRA factors
``B`` (``d_out x r``, float32) and ``A`` (``r x d_in``, float32); the adapted layer computes
``W0 + B @ A`` (the scale ``lora_alpha / r`` is applied by the model, not stored here).

On the wire and in digests a module contributes two tensors named ``"<module>.lora_A"`` and
``"<module>.lora_B"``.
"""

from __future__ import annotations

import hashlib
import math
import struct
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch

from fedsrd_core.sparse import SparseTensor

A_SUFFIX = ".lora_A"
B_SUFFIX = ".lora_B"

#: ``module name -> (d_out, d_in)`` of the adapted linear layer.
Layout = Mapping[str, tuple[int, int]]


@dataclass
class LoraFactors:
    """The LoRA factors of one module: ``B`` (``d_out x r``) and ``A`` (``r x d_in``)."""

    A: torch.Tensor
    B: torch.Tensor

    def __post_init__(self) -> None:
        if self.A.dim() != 2 or self.B.dim() != 2:
            raise ValueError("`A` and `B` must be 2-D")
        if self.A.shape[0] != self.B.shape[1]:
            raise ValueError(
                f"rank mismatch: `A` is {tuple(self.A.shape)} but `B` is {tuple(self.B.shape)}"
            )

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    def clone(self) -> LoraFactors:
        return LoraFactors(self.A.clone(), self.B.clone())


class GlobalState:
    """An ordered mapping ``module name -> LoraFactors``, iterated in sorted name order."""

    def __init__(self, modules: Mapping[str, LoraFactors]) -> None:
        self._modules: dict[str, LoraFactors] = {k: modules[k] for k in sorted(modules)}

    def __getitem__(self, name: str) -> LoraFactors:
        return self._modules[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._modules)

    def __len__(self) -> int:
        return len(self._modules)

    def items(self) -> Iterator[tuple[str, LoraFactors]]:
        return iter(self._modules.items())

    def clone(self) -> GlobalState:
        return GlobalState({k: v.clone() for k, v in self._modules.items()})

    def wire_shapes(self) -> dict[str, tuple[int, ...]]:
        """``{"<module>.lora_A": (r, d_in), "<module>.lora_B": (d_out, r)}`` for every module."""
        out: dict[str, tuple[int, ...]] = {}
        for name, f in self._modules.items():
            out[name + A_SUFFIX] = tuple(f.A.shape)
            out[name + B_SUFFIX] = tuple(f.B.shape)
        return out

    def num_parameters(self) -> int:
        return sum(f.A.numel() + f.B.numel() for f in self._modules.values())


def split_wire_name(name: str) -> tuple[str, str]:
    """``"m.lora_A" -> ("m", "A")``; raises ``ValueError`` for any other suffix."""
    if name.endswith(A_SUFFIX):
        return name[: -len(A_SUFFIX)], "A"
    if name.endswith(B_SUFFIX):
        return name[: -len(B_SUFFIX)], "B"
    raise ValueError(f"tensor name {name!r} ends neither in {A_SUFFIX!r} nor {B_SUFFIX!r}")


def init_state(
    layout: Layout,
    rank: int,
    *,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> GlobalState:
    """Fresh LoRA factors: ``B = 0`` and ``A ~ U(-1/sqrt(d_in), 1/sqrt(d_in))``.

    ``A`` is drawn module by module, in sorted name order, from one CPU generator seeded with
    ``seed`` (so the same layout and seed give the same factors on every machine), then moved
    to ``device``.
    """
    if rank < 1:
        raise ValueError(f"`rank` must be >= 1, got {rank}")
    gen = torch.Generator().manual_seed(seed)
    modules: dict[str, LoraFactors] = {}
    for name in sorted(layout):
        d_out, d_in = layout[name]
        bound = 1.0 / math.sqrt(d_in)
        A = (torch.rand(rank, d_in, generator=gen) * 2 - 1) * bound
        modules[name] = LoraFactors(A.to(device), torch.zeros(d_out, rank, device=device))
    return GlobalState(modules)


def apply_delta(state: GlobalState, delta: Mapping[str, torch.Tensor | SparseTensor]) -> None:
    """Add a (global) delta to ``state`` in place: ``factor += delta[name]`` for each name.

    ``delta`` maps wire names (``"<module>.lora_A"`` / ``".lora_B"``) to dense tensors or
    :class:`SparseTensor` values (float32). The server applies exactly the tensors it
    broadcasts (after wire quantisation), and every client applies the decoded copy, so the
    float32 additions are the same on both sides and the factors stay bit-identical.
    """
    for name, value in delta.items():
        module, which = split_wire_name(name)
        factors = state[module]
        target = factors.A if which == "A" else factors.B
        if isinstance(value, SparseTensor):
            value.add_to_(target)
        else:
            if tuple(value.shape) != tuple(target.shape):
                raise ValueError(
                    f"{name}: delta shape {tuple(value.shape)} != factor shape "
                    f"{tuple(target.shape)}"
                )
            target.add_(value.to(device=target.device, dtype=target.dtype))


def rebalance_factors(state: GlobalState) -> None:
    """Balance each rank component's scale between ``B`` and ``A`` by a power of two, in place.

    For component ``j`` with ``e_A = exponent(max |A[j, :]|)`` and
    ``e_B = exponent(max |B[:, j]|)`` (``frexp`` exponents), ``k = floor((e_A - e_B) / 2)``,
    ``B[:, j] *= 2**k`` and ``A[j, :] *= 2**-k``; components with an all-zero factor are left
    alone. Scaling by a power of two is exact in floating point and so is every product
    ``B[u, j] * A[j, v]``, so ``B @ A`` is unchanged bit for bit, and ``k`` is computed from
    exact quantities (a maximum and an exponent), so every platform gets the same factors.

    Why: FedSRD's alternating closed-form updates (``dA = pinv(B) T`` while ``B`` is still
    small) let the norms of ``A`` and ``B`` drift apart by orders of magnitude. Adam then
    takes steps of about the learning rate per element on each factor, so the change of
    ``B A`` per step grows with the imbalance and local training overshoots.
    """
    for _, f in state.items():
        a = f.A.abs().amax(dim=1)
        b = f.B.abs().amax(dim=0)
        ea = torch.frexp(a).exponent
        eb = torch.frexp(b).exponent
        k = torch.div(ea - eb, 2, rounding_mode="floor")
        k = torch.where((a > 0) & (b > 0), k, torch.zeros_like(k))
        if bool((k != 0).any()):
            f.B.copy_(torch.ldexp(f.B, k.unsqueeze(0).to(f.B.device)))
            f.A.copy_(torch.ldexp(f.A, (-k).unsqueeze(1).to(f.A.device)))


def _le_bytes(t: torch.Tensor) -> bytes:
    """Row-major little-endian bytes of a float32 tensor, whatever the host byte order."""
    data = t.detach().to(device="cpu", dtype=torch.float32).contiguous()
    raw = data.view(torch.uint8) if data.numel() else torch.empty(0, dtype=torch.uint8)
    if sys.byteorder == "big":  # pragma: no cover - no big-endian CI machine
        raw = raw.view(-1, 4).flip(1).reshape(-1)
    return raw.numpy().tobytes() if raw.numel() else b""


def state_digest(state: GlobalState) -> str:
    """SHA-256 (hex) of the global factors, identical on every platform for identical bits.

    The hashed byte string is, for every module in sorted name order and for ``A`` then
    ``B``: the UTF-8 wire name prefixed by its length (u32 LE), the two dimensions (u32 LE
    each), then the float32 values in row-major order, little-endian. It prefixes the whole
    with ``b"fedsrd-state-v1"``. Tensors on any device hash the same.
    """
    hasher = StateHasher()
    for module, f in state.items():
        hasher.add(module, f)
    return hasher.hexdigest()


class StateHasher:
    """:func:`state_digest` one module at a time: ``add`` every module in sorted name order,
    then ``hexdigest`` equals ``state_digest`` of the whole state (for a server that never
    holds the whole state)."""

    def __init__(self) -> None:
        self._h = hashlib.sha256(b"fedsrd-state-v1")
        self._last: str | None = None

    def add(self, module: str, f: LoraFactors) -> None:
        if self._last is not None and module <= self._last:
            raise ValueError(f"modules must come in sorted order: {module!r} after {self._last!r}")
        self._last = module
        for suffix, t in ((A_SUFFIX, f.A), (B_SUFFIX, f.B)):
            name = (module + suffix).encode("utf-8")
            self._h.update(struct.pack("<I", len(name)) + name)
            self._h.update(struct.pack("<II", *t.shape))
            self._h.update(_le_bytes(t))

    def hexdigest(self) -> str:
        return self._h.hexdigest()
