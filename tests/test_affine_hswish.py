"""affine_hswish: the compiled op (C++ CPU twin here, CUDA with a GPU) against the reference."""
import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import mpvit_kernels
from mpvit_kernels import ops, reference
from mpvit_kernels.nn import Conv2dBN
from tests.conftest import BF16_KERNELS, KERNEL_DEVICE, NO_BF16_KERNELS
from tests.utils import (LAYOUTS, RecordOps, across_thread_counts, assert_close, away_from_the_kinks, build_cuda_host,
                         gpu_tiles, make_image)

SHAPES = [(1, 1, 1, 1), (2, 3, 5, 7), (3, 17, 9, 13), (2, 64, 8, 8)]
requires_ext = pytest.mark.skipif(not mpvit_kernels.extension_available(), reason="mpvit_kernels._C not built")


def params(C, dtype=torch.float32, device="cpu", requires_grad=False):
    scale = (torch.rand(C, dtype=dtype, device=device) + 0.5).requires_grad_(requires_grad)
    shift = torch.randn(C, dtype=dtype, device=device).requires_grad_(requires_grad)
    return scale, shift


def sample_inputs(device="cpu", dtype=torch.float32):
    for shape in [(2, 3, 5, 7), (1, 16, 4, 3)]:
        for layout in LAYOUTS:
            for hswish in (True, False):
                x = make_image(shape, dtype, layout, device, requires_grad=True)
                yield (x, *params(shape[1], dtype, device, requires_grad=True), hswish)
    yield (torch.randn(5, 6, dtype=dtype, device=device, requires_grad=True),
           *params(6, dtype, device, requires_grad=True), True)


@requires_ext
def test_extension_registers_cpu_and_cuda_kernels():
    import mpvit_kernels._C  # noqa: F401

    for name in ("mpvit_kernels::affine_hswish", "mpvit_kernels::affine_hswish_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU")
        if torch.version.cuda is not None:  # built as a CUDAExtension: the .cu kernels linked in
            assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA")


@requires_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("hswish", [True, False])
def test_matches_reference(shape, layout, dtype, hswish):
    x = make_image(shape, dtype, layout, requires_grad=True)
    scale, shift = params(shape[1], dtype, requires_grad=True)
    y = torch.ops.mpvit_kernels.affine_hswish(x, scale, shift, hswish)
    x_ref, scale_ref, shift_ref = (t.detach().clone().requires_grad_() for t in (x, scale, shift))
    y_ref = reference.affine_hswish(x_ref, scale_ref, shift_ref, hswish)
    assert_close(y, y_ref)
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)
    grad = make_image(shape, dtype, "nchw")
    y.backward(grad)
    y_ref.backward(grad)
    assert_close(x.grad, x_ref.grad)
    # parameter grads sum over B*H*W elements: allow the summation-order difference
    assert_close(scale.grad, scale_ref.grad, scale=10)
    assert_close(shift.grad, shift_ref.grad, scale=10)


@requires_ext
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_cpu_matches_reference(dtype):
    x = make_image((2, 24, 7, 5), dtype, "channels_last")
    scale, shift = params(24, torch.float32)
    assert_close(torch.ops.mpvit_kernels.affine_hswish(x, scale, shift, True),
                 reference.affine_hswish(x, scale, shift, True))


@requires_ext
def test_hardswish_kinks_match_aten():
    # Exactly at z = -3 and z = 3 the slope follows ATen's hardswish_backward.
    x = torch.tensor([-3.0, 3.0, -3.5, 0.0, 2.0, 4.0], dtype=torch.float64).view(1, 6, 1).requires_grad_()
    ones = torch.ones(6, dtype=torch.float64)
    zeros = torch.zeros(6, dtype=torch.float64)
    torch.ops.mpvit_kernels.affine_hswish(x, ones, zeros, True).sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    torch.nn.functional.hardswish(x_ref).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, atol=0, rtol=0)


@requires_ext
def test_opcheck():
    for args in sample_inputs():
        torch.library.opcheck(torch.ops.mpvit_kernels.affine_hswish.default, args)
    x = make_image((2, 5, 3, 4), layout="channels_last")
    scale, shift = params(5)
    torch.library.opcheck(torch.ops.mpvit_kernels.affine_hswish_backward.default,
                          (torch.randn(2, 5, 3, 4), x, scale, shift, True))


@requires_ext
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradcheck_float64(layout):
    x = make_image((2, 3, 4, 5), torch.float64, layout, requires_grad=True)
    scale, shift = params(3, torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: ops.affine_hswish(*a, True), (x, scale, shift))


@requires_ext
def test_backward_is_deterministic_across_thread_counts():
    x = make_image((4, 32, 33, 31), layout="channels_last", requires_grad=True)
    scale, shift = params(32, requires_grad=True)
    grad = torch.randn_like(x)
    results = across_thread_counts(lambda: torch.ops.mpvit_kernels.affine_hswish_backward(grad, x, scale, shift, True))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@requires_ext
def test_backend_switch_picks_the_kernel_or_the_reference():
    x = make_image((1, 4, 3, 3))
    scale, shift = params(4)
    with RecordOps() as rec:
        ops.affine_hswish(x, scale, shift)
    assert "mpvit_kernels.affine_hswish" in rec.names
    with mpvit_kernels.use_backend("reference"), RecordOps() as rec:
        ops.affine_hswish(x, scale, shift)
    assert not any(n.startswith("mpvit_kernels") for n in rec.names)
    with mpvit_kernels.use_backend("reference", ops=["factor_attention"]), RecordOps() as rec:
        ops.affine_hswish(x, scale, shift)
    assert "mpvit_kernels.affine_hswish" in rec.names
    with mpvit_kernels.use_backend("reference", ops=["affine_hswish"]), RecordOps() as rec:
        ops.affine_hswish(x, scale, shift)
    assert not any(n.startswith("mpvit_kernels") for n in rec.names)
    with pytest.raises(ValueError, match="backend"):
        with mpvit_kernels.use_backend("fast"):
            pass
    with pytest.raises(ValueError, match="op families"):
        with mpvit_kernels.use_backend("reference", ops=["attention"]):
            pass


@pytest.mark.parametrize("make_args, exc, match", [
    (lambda: (torch.randn(2, 3, 4, 4), torch.ones(4), torch.zeros(3)), ValueError, "scale"),
    (lambda: (torch.randn(2, 3, 4, 4), torch.ones(3), torch.zeros(3, 1)), ValueError, "shift"),
    (lambda: (torch.randn(3), torch.ones(3), torch.zeros(3)), ValueError, "x must be"),
    (lambda: (torch.ones(2, 3, 4, 4, dtype=torch.int32), torch.ones(3), torch.zeros(3)), TypeError, "x must be"),
    (lambda: (torch.randn(2, 3, 4, 4), torch.ones(3), torch.zeros(3, dtype=torch.float64)), TypeError, "share"),
    (lambda: (torch.randn(2, 3, 4, 4), torch.ones(3, device="meta"), torch.zeros(3)), ValueError, "scale"),
    (lambda: ([1.0], torch.ones(3), torch.zeros(3)), TypeError, "x must be a Tensor"),
])
def test_bad_inputs_raise_before_any_kernel(make_args, exc, match):
    with pytest.raises(exc, match=match):
        ops.affine_hswish(*make_args())


@requires_ext
def test_compiled_op_rejects_bad_shapes_too():
    with pytest.raises(ValueError, match="scale"):
        torch.ops.mpvit_kernels.affine_hswish(torch.randn(2, 3, 4, 4), torch.ones(4), torch.zeros(4), True)


def test_empty_input():
    x = torch.randn(0, 3, 4, 4, requires_grad=True)
    scale, shift = params(3, requires_grad=True)
    y = ops.affine_hswish(x, scale, shift)
    y.sum().backward()
    assert y.shape == x.shape and torch.equal(shift.grad, torch.zeros(3))


# (shape, path): one program of rows on both paths; on the kernels, rows over three programs
# (the last one short) and channels over two column blocks (the last one short); "chunked": the
# combines of the programs' partials in levels of 2 (COMBINE_CHUNK), as past 256 on a GPU: the
# statistics' 5 programs' in 3 then 2, the backward sums' 3 in 2
BATCH_NORM_CASES = [((3, 12, 7, 5), "aten"), ((3, 12, 7, 5), "kernels"), ((2, 70, 23, 13), "kernels"),
                    ((2, 70, 29, 19), "kernels, chunked")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape, path", BATCH_NORM_CASES, ids=lambda c: c if isinstance(c, str) else "x".join(map(str, c)))
def test_training_batch_norm_matches_batchnorm2d(shape, path, dtype, monkeypatch):
    """BatchNorm with batch statistics + Hardswish (batch_norm_hswish): on the Triton kernels (one
    ``affine_hswish_batch`` op: statistics pass, normalise, two-pass backward) and on ATen's
    BatchNorm (a CPU, or no Triton): outputs, grads and batch statistics as nn.BatchNorm2d +
    Hardswish, on channels-last maps whose mean is above their spread (the kernels merge row
    tiles' (mean, M2)). On aten's, far above (up to 3e4 times): its variance comes back from
    1/sqrt(var + eps) and must stay exact there. The kernels normalise as z * scale + shift, the
    fused GEMMs' training epilogue: that form loses (mean / std) * 2^-24 of the unit in fp32, so
    their maps' mean stays within 20 times their spread."""
    from mpvit_kernels.ops.affine_hswish import batch_norm_hswish

    levels = []
    if path == "kernels, chunked":
        if KERNEL_DEVICE != "cpu":
            pytest.skip("the interpreter's tiles: on a GPU other shapes reach the first levels")
        from mpvit_kernels.triton import affine_hswish as kernels

        combine_chunks = kernels.combine_chunks
        monkeypatch.setattr(kernels, "COMBINE_CHUNK", 2)
        monkeypatch.setattr(kernels, "combine_chunks", lambda P: levels.append(P) or combine_chunks(P))
        path = "kernels"
    if path == "kernels" and dtype == torch.bfloat16 and not BF16_KERNELS:
        pytest.skip(NO_BF16_KERNELS)
    device = KERNEL_DEVICE if path == "kernels" else "cpu"
    acc = reference._acc_dtype(dtype)
    B, C, H, W = shape
    low, offset = (-1, 2) if path == "kernels" else (-3, 30)
    z = torch.randn(shape, dtype=acc, device=device) * torch.logspace(low, 1, C, dtype=acc, device=device).view(1, -1, 1, 1)
    z = z + offset
    z = z.to(dtype).to(memory_format=torch.channels_last).requires_grad_()
    bn = torch.nn.BatchNorm2d(C).to(device, acc).train()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
    with mpvit_kernels.use_backend("auto" if path == "kernels" else "reference", ops=["affine_hswish"]), \
            RecordOps() as rec:
        y, mean, var = batch_norm_hswish(z, bn.weight, bn.bias, bn.eps, True)
    assert ("mpvit_kernels.affine_hswish_batch" in rec.names) == (path == "kernels"), rec.names
    # the kernels round bf16 once (from fp32, as the fp32 reference then rounded), aten's BatchNorm
    # and Hardswish each round their output; their fp32 sums are fp32's, aten's on a CPU fp64's
    once = path == "kernels" and dtype == torch.bfloat16
    tol = dict(atol=2e-3, rtol=8e-3) if once else \
        dict(atol=1e-4, rtol=1e-4) if path == "kernels" and dtype == torch.float32 else {}
    z_ref = z.detach().clone().to(acc if once else dtype).requires_grad_()
    y_ref = torch.nn.functional.hardswish(bn(z_ref))
    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
    assert mean.dtype == var.dtype == acc and not mean.requires_grad and not var.requires_grad
    torch.testing.assert_close(y, y_ref.to(dtype), **tol)
    var_ref, mean_ref = torch.var_mean(z.detach().to(torch.float64), dim=(0, 2, 3), correction=0)
    # a few ulp of var + eps: bf16 rounds the narrowest channels to constants (var 0)
    rtol, atol = (1e-10, 1e-18) if dtype == torch.float64 else (2e-5, 1e-11)
    torch.testing.assert_close(mean.double(), mean_ref, rtol=rtol, atol=0)
    torch.testing.assert_close(var.double(), var_ref, rtol=rtol, atol=atol)
    grad = torch.randn_like(y)
    with mpvit_kernels.use_backend("auto" if path == "kernels" else "reference", ops=["affine_hswish"]):
        got = torch.autograd.grad(y, [z, bn.weight, bn.bias], grad)
    want = torch.autograd.grad(y_ref, [z_ref, bn.weight, bn.bias], grad.to(y_ref.dtype))
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r.to(g.dtype), **tol)
    if levels:  # (each level asks combine_chunks again: the last call's P is what the last launch combined)
        assert levels == [5, 3, 2, 3, 2], levels


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_training_batch_norm_with_a_gpus_tiles(dtype, monkeypatch):
    # the statistics and backward passes as a GPU tiles them (32 rows: 19 programs' statistics,
    # 2 of backward sums, 19 row tiles of grad_z), where the interpreter's are 4 times as tall
    with gpu_tiles():
        test_training_batch_norm_matches_batchnorm2d((2, 70, 23, 13), "kernels", dtype, monkeypatch)


def test_batch_norm_op_opcheck_and_fp64_gradcheck():
    """``affine_hswish_batch``: opcheck on channels-last and NCHW maps (read channels-last, a
    copy), with and without Hardswish; a float64 gradcheck of y in z, weight and bias."""
    op = torch.ops.mpvit_kernels.affine_hswish_batch.default
    for layout, hswish in (("channels_last", True), ("channels_last", False), ("nchw", True)):
        z = make_image((2, 6, 5, 3), torch.float32, layout, KERNEL_DEVICE, requires_grad=True)
        gamma = (torch.rand(6, device=KERNEL_DEVICE) + 0.5).requires_grad_()
        beta = torch.randn(6, device=KERNEL_DEVICE, requires_grad=True)
        torch.library.opcheck(op, (z, gamma, beta, 1e-5, hswish))
    z = make_image((2, 3, 4, 3), torch.float64, "channels_last", KERNEL_DEVICE, requires_grad=True)
    gamma = (torch.rand(3, dtype=torch.float64, device=KERNEL_DEVICE) + 0.5).requires_grad_()
    beta = torch.randn(3, dtype=torch.float64, device=KERNEL_DEVICE, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: op(*a, 1e-5, True)[0], (z, gamma, beta), fast_mode=True)


def _stem_and_invres(training: bool, momentum=0.1, track_running_stats=True):
    """The stem's first Conv2dBN (a 3x3 conv, cuDNN's, then BatchNorm + Hardswish) and an InvRes
    (its depthwise conv, then BatchNorm + Hardswish), BatchNorms randomised."""
    from mpvit_kernels.models.mpvit import ResBlock

    torch.manual_seed(0)
    stem, invres = Conv2dBN(3, 8, 3, 2, hswish=True), ResBlock(8)
    for bn in (stem.bn, invres.norm):
        bn.momentum, bn.track_running_stats = momentum, track_running_stats
        if not track_running_stats:
            bn.running_mean = bn.running_var = bn.num_batches_tracked = None
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_()
    return torch.nn.Sequential(stem, invres).to(KERNEL_DEVICE, torch.float64).train(training)


@pytest.mark.parametrize("momentum, track", [(0.1, True), (None, True), (0.1, False)],
                         ids=["momentum", "cumulative", "untracked"])
def test_stem_and_invres_train_their_batch_norms_in_one_op(momentum, track):
    """In training the stem's and InvRes's BatchNorm + Hardswish run as ``affine_hswish_batch``
    (not aten's batch_norm and hardswish): the output, every grad and the running statistics
    (momentum or cumulative average; none kept) as with kernels off, two steps running; eval
    without running statistics normalises with the batch's too."""
    model = _stem_and_invres(True, momentum, track)
    plain = copy.deepcopy(model)
    for step in range(2):
        x = make_image((2, 3, 13, 11), torch.float64, "channels_last", KERNEL_DEVICE, requires_grad=True)
        x_ref = x.detach().clone().requires_grad_()
        with RecordOps() as rec:
            y = model(x)
        assert rec.names.count("mpvit_kernels.affine_hswish_batch") == 2, rec.names
        assert "aten.native_batch_norm" not in rec.names and "aten.hardswish" not in rec.names, rec.names
        with mpvit_kernels.use_backend("reference"):
            y_ref = plain(x_ref)
        g = torch.randn_like(y)
        y.backward(g)
        y_ref.backward(g)
        torch.testing.assert_close(y, y_ref, atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-12, rtol=1e-10)
        for (name, p), p_ref in zip(model.named_parameters(), plain.parameters()):
            torch.testing.assert_close(p.grad, p_ref.grad, atol=1e-12, rtol=1e-10, msg=name)
        for (name, b), b_ref in zip(model.named_buffers(), plain.buffers()):
            torch.testing.assert_close(b, b_ref, atol=1e-12, rtol=1e-10, msg=name)
    if not track:  # no running statistics: eval takes the batch's as well
        model.eval()
        plain.eval()
        with torch.no_grad(), RecordOps() as rec:
            y = model(x)
        assert "mpvit_kernels.affine_hswish_batch" in rec.names
        with torch.no_grad(), mpvit_kernels.use_backend("reference"):
            torch.testing.assert_close(y, plain(x), atol=1e-12, rtol=1e-10)


def test_stem_and_invres_train_under_torch_compile_fullgraph():
    """One graph (aot_eager) through ``affine_hswish_batch`` and the running statistics' in-place
    updates: the output, the input's grad and the running statistics as eager's."""
    torch._dynamo.reset()
    model = _stem_and_invres(True).float()
    plain = copy.deepcopy(model)
    x = make_image((2, 3, 13, 11), torch.float32, "channels_last", KERNEL_DEVICE, requires_grad=True)
    y = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
    y_ref = plain(x)
    assert_close(y, y_ref)
    (g,) = torch.autograd.grad(y.sum(), x)
    (g_ref,) = torch.autograd.grad(y_ref.sum(), x)
    assert_close(g, g_ref, scale=10)
    for (name, b), b_ref in zip(model.named_buffers(), plain.buffers()):
        torch.testing.assert_close(b, b_ref, msg=name)


@pytest.mark.parametrize("change, exc, match", [
    (dict(z=torch.randn(4, 3, 5)), ValueError, "z must be"),
    (dict(z=torch.ones(2, 3, 4, 4, dtype=torch.int32)), TypeError, "z must be"),
    (dict(weight=torch.rand(4)), ValueError, "weight must have shape"),
    (dict(bias=torch.randn(3, 1)), ValueError, "bias must have shape"),
    (dict(eps=-1.0), ValueError, "eps"),
])
def test_batch_norm_op_rejects_bad_inputs_before_any_kernel(change, exc, match):
    args = dict(z=torch.randn(2, 3, 4, 4), weight=torch.rand(3), bias=torch.randn(3), eps=1e-5, hswish=True)
    args.update(change)
    with pytest.raises(exc, match=match):
        torch.ops.mpvit_kernels.affine_hswish_batch(*args.values())


def test_batch_norm_op_needs_more_than_one_value_per_channel_and_leaves_nchw_maps_and_cuda_to_aten():
    stem = _stem_and_invres(True)[0]
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        stem(torch.randn(1, 3, 2, 2, dtype=torch.float64, device=KERNEL_DEVICE))
    stem.bn.eps = 0.0  # as nn.BatchNorm2d's own path refuses it
    with pytest.raises(ValueError, match="eps must be positive"):
        stem(torch.randn(2, 3, 5, 4, dtype=torch.float64, device=KERNEL_DEVICE))
    stem.bn.eps = 1e-5
    # an NCHW map (what a contiguous input gives cuDNN's conv) would be copied: aten's BatchNorm;
    # so under the cuda backend (the extension's kernels alone)
    from mpvit_kernels.nn import bn_hswish

    stem.bn.train()
    nchw = torch.randn(2, 8, 5, 4, dtype=torch.float64, device=KERNEL_DEVICE)
    for z, backend in ((nchw, "auto"), (nchw.contiguous(memory_format=torch.channels_last), "cuda")):
        with RecordOps() as rec, mpvit_kernels.use_backend(backend, ops=["affine_hswish"]):
            bn_hswish(z, stem.bn, True)
        assert "aten.native_batch_norm" in rec.names and "mpvit_kernels.affine_hswish_batch" not in rec.names


@requires_ext
@pytest.mark.parametrize("fold", [False, True], ids=["affine_hswish", "folded_into_conv"])
@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_module_under_torch_compile_fullgraph(monkeypatch, compile_backend, fold):
    """The stem's Conv2dBN in eval: conv then the affine_hswish op, or (fp32 on a CPU, the
    default there) the BatchNorm folded into the conv."""
    if not fold:
        monkeypatch.setattr(sys.modules["mpvit_kernels.nn"], "folds_into_conv", lambda op, x: False)
    torch._dynamo.reset()
    m = Conv2dBN(3, 8, 3, 2, hswish=True)
    with torch.no_grad():
        m.bn.running_mean.normal_()
        m.bn.running_var.uniform_(0.5, 2.0)
    m.eval()
    x = make_image((2, 3, 9, 11), layout="channels_last", requires_grad=True)
    compiled = torch.compile(m, fullgraph=True, backend=compile_backend)
    with RecordOps() as rec:
        m(x)
    assert ("mpvit_kernels.affine_hswish" in rec.names) != fold
    y, y_ref = compiled(x), m(x)
    assert_close(y, y_ref)
    (g,) = torch.autograd.grad(y.sum(), x)
    (g_ref,) = torch.autograd.grad(y_ref.sum(), x)
    assert_close(g, g_ref)


def test_without_extension_falls_back_and_says_so_once():
    code = textwrap.dedent("""
        import warnings, torch, mpvit_kernels
        from mpvit_kernels import ops, reference
        assert not mpvit_kernels.extension_available()
        x, s, b = torch.randn(2, 3, 4, 4), torch.rand(3), torch.randn(3)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            y = ops.affine_hswish(x, s, b)
            ops.affine_hswish(x, s, b)
        assert len([m for m in w if "not built" in str(m.message)]) == 1, [str(m.message) for m in w]
        assert torch.equal(y, reference.affine_hswish(x, s, b))
        with mpvit_kernels.use_backend("cuda"):
            try:
                ops.affine_hswish(x, s, b)
            except RuntimeError as e:
                assert "not built" in str(e)
            else:
                raise AssertionError("backend cuda without the extension must raise")
        print("ok")
    """)
    env = dict(os.environ, MPVIT_KERNELS_NO_EXTENSION="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


# ---- CUDA (run with a GPU: pytest -m cuda) -------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (3, 17, 9, 13), (16, 64, 56, 56), (2, 288, 7, 7)],
                         ids=lambda s: "x".join(map(str, s)))
def test_cuda_matches_cpu_twin(shape, layout, dtype):
    x = make_image(shape, dtype, layout, device="cuda", requires_grad=True)
    scale, shift = params(shape[1], torch.float32, device="cuda", requires_grad=True)
    y = torch.ops.mpvit_kernels.affine_hswish(x, scale, shift, True)
    grad = torch.randn_like(y)
    if dtype != torch.float64:
        # no grad where x * scale + shift lies within a few fp32 roundings of a Hardswish kink (+-3):
        # the GPU's FMA and the twin's multiply-add may land either side (the slope 0.5 apart)
        z = x.detach().double() * scale.detach().double().view(1, -1, 1, 1) + shift.detach().double().view(1, -1, 1, 1)
        grad = away_from_the_kinks(grad, z, torch.float32)
    gx, gs, gb = torch.autograd.grad(y, (x, scale, shift), grad)
    xc, sc, bc = (t.detach().cpu().requires_grad_() for t in (x, scale, shift))
    yc = torch.ops.mpvit_kernels.affine_hswish(xc, sc, bc, True)
    gxc, gsc, gbc = torch.autograd.grad(yc, (xc, sc, bc), grad.cpu())
    assert y.stride() == x.stride() or layout == "strided"
    assert_close(y.cpu(), yc, dtype)
    assert_close(gx.cpu(), gxc, dtype)
    n = x.numel() / shape[1]
    assert_close(gs.cpu(), gsc, torch.float32, scale=max(10.0, n ** 0.5))
    assert_close(gb.cpu(), gbc, torch.float32, scale=max(10.0, n ** 0.5))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [pytest.param((16, 32, 112, 112), marks=pytest.mark.model_shapes), (3, 70, 23, 13),
                                   pytest.param((16, 288, 7, 7), marks=pytest.mark.model_shapes)],
                         ids=lambda s: "x".join(map(str, s)))
def test_cuda_batch_norm_op_matches_batchnorm2d_in_fp32(shape, dtype):
    """``affine_hswish_batch`` on a GPU (MPViT-S's stem map and InvRes's last, at batch 16): y,
    the batch statistics and every grad as nn.BatchNorm2d + Hardswish in fp32 on the same values
    (which the op rounds once), its backward's bits the same twice."""
    from mpvit_kernels.ops.affine_hswish import batch_norm_hswish

    torch.manual_seed(0)
    C = shape[1]
    z = (torch.randn(shape, device="cuda") * 2 + 1).to(dtype).contiguous(memory_format=torch.channels_last)
    z.requires_grad_()
    bn = torch.nn.BatchNorm2d(C).cuda().train()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
    y, mean, var = batch_norm_hswish(z, bn.weight, bn.bias, bn.eps, True)
    z_ref = z.detach().float().requires_grad_()
    u_ref = bn(z_ref)
    y_ref = torch.nn.functional.hardswish(u_ref)
    tol = dict(atol=2e-3, rtol=8e-3) if dtype != torch.float32 else dict(atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(y.float(), y_ref, **tol)
    var_ref, mean_ref = torch.var_mean(z_ref.detach().double(), dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(mean.double(), mean_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(var.double(), var_ref, rtol=1e-5, atol=1e-6)
    # no grad within 1e-5 of a Hardswish kink, where the two fp32 normalisations (z * scale + shift,
    # ATen's (z - mean) * invstd * weight + bias) may land on either slope (0.5 apart): about one
    # such element a run of the 16x32x112x112 cases, which would fail the comparison
    grad = away_from_the_kinks(torch.randn_like(y), u_ref, torch.float32, margin=1e-5)
    got = torch.autograd.grad(y, [z, bn.weight, bn.bias], grad, retain_graph=True)
    want = torch.autograd.grad(y_ref, [z_ref, bn.weight, bn.bias], grad.float())
    for g, r in zip(got, want):
        torch.testing.assert_close(g.float(), r, **tol)
    again = torch.autograd.grad(y, [z, bn.weight, bn.bias], grad)
    assert all(torch.equal(a, b) for a, b in zip(got, again))


@pytest.mark.cuda
@pytest.mark.model_shapes
def test_cuda_backward_is_deterministic():
    x = make_image((16, 64, 56, 56), torch.bfloat16, "channels_last", device="cuda")
    scale, shift = params(64, device="cuda")
    grad = torch.randn_like(x)
    first = torch.ops.mpvit_kernels.affine_hswish_backward(grad, x, scale, shift, True)
    for _ in range(3):
        for a, b in zip(first, torch.ops.mpvit_kernels.affine_hswish_backward(grad, x, scale, shift, True)):
            assert torch.equal(a, b)


@pytest.mark.cuda
def test_cuda_backward_refuses_a_grad_on_another_device():
    # a CPU grad with x's strides would reach the kernel as a host pointer (an illegal address,
    # which leaves the process's CUDA context unusable)
    x = make_image((2, 8, 5, 7), torch.float32, "nchw", device="cuda")
    scale, shift = params(8, device="cuda")
    with pytest.raises(ValueError, match="grad must be on x's device"):
        torch.ops.mpvit_kernels.affine_hswish_backward(torch.randn(2, 8, 5, 7), x, scale, shift, True)


@pytest.mark.cuda
def test_cuda_opcheck():
    for args in sample_inputs(device="cuda"):
        torch.library.opcheck(torch.ops.mpvit_kernels.affine_hswish.default, args)


@requires_ext
def test_any_shape_and_dimension_order_matches_reference():
    """Property test: random sizes (primes, ones, zero) and any permutation of the memory order."""
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies

    @hypothesis.settings(max_examples=60, deadline=None, derandomize=True)
    @hypothesis.given(sizes=st.lists(st.sampled_from([0, 1, 2, 3, 5, 7, 13]), min_size=2, max_size=5),
                      order_seed=st.integers(0, 10_000), hswish=st.booleans(),
                      dtype=st.sampled_from([torch.float32, torch.float64]))
    def check(sizes, order_seed, hswish, dtype):
        g = torch.Generator().manual_seed(order_seed)
        order = torch.randperm(len(sizes), generator=g).tolist()
        x = torch.randn([sizes[i] for i in order], dtype=dtype, generator=g)
        x = x.permute([order.index(i) for i in range(len(sizes))])  # logical `sizes`, permuted memory
        C = sizes[1]
        scale, shift = torch.rand(C, dtype=dtype, generator=g) + 0.5, torch.randn(C, dtype=dtype, generator=g)
        y = torch.ops.mpvit_kernels.affine_hswish(x, scale, shift, hswish)
        assert y.shape == x.shape and y.stride() == torch.empty_like(x).stride()
        assert_close(y, reference.affine_hswish(x, scale, shift, hswish))
        grad = torch.randn(x.shape, dtype=dtype, generator=g)
        gx, gs, gb = torch.ops.mpvit_kernels.affine_hswish_backward(grad, x, scale, shift, hswish)
        xr, sr, br = (t.clone().requires_grad_() for t in (x, scale, shift))
        rx, rs, rb = torch.autograd.grad(reference.affine_hswish(xr, sr, br, hswish), (xr, sr, br), grad,
                                         allow_unused=True)
        assert_close(gx, rx)
        assert_close(gs, rs if rs is not None else torch.zeros_like(gs), scale=10)
        assert_close(gb, rb if rb is not None else torch.zeros_like(gb), scale=10)

    check()


# ---- the CUDA kernels, run on the CPU (tests/cuda_host) -------------------------------------

HOST_DTYPES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}


@pytest.fixture(scope="module")
def cuda_host(tmp_path_factory):
    """csrc/cuda/affine_hswish_kernels.cuh built for the CPU with tests/cuda_host/shim.h. The
    backward takes at most 4 row chunks instead of 1024, so each lane walks several rows."""
    import ctypes

    so = build_cuda_host("affine_hswish_host", tmp_path_factory.mktemp("cuda_host"),
                         ["MPVIT_AFFINE_HSWISH_MAX_ROW_CHUNKS=4"])
    P, I, I64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
    so.ah_forward.argtypes = [I, P, P, P, P, I64, I64, I64, I]
    so.ah_backward.argtypes = [I, P, P, P, P, P, P, P, P, I64, I64, I64, I]
    so.ah_partial_chunks.argtypes = [I64, I64, I64]
    so.ah_partial_chunks.restype = I64
    return so


# (shape, layout): channels innermost (32-channel lanes, a partial channel block, rows past the
# chunks), channels outermost (one channel a block, more rows than lanes), tokens, one channel
HOST_CASES = [((2, 40, 7, 9), "channels_last"), ((3, 5, 11, 10), "nchw"), ((37, 6), "rows"), ((2, 1, 5, 5), "nchw"),
              ((1, 33, 2, 3), "channels_last")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp64", "fp16", "bf16"])
@pytest.mark.parametrize("case", HOST_CASES, ids=lambda c: f"{'x'.join(map(str, c[0]))}-{c[1]}")
@pytest.mark.parametrize("hswish", [True, False], ids=["hswish", "affine"])
def test_cuda_kernels_on_the_host_match_reference(cuda_host, case, dtype, hswish):
    import ctypes

    shape, layout = case
    C = shape[1]
    x = 3 * torch.randn(shape, dtype=torch.float64)  # both sides of Hardswish's kinks
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    scale, shift = params(C, torch.float64)
    # what the op hands the kernels: dense (outer, C, inner) memory (affine_hswish.h)
    numel = x.numel()
    inner = numel // C if C == 1 else x.stride(1)
    outer = numel // (C * inner)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    xd = x.to(dtype)
    gd = torch.empty_like(xd).copy_(torch.randn(shape))  # in x's layout, as the op makes it
    s, t = scale.to(acc), shift.to(acc)
    y, gx = torch.empty_like(xd), torch.empty_like(xd)
    partial = torch.empty(cuda_host.ah_partial_chunks(outer, C, inner), 2, C, dtype=acc)
    gs, gt = torch.empty(C, dtype=acc), torch.empty(C, dtype=acc)
    # the reference in fp64 on the very values the kernels read
    leaves = [v.double().requires_grad_() for v in (xd, s, t)]
    ref = reference.affine_hswish(*leaves, hswish)
    want = torch.autograd.grad(ref, leaves, gd.double())

    def p(tensor):
        return ctypes.c_void_p(tensor.data_ptr())

    assert cuda_host.ah_forward(HOST_DTYPES[dtype], p(xd), p(s), p(t), p(y), numel, C, inner, int(hswish)) == 0
    assert cuda_host.ah_backward(HOST_DTYPES[dtype], p(gd), p(xd), p(s), p(t), p(gx), p(partial), p(gs), p(gt),
                                 outer, C, inner, int(hswish)) == 0
    assert_close(y.double(), ref.detach(), dtype, scale=4)  # fp16: the output's rounding
    for got, w in zip((gx, gs, gt), want):
        assert_close(got.double(), w, acc if got.dtype == acc else dtype, scale=20)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_cpu_eval_folds_batch_norm_into_the_conv(monkeypatch, dtype, grad):
    """On CPU tensors (no Triton) an eval BatchNorm after a conv goes into the conv's weight and
    bias and the activation runs in place (out of place where autograd needs it): gli_projection
    (several inputs: a GEMM per input accumulating onto the output; one input: a GEMM over the
    rows below 4096 rows or in fp64, oneDNN's 1x1 conv from there; residual included), dwconv_bn
    and the stem's k x k Conv2dBN, against conv -> BatchNorm -> Hardswish."""
    import torch.nn.functional as F

    from mpvit_kernels import backend
    from mpvit_kernels.ops.affine_hswish import conv_folded_bn as fold

    monkeypatch.setattr(backend, "use_triton", lambda op, device: False)
    calls = []
    for where in (sys.modules["mpvit_kernels.ops.gli_projection"], sys.modules["mpvit_kernels.ops.dwconv_bn"],
                  sys.modules["mpvit_kernels.nn"]):
        monkeypatch.setattr(where, "conv_folded_bn", lambda *a, **k: calls.append(1) or fold(*a, **k))
    torch.manual_seed(0)

    def leaf(t):
        return t.to(dtype).requires_grad_(grad)

    def check(got, want, leaves):
        assert got.dtype == dtype and got.requires_grad == grad
        torch.testing.assert_close(got, want, **({} if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)))
        if grad:
            g = torch.randn_like(want)
            for a, b in zip(torch.autograd.grad(got, leaves, g), torch.autograd.grad(want, leaves, g)):
                # fp32: the weight's grad sums 4100 rows in another order
                torch.testing.assert_close(a, b, **(dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else
                                                    dict(rtol=1e-9, atol=1e-12)))

    with torch.set_grad_enabled(grad):
        # 2x9x7 = 126 rows (the GEMM), 2x50x41 = 4100 (the conv in fp32); maps, then tokens with a residual
        for B, H, W in [(2, 9, 7), (2, 50, 41)]:
            xs = [leaf(make_image((B, 5, H, W), layout=layout)) for layout in ("nchw", "channels_last", "strided")]
            w, scale, shift = leaf(torch.randn(6, 15, 1, 1) / 4), leaf(torch.rand(6) + 0.5), leaf(torch.randn(6))
            y = ops.gli_projection(xs, w, scale, shift, hswish=True)
            assert y.is_contiguous(memory_format=torch.channels_last)
            check(y, reference.gli_projection(xs, w, scale, shift), xs + [w, scale, shift])
            y = ops.gli_projection(xs[1:2], w[:, :5], scale, shift, hswish=True)  # one input: no GEMM per input
            check(y, reference.gli_projection(xs[1:2], w[:, :5], scale, shift), xs[1:2] + [w, scale, shift])
            tokens = [leaf(torch.randn(B, H * W, 5)) for _ in range(2)]
            res = leaf(torch.randn(B, H * W, 6))
            y = ops.gli_projection(tokens, w[:, :10], scale, shift, size=(H, W), residual=res)
            maps = [t.transpose(1, 2).reshape(B, 5, H, W) for t in tokens]
            want = F.conv2d(torch.cat(maps, 1), w[:, :10]) * scale.view(-1, 1, 1) + shift.view(-1, 1, 1)
            check(y, want + res.transpose(1, 2).reshape(B, 6, H, W), tokens + [res, w, scale, shift])
            if dtype == torch.float32 and not grad:  # a bf16 scale and shift, read in fp32
                s16, t16 = scale.bfloat16(), shift.bfloat16()
                check(ops.gli_projection(xs, w, s16, t16, hswish=True),
                      reference.gli_projection(xs, w, s16.float(), t16.float()), [])
        x = leaf(make_image((2, 7, 11, 9)))
        dw, pw = leaf(torch.randn(7, 1, 3, 3)), leaf(torch.randn(6, 7, 1, 1) / 3)
        check(ops.dwconv_bn(x, dw, pw, 2, scale, shift, hswish=True),
              reference.dwconv_bn(x, dw, pw, scale, shift, stride=2), [x, dw, pw, scale, shift])
        stem = Conv2dBN(3, 6, 3, 2, hswish=True).to(dtype).eval()
        with torch.no_grad():
            stem.bn.running_mean.normal_()
            stem.bn.running_var.uniform_(0.5, 2.0)
        x = leaf(make_image((2, 3, 13, 10)))
        check(stem(x), F.hardswish(stem.bn(stem.conv(x))), [x, stem.conv.weight, stem.bn.weight])
    assert len(calls) == (10 if dtype == torch.float32 and not grad else 8)  # each case took the folded path


def test_cpu_fold_is_for_fp32_and_fp64_outside_reference_and_autocast():
    """Folding into a bf16/fp16 weight would round the scale, which the kernels keep in fp32:
    those dtypes (and autocast's) keep conv then affine_hswish, as the reference backend does."""
    from mpvit_kernels.ops.affine_hswish import folds_into_conv

    x = torch.randn(2, 3, 4, 4)
    assert folds_into_conv("gli_projection", x) and folds_into_conv("dwconv_bn", x.double())
    assert not folds_into_conv("gli_projection", x.bfloat16()) and not folds_into_conv("dwconv_bn", x.half())
    assert not folds_into_conv("gli_projection", x.to("meta"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not folds_into_conv("affine_hswish", x)
    with mpvit_kernels.use_backend("reference", ops=["dwconv_bn"]):
        assert not folds_into_conv("dwconv_bn", x) and folds_into_conv("gli_projection", x)


def test_gpu_tiles_are_what_every_family_launches_on_a_gpu():
    # tests.utils.gpu_tiles, which the "with a GPU's tiles" tests of each family run under
    from mpvit_kernels.triton import affine_hswish, dwconv_bn, factor_attention, gli_projection, residual_layernorm
    from mpvit_kernels.triton.affine_hswish import GRAD_ROWS, GRAD_TILES, STATS_TILES

    meta = {"BLOCK_D": 16, "ACC": factor_attention.tl.float32, "DOT_PRECISION": "ieee"}

    def tiles():
        return (affine_hswish.grad_tile(), affine_hswish.stats_tile(), dwconv_bn.tile(16, False),
                gli_projection.tile(32, "fp32"), residual_layernorm.tile(32),
                factor_attention.OUTPUT_TILES.fitting(meta))

    gpu = ((GRAD_ROWS, GRAD_TILES), (GRAD_ROWS, STATS_TILES), dwconv_bn.gpu_tile(16, False),
           gli_projection.gpu_tile(32, "fp32"), residual_layernorm.gpu_tile(32),
           factor_attention.OUTPUT_TILES._fitting(16, False, "ieee"))
    interpreted = tiles()
    with gpu_tiles():
        assert tiles() == gpu
    assert tiles() == interpreted
    if KERNEL_DEVICE == "cpu":
        assert all(a != b for a, b in zip(interpreted, gpu)), (interpreted, gpu)


def test_combine_levels_need_a_chunk_of_two_rows_or_more(monkeypatch):
    # each level of a combine must shorten its rows (affine_hswish.combine_chunks), or the ops' loop would not end
    from mpvit_kernels.triton import affine_hswish as kernels

    assert [kernels.combine_chunks(P) for P in (1, 256, 257, 65536)] == [0, 0, 2, 256]
    monkeypatch.setattr(kernels, "COMBINE_CHUNK", 1)
    with pytest.raises(ValueError, match="COMBINE_CHUNK must be at least 2"):
        kernels.combine_chunks(3)
