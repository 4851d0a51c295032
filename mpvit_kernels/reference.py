"""Eager PyTorch ground truth of every op family: the tests' oracle and the "kernels off" path.

Plain compositions of torch ops, written for clarity; every fused kernel is tested against
these. Images are (B, C, H, W) in any memory format; tokens are (B, N, C) with N = H*W
row-major (the same memory as channels-last).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def fold_bn(weight, bias, running_mean, running_var, eps: float):
    """Eval BatchNorm as a per-channel affine: ``bn(x) == x * scale + shift``."""
    scale = weight * torch.rsqrt(running_var + eps)
    return scale, bias - running_mean * scale


def affine_hswish(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, hswish: bool = True) -> torch.Tensor:
    """``hardswish(x * scale[c] + shift[c])`` over channel dim 1, computed in fp32 (fp64 for fp64)."""
    acc = _acc_dtype(x.dtype)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    z = x.to(acc) * scale.to(acc).view(shape) + shift.to(acc).view(shape)
    return (F.hardswish(z) if hswish else z).to(x.dtype)


def depthwise_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                   stride: int = 1) -> torch.Tensor:
    """Depthwise k x k conv with "same" padding k // 2; weight (C, 1, k, k)."""
    return F.conv2d(x, weight, bias, stride=stride, padding=weight.shape[-1] // 2, groups=x.shape[1])


def depthwise(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride: int = 1,
              scale: torch.Tensor | None = None, shift: torch.Tensor | None = None, hswish: bool = False,
              residual: bool = False) -> torch.Tensor:
    """Depthwise conv, then ``* scale + shift`` (a folded BatchNorm) if given, Hardswish if
    ``hswish``, ``+ x`` if ``residual``: the eager composition the ``depthwise`` op fuses."""
    y = depthwise_conv(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype), stride)
    if scale is not None:
        y = affine_hswish(y, scale, shift, hswish)
    elif hswish:
        y = F.hardswish(y)
    return y + x if residual else y


def cpe(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Convolutional position encoding on an image: ``x + dwconv3x3(x) + bias``."""
    return x + depthwise_conv(x, weight, bias)


def dwconv_bn(x: torch.Tensor, dw_weight: torch.Tensor, pw_weight: torch.Tensor, scale: torch.Tensor,
              shift: torch.Tensor, stride: int = 1) -> torch.Tensor:
    """Depthwise-separable conv + eval BatchNorm (folded) + Hardswish (``DWConv2d_BN``)."""
    return affine_hswish(F.conv2d(depthwise_conv(x, dw_weight, stride=stride), pw_weight), scale, shift)


def gli_projection(xs: Sequence[torch.Tensor], weight: torch.Tensor, scale: torch.Tensor,
                   shift: torch.Tensor) -> torch.Tensor:
    """Channel concat of the path outputs -> 1x1 conv -> eval BatchNorm (folded) -> Hardswish."""
    return affine_hswish(F.conv2d(torch.cat(list(xs), dim=1), weight), scale, shift)


def factor_attention(qkv: torch.Tensor, size: tuple[int, int], num_heads: int, scale: float,
                     crpe_weights: Sequence[torch.Tensor], crpe_biases: Sequence[torch.Tensor],
                     crpe_conv=depthwise_conv) -> torch.Tensor:
    """Factorized attention with convolutional relative position encoding, qkv -> (B, N, C).

    qkv: the qkv Linear's output (B, N, 3C), seen as (B, N, 3, heads, Ch). Per head,
    ``out = scale * q @ (softmax_N(k)^T @ v) + q * crpe(v)``. crpe_weights[i] (ci, 1, k, k) and
    crpe_biases[i] (ci,) convolve the next ci channels of v seen as the image (B, heads*Ch, H, W);
    the ci sum to C. Heads are merged head-major into (B, N, C), ready for ``proj``.
    ``crpe_conv(x, weight, bias)``: the depthwise conv that computes them (F.conv2d's by default).
    """
    B, N, C3 = qkv.shape
    C = C3 // 3
    Ch = C // num_heads
    H, W = size
    q, k, v = qkv.reshape(B, N, 3, num_heads, Ch).permute(2, 0, 3, 1, 4)  # each (B, heads, N, Ch)
    context = k.softmax(dim=2).transpose(-1, -2) @ v  # (B, heads, Ch, Ch)
    factor = scale * (q @ context)
    # v as a channels-last image and back: views of qkv's rows (and of channels-last conv outputs)
    v_img = v.transpose(1, 2).reshape(B, H, W, C).permute(0, 3, 1, 2)
    v_parts = torch.split(v_img, [w.shape[0] for w in crpe_weights], dim=1)
    conv_v = torch.cat([crpe_conv(p, w, b) for p, w, b in zip(v_parts, crpe_weights, crpe_biases)], dim=1)
    conv_v = conv_v.permute(0, 2, 3, 1).reshape(B, N, num_heads, Ch).transpose(1, 2)
    out = factor + q * conv_v
    return out.transpose(1, 2).reshape(B, N, C)


def residual_layernorm(x: torch.Tensor, y: torch.Tensor, bias: torch.Tensor, next_bias: torch.Tensor,
                       weight: torch.Tensor, ln_bias: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s + next_bias, layer_norm(s))`` with ``s = x + y + bias`` over the last dim, computed in
    fp32 (fp64 for fp64), returned in x's dtype: a block's residual add after attention and its
    norm2, with fc2's bias added to the residual ahead of the MLP's last GEMM."""
    acc = _acc_dtype(x.dtype)
    s = x.to(acc) + y.to(acc) + bias.to(acc)
    u = F.layer_norm(s, weight.shape, weight.to(acc), ln_bias.to(acc), eps)
    return (s + next_bias.to(acc)).to(x.dtype), u.to(x.dtype)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           ln_weight: torch.Tensor | None = None, ln_bias: torch.Tensor | None = None, eps: float = 1e-5,
           gelu: bool = False, gemm=F.linear) -> torch.Tensor:
    """``act(layer_norm(x) @ weight^T + bias)`` over the last dim (the LayerNorm where ``ln_weight``
    is given, GELU where ``gelu``), in weight's dtype: the LayerNorm computed in fp32 (fp64 for
    fp64) and rounded to it, as eager's norm1 -> qkv and fc1 -> GELU run. ``gemm(x, weight,
    bias)``: the GEMM that computes it (F.linear's by default)."""
    acc = _acc_dtype(weight.dtype)
    if ln_weight is not None:
        x = F.layer_norm(x.to(acc), ln_weight.shape, ln_weight.to(acc), ln_bias.to(acc), eps)
    y = gemm(x.to(weight.dtype), weight, None if bias is None else bias.to(weight.dtype))
    return F.gelu(y) if gelu else y


def linear_mlp(x: torch.Tensor, r: torch.Tensor, fc1_weight: torch.Tensor, fc1_bias: torch.Tensor | None,
               fc2_weight: torch.Tensor) -> torch.Tensor:
    """``r + gelu(x @ fc1_weight^T + fc1_bias) @ fc2_weight^T``, as eager's MLP and residual add run
    it: the GEMMs in the weights' dtype, fc2's output added to r with type promotion."""
    return r + F.linear(F.gelu(F.linear(x, fc1_weight, fc1_bias)), fc2_weight)


def linear_proj_mlp(a: torch.Tensor, x: torch.Tensor, proj_weight: torch.Tensor, proj_bias: torch.Tensor,
                    norm_weight: torch.Tensor, norm_bias: torch.Tensor, eps: float, fc1_weight: torch.Tensor,
                    fc1_bias: torch.Tensor, fc2_weight: torch.Tensor, fc2_bias: torch.Tensor) -> torch.Tensor:
    """An MPViT block after its attention, as our unfused ops run it: proj's GEMM (no bias) in
    its weight's dtype; then :func:`residual_layernorm` (s = x + y + proj_bias, r = s + fc2_bias,
    u = norm2(s)) in the dtype of x + y; then the MLP onto r: fc1 -> GELU (:func:`linear`) and
    fc2 accumulating onto r where they share a dtype (one rounding, as ``addmm``), else fc2's
    output added to r (autocast over a wider stream)."""
    y = F.linear(a.to(proj_weight.dtype), proj_weight)
    dtype = torch.promote_types(x.dtype, y.dtype)
    r, u = residual_layernorm(x.to(dtype), y.to(dtype), proj_bias, fc2_bias, norm_weight, norm_bias, eps)
    h = linear(u, fc1_weight, fc1_bias, gelu=True)
    if h.dtype == r.dtype:
        return torch.addmm(r.reshape(-1, r.shape[-1]), h.reshape(-1, h.shape[-1]), fc2_weight.t()).view(r.shape)
    return r + F.linear(h, fc2_weight)
