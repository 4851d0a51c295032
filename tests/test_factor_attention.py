"""factor_attention: the Triton kernels (interpreted on CPU here, real on a GPU) against the
reference, forward and every gradient, through the op and through the public module."""
import pytest
import torch

import mpvit_kernels
from mpvit_kernels import FactorAttention, ops, reference
from tests.conftest import KERNEL_DEVICE
from tests.utils import RecordOps, assert_close

DEFAULT = {3: 2, 5: 3, 7: 3}

# (B, H, W, head dim, window): odd sizes, the head dims MPViT meets that are not powers of two,
# and custom windows.
CASES = [
    (1, 1, 1, 3, DEFAULT),
    (3, 5, 7, 12, DEFAULT),
    (1, 19, 19, 27, DEFAULT),
    (3, 2, 17, 22, {3: 1, 7: 1}),
    (1, 13, 11, 3, {5: 4}),
    (3, 9, 4, 27, {3: 1, 7: 1}),
    (1, 1, 16, 12, {5: 4}),
    (1, 16, 1, 22, {3: 1, 7: 1}),
]


def case_id(c):
    B, H, W, Ch, window = c
    return f"B{B}-{H}x{W}-Ch{Ch}-" + "_".join(f"{k}x{h}" for k, h in window.items())


def make_inputs(B, H, W, Ch, window, dtype, requires_grad=True, qkv_scale=1.0):
    heads = sum(window.values())
    C = heads * Ch
    qkv = (qkv_scale * torch.randn(B, H * W, 3 * C, dtype=dtype, device=KERNEL_DEVICE)).requires_grad_(requires_grad)
    weights = [(0.2 * torch.randn(h * Ch, 1, k, k, dtype=dtype, device=KERNEL_DEVICE)).requires_grad_(requires_grad)
               for k, h in window.items()]
    biases = [torch.randn(h * Ch, dtype=dtype, device=KERNEL_DEVICE).requires_grad_(requires_grad)
              for h in window.values()]
    return qkv, (H, W), heads, Ch ** -0.5, weights, biases


def run_both(args, grad_seed=1):
    qkv, size, heads, scale, weights, biases = args
    inputs = [qkv, *weights, *biases]
    out = ops.factor_attention(*args)
    with mpvit_kernels.use_backend("reference"):
        ref = ops.factor_attention(*args)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=out.dtype).to(out.device)
    grads = torch.autograd.grad(out, inputs, g)
    ref_grads = torch.autograd.grad(ref, inputs, g)
    return out, ref, grads, ref_grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_kernels_match_reference(case, dtype):
    out, ref, grads, ref_grads = run_both(make_inputs(*case, dtype))
    assert_close(out, ref, scale=4)
    for g, r in zip(grads, ref_grads):
        assert_close(g, r, scale=10)  # grads reduce over N (and B): summation order differs


def test_kernels_are_used():
    args = make_inputs(1, 3, 3, 4, {3: 1, 5: 1}, torch.float32)
    with RecordOps() as rec:
        ops.factor_attention(*args).sum().backward()
    assert "mpvit_kernels.factor_attention_fwd" in rec.names
    assert "mpvit_kernels.factor_attention_bwd" in rec.names
    with mpvit_kernels.use_backend("reference"), RecordOps() as rec:
        ops.factor_attention(*args)
    assert not any(n.startswith("mpvit_kernels") for n in rec.names)


def test_module_forward_is_two_gemms_and_our_op_without_copies():
    # q, k, v are read in place from the qkv Linear's output and O is written ready for proj:
    # a layout copy (permute + contiguous, clone, cat) between them would show up here.
    m = FactorAttention(24, num_heads=2, crpe_window={3: 1, 7: 1}).to(KERNEL_DEVICE)
    x = torch.randn(2, 20, 24, device=KERNEL_DEVICE)
    with torch.no_grad(), RecordOps() as rec:
        m(x, (4, 5))
    assert rec.compute == ["aten.addmm", "mpvit_kernels.factor_attention_fwd", "aten.addmm"], rec.names


def test_strided_qkv_rows_are_read_in_place():
    qkv, size, heads, scale, weights, biases = make_inputs(2, 4, 5, 12, {3: 1, 7: 1}, torch.float32,
                                                           requires_grad=False)
    wide = torch.randn(2, 20, qkv.shape[-1] + 8, device=KERNEL_DEVICE)
    wide[..., :qkv.shape[-1]] = qkv
    strided = wide[..., :qkv.shape[-1]]
    assert not strided.is_contiguous()
    assert_close(ops.factor_attention(strided, size, heads, scale, weights, biases),
                 reference.factor_attention(qkv, size, heads, scale, weights, biases))


def test_large_keys_do_not_overflow():
    args = make_inputs(1, 6, 5, 12, {3: 1, 7: 1}, torch.float32)
    qkv = args[0]
    with torch.no_grad():
        qkv[..., 24:48] *= 1e4  # the keys: softmax over N must subtract the column max
    out, ref, grads, ref_grads = run_both(args)
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    assert_close(out, ref, scale=4)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-3, rtol=1e-3)


def test_backward_is_deterministic():
    args = make_inputs(3, 9, 8, 12, {3: 1, 5: 1}, torch.float32)
    _, _, first, _ = run_both(args)
    _, _, second, _ = run_both(args)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_module_matches_reference_in_every_parameter_gradient():
    torch.manual_seed(0)
    m = FactorAttention(48, num_heads=4, crpe_window={3: 1, 5: 2, 7: 1}).double().to(KERNEL_DEVICE)
    x_base = torch.randn(2, 7 * 6, 96, dtype=torch.float64, device=KERNEL_DEVICE)
    x = x_base[..., ::2].requires_grad_()  # non-contiguous input
    out = m(x, (7, 6))
    params = [x] + list(m.parameters())
    grads = torch.autograd.grad(out.sum(), params)
    with mpvit_kernels.use_backend("reference"):
        ref = m(x, (7, 6))
        ref_grads = torch.autograd.grad(ref.sum(), params)
    assert_close(out, ref, scale=4)
    names = ["x"] + [n for n, _ in m.named_parameters()]
    assert {"qkv.weight", "qkv.bias", "proj.weight", "proj.bias", "crpe.conv_list.0.weight",
            "crpe.conv_list.2.bias"} <= set(names)
    for name, g, r in zip(names, grads, ref_grads):
        assert g is not None, name
        assert_close(g, r, scale=10)


def test_gradcheck_float64_through_the_module():
    # Through the public module, w.r.t. the input and the CRPE weights and biases (the qkv and
    # proj Linears are plain torch). fast_mode: a few random directions instead of every column
    # of the Jacobian, because the interpreter runs each forward in Python.
    m = FactorAttention(8, num_heads=2, crpe_window={3: 1, 5: 1}).double().to(KERNEL_DEVICE)
    x = torch.randn(1, 6, 8, dtype=torch.float64, device=KERNEL_DEVICE, requires_grad=True)
    names = [n for n, _ in m.named_parameters() if n.startswith("crpe.")]
    params = dict(m.named_parameters())

    def f(x, *crpe):
        return torch.func.functional_call(m, dict(zip(names, crpe)), (x, (2, 3)))

    inputs = (x, *(params[n].detach().clone().requires_grad_() for n in names))
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6, fast_mode=True)


def test_opcheck():
    qkv, size, heads, scale, weights, biases = make_inputs(1, 2, 3, 4, {3: 1, 5: 1}, torch.float32)
    fwd_args = (qkv, size[0], size[1], heads, scale, weights, biases)
    torch.library.opcheck(torch.ops.mpvit_kernels.factor_attention_fwd.default, fwd_args)
    wide = torch.randn(1, 6, qkv.shape[-1] + 5, device=KERNEL_DEVICE)[..., :qkv.shape[-1]].requires_grad_()
    torch.library.opcheck(torch.ops.mpvit_kernels.factor_attention_fwd.default, (wide, *fwd_args[1:]))
    with torch.no_grad():
        out, ctx, lse = torch.ops.mpvit_kernels.factor_attention_fwd(*fwd_args)
    torch.library.opcheck(torch.ops.mpvit_kernels.factor_attention_bwd.default,
                          (torch.randn_like(out), qkv.detach(), ctx, lse, size[0], size[1], heads, scale,
                           [w.detach() for w in weights], [b.detach() for b in biases]))


def test_module_under_torch_compile_fullgraph():
    torch._dynamo.reset()
    m = FactorAttention(24, num_heads=2, crpe_window={3: 1, 7: 1}).to(KERNEL_DEVICE)
    x = torch.randn(2, 20, 24, device=KERNEL_DEVICE, requires_grad=True)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    out, ref = compiled(x, (4, 5)), m(x, (4, 5))
    assert_close(out, ref)
    (g,) = torch.autograd.grad(out.sum(), x)
    (g_ref,) = torch.autograd.grad(ref.sum(), x)
    assert_close(g, g_ref)


def test_default_window_and_checkpoint_names():
    m = FactorAttention(64)
    assert [tuple(c.weight.shape) for c in m.crpe.conv_list] == [(16, 1, 3, 3), (24, 1, 5, 5), (24, 1, 7, 7)]
    assert set(m.state_dict()) == {
        "qkv.weight", "qkv.bias", "proj.weight", "proj.bias",
        *(f"crpe.conv_list.{i}.{p}" for i in range(3) for p in ("weight", "bias"))}
    shared = FactorAttention(64, shared_crpe=m.crpe)
    assert shared.crpe is m.crpe


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(dim=30, num_heads=8), ValueError, "divisible"),
    (dict(dim=64, crpe_window={3: 2, 5: 3}), ValueError, "covers 5 heads"),
    (dict(dim=64, crpe_window={4: 8}), ValueError, "odd"),
])
def test_bad_module_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        FactorAttention(**kwargs)


def test_bad_op_inputs_raise_before_any_kernel():
    qkv, size, heads, scale, weights, biases = make_inputs(1, 2, 3, 4, {3: 1, 5: 1}, torch.float32)
    with pytest.raises(ValueError, match="size"):
        ops.factor_attention(qkv, (3, 3), heads, scale, weights, biases)
    with pytest.raises(ValueError, match="qkv"):
        ops.factor_attention(qkv[..., :-1], size, heads, scale, weights, biases)
    with pytest.raises(TypeError, match="qkv"):
        ops.factor_attention(qkv.int(), size, heads, scale, weights, biases)
    with pytest.raises(ValueError, match="num_heads"):
        ops.factor_attention(qkv, size, 3, scale, weights, biases)
    with pytest.raises(ValueError, match=r"crpe_biases\[1\]"):
        ops.factor_attention(qkv, size, heads, scale, weights, [biases[0], biases[1][:-1]])
    with pytest.raises(ValueError, match="cover"):
        ops.factor_attention(qkv, size, heads, scale, weights[:1], biases[:1])
    with pytest.raises(ValueError, match="N="):
        FactorAttention(8, num_heads=2, crpe_window={3: 2})(torch.randn(1, 6, 8), (2, 2))


# ---- CUDA (run with a GPU: pytest -m cuda) -------------------------------------------------

# MPViT-S stage shapes at 224x224 input: (N, C); 8 heads.
MPVIT_S_STAGES = [(56 * 56, 64), (28 * 28, 128), (14 * 14, 216), (7 * 7, 288)]
# Low precision tolerance: the kernel's error against the fp64 reference may be at most this
# multiple of eager PyTorch's own error in the same dtype (plus a small floor).
LOW_PRECISION_FACTOR = 2.0


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("N, C", MPVIT_S_STAGES)
def test_cuda_low_precision_vs_fp64_reference(N, C, dtype):
    side = int(N ** 0.5)
    Ch = C // 8
    qkv, size, heads, scale, weights, biases = make_inputs(16, side, side, Ch, DEFAULT, torch.float64,
                                                           requires_grad=False)
    exact = reference.factor_attention(qkv, size, heads, scale, weights, biases)
    low = [t.to(dtype) for t in (qkv, *weights, *biases)]
    ours = ops.factor_attention(low[0], size, heads, scale, low[1:4], low[4:7])
    eager = reference.factor_attention(low[0], size, heads, scale, low[1:4], low[4:7])
    err_ours = (ours.double() - exact).abs().max().item()
    err_eager = (eager.double() - exact).abs().max().item()
    assert err_ours <= LOW_PRECISION_FACTOR * err_eager + 1e-3, (err_ours, err_eager)


@pytest.mark.cuda
@pytest.mark.parametrize("N, C", MPVIT_S_STAGES)
def test_cuda_fp32_forward_backward_at_model_shapes(N, C):
    side = int(N ** 0.5)
    out, ref, grads, ref_grads = run_both(make_inputs(4, side, side, C // 8, DEFAULT, torch.float32))
    assert_close(out, ref, scale=10)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-3, rtol=1e-3)


@pytest.mark.cuda
def test_cuda_backward_is_deterministic_at_large_n():
    args = make_inputs(1, 128, 128, 8, DEFAULT, torch.bfloat16)
    _, _, first, _ = run_both(args)
    for _ in range(2):
        _, _, again, _ = run_both(args)
        for a, b in zip(first, again):
            assert torch.equal(a, b)
