"""depthwise: a k x k depthwise conv with its epilogue fused before the one store.

    y = dwconv(x, weight, bias, stride, padding=k // 2)    # weight (C, 1, k, k), k in {3, 5, 7}
    y = y * scale[c] + shift[c]    if scale is given        # eval BatchNorm, folded
    y = hardswish(y)               if hswish
    y = y + x                      if residual              # stride 1 only

MPViT's CPE (``x + dw3x3(x) + bias`` on the token map) is one call with ``residual``; the
InvRes path's dw3x3 -> BatchNorm -> Hardswish is one call with the folded BatchNorm in eval.
The kernels are ``mpvit_kernels::depthwise`` (csrc/cpu, csrc/cuda), working in NHWC: the result
is channels-last, a dense channels-last x is read in place, any other layout is converted once.
This file gives them argument checks, a fake for torch.compile and autograd (grads for x,
weight, bias, scale and shift; deterministic: fixed-order reductions, no float atomics).
"""
from __future__ import annotations

import torch

from mpvit_kernels import backend, reference
from mpvit_kernels.ops.affine_hswish import check_strided

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check(x, weight, bias, stride, scale, shift, hswish, residual) -> None:
    named = [("x", x), ("weight", weight), ("bias", bias), ("scale", scale), ("shift", shift)]
    for name, t in named:
        if t is None and name in ("bias", "scale", "shift"):
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"depthwise: {name} must be a Tensor, got {type(t).__name__}")
        check_strided("depthwise", name, t)
        if t.dtype not in _FLOATS:
            raise TypeError(f"depthwise: {name} must be float16/bfloat16/float32/float64, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"depthwise: {name} is on {t.device} but x is on {x.device}")
    if x.dim() != 4:
        raise ValueError(f"depthwise: x must be (B, C, H, W), got shape {tuple(x.shape)}")
    C = x.shape[1]
    k = weight.shape[-1] if weight.dim() == 4 else None
    if weight.dim() != 4 or tuple(weight.shape[:3]) != (C, 1, k) or k not in (3, 5, 7):
        raise ValueError(f"depthwise: weight must be ({C}, 1, k, k) with k in (3, 5, 7) for x with {C} channels, "
                         f"got {tuple(weight.shape)}")
    if not isinstance(stride, int) or isinstance(stride, bool):
        raise TypeError(f"depthwise: stride must be an int, got {type(stride).__name__}")
    if stride not in (1, 2):
        raise ValueError(f"depthwise: stride must be 1 or 2, got {stride!r}")
    for name, flag in (("hswish", hswish), ("residual", residual)):
        if not isinstance(flag, bool):
            raise TypeError(f"depthwise: {name} must be a bool, got {type(flag).__name__}")
    if (scale is None) != (shift is None):
        raise ValueError("depthwise: scale and shift must be given together (a folded BatchNorm)")
    for name, t in (("bias", bias), ("scale", scale), ("shift", shift)):
        if t is not None and tuple(t.shape) != (C,):
            raise ValueError(f"depthwise: {name} must have shape ({C},), got {tuple(t.shape)}")
    if residual and stride != 1:
        raise ValueError("depthwise: residual needs stride 1 (the output must have x's shape)")


def depthwise(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride: int = 1,
              scale: torch.Tensor | None = None, shift: torch.Tensor | None = None, hswish: bool = False,
              residual: bool = False) -> torch.Tensor:
    """Depthwise conv of x (B, C, H, W) with the fused epilogue above; returns (B, C, H', W')
    channels-last, H' = (H - 1) // stride + 1. fp16/bf16/fp32 inputs compute in fp32, fp64 in fp64;
    the output has x's dtype, the parameters may have any floating dtype. Under autocast x is
    cast as a conv's input is, except with ``residual``: eager's ``x + conv(x)`` keeps x's dtype,
    and so does the fused sum."""
    _check(x, weight, bias, stride, scale, shift, hswish, residual)
    if not residual:
        x = backend.autocast(x)
    if backend.use_extension("depthwise", x.device):
        return backend.call_op(torch.ops.mpvit_kernels.depthwise.default, x, weight, bias, int(stride), scale, shift,
                               bool(hswish), bool(residual))
    return reference.depthwise(x, weight, bias, stride, scale, shift, hswish, residual)


def _out_size(n, stride):
    return (n - 1) // stride + 1


def _register() -> None:
    # allocated as the kernels allocate (at::empty with a channels-last memory format)
    @torch.library.register_fake("mpvit_kernels::depthwise")
    def _(x, weight, bias, stride, scale, shift, hswish, residual):
        B, C, H, W = x.shape
        return torch.empty((B, C, _out_size(H, stride), _out_size(W, stride)), dtype=x.dtype, device=x.device,
                           memory_format=torch.channels_last)

    @torch.library.register_fake("mpvit_kernels::depthwise_backward")
    def _(grad, x, weight, bias, stride, scale, shift, hswish, residual):
        C = x.shape[1]
        per_channel = (lambda: weight.new_empty((0,))) if scale is None else (lambda: scale.new_empty((C,)))
        return (torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last),
                weight.new_empty(weight.shape), (weight if bias is None else bias).new_empty((C,)),
                per_channel(), per_channel())

    def setup_context(ctx, inputs, output):
        x, weight, bias, stride, scale, shift, hswish, residual = inputs
        ctx.save_for_backward(x, weight, bias, scale, shift)
        ctx.args = (stride, hswish, residual)

    def backward(ctx, grad):
        x, weight, bias, scale, shift = ctx.saved_tensors
        stride, hswish, residual = ctx.args
        gx, gw, gb, gs, gt = backend.call_op(torch.ops.mpvit_kernels.depthwise_backward.default, grad, x, weight, bias,
                                             stride, scale, shift, hswish, residual)
        with_scale = scale is not None
        return gx, gw, gb if bias is not None else None, None, gs if with_scale else None, \
            gt if with_scale else None, None, None

    backend.register_autograd("mpvit_kernels::depthwise", backward, setup_context=setup_context)
    backend.refuse_double_backward("mpvit_kernels::depthwise_backward")


if backend.extension_available():
    _register()
