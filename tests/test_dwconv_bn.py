"""dwconv_bn: the fused depthwise-separable conv (Triton, interpreted on CPU here, real on a GPU)
against the nn module chain hardswish(bn(pwconv(dwconv(x)))), eval and train, every gradient."""
import copy

import pytest
import torch
import torch.nn.functional as F

import mpvit_kernels
from mpvit_kernels import DWConv2dBN, ops
from tests.conftest import KERNEL_DEVICE
from tests.utils import RecordOps, assert_close, make_image

# (B, Cin, Cout, H, W, k, stride): odd sizes, Cin != Cout, channels not multiples of the tiles
CASES = [
    (2, 8, 8, 7, 9, 3, 1),
    (1, 22, 27, 9, 5, 3, 2),
    (2, 27, 22, 6, 7, 5, 1),
    (1, 8, 16, 5, 5, 7, 2),
    (1, 22, 8, 1, 3, 3, 2),
]


def case_id(c):
    B, ci, co, H, W, k, s = c
    return f"B{B}-{ci}to{co}-{H}x{W}-k{k}-s{s}"


def chain(m, x):
    """The eager module chain the fused op replaces."""
    return F.hardswish(m.bn(m.pwconv(m.dwconv(x))))


def make_module(Cin, Cout, k, stride, dtype, training):
    m = DWConv2dBN(Cin, Cout, k, stride).to(device=KERNEL_DEVICE, dtype=dtype)
    with torch.no_grad():
        m.bn.weight.uniform_(0.5, 1.5)
        m.bn.bias.normal_()
        m.bn.running_mean.normal_()
        m.bn.running_var.uniform_(0.5, 2.0)
    return m.train(training)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_module_matches_the_eager_chain(case, training, dtype, layout):
    B, Cin, Cout, H, W, k, stride = case
    m = make_module(Cin, Cout, k, stride, dtype, training)
    ref = copy.deepcopy(m)
    x = make_image((B, Cin, H, W), dtype, layout, KERNEL_DEVICE, requires_grad=True)
    with RecordOps() as rec:
        y = m(x)
    assert "mpvit_kernels.dwconv_bn" in rec.names
    y_ref = chain(ref, x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert_close(y, y_ref, scale=10)
    grad = torch.randn_like(y_ref)
    params = ["dwconv.weight", "pwconv.weight", "bn.weight", "bn.bias"]
    got = torch.autograd.grad(y, [x] + [m.get_parameter(p) for p in params], grad)
    want = torch.autograd.grad(y_ref, [x] + [ref.get_parameter(p) for p in params], grad)
    for name, g, r in zip(["x"] + params, got, want):
        assert_close(g, r, scale=100)  # reductions over B*H*W in another order
    if training:  # running statistics exactly as nn.BatchNorm2d keeps them
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(getattr(m.bn, name), getattr(ref.bn, name))


def test_op_without_batchnorm_is_the_pre_batchnorm_output():
    m = make_module(8, 12, 3, 1, torch.float32, training=False)
    x = torch.randn(1, 8, 5, 6, device=KERNEL_DEVICE)
    y = ops.dwconv_bn(x, m.dwconv.weight, m.pwconv.weight, 1)
    assert_close(y, m.pwconv(m.dwconv(x)))


def test_gradcheck_float64():
    x = torch.randn(1, 4, 5, 4, dtype=torch.float64, device=KERNEL_DEVICE, requires_grad=True)
    dw = torch.randn(4, 1, 3, 3, dtype=torch.float64, device=KERNEL_DEVICE, requires_grad=True)
    pw = torch.randn(6, 4, 1, 1, dtype=torch.float64, device=KERNEL_DEVICE, requires_grad=True)
    scale = (torch.rand(6, dtype=torch.float64, device=KERNEL_DEVICE) + 0.5).requires_grad_()
    shift = torch.randn(6, dtype=torch.float64, device=KERNEL_DEVICE, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: ops.dwconv_bn(a[0], a[1], a[2], 2, a[3], a[4], True),
                                    (x, dw, pw, scale, shift), fast_mode=True)


def test_opcheck():
    for layout in ("nchw", "channels_last"):
        for affine, hswish in ((True, True), (False, False), (False, True)):
            x = make_image((2, 8, 5, 6), torch.float32, layout, KERNEL_DEVICE, requires_grad=True)
            dw = torch.randn(8, 1, 3, 3, device=KERNEL_DEVICE, requires_grad=True)
            pw = torch.randn(12, 8, device=KERNEL_DEVICE, requires_grad=True)
            scale = (torch.rand(12, device=KERNEL_DEVICE) + 0.5).requires_grad_() if affine else None
            shift = torch.randn(12, device=KERNEL_DEVICE, requires_grad=True) if affine else None
            torch.library.opcheck(torch.ops.mpvit_kernels.dwconv_bn.default, (x, dw, pw, scale, shift, 2, hswish))


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_module_under_torch_compile_fullgraph(training):
    torch._dynamo.reset()
    m = make_module(8, 16, 3, 2, torch.float32, training)
    ref = copy.deepcopy(m)
    x = make_image((2, 8, 7, 6), torch.float32, "channels_last", KERNEL_DEVICE, requires_grad=True)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    y, y_ref = compiled(x), ref(x)
    assert_close(y, y_ref)
    (g,) = torch.autograd.grad(y.sum(), x)
    (g_ref,) = torch.autograd.grad(y_ref.sum(), x)
    assert_close(g, g_ref)


def test_reference_backend_runs_unfused():
    m = make_module(8, 8, 3, 1, torch.float32, training=False)
    x = torch.randn(1, 8, 4, 4, device=KERNEL_DEVICE)
    with mpvit_kernels.use_backend("reference"), RecordOps() as rec:
        y = m(x)
    assert not any(n.startswith("mpvit_kernels") for n in rec.names)
    assert_close(y, chain(m, x))


@pytest.mark.parametrize("change, exc, match", [
    (dict(pw_weight=torch.randn(6, 5, 1, 1)), ValueError, "pw_weight"),
    (dict(pw_weight=torch.randn(6, 4)), ValueError, "pw_weight"),
    (dict(dw_weight=torch.randn(4, 1, 2, 2)), ValueError, "weight"),
    (dict(stride=3), ValueError, "stride"),
    (dict(scale=torch.rand(6)), ValueError, "scale and shift"),
    (dict(scale=torch.rand(5), shift=torch.randn(5)), ValueError, "scale"),
    (dict(x=torch.randn(4, 5, 5)), ValueError, "x must be"),
    (dict(pw_weight=[1.0]), TypeError, "pw_weight must be a Tensor"),
])
def test_bad_inputs_raise_before_any_kernel(change, exc, match):
    args = dict(x=torch.randn(1, 4, 5, 5), dw_weight=torch.randn(4, 1, 3, 3), pw_weight=torch.randn(6, 4, 1, 1))
    with pytest.raises(exc, match=match):
        ops.dwconv_bn(**{**args, **change})


# ---- CUDA (run with a GPU: pytest -m cuda) --------------------------------------------------

# MPViT-S and -B patch embeddings at 224 input: (C, input side, stride); path 0 of stages 2-4 has
# stride 2, the others stride 1.
PATCH_EMBEDS = [(C, side, s) for dims in ((64, 128, 216, 288), (128, 224, 368, 480))
                for C, side, s in zip(dims, (56, 56, 28, 14), (1, 2, 2, 2))] + [(64, 56, 1), (288, 7, 1)]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("embed", PATCH_EMBEDS, ids=lambda e: f"{e[0]}ch-{e[1]}px-s{e[2]}")
def test_cuda_low_precision_at_model_shapes(embed, dtype):
    C, side, stride = embed
    exact = make_module(C, C, 3, stride, torch.float64, training=False)
    x64 = torch.randn(8, C, side, side, dtype=torch.float64, device="cuda").contiguous(
        memory_format=torch.channels_last).requires_grad_()
    want = chain(exact, x64)
    grad = torch.randn_like(want)
    want_grads = torch.autograd.grad(want, [x64, exact.dwconv.weight, exact.pwconv.weight], grad)
    low = copy.deepcopy(exact).to(dtype)
    xl = x64.detach().to(dtype).requires_grad_()
    for name, fn in (("ours", low), ("eager", lambda t: chain(low, t))):
        out = fn(xl)
        grads = torch.autograd.grad(out, [xl, low.dwconv.weight, low.pwconv.weight], grad.to(dtype))
        errs = [(a.double() - b).abs().max().item() for a, b in zip([out, *grads], [want, *want_grads])]
        if name == "ours":
            ours = errs
        else:
            eager = errs
    scales = [t.abs().max().item() for t in [want, *want_grads]]
    assert all(o <= 2 * e + 1e-3 * max(1.0, s) for o, e, s in zip(ours, eager, scales)), (ours, eager)


@pytest.mark.cuda
@pytest.mark.parametrize("embed", PATCH_EMBEDS[:4], ids=lambda e: f"{e[0]}ch-{e[1]}px-s{e[2]}")
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_cuda_fp32_at_model_shapes(embed, training):
    C, side, stride = embed
    m = make_module(C, C, 3, stride, torch.float32, training)
    ref = copy.deepcopy(m)
    x = torch.randn(4, C, side, side, device="cuda").contiguous(memory_format=torch.channels_last).requires_grad_()
    y, y_ref = m(x), chain(ref, x)
    torch.testing.assert_close(y, y_ref, atol=1e-3, rtol=1e-3)
    g = torch.randn_like(y_ref)
    for a, b in zip(torch.autograd.grad(y, [x, m.dwconv.weight, m.pwconv.weight], g),
                    torch.autograd.grad(y_ref, [x, ref.dwconv.weight, ref.pwconv.weight], g)):
        torch.testing.assert_close(a, b, atol=1e-2, rtol=1e-3)
