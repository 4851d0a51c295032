"""pytest-benchmark: DWConv2d_BN (depthwise 3x3 -> 1x1 -> BN -> Hardswish; eval forward, and
training forward+backward) at MPViT-S's
stage-2 patch embedding (128 channels, 28x28 map, stride 1), eager (the public module's four ops)
vs torch.compile vs ours, on CUDA when there is one (else ours runs unfused on the C++ twins). `pytest benchmarks/`."""
import pytest
import torch

from mpvit_kernels.bench.dwconv_bn import eager, eager_train, embed_inputs, ours, ours_train, train_step
from mpvit_kernels.bench.timing import SUITE_DEVICE as DEVICE, sync

BATCH = 16 if DEVICE == "cuda" else 2
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32


@pytest.fixture(scope="module")
def inputs():
    return embed_inputs(BATCH, 128, 28, DTYPE, DEVICE)


@pytest.mark.parametrize("impl", ["eager", "torch.compile", "ours"])
def test_dwconv_bn_eval(benchmark, inputs, impl):
    x, dw, pw, bn = inputs
    fn = {"eager": eager, "torch.compile": torch.compile(eager), "ours": ours}[impl]

    def step():
        with torch.no_grad():
            fn(x, dw, pw, bn, 1)
        sync()

    step()  # a compile happens here, outside the timing
    benchmark.group = f"dwconv_bn eval {DEVICE} {tuple(x.shape)}"
    benchmark(step)


@pytest.mark.parametrize("impl", ["eager", "torch.compile", "ours"])
def test_dwconv_bn_train(benchmark, inputs, impl):
    x, dw, pw, (mean, var, gamma, beta) = (t.detach().requires_grad_() if isinstance(t, torch.Tensor) else t
                                           for t in inputs)
    bn = (mean.detach(), var.detach(), gamma.detach().requires_grad_(), beta.detach().requires_grad_())
    fn = {"eager": eager_train, "torch.compile": torch.compile(eager_train), "ours": ours_train}[impl]
    grad = torch.randn(BATCH, 128, 28, 28, device=DEVICE, dtype=DTYPE).contiguous(memory_format=torch.channels_last)

    def step():
        train_step(fn, x, dw, pw, bn, 1, grad)
        sync()

    step()  # a compile happens here, outside the timing
    benchmark.group = f"dwconv_bn train forward+backward {DEVICE} {tuple(x.shape)}"
    benchmark(step)
