"""dwconv_bn: the depthwise-separable conv of MPViT's patch embeddings (``DWConv2d_BN``),

    y = act(conv1x1(dwconv(x, dw_weight, stride), pw_weight) * scale + shift)

with a folded eval BatchNorm (scale, shift) and Hardswish in the epilogue of one Triton kernel
(mpvit_kernels/triton/dwconv_bn.py): a GEMM over the output pixels whose A operand, the depthwise
conv, is computed in its K loop and never written to memory. Without scale/shift it is the
pre-BatchNorm output, what training normalises with batch statistics.

Training (:func:`dwconv_bn_train`, BatchNorm with batch statistics) is two passes: the same
kernel writes the pre-BatchNorm output z and per-tile statistics in its epilogue, a small kernel
combines them, and one ``affine_hswish`` pass normalises (ops/affine_hswish.py).

Registered as ``mpvit_kernels::dwconv_bn`` and ``mpvit_kernels::dwconv_bn_train`` (custom ops
with fakes, so torch.compile(fullgraph) goes through them). The backward recomputes the depthwise
output from x rather than saving it: per image the recompute reads x (the size of the depthwise
output at stride 1, 4x it at stride 2) where saving would write and keep one more activation of
the depthwise output's size for the whole step; at stride 1 the two cost the same traffic and
recomputing holds less memory. Then the 1x1 weight's grad and the depthwise output's grad are
GEMMs, and the depthwise op's backward gives x's and the depthwise weight's. In training, the
BatchNorm + Hardswish backward runs first (two passes over grad and z, no atomics).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mpvit_kernels import backend
from mpvit_kernels.ops.affine_hswish import (affine_hswish, affine_hswish_grad, batch_norm_backward,
                                             batch_norm_hswish, batch_stats, channel_rows, check_channel_params,
                                             check_eps, check_item_span, check_rows, check_strided, conv_folded_bn,
                                             folds_into_conv)
from mpvit_kernels.ops.depthwise import _FLOATS, _out_size, depthwise
from mpvit_kernels.ops.depthwise import _check as _check_depthwise


def _check(x, dw_weight, pw_weight, stride, scale, shift) -> None:
    _check_depthwise(x, dw_weight, None, stride, scale=None, shift=None, hswish=False, residual=False)
    if not isinstance(pw_weight, torch.Tensor):
        raise TypeError(f"dwconv_bn: pw_weight must be a Tensor, got {type(pw_weight).__name__}")
    check_strided("dwconv_bn", "pw_weight", pw_weight)
    C = x.shape[1]
    if pw_weight.dim() != 4 or tuple(pw_weight.shape[1:]) != (C, 1, 1):
        raise ValueError(f"dwconv_bn: pw_weight must be (out_channels, {C}, 1, 1), got {tuple(pw_weight.shape)}")
    if pw_weight.dtype not in _FLOATS:
        raise TypeError(f"dwconv_bn: pw_weight must be floating point, got {pw_weight.dtype}")
    if pw_weight.device != x.device:
        raise ValueError(f"dwconv_bn: pw_weight is on {pw_weight.device} but x is on {x.device}")
    if (scale is None) != (shift is None):
        raise ValueError("dwconv_bn: scale and shift must be given together (a folded BatchNorm)")
    if scale is not None:
        check_channel_params("dwconv_bn", pw_weight.shape[0], x.device, scale=scale, shift=shift)
    # pixel offsets within an image are 32-bit in the kernel, image offsets and output rows 64-bit
    check_item_span("dwconv_bn", "x", x)
    B, _, Ho, Wo = _out_shape(x, pw_weight, stride)
    check_rows("dwconv_bn", B * Ho * Wo)


def _check_batch_norm(x, pw_weight, bn_weight, bn_bias, eps, stride) -> None:
    check_eps("dwconv_bn_train", eps)
    check_channel_params("dwconv_bn_train", pw_weight.shape[0], x.device, bn_weight=bn_weight, bn_bias=bn_bias)
    B, _, Ho, Wo = _out_shape(x, pw_weight, stride)
    if B * Ho * Wo == 1:
        raise ValueError(f"dwconv_bn_train: batch statistics need more than 1 value per channel, x of shape "
                         f"{tuple(x.shape)} gives 1")


def dwconv_bn(x: torch.Tensor, dw_weight: torch.Tensor, pw_weight: torch.Tensor, stride: int = 1,
              scale: torch.Tensor | None = None, shift: torch.Tensor | None = None,
              hswish: bool = False) -> torch.Tensor:
    """``act(conv1x1(dwconv(x)) * scale + shift)``: x (B, Cin, H, W) any layout, dw_weight
    (Cin, 1, k, k) with k in (3, 5, 7), pw_weight (Cout, Cin, 1, 1), stride 1 or 2; scale and
    shift (Cout,) a folded BatchNorm or both None; Hardswish if ``hswish``. Returns
    (B, Cout, H', W') channels-last. fp16/bf16/fp32 compute in fp32 (the depthwise output rounds
    to x's dtype before the 1x1, as eager's does), fp64 in fp64; under autocast x is cast to the
    autocast dtype first, as a conv's input is. The weights, scale and shift may have any floating
    dtype: pw_weight is cast to x's dtype, the others are read in the accumulation type."""
    x = backend.autocast(x)
    _check(x, dw_weight, pw_weight, stride, scale, shift)
    if backend.use_triton("dwconv_bn", x.device):
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        # cast once per weight version (autocast's bf16 over fp32 weights, a 16-bit model's dw)
        w = backend.weight_as(pw_weight, x.dtype).reshape(pw_weight.shape[0], -1)
        if not (torch.is_grad_enabled() and dw_weight.requires_grad):
            dw_weight = backend.weight_as(dw_weight, acc)
        if scale is not None:
            scale, shift = scale.to(acc).contiguous(), shift.to(acc).contiguous()
        return backend.call_op(_dwconv_bn, x, dw_weight, w, scale, shift, int(stride), bool(hswish))
    # Unfused: the depthwise op, then the 1x1 with the BatchNorm folded into it (folds_into_conv) or
    # followed by affine_hswish (compiled or reference, as their families run)
    if scale is not None and folds_into_conv("dwconv_bn", x):
        return conv_folded_bn(depthwise(x, dw_weight, None, stride), pw_weight, scale, shift, hswish)
    y = F.conv2d(depthwise(x, dw_weight, None, stride), pw_weight.to(x.dtype))
    if scale is not None:
        return affine_hswish(y, scale, shift, hswish)
    return F.hardswish(y) if hswish else y


def dwconv_bn_train(x: torch.Tensor, dw_weight: torch.Tensor, pw_weight: torch.Tensor, stride: int,
                    bn_weight: torch.Tensor, bn_bias: torch.Tensor, eps: float,
                    hswish: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``act(batch_norm(conv1x1(dwconv(x))))`` with the batch's statistics, as a training
    ``nn.BatchNorm2d`` (weight ``bn_weight``, bias ``bn_bias``, ``eps``) normalises. Arguments as
    :func:`dwconv_bn`. Returns (y channels-last, the batch mean, the biased batch variance), the
    statistics (Cout,) in the accumulation type and without grad: the caller updates its running
    statistics with them (nn.DWConv2dBN does, as nn.BatchNorm2d would)."""
    x = backend.autocast(x)
    _check(x, dw_weight, pw_weight, stride, None, None)
    _check_batch_norm(x, pw_weight, bn_weight, bn_bias, eps, stride)
    if backend.use_triton("dwconv_bn", x.device) and x.numel() > 0:
        w = pw_weight.reshape(pw_weight.shape[0], -1).to(x.dtype)
        y, _, mean, var = backend.call_op(_dwconv_bn_train, x, dw_weight, w, bn_weight, bn_bias, float(eps),
                                          int(stride), bool(hswish))
        return y, mean, var
    return batch_norm_hswish(F.conv2d(depthwise(x, dw_weight, None, stride), pw_weight.to(x.dtype)), bn_weight,
                             bn_bias, eps, hswish)


def _out_shape(x, pw, stride):
    B, _, H, W = x.shape
    return B, pw.shape[0], _out_size(H, stride), _out_size(W, stride)


def _launch(x, dw_weight, pw_weight, scale, shift, stride, hswish, stats):
    """The fused kernel: y (B, Cout, H', W') channels-last, and with ``stats`` the row tiles'
    (mean, M2) of y and the rows per tile."""
    from mpvit_kernels.triton import dwconv_bn as kernels
    from mpvit_kernels.triton.launch import vector_width

    B, Cout, Ho, Wo = _out_shape(x, pw_weight, stride)
    Cin, K = x.shape[1], dw_weight.shape[-1]
    # read in place with any batch, row and pixel strides; converted only when channels are not unit-stride
    xn = x if x.stride(1) == 1 or Cin == 1 else x.contiguous(memory_format=torch.channels_last)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    dw = dw_weight.reshape(Cin, K * K).to(acc).contiguous()
    pw = pw_weight.contiguous()
    y = torch.empty((B, Cout, Ho, Wo), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    M = B * Ho * Wo
    BN = kernels.block_n(Cout)
    BM = kernels.tile(BN, acc == torch.float64)[0]
    tiles = (torch.empty(-(-M // BM), Cout, dtype=acc, device=x.device) for _ in range(2)) if stats else (dw, dw)
    tile_mean, tile_m2 = tiles
    if M == 0 or Cout == 0:
        return y, tile_mean, tile_m2, BM
    precision = "ieee" if x.dtype in (torch.float32, torch.float64) else "tf32"
    # a stride of a size-1 dim only ever multiplies 0
    vec = vector_width(x.element_size(), Cin, Cout, *(xn.stride(d) for d in (0, 2, 3) if xn.shape[d] > 1))
    with backend.triton_device(x):
        kernels.dwconv_pw_kernel[(-(-M // BM), -(-Cout // BN))](
            xn, dw, pw, dw if scale is None else scale, dw if shift is None else shift, y, tile_mean, tile_m2, M,
            x.shape[2], x.shape[3], Ho, Wo, Cin, Cout, xn.stride(0), xn.stride(2), xn.stride(3), stride, K=K,
            AFFINE=scale is not None, HSWISH=hswish, STATS=stats,
            ACC=kernels.tl.float64 if acc == torch.float64 else kernels.tl.float32, DOT_PRECISION=precision,
            BLOCK_N=BN, VEC=vec)
    return y, tile_mean, tile_m2, BM


@torch.library.custom_op("mpvit_kernels::dwconv_bn", mutates_args=())
def _dwconv_bn(x: torch.Tensor, dw_weight: torch.Tensor, pw_weight: torch.Tensor, scale: torch.Tensor | None,
               shift: torch.Tensor | None, stride: int, hswish: bool) -> torch.Tensor:
    """y (B, Cout, H', W') channels-last = act((dw(x) @ pw_weight^T) * scale + shift); pw_weight
    (Cout, Cin) in x's dtype, scale and shift (Cout,) in the accumulation type, or both None."""
    return _launch(x, dw_weight, pw_weight, scale, shift, stride, hswish, stats=False)[0]


@_dwconv_bn.register_fake
def _(x, dw_weight, pw_weight, scale, shift, stride, hswish):
    return torch.empty(_out_shape(x, pw_weight, stride), dtype=x.dtype, device=x.device,
                       memory_format=torch.channels_last)


@torch.library.custom_op("mpvit_kernels::dwconv_bn_train", mutates_args=())
def _dwconv_bn_train(x: torch.Tensor, dw_weight: torch.Tensor, pw_weight: torch.Tensor, bn_weight: torch.Tensor,
                     bn_bias: torch.Tensor, eps: float, stride: int,
                     hswish: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, z, mean, var): z = dw(x) @ pw_weight^T the pre-BatchNorm output (x's dtype, for the
    backward), (mean, var) its per-channel batch statistics (accumulation type), y = act(batch
    norm of z), both (B, Cout, H', W') channels-last."""
    z, tile_mean, tile_m2, rows = _launch(x, dw_weight, pw_weight, None, None, stride, False, stats=True)
    M = z.numel() // z.shape[1]
    mean, var, scale, shift = batch_stats(tile_mean, tile_m2, rows, M, bn_weight, bn_bias, eps)
    return affine_hswish(z, scale, shift, hswish), z, mean, var


@_dwconv_bn_train.register_fake
def _(x, dw_weight, pw_weight, bn_weight, bn_bias, eps, stride, hswish):
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    shape = _out_shape(x, pw_weight, stride)
    y, z = (torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last) for _ in range(2))
    return y, z, x.new_empty(shape[1], dtype=acc), x.new_empty(shape[1], dtype=acc)


def _depthwise_rows(x, dw_weight, stride):
    """The depthwise output as (M, Cin) rows (a view of its NHWC memory), recomputed: the forward
    never stored it."""
    return channel_rows(depthwise(x, backend.cast(dw_weight, x.dtype), None, stride))


def _conv_backward(x, dw_weight, pw_weight, stride, g, dm=None):
    """Grads of x, dw_weight and pw_weight from g (M, Cout) in x's dtype, the grad of the 1x1
    output; dm the depthwise rows if the caller has them."""
    B, Cout, Ho, Wo = _out_shape(x, pw_weight, stride)
    Cin = x.shape[1]
    dm = _depthwise_rows(x, dw_weight, stride) if dm is None else dm
    grad_pw = g.t() @ dm
    gd = (g @ pw_weight).reshape(B, Ho, Wo, Cin).permute(0, 3, 1, 2)  # channels-last (B, Cin, Ho, Wo)
    if backend.extension_runs_on(x.device):
        gx, gdw = backend.call_op(torch.ops.mpvit_kernels.depthwise_backward.default, gd, x, dw_weight, None, stride,
                                  None, None, False, False)[:2]
    else:
        K = dw_weight.shape[-1]
        xd, wd = x.detach().requires_grad_(), backend.cast(dw_weight.detach(), x.dtype).requires_grad_()
        with torch.enable_grad():
            out = F.conv2d(xd, wd, None, stride, K // 2, groups=Cin)
        gx, gdw = torch.autograd.grad(out, (xd, wd), gd)
    return gx, backend.cast(gdw, dw_weight.dtype), backend.cast(grad_pw, pw_weight.dtype)


def _setup_context(ctx, inputs, output):
    x, dw_weight, pw_weight, scale, shift, stride, hswish = inputs
    ctx.save_for_backward(x, dw_weight, pw_weight, scale, shift)
    ctx.args = (stride, hswish)


def _backward(ctx, grad):
    x, dw_weight, pw_weight, scale, shift = ctx.saved_tensors
    stride, hswish = ctx.args
    g = channel_rows(backend.cast(grad, x.dtype))
    grad_scale = grad_shift = d = None
    if scale is not None or hswish:
        d = _depthwise_rows(x, dw_weight, stride)
        g, grad_scale, grad_shift = affine_hswish_grad(g, d @ pw_weight.t(), scale, shift, hswish)
    return *_conv_backward(x, dw_weight, pw_weight, stride, g, d), grad_scale, grad_shift, None, None


backend.register_autograd(_dwconv_bn, _backward, setup_context=_setup_context)


def _train_setup_context(ctx, inputs, output):
    x, dw_weight, pw_weight, bn_weight, bn_bias, eps, stride, hswish = inputs
    _, z, mean, var = output
    ctx.mark_non_differentiable(z, mean, var)
    ctx.set_materialize_grads(False)  # no zero-filled grads for z, mean and var (a launch each)
    ctx.save_for_backward(x, dw_weight, pw_weight, bn_weight, bn_bias, z, mean, var)
    ctx.args = (eps, stride, hswish)


def _train_backward(ctx, grad, *_):
    if grad is None:  # an undefined grad (grads are not materialised): zero, so none for the inputs
        return (None,) * 8
    x, dw_weight, pw_weight, bn_weight, bn_bias, z, mean, var = ctx.saved_tensors
    eps, stride, hswish = ctx.args
    g, grad_weight, grad_bias = batch_norm_backward(channel_rows(grad), channel_rows(z), bn_weight, bn_bias, mean,
                                                    var, eps, hswish)
    return (*_conv_backward(x, dw_weight, pw_weight, stride, g), backend.cast(grad_weight, bn_weight.dtype),
            backend.cast(grad_bias, bn_bias.dtype), None, None, None)


backend.register_autograd(_dwconv_bn_train, _train_backward, setup_context=_train_setup_context)
