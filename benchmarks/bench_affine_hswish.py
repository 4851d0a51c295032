"""pytest-benchmark: affine_hswish (eval BatchNorm + Hardswish) at an MPViT-S stem shape, eager
vs torch.compile vs ours, forward and forward+backward, on CUDA when there is one (else the CPU
twin). `pytest benchmarks/`."""
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


def eager(x, w, b, mean, var):
    return F.hardswish(F.batch_norm(x, mean, var, w, b, False, 0.0, 1e-5))


def ours(x, w, b, mean, var):
    scale, shift = mpvit_kernels.reference.fold_bn(w, b, mean, var, 1e-5)
    return mpvit_kernels.ops.affine_hswish(x, scale, shift, True)


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "forward+backward"])
@pytest.mark.parametrize("impl", ["eager", "torch.compile", "ours"])
def test_affine_hswish(benchmark, inputs, impl, backward):
    x, w, b, mean, var = inputs
    fn = {"eager": eager, "torch.compile": torch.compile(eager), "ours": ours}[impl]
    x = x.detach().requires_grad_(backward)
    grad = torch.randn_like(x)

    def step():
        if backward:
            fn(x, w, b, mean, var).backward(grad)
        else:
            with torch.no_grad():
                fn(x, w, b, mean, var)
        sync()

    step()  # a compile happens here, outside the timing
    benchmark.group = f"affine_hswish {'forward+backward' if backward else 'forward'} {DEVICE} {tuple(x.shape)}"
    benchmark(step)
