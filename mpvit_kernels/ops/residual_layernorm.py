"""residual_layernorm: the middle of an MPViT block as one pass over its tokens,

    s = x + y + bias            x the block's input (after the CPE), y = attention @ proj.weight^T
    u = layer_norm(s)           the MLP's input (norm2)
    r = s + next_bias           the residual stream with the MLP's fc2 bias added in advance

so the block's MLP ends in one GEMM that accumulates onto r in place (``r.addmm_(h, fc2.weight.t())``)
and neither residual add nor the LayerNorm is a pass of its own: eager's proj bias, add, norm2,
fc2 bias and add (5 passes over the tokens, 10 token-sized reads and writes) become this op and
the GEMMs' own reads and writes (7).

Registered as ``mpvit_kernels::residual_layernorm_fwd`` (a custom op with a fake and autograd)
over the Triton kernel (mpvit_kernels/triton/residual_layernorm.py) on CUDA tensors, or on CPU
tensors under Triton's interpreter; on other CPU tensors the extension's C++ twin
``mpvit_kernels::residual_layernorm`` (csrc/cpu/residual_layernorm.cpp, same outputs, same
autograd; under ``auto`` only where no backward follows); without either (and under
``reference``) the eager composition of
:func:`mpvit_kernels.reference.residual_layernorm`. Backward: the LayerNorm's with the saved
per-token (mean, rstd) plus r's grad, s recomputed from x and y: one Triton pass
(``mpvit_kernels::residual_layernorm_bwd``) writing the one grad x, y and the proj GEMM share,
with per-program column sums for the four parameters, combined in a fixed order; the twin's in
ATen ops (``native_layer_norm_backward``). Deterministic.
"""
from __future__ import annotations

import torch

from mpvit_kernels import backend, reference
from mpvit_kernels.ops.affine_hswish import check_channel_params, check_float_tensors, check_layernorm_eps, check_rows

MAX_CHANNELS = 2048  # a token's channels are one tile of the Triton kernels (wider rows spill)


def _check(x, y, params, eps):
    check_float_tensors("residual_layernorm", x=x, y=y)
    if x.dim() not in (2, 3):
        raise ValueError(f"residual_layernorm: x must be tokens (B, N, C) or rows (M, C), got shape {tuple(x.shape)}")
    if y.shape != x.shape:
        raise ValueError(f"residual_layernorm: y must have x's shape {tuple(x.shape)}, got {tuple(y.shape)}")
    if y.device != x.device:
        raise ValueError(f"residual_layernorm: y is on {y.device}, x on {x.device}")
    C = x.shape[-1]
    if not 1 <= C <= MAX_CHANNELS:
        raise ValueError(f"residual_layernorm: x must have 1 to {MAX_CHANNELS} channels, got {C}")
    check_channel_params("residual_layernorm", C, x.device, **params)
    check_layernorm_eps("residual_layernorm", eps)
    check_rows("residual_layernorm", x.numel() // C)


def residual_layernorm(x: torch.Tensor, y: torch.Tensor, bias: torch.Tensor, next_bias: torch.Tensor,
                       weight: torch.Tensor, ln_bias: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s + next_bias, layer_norm(s))`` with ``s = x + y + bias``, over the last dim.

    x, y: tokens (B, N, C) or rows (M, C) of one shape, any strides (a unit channel stride is
    read in place); bias, next_bias, weight (the LayerNorm's), ln_bias: (C,), any floating
    dtype, read in the accumulation type (fp32, fp64 for fp64 inputs); C <= 2048. Returns (r,
    u), both of x's shape, contiguous, in the dtype of ``x + y`` (type promotion: a residual sum
    keeps its stream's dtype, under autocast too, as eager's); computed in fp32 (fp64 for fp64).
    u is in that dtype as well, where eager's LayerNorm under autocast returns fp32 that the next
    Linear casts down to the same values. MPViT's block passes rows, so that r is a tensor of its
    own, not a view, for fc2's in-place ``addmm_`` (autograd handles an in-place op on a view by
    copying whole grads).
    """
    _check(x, y, dict(bias=bias, next_bias=next_bias, weight=weight, ln_bias=ln_bias), eps)
    if x.dtype != y.dtype:  # eager's type promotion of x + y
        dtype = torch.promote_types(x.dtype, y.dtype)
        x, y = x.to(dtype), y.to(dtype)
    params = (bias, next_bias, weight, ln_bias)
    backward_follows = torch.is_grad_enabled() and any(t.requires_grad for t in (x, y, *params))
    # On CPU the C++ twin runs inference; where a backward follows, auto takes the eager reference,
    # whose autograd keeps s instead of recomputing it (measured faster on CPU, `--ops residual_layernorm`).
    if backend.use_cpu_kernel("residual_layernorm", x.device) and (
            not backward_follows or backend.get_backend("residual_layernorm") == "cuda"):
        return backend.call_op(torch.ops.mpvit_kernels.residual_layernorm.default, x, y, *params, float(eps))[:2]
    if backend.use_triton("residual_layernorm", x.device):
        if len({p.dtype for p in params}) > 1:  # the kernel reads them in one dtype, whichever it is
            params = tuple(p.to(reference._acc_dtype(x.dtype)) for p in params)
        return backend.call_op(_residual_layernorm, x, y, *params, float(eps))[:2]
    return reference.residual_layernorm(x, y, *params, eps)


def _rows(t: torch.Tensor) -> tuple[torch.Tensor, int, int, int, int]:
    """t with unit channel stride (copied once if it has none) as the kernels index it: (t, B,
    N, batch stride, token stride); rows (M, C) are one batch of M tokens."""
    if t.stride(-1) != 1 and t.shape[-1] != 1:
        t = t.contiguous()
    if t.dim() == 2:
        return t, 1, t.shape[0], 0, t.stride(0)
    return t, t.shape[0], t.shape[1], t.stride(0), t.stride(1)


def _vector_width(x, C, B, N, sxb, sxn, syb, syn) -> int:
    """The kernels' VEC: what C and the strides the kernels multiply by are multiples of (a
    batch stride with B = 1 or a token stride with N = 1 only ever multiplies 0)."""
    from mpvit_kernels.triton.launch import vector_width

    return vector_width(x.element_size(), C, *(s for s, size in ((sxb, B), (sxn, N), (syb, B), (syn, N)) if size > 1))


@torch.library.custom_op("mpvit_kernels::residual_layernorm_fwd", mutates_args=())
def _residual_layernorm(x: torch.Tensor, y: torch.Tensor, bias: torch.Tensor, next_bias: torch.Tensor,
                        weight: torch.Tensor, ln_bias: torch.Tensor,
                        eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(r, u, mean, rstd): r and u of x's shape (tokens (B, N, C) or rows (M, C)), contiguous, in
    x's dtype; mean and rstd per token (x's shape without C) in the accumulation type (fp32, fp64
    for fp64 x); the four parameters share a dtype."""
    from mpvit_kernels.triton import residual_layernorm as kernels

    r, u, mean, rstd = _fake(x, y, bias, next_bias, weight, ln_bias, eps)
    (x, B, N, sxb, sxn), (y, _, _, syb, syn) = _rows(x), _rows(y)
    C, M = x.shape[-1], B * N
    if M == 0:
        return r, u, mean, rstd
    params = [p.contiguous() for p in (bias, next_bias, weight, ln_bias)]
    bc = kernels.block_c(C)
    with backend.triton_device(x):
        kernels.residual_layernorm_kernel[(-(-M // kernels.tile(bc)[0]),)](
            x, y, *params, r, u, mean, rstd, M, N, C, sxb, sxn, syb, syn, float(eps),
            ACC=kernels.tl.float64 if mean.dtype == torch.float64 else kernels.tl.float32, BLOCK_C=bc,
            VEC=_vector_width(x, C, B, N, sxb, sxn, syb, syn))
    return r, u, mean, rstd


def _fake(x, y, bias, next_bias, weight, ln_bias, eps):
    acc = reference._acc_dtype(x.dtype)
    return (x.new_empty(x.shape), x.new_empty(x.shape), x.new_empty(x.shape[:-1], dtype=acc),
            x.new_empty(x.shape[:-1], dtype=acc))


@torch.library.custom_op("mpvit_kernels::residual_layernorm_bwd", mutates_args=())
def _residual_layernorm_bwd(grad_r: torch.Tensor, grad_u: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                            bias: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
                            rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward of ``residual_layernorm_fwd``: (grad_s, of x's shape, contiguous, in x's dtype: the
    grad of x and of y alike; (4, C) in the accumulation type: the grads of bias, next_bias,
    weight and ln_bias), from the grads of r and u and the forward's inputs and per-token
    statistics. One Triton pass, then one fixed-order sum of its per-program partials:
    deterministic."""
    from mpvit_kernels.triton import residual_layernorm as kernels

    acc = mean.dtype
    grad_s = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    (x, B, N, sxb, sxn), (y, _, _, syb, syn) = _rows(x), _rows(y)
    C, M = x.shape[-1], B * N
    grad_r, grad_u = (backend.cast(g, x.dtype).reshape(M, C).contiguous() for g in (grad_r, grad_u))
    if M == 0:
        return grad_s, torch.zeros((4, C), dtype=acc, device=x.device)
    wide = acc == torch.float64
    bc = kernels.block_c(C)
    programs = -(-M // (kernels.tile(bc)[0] * kernels.GRAD_TILES))
    partial = torch.empty((programs, 4, C), dtype=acc, device=x.device)
    with backend.triton_device(x):
        kernels.residual_layernorm_bwd_kernel[(programs,)](
            x, y, bias.contiguous(), weight.contiguous(), mean.contiguous(), rstd.contiguous(), grad_r, grad_u, grad_s,
            partial, M, N, C, sxb, sxn, syb, syn,
            ACC=kernels.tl.float64 if wide else kernels.tl.float32, BLOCK_C=bc, TILES=kernels.GRAD_TILES,
            VEC=_vector_width(x, C, B, N, sxb, sxn, syb, syn))
    return grad_s, partial.sum(0)  # fixed order: torch's sum has no atomics


@_residual_layernorm_bwd.register_fake
def _(grad_r, grad_u, x, y, bias, weight, mean, rstd):
    return x.new_empty(x.shape), mean.new_empty((4, x.shape[-1]))


backend.refuse_double_backward("mpvit_kernels::residual_layernorm_bwd")


def _setup_context(ctx, inputs, output):
    x, y, bias, next_bias, weight, ln_bias, eps = inputs
    _, _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)  # no zero grads for mean and rstd (launches that move nothing useful)
    ctx.save_for_backward(x, y, bias, weight, ln_bias, mean, rstd)


def _grads_of_outputs(x, grad_r, grad_u):
    zero = None if grad_r is not None and grad_u is not None else torch.zeros(x.shape, dtype=x.dtype, device=x.device)
    return (zero if grad_r is None else grad_r), (zero if grad_u is None else grad_u)


def _triton_backward(ctx, grad_r, grad_u, *_):
    x, y, bias, weight, ln_bias, mean, rstd = ctx.saved_tensors
    grad_r, grad_u = _grads_of_outputs(x, grad_r, grad_u)
    grad_s, grads = backend.call_op(_residual_layernorm_bwd, grad_r, grad_u, x, y, bias, weight, mean, rstd)
    return (grad_s, grad_s, *backend.cast(grads, bias.dtype).unbind(0), None)  # the four parameters share a dtype


def _eager_backward(ctx, grad_r, grad_u, *_):
    """The C++ twin's backward, in ATen ops (it runs where a backward follows only under ``cuda``)."""
    x, y, bias, weight, ln_bias, mean, rstd = ctx.saved_tensors
    grad_r, grad_u = _grads_of_outputs(x, grad_r, grad_u)
    acc, dtype = mean.dtype, bias.dtype
    s = x.to(acc) + y.to(acc) + bias.to(acc)  # recomputed: the forward stores only the per-token statistics
    C = x.shape[-1]
    grad_s, grad_weight, grad_ln_bias = torch.ops.aten.native_layer_norm_backward(
        grad_u.to(acc), s, [C], mean.unsqueeze(-1), rstd.unsqueeze(-1), weight.to(acc), ln_bias.to(acc),
        [True, True, True])
    grad_s = grad_s + grad_r.to(acc)
    rows = tuple(range(x.dim() - 1))
    return (grad_s.to(x.dtype), grad_s.to(y.dtype), grad_s.sum(rows).to(dtype), grad_r.to(acc).sum(rows).to(dtype),
            grad_weight.to(dtype), grad_ln_bias.to(dtype), None)


_residual_layernorm.register_fake(_fake)
backend.register_autograd(_residual_layernorm, _triton_backward, setup_context=_setup_context)
if backend.extension_available():  # the C++ twin: the same contract
    torch.library.register_fake("mpvit_kernels::residual_layernorm", _fake)
    backend.register_autograd("mpvit_kernels::residual_layernorm", _eager_backward, setup_context=_setup_context)
