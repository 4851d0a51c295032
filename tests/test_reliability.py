"""Reliability: an empty batch (B = 0) through every module gives an empty result of the right
shape, forward and backward, on every backend (no kernel is launched over nothing); a second
derivative through any op is refused with a clear error; a training step is bitwise
reproducible in deterministic mode; bad module arguments are refused naming them; batches past
2^31 elements are addressed with 64-bit offsets (and what stays 32-bit is refused beyond it);
a NaN in an input is never hidden; low-precision attention with large keys stays finite."""
import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import mpvit_kernels
from mpvit_kernels.models import mpvit_tiny
from tests.conftest import BF16, KERNEL_DEVICE
from tests.utils import HOST_RUN_FILES, HOST_RUN_KEYWORD, ROOT, asan_runtimes, compile_cuda_host

BACKENDS = ["auto", "reference"]  # auto: the Triton kernels (interpreted here) and the C++ twins


def modules(device=KERNEL_DEVICE):
    torch.manual_seed(0)
    d = {"device": device}
    built = {
        "FactorAttention": (mpvit_kernels.FactorAttention(16, 8),
                            lambda m, B: m(torch.randn(B, 12, 16, **d), (3, 4)), (12, 16)),
        "ConvPosEnc": (mpvit_kernels.ConvPosEnc(16), lambda m, B: m(torch.randn(B, 12, 16, **d), (3, 4)), (12, 16)),
        "DWConv2dBN": (mpvit_kernels.DWConv2dBN(8, 12, 3, 2), lambda m, B: m(torch.randn(B, 8, 7, 5, **d)),
                       (12, 4, 3)),
        "GLIProjection": (mpvit_kernels.GLIProjection(8, 12, 3),
                          lambda m, B: m([torch.randn(B, 8, 5, 4, **d) for _ in range(3)]), (12, 5, 4)),
        "Conv2dBN 1x1": (mpvit_kernels.Conv2dBN(8, 12, 1, hswish=True), lambda m, B: m(torch.randn(B, 8, 5, 4, **d)),
                         (12, 5, 4)),
        "Conv2dBN 3x3 s2": (mpvit_kernels.Conv2dBN(3, 8, 3, 2, hswish=True),
                            lambda m, B: m(torch.randn(B, 3, 9, 8, **d)), (8, 5, 4)),
        "MPViT-T": (mpvit_tiny(num_classes=5), lambda m, B: m(torch.randn(B, 3, 32, 28, **d)), (5,)),
    }
    return {name: (module.to(device), run, shape) for name, (module, run, shape) in built.items()}


@pytest.mark.parametrize("backend", [*BACKENDS, "cpu-auto"])
@pytest.mark.parametrize("name", list(modules("meta")))
def test_empty_batch_forward_and_backward(name, backend, monkeypatch):
    device = KERNEL_DEVICE
    if backend == "cpu-auto":  # what auto runs on CPU tensors without the interpreter: the C++ twins, oneDNN
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        backend, device = "auto", "cpu"
    module, run, shape = modules(device)[name]
    module.eval()  # training BatchNorm refuses an empty batch, as nn.BatchNorm2d does
    with mpvit_kernels.use_backend(backend):
        out = run(module, 0)
        assert tuple(out.shape) == (0, *shape), name
        out.sum().backward()
    grads = [p.grad for p in module.parameters()]
    assert all(g is None or (g.shape == p.shape and not g.any()) for g, p in zip(grads, module.parameters()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_in_training_keeps_the_statistics_as_batchnorm_does(backend):
    torch.manual_seed(0)
    for module, run in ((mpvit_kernels.DWConv2dBN(8, 12), lambda m: m(torch.randn(0, 8, 7, 5))),
                        (mpvit_kernels.GLIProjection(8, 12, 2), lambda m: m([torch.randn(0, 8, 5, 4)] * 2))):
        module.train()
        with mpvit_kernels.use_backend(backend):
            out = run(module)
            out.sum().backward()
        assert out.shape[0] == 0 and out.shape[1] == 12
        bn = module.bn
        assert torch.equal(bn.running_mean, torch.zeros(12)) and torch.equal(bn.running_var, torch.ones(12))
        assert int(bn.num_batches_tracked) == 1  # counted, as nn.BatchNorm2d counts an empty batch


def op_calls():
    """(name, inputs requiring grad, fn of them) for every family's forward op, on the kernels'
    device (on CPU tensors without the interpreter some families run eager ops, which have a
    second derivative)."""
    from mpvit_kernels import ops

    torch.manual_seed(0)
    d = {"device": KERNEL_DEVICE}
    x = torch.randn(2, 8, 6, 5, requires_grad=True, **d)
    w, b = torch.randn(8, 1, 3, 3, **d), torch.randn(8, **d)
    pw, gli_w = torch.randn(12, 8, 1, 1, **d), torch.randn(12, 16, **d)
    scale, shift = torch.rand(12, **d) + 0.5, torch.randn(12, **d)
    qkv = torch.randn(2, 12, 48, requires_grad=True, **d)
    crpe = [torch.randn(4, 1, 3, 3, **d), torch.randn(12, 1, 5, 5, **d)], [torch.randn(4, **d), torch.randn(12, **d)]
    return [
        ("affine_hswish", x, lambda x: ops.affine_hswish(x, scale[:8], shift[:8], True)),
        ("depthwise", x, lambda x: ops.depthwise(x, w, b, 1, hswish=True)),
        ("dwconv_bn", x, lambda x: ops.dwconv_bn(x, w, pw, 1, scale, shift, hswish=True)),
        ("dwconv_bn_train", x, lambda x: ops.dwconv_bn_train(x, w, pw, 1, scale, shift, 1e-5, hswish=True)[0]),
        ("gli_projection", x, lambda x: ops.gli_projection([x, x], gli_w, scale, shift, hswish=True)),
        ("factor_attention", qkv, lambda q: ops.factor_attention(q, (3, 4), 4, 0.5, *crpe)),
    ]


@pytest.mark.parametrize("case", range(6), ids=[c[0] for c in op_calls()])
def test_double_backward_is_refused_clearly(case):
    name, x, fn = op_calls()[case]
    (g,) = torch.autograd.grad(fn(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="second derivative"):
        g.square().sum().backward()


def test_training_step_is_bitwise_reproducible_in_deterministic_mode():
    # What a CPU training step runs under auto (no interpreter): the C++ twins of depthwise and
    # affine_hswish, the eager reference of the Triton families. Each Triton kernel's backward
    # has its own test (interpreted here, they took 12 of this test's 13 s and proved nothing of
    # a GPU's ordering).
    from tests.utils import randomize_bn

    torch.manual_seed(0)
    model = randomize_bn(mpvit_tiny(num_classes=5)).train()
    x, target = torch.randn(2, 3, 36, 32), torch.tensor([0, 4])
    runs = []
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        for _ in range(2):
            m = copy.deepcopy(model)
            with mpvit_kernels.use_backend("reference", ops=["factor_attention", "dwconv_bn", "gli_projection", "linear",
                                                             "residual_layernorm"]):
                torch.nn.functional.cross_entropy(m(x), target).backward()
            runs.append([p.grad for p in m.parameters()] + list(m.buffers()))
    finally:
        torch.use_deterministic_algorithms(was)
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def bad_module_calls():
    """(id, call, exception, message) for the modules: wrong arguments to the constructors and
    wrong inputs to the forwards, each refused before any kernel runs."""
    from mpvit_kernels import ConvPosEnc, Conv2dBN, DWConv2dBN, FactorAttention, GLIProjection

    r = torch.randn
    return [
        ("FactorAttention dim", lambda: FactorAttention(16, 3), ValueError, r"dim \(16\) must be divisible"),
        ("FactorAttention heads", lambda: FactorAttention(16, 0), ValueError, "num_heads must be a positive int"),
        ("FactorAttention channels", lambda: FactorAttention(16, 8)(r(2, 12, 15), (3, 4)), ValueError,
         r"x must be \(B, N, 16\), got shape \(2, 12, 15\)"),
        ("FactorAttention dims", lambda: FactorAttention(16, 8)(r(2, 12, 16, 1), (3, 4)), ValueError,
         r"x must be \(B, N, 16\)"),
        ("FactorAttention int", lambda: FactorAttention(16, 8)(torch.ones(2, 12, 16, dtype=torch.long), (3, 4)),
         TypeError, "x must be floating point, got torch.int64"),
        ("FactorAttention dtype", lambda: FactorAttention(16, 8)(r(2, 12, 16, dtype=torch.float64), (3, 4)),
         TypeError, "x is torch.float64 but the module's parameters are torch.float32"),
        ("FactorAttention device", lambda: FactorAttention(16, 8)(r(2, 12, 16, device="meta"), (3, 4)), ValueError,
         "x is on meta but the module's parameters are on cpu"),
        ("FactorAttention size", lambda: FactorAttention(16, 8)(r(2, 12, 16), 12), ValueError,
         "size must be"),
        ("FactorAttention N", lambda: FactorAttention(16, 8)(r(2, 12, 16), (3, 5)), ValueError,
         r"N=12 tokens but size=\(3, 5\) gives 15"),
        ("ConvPosEnc kernel", lambda: ConvPosEnc(16, 4), ValueError, "kernel_size must be one of"),
        ("ConvPosEnc channels", lambda: ConvPosEnc(16)(r(2, 12, 8), (3, 4)), ValueError, r"x must be \(B, N, 16\)"),
        ("ConvPosEnc size", lambda: ConvPosEnc(16)(r(2, 12, 16), (3, 4.0)), ValueError, "size must be"),
        ("DWConv2dBN stride", lambda: DWConv2dBN(8, 12, 3, 3), ValueError, "stride must be one of"),
        ("DWConv2dBN kernel", lambda: DWConv2dBN(8, 12, 4), ValueError, "kernel_size must be one of"),
        ("DWConv2dBN channels", lambda: DWConv2dBN(8, 12)(r(1, 7, 5, 5)), ValueError,
         r"x must be \(B, 8, H, W\), got shape \(1, 7, 5, 5\)"),
        ("DWConv2dBN dtype", lambda: DWConv2dBN(8, 12)(r(1, 8, 5, 5, dtype=torch.float64)), TypeError,
         "parameters are torch.float32"),
        ("Conv2dBN channels", lambda: Conv2dBN(8, 12, 1)(r(1, 7, 5, 5)), ValueError, r"x must be \(B, 8, H, W\)"),
        ("Conv2dBN dtype", lambda: Conv2dBN(8, 12, 1)(r(1, 8, 5, 5, dtype=torch.float64)), TypeError,
         "parameters are torch.float32"),
        ("Conv2dBN in_ch", lambda: Conv2dBN(0, 12, 1), ValueError, "in_ch must be a positive int"),
        ("GLIProjection out", lambda: GLIProjection(8, 0, 2), ValueError, "out_channels must be a positive int"),
        ("GLIProjection channels", lambda: GLIProjection(8, 12, 2)([r(1, 8, 5, 5), r(1, 7, 5, 5)]), ValueError,
         r"inputs\[1\] must be \(B, 8, H, W\)"),
        ("GLIProjection token channels", lambda: GLIProjection(8, 12, 2)([r(1, 25, 7)] * 2, size=(5, 5)),
         ValueError, r"inputs\[0\] must be \(B, N, 8\)"),
        ("GLIProjection dtype", lambda: GLIProjection(8, 12, 2)([r(1, 8, 5, 5, dtype=torch.float64)] * 2),
         TypeError, r"inputs\[0\] is torch.float64"),
        ("FactorAttention sparse", lambda: FactorAttention(16, 8)(r(2, 12, 16).to_sparse(), (3, 4)), TypeError,
         r"x must be a dense \(strided\) tensor, got torch.sparse_coo"),
        ("GLIProjection mkldnn", lambda: GLIProjection(8, 12, 2)([r(1, 8, 5, 5), r(1, 8, 5, 5).to_mkldnn()]),
         TypeError, r"inputs\[1\] must be a dense \(strided\) tensor, got torch._mkldnn"),
        ("MPViT sparse", lambda: mpvit_tiny()(r(1, 3, 8, 8).to_sparse()), TypeError,
         r"MPViT: x must be a dense \(strided\) tensor"),
    ]


@pytest.mark.parametrize("case", range(len(bad_module_calls())), ids=[c[0] for c in bad_module_calls()])
def test_modules_refuse_bad_arguments_naming_them(case):
    _, call, exc, match = bad_module_calls()[case]
    with pytest.raises(exc, match=match):
        call()


def non_dense_op_calls():
    """(name, call, the argument's name): one op call per family with one argument sparse, mkldnn
    or nested, the others fine."""
    from mpvit_kernels import ops

    x, w3, ones, zeros = torch.randn(2, 8, 5, 5), torch.randn(8, 1, 3, 3), torch.ones(8), torch.zeros(8)
    tokens = torch.randn(2, 6, 8)
    nested = torch.nested.nested_tensor([torch.randn(3, 8), torch.randn(3, 8)], layout=torch.jagged)
    return [
        ("affine_hswish", lambda: ops.affine_hswish(x.to_sparse(), ones, zeros, True), "x"),
        ("affine_hswish shift", lambda: ops.affine_hswish(x, ones, zeros.to_sparse(), True), "shift"),
        ("depthwise", lambda: ops.depthwise(x, w3.to_sparse(), None), "weight"),
        ("dwconv_bn", lambda: ops.dwconv_bn(x, w3, torch.randn(6, 8, 1, 1).to_mkldnn(), 1), "pw_weight"),
        ("gli_projection", lambda: ops.gli_projection([x, x.to_sparse()], torch.randn(6, 16)), r"inputs\[1\]"),
        ("gli_projection weight", lambda: ops.gli_projection([x], torch.randn(6, 8).to_sparse()), "weight"),
        ("factor_attention", lambda: ops.factor_attention(torch.randn(2, 6, 24).to_sparse(), (2, 3), 2, 0.5,
                                                          [w3], [ones]), "qkv"),
        ("factor_attention crpe", lambda: ops.factor_attention(torch.randn(2, 6, 24), (2, 3), 2, 0.5,
                                                               [w3.to_sparse()], [ones]), r"crpe_weights\[0\]"),
        ("linear", lambda: ops.linear(nested, torch.randn(6, 8), None, None, None), "x"),
        ("residual_layernorm", lambda: ops.residual_layernorm(tokens, nested, ones, ones, ones, zeros, 1e-6), "y"),
    ]


@pytest.mark.parametrize("case", range(len(non_dense_op_calls())), ids=[c[0] for c in non_dense_op_calls()])
def test_ops_refuse_non_dense_tensors_naming_them(case):
    """Sparse, mkldnn and nested tensors have no strides for the kernels: a TypeError naming the
    argument (they failed deep in ATen, or with the dispatcher's list of backends)."""
    _, call, name = non_dense_op_calls()[case]
    with pytest.raises(TypeError, match=rf"{name} must be a dense \(strided\) tensor"):
        call()


def test_modules_take_another_dtype_under_autocast():
    from mpvit_kernels import FactorAttention

    m = FactorAttention(16, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(torch.randn(2, 12, 16, dtype=torch.bfloat16), (3, 4))
    assert out.dtype == torch.bfloat16


# ---- 64-bit offsets ---------------------------------------------------------------------------

# Items this far apart put item 2 past 2^31 elements, while 2 * ITEM_STRIDE computed in int32
# wraps: a kernel that forms a batch offset in 32 bits reads the wrong item (or faults).
ITEM_STRIDE = 2 ** 30 + 64


@pytest.fixture
def huge_buffers(monkeypatch):
    """For the tests that allocate 8 GiB: on a CPU left unfilled (conftest's deterministic mode
    would fill all of it with NaN: 8 GiB written and resident per test, where only the items'
    pages are touched otherwise); on a GPU, where the memory is committed, given back afterwards,
    as the caching allocator would keep it from the other pytest workers sharing the card."""
    monkeypatch.setattr(torch.utils.deterministic, "fill_uninitialized_memory", False)
    yield
    if KERNEL_DEVICE == "cuda":
        torch.cuda.empty_cache()


def far_apart(item_shape, item_strides, batch=3, parts=1):
    """``parts`` tensors (batch, *item_shape) of random values whose items lie ITEM_STRIDE fp32
    elements apart in one buffer of over 2^31 elements, on the kernels' device. The buffer is
    allocated, never filled: on a CPU only the pages the items occupy are touched (a few MB of
    the 8 GiB reserved)."""
    item = 1 + sum((n - 1) * s for n, s in zip(item_shape, item_strides))
    buf = torch.empty((batch - 1) * ITEM_STRIDE + parts * item, dtype=torch.float32, device=KERNEL_DEVICE)
    views = []
    for p in range(parts):
        v = buf.as_strided((batch, *item_shape), (ITEM_STRIDE, *item_strides), p * item)
        v.copy_(torch.randn(v.shape))
        views.append(v)
    return views


@pytest.mark.parametrize("op", ["factor_attention", "gli_projection maps", "gli_projection tokens", "dwconv_bn"])
def test_batches_past_2_to_the_31_elements_read_the_right_items(op, huge_buffers):
    from mpvit_kernels import ops

    d = {"device": KERNEL_DEVICE}
    H, W, C = 3, 5, 8
    if op == "factor_attention":
        (x,) = far_apart((H * W, 3 * C), (3 * C, 1))
        crpe = [torch.randn(4, 1, 3, 3, **d), torch.randn(4, 1, 5, 5, **d)], [torch.randn(4, **d), torch.randn(4, **d)]
        run = lambda t: ops.factor_attention(t, (H, W), 2, 0.5, *crpe)  # noqa: E731
        xs = [x]
    elif op == "gli_projection maps":
        xs = far_apart((C, H, W), (1, W * C, C), parts=2)  # channels-last images
        w, scale, shift = torch.randn(6, 2 * C, **d), torch.rand(6, **d), torch.randn(6, **d)
        run = lambda *t: ops.gli_projection(list(t), w, scale, shift, hswish=True)  # noqa: E731
    elif op == "gli_projection tokens":
        xs = far_apart((H * W, C), (C, 1), parts=2)
        w = torch.randn(6, 2 * C, **d)
        run = lambda *t: ops.gli_projection(list(t), w, size=(H, W))  # noqa: E731
    else:
        xs = far_apart((C, H, W), (1, W * C, C))
        dw, pw = torch.randn(C, 1, 3, 3, **d), torch.randn(6, C, 1, 1, **d)
        scale, shift = torch.rand(6, **d), torch.randn(6, **d)
        run = lambda t: ops.dwconv_bn(t, dw, pw, 1, scale, shift, hswish=True)  # noqa: E731
    compact = [x.clone().requires_grad_() for x in xs]  # the same values, small offsets
    xs = [x.requires_grad_() for x in xs]
    out, want = run(*xs), run(*compact)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    grad = torch.randn_like(want)
    got, expected = torch.autograd.grad(out, xs, grad), torch.autograd.grad(want, compact, grad)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


def test_gli_inputs_with_strides_past_32_bits_beside_ones_within(huge_buffers):
    """Triton types an int argument i32 or i64 by its value, and the GLI kernel picks each input's
    strides out of one chain of branches, whose types must agree (a mix failed to compile on a
    GPU; the interpreter does not type): the op reads such a mix from dense copies."""
    from mpvit_kernels import ops
    from tests.utils import RecordLaunches

    H, W, C = 3, 5, 8
    far_stride = 2 ** 31 + 64  # the far input's item 1 starts past 2^31 (8 GiB reserved, two items touched)
    far = torch.empty(far_stride + H * W * C, device=KERNEL_DEVICE).as_strided((2, H * W, C), (far_stride, C, 1))
    far.copy_(torch.randn(far.shape))
    near, w = torch.randn(2, H * W, C, device=KERNEL_DEVICE), torch.randn(6, 2 * C, device=KERNEL_DEVICE)
    with RecordLaunches() as rec:
        out = ops.gli_projection([near, far], w, size=(H, W))
    strides = [v for _, args in rec.launches for k, v in args.items() if k[:2] in ("sb", "sn") and k[2:].isdigit()]
    assert len(strides) == 10 and max(strides) < 2 ** 31, strides
    torch.testing.assert_close(out, ops.gli_projection([near, far.contiguous()], w, size=(H, W)), rtol=0, atol=0)


def test_items_or_rows_past_32_bits_are_refused_before_any_kernel():
    from mpvit_kernels import ops

    big = 2 ** 31
    qkv = torch.empty(1, 2, 48, device="meta").as_strided((1, 2, 48), (big, big, 1))  # token 1 at 2^31
    crpe = [torch.empty(16, 1, 3, 3, device="meta")], [torch.empty(16, device="meta")]
    with pytest.raises(ValueError, match="factor_attention: one batch item of qkv spans"):
        ops.factor_attention(qkv, (1, 2), 2, 0.5, *crpe)
    x = torch.empty(1, 8, 2, 2, device="meta").as_strided((1, 8, 2, 2), (1, 1, big, 8))
    with pytest.raises(ValueError, match="dwconv_bn: one batch item of x spans"):
        ops.dwconv_bn(x, torch.empty(8, 1, 3, 3, device="meta"), torch.empty(4, 8, 1, 1, device="meta"))
    many = torch.empty(2 ** 16, 1, 2 ** 15, 1, device="meta")  # 2^31 pixels
    with pytest.raises(ValueError, match="gli_projection: 2147483648 rows"):
        ops.gli_projection([many], torch.empty(4, 1, device="meta"))
    with pytest.raises(ValueError, match="dwconv_bn: 2147483648 rows"):
        ops.dwconv_bn(many, torch.empty(1, 1, 3, 3, device="meta"), torch.empty(4, 1, 1, 1, device="meta"))


# ---- numerics ---------------------------------------------------------------------------------

def nan_cases():
    """(name, fn, x): ops whose input x (2 items) carries one NaN in item 0."""
    from mpvit_kernels import ops

    torch.manual_seed(0)
    C = 8
    img = torch.randn(2, C, 5, 4, device=KERNEL_DEVICE)
    w, b = torch.randn(C, 1, 3, 3, device=KERNEL_DEVICE), torch.randn(C, device=KERNEL_DEVICE)
    pw = torch.randn(6, C, 1, 1, device=KERNEL_DEVICE)
    s6, t6 = torch.rand(6, device=KERNEL_DEVICE) + 0.5, torch.randn(6, device=KERNEL_DEVICE)
    s8, t8 = torch.rand(C, device=KERNEL_DEVICE) + 0.5, torch.randn(C, device=KERNEL_DEVICE)
    qkv = torch.randn(2, 20, 3 * 16, device=KERNEL_DEVICE)
    crpe = ([torch.randn(8, 1, 3, 3, device=KERNEL_DEVICE), torch.randn(8, 1, 5, 5, device=KERNEL_DEVICE)],
            [torch.randn(8, device=KERNEL_DEVICE), torch.randn(8, device=KERNEL_DEVICE)])
    attention = lambda t: ops.factor_attention(t, (4, 5), 2, 0.25, *crpe)  # noqa: E731
    return [
        ("affine_hswish", lambda x: ops.affine_hswish(x, s8, t8, True), img),
        ("depthwise bn hswish", lambda x: ops.depthwise(x, w, b, 1, s8, t8, hswish=True), img),
        ("depthwise cpe", lambda x: ops.depthwise(x, w, b, residual=True), img),
        ("dwconv_bn", lambda x: ops.dwconv_bn(x, w, pw, 2, s6, t6, hswish=True), img),
        ("gli_projection", lambda x: ops.gli_projection([x, x.flip(0)], pw.reshape(6, C).repeat(1, 2), s6, t6,
                                                        hswish=True), img),
        ("factor_attention q", attention, qkv),
        ("factor_attention k", attention, qkv),
        ("factor_attention v", attention, qkv),
    ]


@pytest.mark.parametrize("case", range(len(nan_cases())), ids=[c[0] for c in nan_cases()])
def test_a_nan_in_an_input_reaches_the_output(case):
    """Never hidden (a clamp, a max or a masked select could drop it): the item with the NaN gets
    NaNs, the other item none (nothing mixes items in eval)."""
    name, fn, x = nan_cases()[case]
    x = x.clone()
    if name.startswith("factor_attention"):
        x[0, 7, {"q": 3, "k": 16 + 3, "v": 32 + 3}[name[-1]]] = float("nan")
    else:
        x[0, 2, 1, 1] = float("nan")
    out = fn(x)
    if name == "gli_projection":  # item 1 reads item 0 through the flipped second input
        assert out.isnan().any(dim=(1, 2, 3)).all(), name
        return
    assert out[0].isnan().any() and out[1].isfinite().all(), name


@pytest.mark.parametrize("op", ["dwconv_bn_train", "gli_projection_train"])
def test_a_nan_in_a_training_batch_reaches_every_output(op):
    """Batch statistics mix every item: a NaN anywhere makes the batch's statistics NaN."""
    from mpvit_kernels import ops

    x = torch.randn(2, 8, 5, 4, device=KERNEL_DEVICE)
    x[1, 3, 2, 2] = float("nan")
    gamma, beta = torch.ones(6, device=KERNEL_DEVICE), torch.zeros(6, device=KERNEL_DEVICE)
    if op == "dwconv_bn_train":
        y, mean, var = ops.dwconv_bn_train(x, torch.randn(8, 1, 3, 3, device=KERNEL_DEVICE),
                                           torch.randn(6, 8, 1, 1, device=KERNEL_DEVICE), 1, gamma, beta, 1e-5)
    else:
        y, mean, var = ops.gli_projection_train([x], torch.randn(6, 8, device=KERNEL_DEVICE), gamma, beta, 1e-5)
    assert y.isnan().all() and mean.isnan().all() and var.isnan().all()


@pytest.mark.parametrize("dtype", [pytest.param(torch.float16, id="fp16"), BF16])
def test_low_precision_attention_with_large_keys_is_finite(dtype):
    """Keys up to about 3e4 (fp16's range ends at 65504): the softmax subtracts each column's max,
    so the output and every grad are finite where the fp32 reference is, and close to it."""
    from mpvit_kernels import ops

    torch.manual_seed(0)
    qkv = torch.randn(2, 20, 48, device=KERNEL_DEVICE)
    qkv[..., 16:32] *= 1e4
    crpe = ([0.2 * torch.randn(8, 1, 3, 3, device=KERNEL_DEVICE), 0.2 * torch.randn(8, 1, 5, 5, device=KERNEL_DEVICE)],
            [torch.randn(8, device=KERNEL_DEVICE), torch.randn(8, device=KERNEL_DEVICE)])
    low = qkv.to(dtype).requires_grad_()
    exact = low.detach().float().requires_grad_()
    out = ops.factor_attention(low, (4, 5), 2, 0.25, *crpe)
    with mpvit_kernels.use_backend("reference"):
        ref = ops.factor_attention(exact, (4, 5), 2, 0.25, *crpe)
    grad = torch.randn_like(ref)
    (g,), (g_ref,) = torch.autograd.grad(out, low, grad.to(dtype)), torch.autograd.grad(ref, exact, grad)
    assert torch.isfinite(ref).all() and torch.isfinite(g_ref).all()
    assert torch.isfinite(out).all() and torch.isfinite(g).all()
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-3
    torch.testing.assert_close(out.float(), ref, atol=tol * ref.abs().max().item(), rtol=0)
    # the saturated softmax leaves dk near 0 by cancellation: every grad against the largest
    torch.testing.assert_close(g.float(), g_ref, atol=4 * tol * g_ref.abs().max().item(), rtol=0)


# ---- dynamic shapes -----------------------------------------------------------------------------

def test_modules_compile_with_dynamic_shapes():
    """torch.compile(dynamic=True, fullgraph=True): symbolic sizes (and the attention's scale) pass
    the checks and reach the ops; two input sizes, one compile each way, results as eager."""
    from mpvit_kernels import DWConv2dBN, FactorAttention, GLIProjection

    torch._dynamo.reset()
    torch.manual_seed(0)
    attention, embed, gli = FactorAttention(16, 2, crpe_window={3: 1, 5: 1}), DWConv2dBN(8, 12).eval(), \
        GLIProjection(8, 12, 2).eval()
    runs = {
        "attention": (attention, lambda m, s: m(torch.randn(2, s[0] * s[1], 16), s)),
        "embed": (embed, lambda m, s: m(torch.randn(2, 8, *s))),
        "gli": (gli, lambda m, s: m([torch.randn(2, 8, *s)] * 2)),
    }
    for name, (module, run) in runs.items():
        compiled = torch.compile(module, dynamic=True, fullgraph=True, backend="aot_eager")
        for size in ((3, 4), (5, 3)):
            torch.manual_seed(1)
            with torch.no_grad():
                got = run(compiled, size)
            torch.manual_seed(1)
            with torch.no_grad():
                want = run(module, size)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=name)


# Reads past `scale` (C claimed twice its length) through the host build of affine_hswish's CUDA
# kernels (argv[1], built under ASan): what the sanitizer must report. Buffers from malloc, which
# ASan surrounds with redzones (Python's small-object allocator would not), and no torch import:
# 3 s under ASan.
_OUT_OF_BOUNDS = textwrap.dedent("""
    import ctypes, sys
    so, libc = ctypes.CDLL(sys.argv[1]), ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    C, n = 40, 2 * 40 * 3 * 3  # x and y (2, 40, 3, 3) channels-last, scale and shift (40,)
    x, scale, shift, y = (ctypes.c_void_p(libc.malloc(4 * k)) for k in (n, C, C, n))
    for p, k in ((x, n), (scale, C), (shift, C)):
        ctypes.memset(p, 0, 4 * k)
    so.ah_forward(0, x, scale, shift, y, ctypes.c_int64(n), ctypes.c_int64(2 * C), ctypes.c_int64(1), 1)
""")


@pytest.mark.slow
def test_cuda_kernels_on_the_host_stay_in_bounds_under_addresssanitizer(tmp_path):
    """The host runs of the CUDA kernels (test_depthwise's and test_affine_hswish's, every case)
    with the kernels built under AddressSanitizer: each of their loads and stores, shared memory
    included, must land inside what it was given, as compute-sanitizer's memcheck checks on a
    GPU. Without it an out-of-bounds store went unseen or hung the emulation. Where this test
    runs, conftest leaves those cases out of the session itself: they run once, here."""
    runtimes = asan_runtimes()
    if runtimes is None:
        pytest.skip("no g++ with AddressSanitizer's runtime")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_XDIST", "PYTEST_CURRENT"))}
    # no GPU in the sanitized process, on a machine with one too (gpu_proof's tests stage): the
    # host runs need none, and the CUDA driver's address-space reservations clash with ASan's shadow
    env.update(LD_PRELOAD=" ".join(runtimes), MPVIT_CUDA_HOST_ASAN="1", CUDA_VISIBLE_DEVICES="",
               ASAN_OPTIONS=f"detect_leaks=0:halt_on_error=1:log_path={tmp_path / 'asan'}")

    def reports():
        found = "".join(p.read_text() for p in tmp_path.glob("asan.*"))
        for p in tmp_path.glob("asan.*"):
            p.unlink()
        return found

    library = compile_cuda_host("affine_hswish_host", tmp_path, asan=True)  # built here, loaded there only
    control = subprocess.run([sys.executable, "-c", _OUT_OF_BOUNDS, library], env=env, cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
    assert control.returncode != 0 and "heap-buffer-overflow" in reports(), control.stderr[-2000:]
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *HOST_RUN_FILES,
                          "-k", HOST_RUN_KEYWORD], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    found = reports()
    assert out.returncode == 0 and not found, found[:3000] + out.stdout[-2000:]
    assert " passed" in out.stdout and "skipped" not in out.stdout, out.stdout[-2000:]
