"""depthwise: the C++ CPU twin, and the CUDA kernels run on the CPU through tests/cuda_host (for
real on a GPU), against the F.conv2d composition, forward and every gradient."""
import ctypes

import pytest
import torch

import mpvit_kernels
from mpvit_kernels import ops, reference
from mpvit_kernels.nn import ConvPosEnc
from tests.utils import RecordOps, across_thread_counts, assert_close, build_cuda_host, make_image

requires_ext = pytest.mark.skipif(not mpvit_kernels.extension_available(), reason="mpvit_kernels._C not built")
PARAMS = ("x", "weight", "bias", "scale", "shift")

# name: (bias, scale/shift, hswish, residual)
EPILOGUES = {
    "plain": (False, False, False, False),
    "cpe": (True, False, False, True),          # x + dw(x) + bias
    "invres": (False, True, True, False),       # dw -> BN -> Hardswish
    "hswish": (True, False, True, False),
    "everything": (True, True, True, True),
}
SHAPES = [(1, 1, 1, 1), (3, 8, 5, 7), (1, 22, 17, 9), (3, 27, 6, 13), (1, 8, 2, 1)]


def make_args(shape, k, stride, epilogue, dtype=torch.float32, layout="nchw", device="cpu", requires_grad=True):
    bias, bn, hswish, residual = EPILOGUES[epilogue]
    C = shape[1]

    def p(t):
        return t.to(device=device, dtype=dtype).requires_grad_(requires_grad)

    return dict(x=make_image(shape, dtype, layout, device, requires_grad=requires_grad),
                weight=p(0.3 * torch.randn(C, 1, k, k)), bias=p(torch.randn(C)) if bias else None, stride=stride,
                scale=p(torch.rand(C) + 0.5) if bn else None, shift=p(torch.randn(C)) if bn else None,
                hswish=hswish, residual=residual and stride == 1)


def leaves(args):
    return [args[k] for k in PARAMS if args[k] is not None]


def fp64_reference(args):
    """The composition in fp64, and its leaves in the order of ``leaves(args)``."""
    ref_args = {k: v.detach().double().requires_grad_() if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    return reference.depthwise(**ref_args), leaves(ref_args)


def check_against_fp64(args, out, dtype, fwd_scale=4, grad_scale=20):
    ref, ref_leaves = fp64_reference(args)
    assert_close(out, ref.to(dtype), dtype, scale=fwd_scale)
    grad = torch.randn(ref.shape, dtype=torch.float64, device=ref.device)
    got = torch.autograd.grad(out, leaves(args), grad.to(dtype))
    want = torch.autograd.grad(ref, ref_leaves, grad)
    for name, g, w in zip([k for k in PARAMS if args[k] is not None], got, want):
        assert g.shape == w.shape, name
        assert_close(g, w.to(g.dtype), dtype, scale=grad_scale)  # parameter grads sum over B*H*W


def case_id(v):
    return "x".join(map(str, v)) if isinstance(v, tuple) else str(v)


# ---- the C++ CPU twin -----------------------------------------------------------------------

@requires_ext
def test_extension_registers_cpu_and_cuda_kernels():
    for name in ("mpvit_kernels::depthwise", "mpvit_kernels::depthwise_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU")
        if torch.version.cuda is not None:
            assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA")


@requires_ext
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("epilogue", list(EPILOGUES))
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("k", [3, 5, 7])
@pytest.mark.parametrize("shape", SHAPES, ids=case_id)
def test_cpu_twin_matches_reference(shape, k, stride, epilogue, dtype, layout):
    args = make_args(shape, k, stride, epilogue, dtype, layout)
    with RecordOps() as rec:
        y = ops.depthwise(**args)
    assert "mpvit_kernels.depthwise" in rec.names
    assert y.is_contiguous(memory_format=torch.channels_last) and y.dtype == dtype
    check_against_fp64(args, y, dtype)


@requires_ext
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_cpu_twin_low_precision_inputs_with_fp32_parameters(dtype):
    args = make_args((2, 16, 9, 7), 3, 1, "everything", dtype, "channels_last")
    for k in ("weight", "bias", "scale", "shift"):  # autocast-style: fp32 parameters
        args[k] = args[k].detach().float().requires_grad_()
    y = ops.depthwise(**args)
    assert y.dtype == dtype
    ref, _ = fp64_reference(args)
    assert_close(y, ref.to(dtype), dtype)


@requires_ext
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_cpu_twin_low_precision_is_the_fp32_twin_rounded_once(dtype):
    """16-bit maps run the fp32 kernels on a widened copy: the output and the input grad are the
    fp32 twin's rounded once, the parameter grads the fp32 twin's, in the twin's layout. (Pins
    that design; its equality with the former native 16-bit kernels, bitwise over 228 cases of
    both twins, was checked once against the build before 2302f47.)"""
    fwd, bwd = torch.ops.mpvit_kernels.depthwise.default, torch.ops.mpvit_kernels.depthwise_backward.default
    x = torch.randn(2, 16, 9, 7).to(dtype)  # NCHW: the widened copy is made channels-last
    weight, bias, scale, shift = torch.randn(16, 1, 5, 5), torch.randn(16), torch.rand(16) + 0.5, torch.randn(16)
    for stride, residual in ((1, True), (2, False)):
        args = (weight, bias, stride, scale, shift, True, residual)
        y, y32 = fwd(x, *args), fwd(x.float(), *args)
        assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(y, y32.to(dtype))
        g = torch.randn(y.shape).to(dtype)
        grads, grads32 = bwd(g, x, *args), bwd(g.float(), x.float(), *args)
        assert grads[0].dtype == dtype and torch.equal(grads[0], grads32[0].to(dtype))
        assert all(torch.equal(a, b) for a, b in zip(grads[1:], grads32[1:]))


@requires_ext
@pytest.mark.parametrize("epilogue", ["plain", "cpe", "invres"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_gradcheck_float64(epilogue, layout):
    args = make_args((2, 3, 5, 4), 3, 1, epilogue, torch.float64, layout)
    names = [k for k in PARAMS if args[k] is not None]

    def f(*ts):
        return ops.depthwise(**{**args, **dict(zip(names, ts))})

    assert torch.autograd.gradcheck(f, tuple(leaves(args)))
    strided = make_args((1, 4, 6, 5), 5, 2, "invres", torch.float64, "strided")
    names2 = [k for k in PARAMS if strided[k] is not None]
    assert torch.autograd.gradcheck(lambda *ts: ops.depthwise(**{**strided, **dict(zip(names2, ts))}),
                                    tuple(leaves(strided)))


def opcheck_samples(device="cpu"):
    for layout in ("nchw", "channels_last"):
        for epilogue, stride, k in (("plain", 2, 3), ("cpe", 1, 3), ("invres", 1, 5), ("everything", 1, 7)):
            yield make_args((2, 8, 5, 6), k, stride, epilogue, torch.float32, layout, device)
    yield make_args((1, 1, 3, 3), 3, 1, "cpe", torch.float32, "nchw", device)  # C = 1: both layouts at once


@requires_ext
def test_opcheck():
    for args in opcheck_samples():
        order = ("x", "weight", "bias", "stride", "scale", "shift", "hswish", "residual")
        torch.library.opcheck(torch.ops.mpvit_kernels.depthwise.default, tuple(args[k] for k in order))
        y = ops.depthwise(**args)
        torch.library.opcheck(torch.ops.mpvit_kernels.depthwise_backward.default,
                              (torch.randn_like(y), *(args[k].detach() if isinstance(args[k], torch.Tensor)
                                                      else args[k] for k in order)))


@requires_ext
def test_backward_is_bitwise_reproducible_across_thread_counts():
    args = make_args((4, 24, 23, 19), 3, 1, "everything", layout="channels_last")
    y = ops.depthwise(**args)
    grad = torch.randn_like(y)
    results = across_thread_counts(lambda: torch.autograd.grad(y, leaves(args), grad, retain_graph=True))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@requires_ext
@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_cpe_module_is_one_op_without_copies_and_compiles_fullgraph(compile_backend):
    torch._dynamo.reset()
    m = ConvPosEnc(16)
    x = torch.randn(2, 5 * 7, 16, requires_grad=True)
    with torch.no_grad(), RecordOps() as rec:
        out = m(x, (5, 7))
    assert rec.compute == ["mpvit_kernels.depthwise"], rec.names  # the token map is a view both ways
    assert out.is_contiguous()
    compiled = torch.compile(m, fullgraph=True, backend=compile_backend)
    y, y_ref = compiled(x, (5, 7)), m(x, (5, 7))
    assert_close(y, y_ref)
    (g,) = torch.autograd.grad(y.sum(), x)
    (g_ref,) = torch.autograd.grad(y_ref.sum(), x)
    assert_close(g, g_ref)
    with mpvit_kernels.use_backend("reference"):
        assert_close(m(x, (5, 7)), y_ref)


@requires_ext
def test_empty_batch_and_channels():
    for shape in ((0, 4, 5, 5), (2, 0, 5, 5)):
        args = make_args(shape, 3, 1, "everything")
        y = ops.depthwise(**args)
        assert y.shape == shape
        grads = torch.autograd.grad(y.sum(), leaves(args), allow_unused=True)
        assert all(g is None or not g.any() for g in grads)


@pytest.mark.parametrize("change, exc, match", [
    (dict(x=torch.randn(3, 4, 4)), ValueError, "x must be"),
    (dict(x=torch.ones(1, 4, 5, 5, dtype=torch.int32)), TypeError, "x must be"),
    (dict(weight=torch.randn(4, 1, 4, 4)), ValueError, "weight"),
    (dict(weight=torch.randn(3, 1, 3, 3)), ValueError, "weight"),
    (dict(bias=torch.randn(5)), ValueError, "bias"),
    (dict(stride=3), ValueError, "stride"),
    (dict(scale=torch.rand(4)), ValueError, "scale and shift"),
    (dict(scale=torch.rand(4), shift=torch.randn(3)), ValueError, "shift"),
    (dict(stride=2, residual=True), ValueError, "residual"),
    (dict(weight=torch.randn(4, 1, 3, 3, device="meta")), ValueError, "weight is on"),
    (dict(bias=[0.0] * 4), TypeError, "bias must be a Tensor"),
    (dict(stride=1.0), TypeError, "stride must be an int"),
    (dict(residual=torch.ones(1)), TypeError, "residual must be a bool"),
    (dict(hswish=1), TypeError, "hswish must be a bool"),
])
def test_bad_inputs_raise_before_any_kernel(change, exc, match):
    args = dict(x=torch.randn(1, 4, 5, 5), weight=torch.randn(4, 1, 3, 3))
    with pytest.raises(exc, match=match):
        ops.depthwise(**{**args, **change})


@requires_ext
def test_compiled_op_rejects_bad_shapes_too():
    with pytest.raises(ValueError, match="weight"):
        torch.ops.mpvit_kernels.depthwise(torch.randn(1, 4, 5, 5), torch.randn(4, 1, 4, 4), None, 1, None, None,
                                          False, False)


# ---- the CUDA kernels, run on the CPU (tests/cuda_host) -------------------------------------

HOST_DTYPES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}


@pytest.fixture(scope="module")
def cuda_host(tmp_path_factory):
    """csrc/cuda/depthwise_kernels.cuh built for the CPU with tests/cuda_host/shim.h. Pass 1 of
    the backward aims for 2 blocks instead of 512, so that each block walks several tiles."""
    so = build_cuda_host("depthwise_host", tmp_path_factory.mktemp("cuda_host"), ["MPVIT_DEPTHWISE_PARAM_BLOCKS=2"])
    P, I, I64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
    so.dw_forward.argtypes = [I, I, I, I64, I64, I64, I64, I, P, P, P, P, P, I, I, P]
    so.dw_backward.argtypes = [I, I, I, I64, I64, I64, I64, I, P, P, P, P, P, P, I, I, P, P, P, P]
    so.dw_partial_numel.argtypes = [I, I, I64, I64, I64, I64, I]
    so.dw_partial_numel.restype = I64
    so.dw_fits_grid.argtypes = [I, I64, I64, I64, I64, I]
    return so


def run_on_host(so, args, vec, grad):
    """The forward and backward launch sequences of depthwise.cu, on the CPU."""
    x = args["x"].detach()
    B, C, H, W = x.shape
    K, stride = args["weight"].shape[-1], args["stride"]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32

    def p(t):
        return ctypes.c_void_p(t.data_ptr()) if t is not None else ctypes.c_void_p(0)

    def param(name):
        t = args[name]
        return None if t is None else t.detach().reshape(C, -1).squeeze(-1).to(acc).contiguous()

    xn = x.permute(0, 2, 3, 1).contiguous()
    w, b, s, t = param("weight"), param("bias"), param("scale"), param("shift")
    Ho, Wo = (H - 1) // stride + 1, (W - 1) // stride + 1
    y = torch.empty(B, Ho, Wo, C, dtype=x.dtype)
    flags = (int(args["hswish"]), int(args["residual"]))
    dims = (HOST_DTYPES[x.dtype], vec, K, B, H, W, C, stride)
    assert so.dw_forward(*dims, p(xn), p(w), p(b), p(s), p(t), *flags, p(y)) == 0
    gn = grad.permute(0, 2, 3, 1).contiguous()
    gconv = torch.empty(B * Ho * Wo * C, dtype=acc)
    partial = torch.empty(so.dw_partial_numel(vec, K, B, H, W, C, stride), dtype=acc)
    gx = torch.empty(B, H, W, C, dtype=x.dtype)
    sums = torch.empty((K * K + 3) * C, dtype=acc)
    assert so.dw_backward(*dims, p(gn), p(xn), p(w), p(b), p(s), p(t), *flags, p(gconv), p(partial), p(gx),
                          p(sums)) == 0
    grads = {"x": gx.permute(0, 3, 1, 2), "weight": sums[:C * K * K].view(C, 1, K, K),
             "bias": sums[C * K * K:C * K * K + C], "scale": sums[C * K * K + C:C * K * K + 2 * C],
             "shift": sums[C * K * K + 2 * C:]}
    return y.permute(0, 3, 1, 2), [grads[k] for k in PARAMS if args[k] is not None]


# Every tile path: one-channel lanes and 16-byte vectors (C % (16 / element size) == 0), several
# channel blocks, partial tiles, stride 2 with odd sizes, every window and epilogue.
HOST_CASES = [
    ((2, 8, 5, 7), 3, 1, "cpe"), ((1, 8, 9, 17), 3, 2, "invres"), ((2, 27, 6, 4), 5, 1, "everything"),
    ((1, 72, 3, 10), 7, 1, "hswish"), ((1, 16, 11, 5), 7, 2, "plain"), ((2, 40, 4, 9), 5, 2, "invres"),
    ((1, 1, 1, 1), 3, 1, "everything"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp64", "fp16", "bf16"])
@pytest.mark.parametrize("case", HOST_CASES, ids=lambda c: f"{case_id(c[0])}-k{c[1]}-s{c[2]}-{c[3]}")
def test_cuda_kernels_on_the_host_match_reference(cuda_host, case, dtype):
    shape, k, stride, epilogue = case
    args = make_args(shape, k, stride, epilogue, dtype, requires_grad=False)
    ref, ref_leaves = fp64_reference(args)
    grad = torch.randn(ref.shape, dtype=torch.float64).to(dtype)
    want = torch.autograd.grad(ref, ref_leaves, grad.double())  # the upstream grad the kernels read
    V = 16 // torch.empty((), dtype=dtype).element_size()
    for vec in (1, V) if shape[1] % V == 0 else (1,):
        y, got = run_on_host(cuda_host, args, vec, grad)
        # 16-bit y and grad x: fp32 arithmetic rounded once to the dtype; the parameter grads are
        # sums in the accumulation type
        for out, w in zip([y] + got, [ref] + list(want)):
            one_rounding = out.dtype in (torch.float16, torch.bfloat16)
            assert_close(out.double(), w, out.dtype, scale=1 if one_rounding else 4 if out is y else 20)


def test_cuda_launcher_refuses_sizes_beyond_its_grids(cuda_host):
    # checked before any launch: 32-bit tile counters, 65535 blocks along y (channels) and z (batch)
    assert cuda_host.dw_fits_grid(8, 16, 512, 512, 64, 1)
    assert not cuda_host.dw_fits_grid(1, 65535, 65537, 1, 1, 1)  # 2^31 tiles of 2 pixels each
    assert not cuda_host.dw_fits_grid(1, 1, 8, 8, 16 * 65536, 1)  # 65536 channel blocks
    assert not cuda_host.dw_fits_grid(8, 65536, 8, 8, 8, 1)


def test_cuda_kernels_on_the_host_keep_weight_grads_finite_past_the_image_edge(cuda_host):
    # a tile's pixels past the output's last row must not read x: tap row 0 of the weight grad
    # sums x rows -1..H-2 only, so an inf in the last row must not reach it (0 * inf = NaN)
    args = make_args((1, 8, 3, 5), 3, 1, "plain", requires_grad=False)
    with torch.no_grad():
        args["x"][:, :, -1] = float("inf")
    grad = torch.randn(1, 8, 3, 5)
    _, (gx, gw) = run_on_host(cuda_host, args, 4, grad)
    assert torch.isfinite(gw[:, :, 0]).all(), gw[:, :, 0]


# ---- CUDA (run with a GPU: pytest -m cuda) --------------------------------------------------

# (name, B, C, H, W, epilogue) of MPViT-S and -B CPE and InvRes depthwise sites at 224 input
MODEL_SITES = [(f"{m} {site} {C}x{R}", C, R, epi) for m, dims in (("S", (64, 128, 216, 288)), ("B", (128, 224, 368, 480)))
               for C, R in zip(dims, (56, 28, 14, 7)) for site, epi in (("cpe", "cpe"), ("invres", "invres"))]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("site", MODEL_SITES, ids=lambda s: s[0].replace(" ", "-"))
def test_cuda_low_precision_at_model_shapes(site, dtype):
    _, C, R, epilogue = site
    # the truth in fp64 from the very values both sides read (inputs and grad rounded to dtype):
    # else a rounding that moves a pre-activation across a Hardswish kink (its slope jumps by
    # 0.5 at +-3) decides the max error of ours and of eager alike, by chance
    exact_args = make_args((8, C, R, R), 3, 1, epilogue, dtype, "channels_last", device="cuda")
    exact, exact_leaves = fp64_reference(exact_args)
    grad = torch.randn(exact.shape, dtype=torch.float64, device="cuda").to(dtype).double()
    exact_grads = torch.autograd.grad(exact, exact_leaves, grad)
    low = {k: v.detach().to(dtype).requires_grad_() if isinstance(v, torch.Tensor) else v for k, v in exact_args.items()}
    ours = ops.depthwise(**low)
    eager = reference.depthwise(**low)
    for name, o, e, want in zip(["out"] + [k for k in PARAMS if low[k] is not None],
                                [ours, *torch.autograd.grad(ours, leaves(low), grad.to(dtype))],
                                [eager, *torch.autograd.grad(eager, leaves(low), grad.to(dtype))],
                                [exact, *exact_grads]):
        err_ours = (o.double() - want).abs().max().item()
        err_eager = (e.double() - want).abs().max().item()
        assert err_ours <= 2 * err_eager + 1e-3 * max(1.0, want.abs().max().item()), (name, err_ours, err_eager)


@pytest.mark.cuda
@pytest.mark.parametrize("case", HOST_CASES + [((16, 64, 56, 56), 3, 1, "cpe"), ((16, 288, 7, 7), 3, 1, "invres")],
                         ids=lambda c: f"{case_id(c[0])}-k{c[1]}-s{c[2]}-{c[3]}")
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_cuda_fp32_matches_cpu_twin(case, layout):
    shape, k, stride, epilogue = case
    args = make_args(shape, k, stride, epilogue, torch.float32, layout, device="cuda")
    y = ops.depthwise(**args)
    grad = torch.randn_like(y)
    if args["hswish"]:
        # no grad where the pre-activation lies within 1e-4 of a Hardswish kink (+-3): the GPU's
        # sums and FMAs round otherwise than the twin's, and a crossing changes the slope by 0.5
        z = reference.depthwise(**{**{k: v.detach().double() if isinstance(v, torch.Tensor) else v
                                      for k, v in args.items()}, "hswish": False, "residual": False})
        grad = grad.masked_fill((z.abs() - 3).abs().float() < 1e-4, 0)
    got = torch.autograd.grad(y, leaves(args), grad)
    cpu = {k: v.detach().cpu().requires_grad_() if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    y_cpu = ops.depthwise(**cpu)
    want = torch.autograd.grad(y_cpu, leaves(cpu), grad.cpu())
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert_close(y.cpu(), y_cpu, scale=4)
    for g, w in zip(got, want):
        assert_close(g.cpu(), w, scale=20)


def assert_backward_is_bitwise_reproducible(args, runs=3):
    y = ops.depthwise(**args)
    grad = torch.randn_like(y)
    first = torch.autograd.grad(y, leaves(args), grad, retain_graph=True)
    for _ in range(runs - 1):
        for a, b in zip(first, torch.autograd.grad(y, leaves(args), grad, retain_graph=True)):
            assert torch.equal(a, b)


@pytest.mark.cuda
def test_cuda_backward_is_deterministic_at_large_n():
    assert_backward_is_bitwise_reproducible(
        make_args((16, 64, 56, 56), 3, 1, "everything", torch.bfloat16, "channels_last", device="cuda"))


@pytest.mark.cuda
@pytest.mark.parametrize("case", HOST_CASES, ids=lambda c: f"{case_id(c[0])}-k{c[1]}-s{c[2]}-{c[3]}")
def test_cuda_backward_is_deterministic(case):
    # small shapes, every tile path: also what compute-sanitizer's racecheck runs (gpu_proof.sh)
    shape, k, stride, epilogue = case
    assert_backward_is_bitwise_reproducible(make_args(shape, k, stride, epilogue, torch.float16, device="cuda"))


@pytest.mark.cuda
def test_cuda_opcheck():
    for args in opcheck_samples("cuda"):
        order = ("x", "weight", "bias", "stride", "scale", "shift", "hswish", "residual")
        torch.library.opcheck(torch.ops.mpvit_kernels.depthwise.default, tuple(args[k] for k in order))
