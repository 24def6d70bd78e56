"""Global state: digest (platform-independent), applying deltas, initialisation."""

from __future__ import annotations

import hashlib
import struct

import pytest
import torch

from fedsrd_core.sparse import SparseTensor
from fedsrd_core.state import (
    GlobalState,
    LoraFactors,
    apply_delta,
    init_state,
    split_wire_name,
    state_digest,
)


def tiny_state() -> GlobalState:
    return GlobalState(
        {
            "m.b": LoraFactors(torch.tensor([[1.0, -2.0]]), torch.tensor([[0.5], [0.25]])),
            "m.a": LoraFactors(torch.tensor([[3.0]]), torch.tensor([[-0.0]])),
        }
    )


def test_digest_matches_the_documented_byte_string():
    # Built by hand from the docstring's definition with struct (IEEE-754 little-endian).
    h = hashlib.sha256(b"fedsrd-state-v1")
    for name, shape, vals in [
        ("m.a.lora_A", (1, 1), [3.0]),
        ("m.a.lora_B", (1, 1), [-0.0]),
        ("m.b.lora_A", (1, 2), [1.0, -2.0]),
        ("m.b.lora_B", (2, 1), [0.5, 0.25]),
    ]:
        n = name.encode()
        h.update(struct.pack("<I", len(n)) + n + struct.pack("<II", *shape))
        h.update(struct.pack(f"<{len(vals)}f", *vals))
    assert state_digest(tiny_state()) == h.hexdigest()


def test_digest_sees_every_bit():
    s = tiny_state()
    d0 = state_digest(s)
    s["m.a"].B.fill_(0.0)  # -0.0 -> +0.0: equal as floats, different bits
    assert state_digest(s) != d0


def test_apply_delta_dense_and_sparse():
    s = tiny_state()
    apply_delta(
        s,
        {
            "m.b.lora_A": torch.tensor([[1.0, 1.0]]),
            "m.b.lora_B": SparseTensor((2, 1), torch.tensor([1]), torch.tensor([0.75])),
        },
    )
    assert s["m.b"].A.tolist() == [[2.0, -1.0]]
    assert s["m.b"].B.tolist() == [[0.5], [1.0]]
    with pytest.raises(ValueError, match="delta shape"):
        apply_delta(s, {"m.b.lora_A": torch.zeros(2, 2)})
    with pytest.raises(KeyError):
        apply_delta(s, {"nope.lora_A": torch.zeros(1, 1)})


def test_split_wire_name():
    assert split_wire_name("x.y.lora_B") == ("x.y", "B")
    with pytest.raises(ValueError, match="ends neither"):
        split_wire_name("x.weight")


def test_init_state_is_deterministic_and_B_is_zero():
    layout = {"l1": (8, 6), "l0": (4, 5)}
    a, b = init_state(layout, 3, seed=9), init_state(layout, 3, seed=9)
    assert state_digest(a) == state_digest(b)
    assert state_digest(a) != state_digest(init_state(layout, 3, seed=10))
    assert list(a) == ["l0", "l1"]
    assert a["l1"].A.shape == (3, 6) and a["l1"].B.shape == (8, 3)
    assert a["l1"].B.abs().sum() == 0
    assert a["l0"].A.abs().max() <= 1 / 5**0.5
    assert a.num_parameters() == 3 * (8 + 6) + 3 * (4 + 5)
    assert a.wire_shapes()["l0.lora_B"] == (4, 3)
