"""pytest-benchmark: the middle of an MPViT block (proj, residual add, norm2, fc2, residual add)
at the MPViT-S stage-1 shape, eager vs torch.compile vs ours (residual_layernorm and fc2
accumulating onto its output), forward and forward+backward, on CUDA when there is one (else
the CPU twin / reference). `pytest benchmarks/`."""
import pytest
import torch

from mpvit_kernels.bench.residual_layernorm import MLP_RATIO, eager, ours
from mpvit_kernels.bench.timing import SUITE_DEVICE as DEVICE, sync

BATCH = 16 if DEVICE == "cuda" else 2
C, N = 64, 56 * 56


@pytest.fixture(scope="module")
def inputs():
    x, a = (torch.randn(BATCH, N, C, device=DEVICE) for _ in range(2))
    h = torch.randn(BATCH, N, MLP_RATIO * C, device=DEVICE)
    params = [torch.randn(C, C, device=DEVICE) * C ** -0.5, torch.randn(C, device=DEVICE),
              torch.randn(C, MLP_RATIO * C, device=DEVICE) * C ** -0.5, torch.randn(C, device=DEVICE),
              torch.rand(C, device=DEVICE) + 0.5, torch.randn(C, device=DEVICE)]
    return (x, a, h), params


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "forward+backward"])
@pytest.mark.parametrize("impl", ["eager", "torch.compile", "ours"])
def test_residual_layernorm(benchmark, inputs, impl, backward):
    tokens, params = inputs
    fn = {"eager": eager, "torch.compile": torch.compile(eager), "ours": ours}[impl]
    leaves = [t.detach().requires_grad_(backward) for t in tokens]
    grads = [torch.randn_like(tokens[0]), torch.randn_like(tokens[0])]

    def step():
        if backward:
            torch.autograd.backward(fn(*leaves, *params), grads)
        else:
            with torch.no_grad():
                fn(*leaves, *params)
        sync()

    step()  # a compile happens here, outside the timing
    benchmark.group = f"residual_layernorm {'forward+backward' if backward else 'forward'} {DEVICE} {(BATCH, N, C)}"
    benchmark(step)
