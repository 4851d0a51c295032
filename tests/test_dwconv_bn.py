"""dwconv_bn: the fused depthwise-separable conv (Triton, interpreted on CPU here, real on a GPU)
against the nn module chain hardswish(bn(pwconv(dwconv(x)))), eval and train, every gradient."""
import copy

import pytest
import torch
import torch.nn.functional as F

import mpvit_kernels
from mpvit_kernels import DWConv2dBN, ops
from tests.conftest import BF16, KERNEL_DEVICE, MODEL_SHAPES
from tests.utils import RecordOps, assert_close, away_from_the_kinks, gpu_tiles, make_image, output_and_grad_errors

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
    assert ("mpvit_kernels.dwconv_bn_train" if training else "mpvit_kernels.dwconv_bn") in rec.names
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


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("case", [CASES[0], (2, 8, 136, 7, 9, 3, 1)], ids=case_id)
def test_module_with_a_gpus_tiles(case, training):
    # the GEMM as a GPU tiles it (32 rows at 16 outputs, 64 at 128: 4 and 2 row tiles, the last
    # short; two output tiles of 128 for 136), and the BatchNorm passes likewise
    with gpu_tiles():
        test_module_matches_the_eager_chain(case, training, torch.float32, "channels_last")


@pytest.mark.parametrize("pad, cout, vec", [(8, 24, 8), (4, 24, 4), (8, 20, 4), (3, 24, 1)])
def test_strides_and_widths_narrow_the_vector_width(pad, cout, vec):
    # a channels-last map sliced out of one cin + pad channels wide: the kernels are told (VEC)
    # what the widths and strides are multiples of, for 16-byte accesses; the BatchNorm's
    # backward kernels read (M, cout) rows
    from mpvit_kernels.triton.launch import vector_width
    from tests.utils import RecordLaunches

    m = make_module(16, cout, 3, 1, torch.float32, True)
    ref = copy.deepcopy(m)
    wide = torch.randn(2, 16 + pad, 5, 7, device=KERNEL_DEVICE).contiguous(memory_format=torch.channels_last)
    x = wide[:, :16].requires_grad_()
    with RecordLaunches() as rec:
        y = m(x)
        grad = torch.randn_like(y)
        got = torch.autograd.grad(y, [x, m.pwconv.weight], grad)
    vecs = {(fn.__name__, meta["VEC"]) for fn, meta in rec.launches if "VEC" in meta}
    assert vecs == {("dwconv_pw_kernel", vec), ("grad_sums_kernel", vector_width(4, cout)),
                    ("grad_kernel", vector_width(4, cout))}
    y_ref = chain(ref, x)
    assert_close(y, y_ref, scale=10)
    for a, b in zip(got, torch.autograd.grad(y_ref, [x, ref.pwconv.weight], grad)):
        assert_close(a, b, scale=100)


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
def test_training_statistics_over_steps_and_a_large_mean(momentum):
    """Three steps on inputs whose 1x1 output has a mean far above its spread (where a plain sum
    of squares would cancel in fp32): outputs, grads and running statistics as nn's."""
    m = make_module(8, 12, 3, 2, torch.float32, training=True)
    m.bn.momentum = momentum
    ref = copy.deepcopy(m)
    for step in range(3):
        x = (torch.randn(2, 8, 9, 7, device=KERNEL_DEVICE) * 0.01 + 30.0 * (step + 1)).requires_grad_()
        y, y_ref = m(x), chain(ref, x)
        assert_close(y, y_ref, scale=10)
        grad = torch.randn_like(y_ref)
        got = torch.autograd.grad(y, [x, m.bn.weight, m.pwconv.weight], grad)
        want = torch.autograd.grad(y_ref, [x, ref.bn.weight, ref.pwconv.weight], grad)
        for g, r in zip(got, want):
            assert_close(g, r, scale=1000)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(m.bn, name), getattr(ref.bn, name))


def test_train_op_gradcheck_float64_and_statistics():
    x = torch.randn(2, 4, 5, 4, dtype=torch.float64, device=KERNEL_DEVICE, requires_grad=True)
    dw = torch.randn(4, 1, 3, 3, dtype=torch.float64, device=KERNEL_DEVICE, requires_grad=True)
    pw = torch.randn(6, 4, 1, 1, dtype=torch.float64, device=KERNEL_DEVICE, requires_grad=True)
    gamma = (torch.rand(6, dtype=torch.float64, device=KERNEL_DEVICE) + 0.5).requires_grad_()
    beta = torch.randn(6, dtype=torch.float64, device=KERNEL_DEVICE, requires_grad=True)
    for hswish in (True, False):
        assert torch.autograd.gradcheck(lambda *a: ops.dwconv_bn_train(a[0], a[1], a[2], 2, a[3], a[4], 1e-5, hswish)[0],
                                        (x, dw, pw, gamma, beta), fast_mode=True)
    y, mean, var = ops.dwconv_bn_train(x, dw, pw, 2, gamma, beta, 1e-5)
    z = F.conv2d(F.conv2d(x, dw, None, 2, 1, groups=4), pw)
    torch.testing.assert_close(mean, z.mean((0, 2, 3)))
    torch.testing.assert_close(var, z.var((0, 2, 3), correction=0))
    assert not mean.requires_grad and not var.requires_grad


def test_train_op_opcheck():
    for layout in ("nchw", "channels_last"):
        for hswish in (True, False):
            x = make_image((2, 8, 5, 6), torch.float32, layout, KERNEL_DEVICE, requires_grad=True)
            dw = torch.randn(8, 1, 3, 3, device=KERNEL_DEVICE, requires_grad=True)
            pw = torch.randn(12, 8, device=KERNEL_DEVICE, requires_grad=True)
            gamma = (torch.rand(12, device=KERNEL_DEVICE) + 0.5).requires_grad_()
            beta = torch.randn(12, device=KERNEL_DEVICE, requires_grad=True)
            torch.library.opcheck(torch.ops.mpvit_kernels.dwconv_bn_train.default,
                                  (x, dw, pw, gamma, beta, 1e-5, 1 if hswish else 2, hswish))
    z = torch.randn(2, 5, 6, 12, device=KERNEL_DEVICE).permute(0, 3, 1, 2)  # channels-last (B, C, H, W)
    rows = z.permute(0, 2, 3, 1).reshape(-1, 12)
    var, mean = torch.var_mean(rows, 0, correction=0)
    torch.library.opcheck(torch.ops.mpvit_kernels.affine_hswish_batch_backward.default,
                          (torch.randn_like(rows), rows, torch.rand(12, device=KERNEL_DEVICE) + 0.5,
                           torch.randn(12, device=KERNEL_DEVICE), mean, var, 1e-5, True))


def test_train_needs_more_than_one_value_per_channel():
    m = make_module(4, 6, 3, 2, torch.float32, training=True)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        m(torch.randn(1, 4, 2, 1, device=KERNEL_DEVICE))


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


@pytest.mark.parametrize("eps", [-1e-5, float("nan"), "1e-5"])
def test_train_op_refuses_a_bad_eps(eps):
    with pytest.raises(ValueError, match="dwconv_bn_train: eps must be a finite number"):
        ops.dwconv_bn_train(torch.randn(2, 4, 5, 5), torch.randn(4, 1, 3, 3), torch.randn(6, 4, 1, 1), 1,
                            torch.ones(6), torch.zeros(6), eps)
    with pytest.raises(ValueError, match="gli_projection_train: eps must be a finite number"):
        ops.gli_projection_train([torch.randn(2, 4, 5, 5)] * 2, torch.randn(6, 8), torch.ones(6), torch.zeros(6), eps)


# ---- CUDA (run with a GPU: pytest -m cuda) --------------------------------------------------

# MPViT-S and -B patch embeddings at 224 input: (C, input side, stride); path 0 of stages 2-4 has
# stride 2, the others stride 1.
PATCH_EMBEDS = [(C, side, s) for dims in ((64, 128, 216, 288), (128, 224, 368, 480))
                for C, side, s in zip(dims, (56, 56, 28, 14), (1, 2, 2, 2))] + [(216, 14, 1), (288, 7, 1)]


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("dtype", [pytest.param(torch.float16, id="fp16"), BF16])
@pytest.mark.parametrize("embed", [(20, 9, 2), (24, 7, 1)]
                         + [pytest.param(e, marks=MODEL_SHAPES) for e in PATCH_EMBEDS],
                         ids=lambda e: f"{e[0]}ch-{e[1]}px-s{e[2]}")
def test_low_precision_within_twice_eager(embed, dtype, training):
    """fp16/bf16 forward and every grad against fp64, within twice eager's error in the same dtype.
    The first cases are small enough for the interpreter (bf16 there as a GPU computes it:
    tests/interpreter_numerics.py), one with channels a multiple of 8 (the 16-byte vector loads the
    model's widths take); the others run at the model's shapes on a GPU."""
    C, side, stride = embed
    exact = make_module(C, C, 3, stride, torch.float64, training)
    params = ["dwconv.weight", "pwconv.weight"] + (["bn.weight", "bn.bias"] if training else [])
    batch = 8 if KERNEL_DEVICE == "cuda" else 2
    x64 = torch.randn(batch, C, side, side, dtype=torch.float64, device=KERNEL_DEVICE).contiguous(
        memory_format=torch.channels_last).requires_grad_()
    low = copy.deepcopy(exact).to(dtype)
    z = exact.bn(exact.pwconv(exact.dwconv(x64)))  # the exact pre-activation
    want = F.hardswish(z)
    grad = away_from_the_kinks(torch.randn_like(want), z, dtype)
    want_grads = torch.autograd.grad(want, [x64] + [exact.get_parameter(p) for p in params], grad)
    xl = x64.detach().to(dtype).requires_grad_()
    leaves, wants = [xl] + [low.get_parameter(p) for p in params], [want, *want_grads]
    ours = output_and_grad_errors(lambda: low(xl), leaves, grad.to(dtype), wants)
    eager = output_and_grad_errors(lambda: chain(low, xl), leaves, grad.to(dtype), wants)
    assert all(o <= 2 * e + 1e-3 for o, e in zip(ours, eager)), (ours, eager)


@pytest.mark.cuda
@pytest.mark.model_shapes
def test_cuda_training_is_deterministic():
    """Fixed-order statistics and backward sums: two steps give the same bits."""
    C, side, stride = PATCH_EMBEDS[1]
    m = make_module(C, C, 3, stride, torch.bfloat16, training=True)
    x = torch.randn(16, C, side, side, device="cuda", dtype=torch.bfloat16).contiguous(
        memory_format=torch.channels_last).requires_grad_()
    runs = []
    for _ in range(2):
        y = m(x)
        runs.append([y, *torch.autograd.grad(y, [x, *m.parameters()], torch.ones_like(y))])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.cuda
@pytest.mark.parametrize("embed", PATCH_EMBEDS[:4], ids=lambda e: f"{e[0]}ch-{e[1]}px-s{e[2]}")
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_cuda_fp32_at_model_shapes(embed, training):
    C, side, stride = embed
    m = make_module(C, C, 3, stride, torch.float32, training)
    ref = copy.deepcopy(m)
    x = torch.randn(4, C, side, side, device="cuda").contiguous(memory_format=torch.channels_last).requires_grad_()
    z = ref.bn(ref.pwconv(ref.dwconv(x)))  # the pre-activation (the batch statistics counted once, in it)
    y, y_ref = m(x), F.hardswish(z)
    torch.testing.assert_close(y, y_ref, atol=1e-3, rtol=1e-3)
    # no grad within 1e-4 of a Hardswish kink: the two GEMMs' fp32 sums may land either side
    g = away_from_the_kinks(torch.randn_like(y_ref), z, torch.float32, margin=1e-4)
    for a, b in zip(torch.autograd.grad(y, [x, m.dwconv.weight, m.pwconv.weight], g),
                    torch.autograd.grad(y_ref, [x, ref.dwconv.weight, ref.pwconv.weight], g)):
        torch.testing.assert_close(a, b, atol=1e-2, rtol=1e-3)
