"""residual_layernorm: a block's residual add after attention, norm2 and the two Linear biases
in one pass (Triton, interpreted on CPU here, real on a GPU; and the C++ CPU twin), against the
eager chain it replaces, every gradient; and MPViT's block, which runs through it, against its
eager form."""
import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F

import mpvit_kernels
from mpvit_kernels import ops
from mpvit_kernels.models.mpvit import MHCABlock, drop_path, dropped
from mpvit_kernels.nn import ConvPosEnc, ConvRelPosEnc
from tests.conftest import BF16, BF16_KERNELS, KERNEL_DEVICE, MODEL_SHAPES
from tests.utils import RecordOps, assert_close, gpu_tiles


def chain(x, y, bias, next_bias, weight, ln_bias, eps):
    """What eager runs: proj's bias, the residual add, norm2; fc2's bias joins r later."""
    s = x + (y + bias)
    return s + next_bias, F.layer_norm(s, (s.shape[-1],), weight, ln_bias, eps)


# The C++ twin on CPU tensors (``cuda`` takes it for them), beside the Triton kernel.
IMPLS = {"triton": (KERNEL_DEVICE, contextlib.nullcontext),
         "twin": ("cpu", lambda: mpvit_kernels.use_backend("cuda", ops=["residual_layernorm"]))}


def make_inputs(B, N, C, dtype, layout, device=KERNEL_DEVICE):
    """x, y leaves (B, N, C) in ``layout``: "dense"; "image" (tokens of a channels-last map, x
    a slice of wider tokens: batch and token strides of their own); "strided" (a non-unit
    channel stride, which the op copies once); "rows" ((B*N, C), y a slice of wider rows); and
    the four (C,) parameters."""
    def leaf(i):
        if layout == "rows":
            t = torch.randn(B * N, C + 5 * i, dtype=dtype, device=device)[:, :C]
        elif layout == "dense":
            t = torch.randn(B, N, C, dtype=dtype, device=device)
        elif layout == "image":
            t = torch.randn(B, N, C + 3 * i, dtype=dtype, device=device)[..., :C]
        else:
            t = torch.randn(B, C, N, dtype=dtype, device=device).transpose(1, 2)
        return t.requires_grad_()

    params = [torch.randn(C, dtype=dtype, device=device).requires_grad_() for _ in range(4)]
    return [leaf(0), leaf(1)], params


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("layout", ["dense", "image", "strided", "rows"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("shape", [(2, 7, 8), (1, 15, 22), (2, 5, 27), (1, 3, 130)], ids=lambda s: "x".join(map(str, s)))
def test_matches_the_eager_chain_with_every_grad(shape, dtype, layout, impl):
    device, forced = IMPLS[impl]
    (x, y), params = make_inputs(*shape, dtype, layout, device)
    with forced(), RecordOps() as rec:
        r, u = ops.residual_layernorm(x, y, *params, 1e-6)
    assert ("mpvit_kernels.residual_layernorm" in rec.names) == (impl == "twin")
    r_ref, u_ref = chain(x, y, *params, 1e-6)
    assert r.is_contiguous() and u.is_contiguous() and r.dtype == u.dtype == dtype
    assert_close(r, r_ref)
    assert_close(u, u_ref, scale=4)
    grads = [torch.randn_like(r), torch.randn_like(u)]
    leaves = [x, y, *params]
    got = torch.autograd.grad((r, u), leaves, grads)
    want = torch.autograd.grad((r_ref, u_ref), leaves, grads)
    for a, b in zip(got, want):  # x, y, bias, next_bias, weight, ln_bias
        assert_close(a, b, scale=10)


@pytest.mark.parametrize("shape", [(3, 41, 22), (1, 9, 130)], ids=lambda s: "x".join(map(str, s)))
def test_matches_the_eager_chain_with_a_gpus_tiles(shape):
    # the passes as a GPU tiles them (at 130 channels 4 rows a forward program, 32 a backward
    # one), where the interpreter's cover up to 8192 values a program
    with gpu_tiles():
        test_matches_the_eager_chain_with_every_grad(shape, torch.float32, "strided", "triton")


@pytest.mark.parametrize("pad, vec", [(8, 8), (4, 4), (3, 1)])
def test_row_strides_narrow_the_vector_width(pad, vec):
    # tokens sliced out of rows C + pad wide: the kernels are told (VEC) what C and every stride
    # are multiples of, for 16-byte accesses; a wrong VEC would round the strides
    from tests.utils import RecordLaunches

    x = torch.randn(2, 9, 16 + pad, device=KERNEL_DEVICE)[..., :16].requires_grad_()
    y = torch.randn(2, 9, 16, device=KERNEL_DEVICE).requires_grad_()
    params = [torch.randn(16, device=KERNEL_DEVICE).requires_grad_() for _ in range(4)]
    with RecordLaunches() as rec:
        r, u = ops.residual_layernorm(x, y, *params, 1e-6)
        got = torch.autograd.grad((r, u), [x, y], [torch.ones_like(r), u.detach()])
    assert [meta["VEC"] for _, meta in rec.launches] == [vec, vec]  # forward, backward
    r_ref, u_ref = chain(x, y, *params, 1e-6)
    assert_close(r, r_ref)
    assert_close(u, u_ref, scale=4)
    for a, b in zip(got, torch.autograd.grad((r_ref, u_ref), [x, y], [torch.ones_like(r), u.detach()])):
        assert_close(a, b, scale=10)


def test_twin_in_low_precision_within_twice_eager_error():
    (x64, y64), params = make_inputs(2, 9, 40, torch.float64, "dense", "cpu")
    want = chain(x64, y64, *params, 1e-6)
    for dtype in (torch.bfloat16, torch.float16):
        x, y = x64.detach().to(dtype), y64.detach().to(dtype)
        low = [p.detach().float() for p in params]  # fp32 parameters, as under autocast
        with IMPLS["twin"][1]():
            got = ops.residual_layernorm(x, y, *low, 1e-6)
        eager = chain(x, y, *(p.to(dtype) for p in low), 1e-6)
        for g, e, w in zip(got, eager, want):
            assert g.dtype == dtype
            assert (g.double() - w).abs().max() <= 2 * (e.double() - w).abs().max() + 1e-6


@pytest.mark.parametrize("impl", list(IMPLS))
def test_parameters_of_another_dtype_are_read_as_they_are(impl):
    device, forced = IMPLS[impl]
    (x, y), params = make_inputs(2, 5, 12, torch.float32, "dense", device)
    wide = [p.detach().double().requires_grad_() for p in params]
    mixed = [wide[0], *params[1:]]  # mixed dtypes: cast once to the accumulation type
    for ps in (wide, mixed):
        with forced():
            r, u = ops.residual_layernorm(x, y, *ps, 1e-6)
        r_ref, u_ref = chain(x, y, *(p.float() for p in ps), 1e-6)
        assert r.dtype == torch.float32
        assert_close(r, r_ref)
        assert_close(u, u_ref, scale=4)
        grads = torch.autograd.grad((r, u), ps, [torch.ones_like(r), u.detach()])
        assert [g.dtype for g in grads] == [p.dtype for p in ps]


@pytest.mark.parametrize("impl", list(IMPLS))
def test_fp64_gradcheck(impl):
    device, forced = IMPLS[impl]
    (x, y), params = make_inputs(2, 5, 6, torch.float64, "image", device)
    with forced():
        # fast mode (random directions) for the interpreted kernel: the full Jacobian costs 17 s there
        assert torch.autograd.gradcheck(lambda *a: ops.residual_layernorm(*a, 1e-5), (x, y, *params),
                                        fast_mode=impl == "triton")


@pytest.mark.parametrize("op, device", [("residual_layernorm_fwd", KERNEL_DEVICE), ("residual_layernorm", "cpu")])
def test_opcheck(op, device):
    for layout in ("dense", "image", "rows"):
        (x, y), params = make_inputs(2, 6, 8, torch.float32, layout, device)
        torch.library.opcheck(getattr(torch.ops.mpvit_kernels, op).default, (x, y, *params, 1e-6))


def test_opcheck_backward():
    (x, y), params = make_inputs(2, 6, 8, torch.float32, "image")
    _, _, mean, rstd = torch.ops.mpvit_kernels.residual_layernorm_fwd(x, y, *params, 1e-6)
    grads = [torch.randn(2, 6, 8, device=KERNEL_DEVICE) for _ in range(2)]
    torch.library.opcheck(torch.ops.mpvit_kernels.residual_layernorm_bwd.default,
                          (*grads, x.detach(), y.detach(), params[0].detach(), params[2].detach(), mean, rstd))


def test_under_torch_compile_fullgraph():
    torch._dynamo.reset()
    (x, y), params = make_inputs(2, 6, 12, torch.float32, "image")
    compiled = torch.compile(lambda *a: ops.residual_layernorm(*a, 1e-6), fullgraph=True, backend="aot_eager")
    r, u = compiled(x, y, *params)
    r_ref, u_ref = chain(x, y, *params, 1e-6)
    assert_close(r, r_ref)
    assert_close(u, u_ref, scale=4)
    got = torch.autograd.grad((r * u).sum(), [x, *params])
    want = torch.autograd.grad((r_ref * u_ref).sum(), [x, *params])
    for a, b in zip(got, want):
        assert_close(a, b, scale=10)


@pytest.mark.parametrize("impl", ["reference", *IMPLS])
def test_outputs_take_the_dtype_of_x_plus_y_under_autocast_too(impl):
    device, forced = IMPLS.get(impl, ("cpu", lambda: mpvit_kernels.use_backend("reference")))
    (x, y), params = make_inputs(1, 4, 8, torch.float32, "dense", device)
    with forced(), RecordOps() as rec:
        r, u = ops.residual_layernorm(x, y, *params, 1e-6)
    assert any(n.startswith("mpvit_kernels") for n in rec.names) == (impl != "reference")
    for xd, yd, want in ((torch.float32, torch.float32, torch.float32),  # a residual stream kept in fp32
                         (torch.float32, torch.bfloat16, torch.float32),
                         (torch.bfloat16, torch.bfloat16, torch.bfloat16)):
        if want == torch.bfloat16 and impl == "triton" and not BF16_KERNELS:
            continue  # bf16 cannot run through the kernels here (conftest.NO_BF16_KERNELS)
        with forced(), torch.autocast(device, dtype=torch.bfloat16):
            rl, ul = ops.residual_layernorm(x.to(xd), y.to(yd), *params, 1e-6)
        assert rl.dtype == ul.dtype == want
        tol = torch.bfloat16 if torch.bfloat16 in (xd, yd) else torch.float32
        assert_close(rl.float(), r, dtype=tol)
        assert_close(ul.float(), u, dtype=tol, scale=4)


def _args(**change):
    args = dict(x=torch.randn(1, 4, 8), y=torch.randn(1, 4, 8), bias=torch.randn(8), next_bias=torch.randn(8),
                weight=torch.randn(8), ln_bias=torch.randn(8), eps=1e-6)
    return {**args, **change}


@pytest.mark.parametrize("change, exc, match", [
    (dict(x="x"), TypeError, "x must be a Tensor"),
    (dict(y=torch.ones(1, 4, 8, dtype=torch.int64)), TypeError, "y must be float"),
    (dict(x=torch.randn(8), y=torch.randn(8)), ValueError, r"x must be tokens \(B, N, C\) or rows \(M, C\)"),
    (dict(y=torch.randn(1, 5, 8)), ValueError, "y must have x's shape"),
    (dict(y=torch.randn(1, 4, 8, device="meta")), ValueError, "y is on meta"),
    (dict(bias=torch.randn(7)), ValueError, r"bias must have shape \(8,\)"),
    (dict(weight=None), TypeError, "weight must be a floating point Tensor"),
    (dict(x=torch.randn(1, 2, 2049), y=torch.randn(1, 2, 2049)), ValueError, "1 to 2048 channels"),
    (dict(x=torch.randn(1, 2, 0), y=torch.randn(1, 2, 0)), ValueError, "1 to 2048 channels"),
    (dict(eps=0.0), ValueError, "eps must be"),
    (dict(eps=float("nan")), ValueError, "eps must be"),
])
def test_bad_inputs_raise_before_any_kernel(change, exc, match):
    with pytest.raises(exc, match=match):
        ops.residual_layernorm(**_args(**change))


def test_empty_batch():
    r, u = ops.residual_layernorm(**_args(x=torch.randn(0, 4, 8), y=torch.randn(0, 4, 8)))
    assert r.shape == u.shape == (0, 4, 8)


def make_block(C, dtype, drop_path_rate=0.0):
    torch.manual_seed(0)
    block = MHCABlock(C, 2, drop_path_rate, ConvPosEnc(C, 3), ConvRelPosEnc(C // 8, 8)).to(KERNEL_DEVICE, dtype)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.3)
    return block


def eager_block(block, x, size):
    """The block as the public code writes it: no op of ours after the CPE (drop path as the
    block's rate and mode say)."""
    rate, training = block.drop_path_rate, block.training
    x = block.cpe(x, size)
    x = x + drop_path(block.factoratt_crpe(block.norm1(x), size), rate, training)
    return x + drop_path(block.mlp(block.norm2(x)), rate, training)


@pytest.mark.slow
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_mpvit_block_equals_its_eager_form(training):
    block = make_block(16, torch.float64).train(training)
    x = torch.randn(1, 15, 16, dtype=torch.float64, device=KERNEL_DEVICE, requires_grad=True)
    with RecordOps() as rec:
        out = block(x, (3, 5))
    assert "mpvit_kernels.residual_layernorm_fwd" in rec.names and "aten.add" not in rec.compute
    want = eager_block(block, x, (3, 5))
    assert_close(out, want)
    params = list(block.parameters())
    with RecordOps() as rec:
        got = torch.autograd.grad(out, [x, *params], torch.ones_like(out))
    # fc2's in-place addmm_ is on a tensor of its own: no whole-grad copies (autograd's way with
    # an in-place op on a view)
    assert "mpvit_kernels.residual_layernorm_bwd" in rec.names
    assert not {"aten.clone", "aten.copy_", "aten.new_zeros"} & set(rec.names), rec.names
    ref = torch.autograd.grad(want, [x, *params], torch.ones_like(want))
    for a, b in zip(got, ref):
        assert_close(a, b, scale=10)


def test_mpvit_block_under_autocast_casts_fc2_weight_once_per_version():
    block = make_block(16, torch.float32).eval()
    x = torch.randn(2, 15, 16, dtype=torch.bfloat16)  # a bf16 stream, as the model's under autocast
    with mpvit_kernels.use_backend("reference"), torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        first = block(x, (3, 5))
        with RecordOps() as rec:
            again = block(x, (3, 5))
        with torch.no_grad():
            block.mlp.fc2.weight.mul_(2)  # a new version: cast again
        with RecordOps() as changed:
            block(x, (3, 5))
    casts = lambda r: [a for n, a in r.calls if n == "aten._to_copy" and a[0] is block.mlp.fc2.weight]  # noqa: E731
    assert first.dtype == torch.bfloat16 and torch.equal(first, again)
    assert not casts(rec) and len(casts(changed)) == 1


@pytest.mark.slow
def test_mpvit_block_with_drop_path_trains_through_the_fused_ops():
    """Drop path (training): each branch's output scaled per image by 0 or 1/keep, its masks
    drawn as the public block draws them, so one seed drops the same images; the fused ops (qkv
    with norm1, residual_layernorm, fc1 with GELU) as without drop path. Output and every grad
    those of the public form, fp64."""
    block = make_block(16, torch.float64, drop_path_rate=0.5).train()
    B = 4
    x = torch.randn(B, 6, 16, dtype=torch.float64, device=KERNEL_DEVICE, requires_grad=True)
    params = [x, *block.parameters()]
    g = torch.randn(B, 6, 16, dtype=torch.float64, device=KERNEL_DEVICE)
    for seed in range(100):  # a seed whose two masks (the block draws nothing else) each keep some images, not all
        torch.manual_seed(seed)
        masks = [torch.empty(B, 1, 1, dtype=torch.float64, device=KERNEL_DEVICE).bernoulli_(0.5) for _ in range(2)]
        if all(0 < m.sum() < B for m in masks):
            break
    torch.manual_seed(seed)
    with RecordOps() as rec:
        out = block(x, (2, 3))
    got = torch.autograd.grad(out, params, g)
    assert "mpvit_kernels.residual_layernorm_fwd" in rec.names and "mpvit_kernels.linear" in rec.names
    torch.manual_seed(seed)
    want = eager_block(block, x, (2, 3))
    assert_close(out, want)
    for a, b in zip(got, torch.autograd.grad(want, params, g)):
        assert_close(a, b, scale=10)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_the_fused_blocks_drop_path_drops_and_scales_as_drop_path(dtype):
    """The fused block's drop path (models.mpvit.dropped): the same images dropped for a seed,
    the kept ones scaled by 1/keep in fp32: in 16 bits almost always drop_path's x * mask / keep
    (a 16-bit 1/keep, bf16 1.109375 for 1/0.9, left 28% of the elements an ulp low), in fp32
    within an ulp of its division; added to a base in the same pass, within the rounding of
    drop_path's separate add."""
    branch = torch.randn(64, 7, 31, device=KERNEL_DEVICE).to(dtype)
    base = torch.randn(64, 7, 31, device=KERNEL_DEVICE).to(dtype)
    torch.manual_seed(5)
    alone = dropped(branch, 0.1)
    torch.manual_seed(5)
    want = drop_path(branch, 0.1, True)
    kept = (want != 0).any(dim=(1, 2))
    assert torch.equal(alone != 0, want != 0) and 0 < kept.sum().item() < 64  # the same images dropped
    eps = torch.finfo(dtype).eps
    if dtype != torch.float32:
        differ = (alone != want).float().mean().item()
        assert differ < 0.02, differ
    torch.testing.assert_close(alone, want, atol=0, rtol=eps)
    torch.manual_seed(5)
    got = dropped(branch, 0.1, base)
    torch.testing.assert_close(got, base + want, atol=2 * eps * (base.abs() + want.abs()).max().item(), rtol=0)


def test_mpvit_block_under_autocast_runs_fc2_in_the_autocast_dtype():
    """An fp32 block and stream under bf16 autocast: fc2 is a bf16 GEMM, as eager's, added to the
    fp32 stream; no fp32 copy of the 4C-wide hidden, no fp32 GEMM over it."""
    block = make_block(16, torch.float32).eval()
    x = torch.randn(2, 15, 16)
    with mpvit_kernels.use_backend("reference", ops=["linear", "factor_attention"]), \
            torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        with RecordOps() as rec:
            out = block(x, (3, 5))
        want = eager_block(block, x, (3, 5))
    assert out.dtype == want.dtype == torch.float32
    hidden_upcasts = [a for n, a in rec.calls if n == "aten._to_copy" and a[0].shape[-1] == 32 and a[0].dtype == torch.bfloat16]
    assert not hidden_upcasts and "aten.addmm_" not in rec.names
    assert_close(out, want, dtype=torch.bfloat16)


# ---- CUDA (run with a GPU: pytest -m cuda) --------------------------------------------------

# MPViT-S and -B blocks at a 224 input: (channels, tokens)
SHAPES = [(C, side * side) for dims in ((64, 128, 216, 288), (128, 224, 368, 480))
          for C, side in zip(dims, (56, 28, 14, 7))]


@pytest.mark.parametrize("dtype", [pytest.param(torch.float16, id="fp16"), BF16])
@pytest.mark.parametrize("shape", [(27, 15), (24, 15)] + [pytest.param(s, marks=MODEL_SHAPES) for s in SHAPES],
                         ids=lambda s: f"C{s[0]}-N{s[1]}")
def test_low_precision_within_twice_eager(shape, dtype):
    """Under fp16/bf16 autocast, both outputs and every grad against fp64, within twice eager's
    error in the same dtype. The first cases are small enough for the interpreter (bf16 there as a
    GPU computes it: tests/interpreter_numerics.py), one with channels a multiple of 8 (the 16-byte
    vector loads the model's widths take); the others run at the model's shapes on a GPU."""
    C, N = shape
    (x64, y64), params64 = make_inputs(8 if KERNEL_DEVICE == "cuda" else 2, N, C, torch.float64, "dense")
    want = chain(x64, y64, *params64, 1e-6)
    # the upstream grads as values of the autocast dtype, for the reference too: ours returns r and
    # u in it and gets its grads in it, eager (promoted to fp32 by the fp32 biases) in fp32; grads
    # rounded for ours alone put their rounding into ours' bias grads (sums over every row)
    grads = [torch.randn_like(t).to(dtype).double() for t in want]
    want_grads = torch.autograd.grad(want, [x64, *params64], grads)
    xl, yl = (t.detach().to(dtype).requires_grad_() for t in (x64, y64))
    pl = [p.detach().float().requires_grad_() for p in params64]  # fp32 parameters, as under autocast
    errs, dtypes = {}, {}
    for name, fn in (("ours", ops.residual_layernorm), ("eager", chain)):
        with torch.autocast(KERNEL_DEVICE, dtype=dtype):
            out = fn(xl, yl, *pl, 1e-6)
        got = torch.autograd.grad(out, [xl, *pl], [g.to(o.dtype) for g, o in zip(grads, out)])
        errs[name] = [(a.double() - b).abs().max().item() for a, b in zip([*out, *got], [*want, *want_grads])]
        dtypes[name] = [t.dtype for t in [*out, *got]]
    scales = [t.abs().max().item() for t in [*want, *want_grads]]
    # eager's r and u come out in fp32 here (fp32 parameters promote its sum, autocast keeps
    # layer_norm in fp32), ours in the autocast dtype: the rounding of a result in ours' dtype
    # is allowed on top (up to half its ulp, |value| <= s)
    floors = [torch.finfo(d).eps / 2 * max(1.0, s) if d != e else 0.0
              for d, e, s in zip(dtypes["ours"], dtypes["eager"], scales)]
    assert all(o <= 2 * e + f + 1e-3 * max(1.0, s)
               for o, e, f, s in zip(errs["ours"], errs["eager"], floors, scales)), (errs, dtypes)


@pytest.mark.cuda
@pytest.mark.parametrize("shape", SHAPES[:4], ids=lambda s: f"C{s[0]}-N{s[1]}")
def test_cuda_fp32_at_model_shapes_is_deterministic(shape):
    C, N = shape
    (x, y), params = make_inputs(4, N, C, torch.float32, "image")
    runs = []
    for _ in range(2):
        r, u = ops.residual_layernorm(x, y, *params, 1e-6)
        runs.append([r, u, *torch.autograd.grad((r, u), [x, y, *params], [torch.ones_like(r), u.detach()])])
    r_ref, u_ref = chain(x, y, *params, 1e-6)
    torch.testing.assert_close(runs[0][0], r_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(runs[0][1], u_ref, atol=1e-4, rtol=1e-4)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.cuda
def test_cuda_block_under_autocast_matches_its_eager_form():
    block = make_block(64, torch.float32)
    x = torch.randn(4, 196, 64, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16), torch.no_grad():
        out, want = block(x, (14, 14)), eager_block(copy.deepcopy(block), x, (14, 14))
    assert out.dtype == want.dtype
    torch.testing.assert_close(out.float(), want.float(), atol=0.1, rtol=0.05)
