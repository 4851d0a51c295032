"""affine_hswish: y = x * scale[c] + shift[c], then Hardswish (optional).

An eval BatchNorm folded to (scale, shift) plus its activation, after the stem convs and the
ResBlock convs. The kernels are ``mpvit_kernels::affine_hswish`` (csrc/cpu, csrc/cuda); this
file gives them a fake for torch.compile and autograd (grads for x, scale and shift, so a
frozen-statistics BatchNorm still trains its affine parameters).
"""
from __future__ import annotations

import torch

from mpvit_kernels import backend, reference

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> None:
    for name, t in (("x", x), ("scale", scale), ("shift", shift)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"affine_hswish: {name} must be a Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOATS:
            raise TypeError(f"affine_hswish: {name} must be float16/bfloat16/float32/float64, got {t.dtype}")
    if x.dim() < 2:
        raise ValueError(f"affine_hswish: x must be (B, C, ...) with channels in dim 1, got shape {tuple(x.shape)}")
    C = x.shape[1]
    for name, t in (("scale", scale), ("shift", shift)):
        if t.shape != (C,):
            raise ValueError(f"affine_hswish: {name} must have shape ({C},) for x of shape {tuple(x.shape)}, "
                             f"got {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"affine_hswish: {name} is on {t.device} but x is on {x.device}")
    if scale.dtype != shift.dtype:
        raise TypeError(f"affine_hswish: scale and shift must share a dtype, got {scale.dtype} and {shift.dtype}")


def affine_hswish(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, hswish: bool = True) -> torch.Tensor:
    """``hardswish(x * scale[c] + shift[c])`` (or without the Hardswish), channels in dim 1.

    Any layout (NCHW, channels-last, ...); the output keeps a dense input's strides. Computes in
    fp32 for fp16/bf16/fp32 inputs, fp64 for fp64; the output has x's dtype.
    """
    _check(x, scale, shift)
    if backend.use_extension("affine_hswish", x.device):
        return torch.ops.mpvit_kernels.affine_hswish(x, scale, shift, bool(hswish))
    return reference.affine_hswish(x, scale, shift, hswish)


def _register() -> None:
    @torch.library.register_fake("mpvit_kernels::affine_hswish")
    def _(x, scale, shift, hswish):
        return torch.empty_like(x)

    @torch.library.register_fake("mpvit_kernels::affine_hswish_backward")
    def _(grad, x, scale, shift, hswish):
        return torch.empty_like(x), scale.new_empty(scale.shape), shift.new_empty(shift.shape)

    def setup_context(ctx, inputs, output):
        x, scale, shift, hswish = inputs
        ctx.save_for_backward(x, scale, shift)
        ctx.hswish = hswish

    def backward(ctx, grad):
        x, scale, shift = ctx.saved_tensors
        grad_x, grad_scale, grad_shift = torch.ops.mpvit_kernels.affine_hswish_backward(
            grad, x, scale, shift, ctx.hswish)
        return grad_x, grad_scale, grad_shift, None

    torch.library.register_autograd("mpvit_kernels::affine_hswish", backward, setup_context=setup_context)


if backend.extension_available():
    _register()
