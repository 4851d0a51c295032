"""pytest-benchmark: affine_hswish (eval BatchNorm + Hardswish) at an MPViT-S stem shape,
eager vs ours, on CUDA when there is one (else the CPU twin). `pytest benchmarks/`."""
import pytest
import torch
import torch.nn.functional as F

import mpvit_kernels
from mpvit_kernels.bench.timing import SUITE_DEVICE as DEVICE, sync

BATCH = 16 if DEVICE == "cuda" else 2


@pytest.fixture(scope="module")
def inputs():
    x = torch.randn(BATCH, 64, 56, 56, device=DEVICE).contiguous(memory_format=torch.channels_last)
    w, b, mean = (torch.randn(64, device=DEVICE) for _ in range(3))
    var = torch.rand(64, device=DEVICE) + 0.5
    return x, w, b, mean, var


@pytest.mark.parametrize("impl", ["eager", "ours"])
def test_affine_hswish_forward(benchmark, inputs, impl):
    x, w, b, mean, var = inputs
    scale, shift = mpvit_kernels.reference.fold_bn(w, b, mean, var, 1e-5)
    if impl == "eager":
        def fn():
            F.hardswish(F.batch_norm(x, mean, var, w, b, False, 0.0, 1e-5))
            sync()
    else:
        def fn():
            mpvit_kernels.ops.affine_hswish(x, scale, shift, True)
            sync()
    benchmark.group = f"affine_hswish forward {DEVICE} {tuple(x.shape)}"
    benchmark(fn)
