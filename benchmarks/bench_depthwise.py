"""pytest-benchmark: the depthwise op at MPViT-S's stage-1 CPE site (x + dw3x3(x) + bias on a
channels-last map), eager (the public module's conv + add) vs torch.compile vs ours, forward and forward+backward,
on CUDA when there is one (else the C++ CPU twin). `pytest benchmarks/`."""
import pytest
import torch

from mpvit_kernels.bench.depthwise import eager_cpe, ours_cpe, site_inputs
from mpvit_kernels.bench.timing import SUITE_DEVICE as DEVICE, sync

BATCH = 16 if DEVICE == "cuda" else 2
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32


@pytest.fixture(scope="module")
def inputs():
    return site_inputs(BATCH, 64, 56, DTYPE, DEVICE)


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "forward+backward"])
@pytest.mark.parametrize("impl", ["eager", "torch.compile", "ours"])
def test_depthwise_cpe(benchmark, inputs, impl, backward):
    x, w, b, bn = inputs
    fn = {"eager": eager_cpe, "torch.compile": torch.compile(eager_cpe), "ours": ours_cpe}[impl]
    xg = x.detach().requires_grad_(backward)
    grad = torch.randn_like(x)

    def step():
        if backward:
            fn(xg, w, b, bn).backward(grad)
        else:
            with torch.no_grad():
                fn(xg, w, b, bn)
        sync()

    step()  # a compile happens here, outside the timing
    benchmark.group = f"depthwise CPE {'forward+backward' if backward else 'forward'} {DEVICE} {tuple(x.shape)}"
    benchmark(step)
