"""pytest-benchmark: the GLI projection (concat of 4 maps -> 1x1 -> BN -> Hardswish; eval forward,
and training forward+backward) at MPViT-S's stage-2 aggregate (4 x 128 channels -> 216, 28x28
map), eager (the public module's cat, conv, BN, Hardswish) vs torch.compile vs ours, on CUDA when there is one
(else ours runs unfused on the C++ twins). `pytest benchmarks/`."""
import pytest
import torch

from mpvit_kernels.bench.gli_projection import aggregate_inputs, eager, eager_train, ours, ours_train, train_step
from mpvit_kernels.bench.timing import SUITE_DEVICE as DEVICE, sync

BATCH = 16 if DEVICE == "cuda" else 2
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32


@pytest.fixture(scope="module")
def inputs():
    return aggregate_inputs(BATCH, 128, 216, 28, DTYPE, DEVICE)


@pytest.mark.parametrize("impl", ["eager", "torch.compile", "ours"])
def test_gli_projection_eval(benchmark, inputs, impl):
    xs, w, bn = inputs
    fn = {"eager": eager, "torch.compile": torch.compile(eager), "ours": ours}[impl]

    def step():
        with torch.no_grad():
            fn(xs, w, bn)
        sync()

    step()  # a compile happens here, outside the timing
    benchmark.group = f"gli_projection eval {DEVICE} 4x{tuple(xs[0].shape)}"
    benchmark(step)


@pytest.mark.parametrize("impl", ["eager", "torch.compile", "ours"])
def test_gli_projection_train(benchmark, inputs, impl):
    xs, w, (mean, var, gamma, beta) = inputs
    xs, w = [x.detach().requires_grad_() for x in xs], w.detach().requires_grad_()
    bn = (mean, var, gamma.detach().requires_grad_(), beta.detach().requires_grad_())
    fn = {"eager": eager_train, "torch.compile": torch.compile(eager_train), "ours": ours_train}[impl]
    grad = torch.randn(BATCH, 216, 28, 28, device=DEVICE, dtype=DTYPE).contiguous(memory_format=torch.channels_last)

    def step():
        train_step(fn, xs, w, bn, grad)
        sync()

    step()  # a compile happens here, outside the timing
    benchmark.group = f"gli_projection train forward+backward {DEVICE} 4x{tuple(xs[0].shape)}"
    benchmark(step)
