"""pytest-benchmark: DWConv2d_BN (depthwise 3x3 -> 1x1 -> BN -> Hardswish, eval) at MPViT-S's
stage-2 patch embedding (128 channels, 28x28 map, stride 1), eager (the public module's four ops)
vs ours, on CUDA when there is one (else ours runs unfused on the C++ twins). `pytest benchmarks/`."""
import pytest
import torch

from mpvit_kernels.bench.dwconv_bn import eager, embed_inputs, ours
from mpvit_kernels.bench.timing import SUITE_DEVICE as DEVICE, sync

BATCH = 16 if DEVICE == "cuda" else 2
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32


@pytest.fixture(scope="module")
def inputs():
    return embed_inputs(BATCH, 128, 28, DTYPE, DEVICE)


@pytest.mark.parametrize("impl", ["eager", "ours"])
def test_dwconv_bn_eval(benchmark, inputs, impl):
    x, dw, pw, bn = inputs
    fn = eager if impl == "eager" else ours

    def step():
        with torch.no_grad():
            fn(x, dw, pw, bn, 1)
        sync()

    benchmark.group = f"dwconv_bn eval {DEVICE} {tuple(x.shape)}"
    benchmark(step)
