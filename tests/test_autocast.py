"""Autocast (bf16, fp16) through the fused ops and the fused model: activations cast as autocast
casts a conv's input, fp32 accumulation, outputs in the autocast dtype (a residual sum keeps
its input's dtype, as eager's ``x + conv(x)`` does). The rule against eager under the same
autocast: our error against the fp64 model is at most twice eager's, plus a small floor."""
import copy
import importlib

import pytest
import torch
import torch.nn.functional as F

import mpvit_kernels
from mpvit_kernels import fuse, ops
from mpvit_kernels.bench.public_mpvit import MHCA_stage, Patch_Embed_stage
from tests.conftest import BF16_KERNELS, KERNEL_DEVICE, NO_BF16_KERNELS
from tests.test_fuse import randomized
from tests.utils import cpu_auto, normwise_error, randomize_bn

LOW = [torch.bfloat16, torch.float16]
fuse_module = importlib.import_module("mpvit_kernels.fuse")  # the package's `fuse` is the function


@pytest.mark.parametrize("dtype", LOW)
def test_op_output_dtypes_follow_autocast(dtype):
    x = torch.randn(2, 8, 7, 5)
    w, b = torch.randn(8, 1, 3, 3), torch.randn(8)
    pw, scale, shift = torch.randn(6, 8, 1, 1), torch.rand(6) + 0.5, torch.randn(6)
    with torch.autocast("cpu", dtype=dtype), cpu_auto():
        assert ops.depthwise(x, w, b).dtype == dtype
        assert ops.depthwise(x, w, b, residual=True).dtype == torch.float32  # as x + conv(x)
        assert ops.dwconv_bn(x, w, pw, 1, scale, shift, hswish=True).dtype == dtype
        y, mean, var = ops.dwconv_bn_train(x, w, pw, 1, scale, shift, 1e-5, hswish=True)
        assert y.dtype == dtype and mean.dtype == var.dtype == torch.float32
        # mixed input dtypes are what eager's concat sees under autocast: both cast
        mixed = [x, x.to(dtype)]
        assert ops.gli_projection(mixed, torch.randn(6, 16), scale, shift, hswish=True).dtype == dtype
        assert ops.affine_hswish(x.to(dtype), torch.rand(8), torch.randn(8), True).dtype == dtype
    with pytest.raises(ValueError, match="inputs\\[1\\]"):  # outside autocast they must agree
        ops.gli_projection([x, x.to(dtype)], torch.randn(6, 16))
    x64 = x.double()
    with torch.autocast("cpu", dtype=dtype):  # autocast leaves fp64 alone, so do we
        assert ops.depthwise(x64, w.double(), b.double()).dtype == torch.float64


def check_grads_as_accurate(ours, eager, truth):
    """Every parameter grad of ``ours`` in fp32 and at most twice as far from ``truth``'s (fp64)
    as ``eager``'s, plus a floor from the typical grad: some grads are 0 in exact arithmetic (a
    bias that a training BatchNorm subtracts again), where both sides hold rounding noise alone."""
    want, theirs = dict(truth.named_parameters()), dict(eager.named_parameters())
    floor = 1e-2 * torch.stack([p.grad.norm() for p in truth.parameters()]).median()
    for name, p in ours.named_parameters():
        assert p.grad.dtype == torch.float32, name
        g64 = want[name].grad
        d_ours, d_eager = (p.grad.double() - g64).norm(), (theirs[name].grad.double() - g64).norm()
        assert d_ours <= 2 * d_eager + 1e-2 * g64.norm() + floor, (name, d_ours.item(), d_eager.item())


# CPU tensors: a CPU's auto (the C++ twins, the Triton families on the reference), or the Triton kernels in
# the interpreter (where it runs; bf16 computed as a GPU does: tests/interpreter_numerics.py) with
# the attention on its twin (interpreted, it alone took 13 of the MHCA stage's 15 s; its
# kernels' own low-precision test runs them)
KERNELS = {"twins": cpu_auto,
           "triton": lambda: mpvit_kernels.use_backend("cuda", ops=["factor_attention"])}


def run_three(public, fused, x, dtype, loss=None, kernels="twins"):
    """fp64 truth, eager and ours under autocast: forward, the 2x rule, then the backward of
    ``loss`` and the 2x rule on every parameter grad."""
    truth = copy.deepcopy(public).double()
    out64 = truth(x.double())
    with torch.autocast("cpu", dtype=dtype):
        eager = public(x)
        with KERNELS[kernels]():
            ours = fused(x)
    assert ours.dtype == eager.dtype == dtype
    assert normwise_error(ours, out64) <= 2 * normwise_error(eager, out64) + 2e-3
    if loss is None:
        return
    for out in (out64, eager, ours):
        loss(out.double()).backward()
    check_grads_as_accurate(fused, public, truth)


@pytest.mark.parametrize("kernels", ["twins", "triton"])
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("stage", ["patch_embed", "mhca"])
def test_fused_stages_train_under_autocast_as_accurately_as_eager(dtype, stage, kernels):
    # Stages rather than the whole model for training: at a test-sized input the last stage's
    # BatchNorms see a handful of values per channel, which turns rounding noise into grads.
    if kernels == "triton" and KERNEL_DEVICE != "cpu":
        pytest.skip("Triton kernels on CPU tensors run in the interpreter alone; on a GPU, "
                    "test_fused_model_under_autocast_on_cuda_through_the_kernels runs them")
    if kernels == "triton" and dtype == torch.bfloat16 and not BF16_KERNELS:
        pytest.skip(NO_BF16_KERNELS)
    torch.manual_seed(0)
    if stage == "patch_embed":
        public = randomize_bn(Patch_Embed_stage(32, 3, True).train())
        fused = fuse_module._patch_embed_stage(copy.deepcopy(public))
        x = torch.randn(4, 32, 11, 10)
        run = lambda m, x: torch.cat([o.flatten(1) for o in m(x)], 1)  # noqa: E731
    else:
        public = randomize_bn(MHCA_stage(32, 40, 1, 2, 2, [0.0]).train())
        fused = fuse_module._mhca_stage(copy.deepcopy(public))
        x = torch.randn(4, 32, 7, 6)
        run = lambda m, x: m([x, x * 0.5])  # noqa: E731

    class Wrap(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return run(self.m, x)

    w = torch.randn_like(run(public, x).double())
    run_three(Wrap(public), Wrap(fused), x, dtype, lambda out: (out * w).sum(), kernels)


@pytest.mark.parametrize("dtype", LOW)
def test_fused_model_under_autocast_is_as_accurate_as_eager(dtype):
    public = randomized().eval()
    fused = fuse(copy.deepcopy(public))
    target = torch.tensor([1, 3])
    run_three(public, fused, torch.randn(2, 3, 33, 29), dtype, lambda out: F.cross_entropy(out, target))
    public.train(), fused.train()  # batch statistics: forward only (see the stage test)
    run_three(public, fused, torch.randn(2, 3, 33, 29), dtype)


def test_fused_module_under_autocast_compiles_fullgraph():
    m = mpvit_kernels.DWConv2dBN(8, 12, 3, 2).eval()
    x = torch.randn(2, 8, 9, 7)
    with torch.autocast("cpu", dtype=torch.bfloat16), cpu_auto():
        want = m(x)
        got = torch.compile(m, fullgraph=True, backend="aot_eager")(x)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got, want)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", LOW)
def test_fused_model_under_autocast_on_cuda_through_the_kernels(dtype):
    public = randomized().cuda().eval()
    truth = copy.deepcopy(public).double()
    fused = fuse(copy.deepcopy(public)).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 33, 29, device="cuda")
    out64 = truth(x.double())
    with torch.autocast("cuda", dtype=dtype), torch.no_grad():
        eager = public(x)
        ours = fused(x)
    assert ours.dtype == eager.dtype == dtype
    assert normwise_error(ours, out64) <= 2 * normwise_error(eager, out64) + 2e-3


@pytest.mark.cuda
def test_a_cuda_graph_replay_reads_the_weights_as_they_are_then():
    """A CUDA graph of the fused model's inference forward under autocast (captured after warm-up
    forwards, autocast's own cast cache off as a capture needs) computes its BatchNorm folds, CRPE
    packings and weight casts inside the graph: a replay after the weights and statistics changed
    in place, and after the eager caches were dropped, equals an eager forward with the new values."""
    model = fuse(randomized()).cuda().eval().to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 64, 64, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
        with torch.cuda.stream(side):
            for _ in range(3):
                model(x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = model(x)
        graph.replay()
        before = out.float().clone()
        for name, t in (*model.named_parameters(), *model.named_buffers()):
            if name.endswith("running_var"):
                t.mul_(4.0)
            elif t.is_floating_point():  # weights, BN affine, running means: every fold and cast changes
                t.add_(0.5 * t.abs().mean() * torch.randn_like(t))
        mpvit_kernels.clear_caches()
        graph.replay()
        want = model(x).float()
    torch.cuda.synchronize()
    change = (want - before).norm()
    assert change > 0.3 * before.norm()  # (0.71 in a CPU run of the same changes)
    # the same kernels on the same values: a stale fold or cast would leave a fair part of the change
    assert (out.float() - want).norm() <= 0.05 * change
