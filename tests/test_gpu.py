"""CUDA paths: the same results on the GPU as on the CPU (skipped without a CUDA device)."""

from __future__ import annotations

import pytest
import torch

from fedsrd_core.aggregate import aggregation_weights, fedsrd_module_delta
from fedsrd_core.masks import keep_threshold, seeded_mask
from fedsrd_core.state import init_state, state_digest

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_server_step_on_cuda_matches_cpu():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(16, 96, generator=g) / 10
    B = torch.randn(128, 16, generator=g) / 10
    dAs = [torch.randn(16, 96, generator=g) / 100 for _ in range(4)]
    dBs = [torch.randn(128, 16, generator=g) / 100 for _ in range(4)]
    w = aggregation_weights([1] * 4)
    for round_ in (1, 2):
        _, cpu = fedsrd_module_delta(A, B, dAs, dBs, w, round_=round_)
        _, gpu = fedsrd_module_delta(
            A.cuda(), B.cuda(), [x.cuda() for x in dAs], [x.cuda() for x in dBs], w, round_=round_
        )
        assert gpu.is_cuda
        torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-6)


def test_seeded_mask_is_identical_on_cuda():
    thr = keep_threshold(0.2)
    cpu = seeded_mask(7, 3, "m.lora_B", (300, 64), thr)
    gpu = seeded_mask(7, 3, "m.lora_B", (300, 64), thr, device="cuda")
    assert torch.equal(gpu.cpu(), cpu)


def test_digest_is_device_independent():
    s = init_state({"m": (8, 6)}, 2, seed=1)
    d = state_digest(s)
    assert state_digest(init_state({"m": (8, 6)}, 2, seed=1, device="cuda")) == d
