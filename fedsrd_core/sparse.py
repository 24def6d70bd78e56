"""A sparse tensor as the wire and the algorithms see it: flat positions plus values.

Positions are flat row-major indices into ``shape``, strictly increasing, int64. Values are
one per position. This is deliberately simpler than ``torch.sparse``: the codec, the
sparsifiers and the server all index flat factors, and a plain (indices, values) pair is
trivially portable to a third-party implementation of the wire format.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SparseTensor:
    """A tensor of ``shape`` that is zero except at ``indices``.

    Attributes:
        shape: the dense shape, e.g. ``(d_out, r)`` for a LoRA B factor.
        indices: ``int64[k]``, flat row-major positions, strictly increasing, each in
            ``[0, numel)``.
        values: ``float[k]``, the value at each position (float32 for all math here).
    """

    shape: tuple[int, ...]
    indices: torch.Tensor
    values: torch.Tensor

    def __post_init__(self) -> None:
        if self.indices.dim() != 1 or self.values.dim() != 1:
            raise ValueError("`indices` and `values` must be 1-D")
        if self.indices.numel() != self.values.numel():
            raise ValueError(
                f"`indices` has {self.indices.numel()} entries but `values` has "
                f"{self.values.numel()}"
            )
        if self.indices.dtype != torch.int64:
            raise ValueError(f"`indices` must be int64, got {self.indices.dtype}")
        if any(d < 0 for d in self.shape):
            raise ValueError(f"`shape` must be non-negative, got {self.shape}")

    @property
    def numel(self) -> int:
        """Number of elements of the dense tensor."""
        return math.prod(self.shape)

    @property
    def nnz(self) -> int:
        """Number of stored positions."""
        return int(self.indices.numel())

    @property
    def density(self) -> float:
        """Fraction of stored positions, ``nnz / numel`` (0 for an empty shape)."""
        n = self.numel
        return self.nnz / n if n else 0.0

    def to_dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Materialise the dense tensor (zeros except at ``indices``)."""
        out = torch.zeros(self.numel, dtype=dtype or self.values.dtype, device=self.values.device)
        out[self.indices.to(out.device)] = self.values.to(out.dtype)
        return out.view(self.shape)

    def add_to_(self, dense: torch.Tensor) -> torch.Tensor:
        """In place ``dense += self`` (``dense`` must be contiguous and of ``shape``)."""
        if tuple(dense.shape) != self.shape:
            raise ValueError(f"shape mismatch: dense {tuple(dense.shape)} vs sparse {self.shape}")
        flat = dense.view(-1)
        flat.index_add_(0, self.indices.to(flat.device), self.values.to(flat.dtype))
        return dense

    @classmethod
    def from_dense(cls, dense: torch.Tensor) -> SparseTensor:
        """The non-zero entries of ``dense``, positions in increasing order."""
        flat = dense.reshape(-1)
        idx = torch.nonzero(flat, as_tuple=False).view(-1)
        return cls(tuple(dense.shape), idx, flat[idx].clone())

    @classmethod
    def from_mask(cls, dense: torch.Tensor, mask: torch.Tensor) -> SparseTensor:
        """The entries of ``dense`` where boolean ``mask`` (same shape) is true."""
        idx = torch.nonzero(mask.reshape(-1), as_tuple=False).view(-1)
        return cls(tuple(dense.shape), idx, dense.reshape(-1)[idx].clone())
