"""Drop-in modules. Parameter names follow the public MPViT checkpoints, so a public
state_dict loads into them strictly. Each forward goes through :mod:`mpvit_kernels.ops` (the
backend switch picks kernels or the reference) where a fused op exists.
"""
from __future__ import annotations

import functools
from typing import Mapping, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from mpvit_kernels import backend, ops, reference
from mpvit_kernels.ops.affine_hswish import (batch_norm_hswish, batch_norm_in_kernels, check_strided, conv_folded_bn,
                                             folds_into_conv)
from mpvit_kernels.ops.gli_projection import MAX_INPUTS as GLI_MAX_INPUTS

DEFAULT_CRPE_WINDOW = {3: 2, 5: 3, 7: 3}  # kernel size: number of heads, in head order


def folded_bn(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """An eval BatchNorm as (scale, shift) with ``bn(x) == x * scale + shift``, in fp32 (fp64 for
    an fp64 BatchNorm), computed once and reused while its weight, bias and running statistics
    are the same tensors at the same version (backend.cached_by_version: an optimiser step or a
    load_state_dict recomputes it). Not cached where the fold is part of an autograd graph (the
    affine parameters train, as in frozen-BN fine-tuning: each forward needs its own graph), nor
    inside torch.compile (which fuses the fold into its graph), a CUDA graph capture or for
    inference tensors (backend.cached_by_version)."""
    # each read once: a module attribute costs a __getattr__, and this runs per BatchNorm per forward
    weight, bias, mean, var, eps = bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps
    # a training forward of nn.BatchNorm2d updates the running statistics inside ATen's kernel,
    # which bumps no version; it bumps this counter's (add_), so the fold follows
    tracked = getattr(bn, "num_batches_tracked", None)  # (look-alikes such as FrozenBatchNorm2d have none)

    def fold():  # in the accumulation type: a bf16 model's fold stays exact to fp32, as the ops read it
        acc = reference._acc_dtype(var.dtype)
        C = mean.shape[0]
        return reference.fold_bn(mean.new_ones(C, dtype=acc) if weight is None else weight.to(acc),
                                 mean.new_zeros(C, dtype=acc) if bias is None else bias.to(acc),
                                 mean.to(acc), var.to(acc), eps)

    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and (
            (weight is not None and weight.requires_grad) or (bias is not None and bias.requires_grad))):
        return fold()
    with torch.no_grad():
        return backend.cached_by_version((weight, bias, mean, var, tracked), eps, fold)


def check_input(where: str, x, layout: str, channel_dim: int, channels: int, param: torch.Tensor,
                name: str = "x") -> None:
    """A module's input before any kernel runs: a dense floating Tensor of ``layout`` ("(B, C, H, W)"
    or "(B, N, C)", its dims counted from it) with ``channels`` in ``channel_dim``, on ``param``'s
    device and, outside autocast, in its dtype (as nn.Linear and nn.Conv2d require; under
    autocast the ops cast as autocast does)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{where}: {name} must be a Tensor, got {type(x).__name__}")
    check_strided(where, name, x)
    if x.dim() != layout.count(",") + 1 or x.shape[channel_dim] != channels:
        raise ValueError(f"{where}: {name} must be {layout.replace('C', str(channels))}, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{where}: {name} must be floating point, got {x.dtype}")
    if x.device != param.device:
        raise ValueError(f"{where}: {name} is on {x.device} but the module's parameters are on {param.device}")
    if x.dtype != param.dtype and not (x.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(x.device.type)):
        raise TypeError(f"{where}: {name} is {x.dtype} but the module's parameters are {param.dtype}; cast one to the "
                        "other, or run under torch.autocast")


def _check_sizes(where: str, kernel_sizes=None, strides=None, **sizes) -> None:
    """A module's constructor sizes: positive ints, kernel size and stride (where given) among
    those its kernels take (any, if None)."""
    for name, v in sizes.items():
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ValueError(f"{where}: {name} must be a positive int, got {v!r}")
    for name, allowed in (("kernel_size", kernel_sizes), ("stride", strides)):
        if allowed is not None and sizes[name] not in allowed:
            raise ValueError(f"{where}: {name} must be one of {allowed}, got {sizes[name]}")


def check_size(where: str, size, N: int) -> tuple[int, int]:
    """``size`` = (H, W) of a token tensor with N tokens."""
    if torch.jit.is_tracing() and isinstance(size, (tuple, list)):
        # torch.jit.trace gives sizes as 0-dim tensors; the trace keeps them as constants, as it
        # does every Python int (a traced model runs at the traced input size)
        size = tuple(int(s) if isinstance(s, torch.Tensor) and s.dim() == 0 and not s.is_floating_point() else s
                     for s in size)
    if (not isinstance(size, (tuple, list, torch.Size)) or len(size) != 2
            or not all(isinstance(s, (int, torch.SymInt)) and not isinstance(s, bool) and s > 0 for s in size)):
        raise ValueError(f"{where}: size must be (H, W), two positive ints, got {size!r}")
    if size[0] * size[1] != N:
        raise ValueError(f"{where}: x has N={N} tokens but size={tuple(size)} gives {size[0] * size[1]}")
    return size[0], size[1]


def sync_group(bn: nn.BatchNorm2d):
    """The process group a training synchronised BatchNorm (ours, or nn.SyncBatchNorm) takes its
    statistics over, or None where there is nothing to synchronise."""
    if not (isinstance(bn, (SyncBatchNorm2d, nn.SyncBatchNorm)) and bn.training and dist.is_available()
            and dist.is_initialized()):
        return None
    group = bn.process_group or dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


class _AllReduceSum(torch.autograd.Function):
    """Sum over the processes of ``group``; each process's output depends on every input, so the
    grad of an input is the sum of the output grads."""

    @staticmethod
    def forward(ctx, group, t):
        ctx.group = group
        t = t.clone()
        dist.all_reduce(t, group=group)
        return t

    @staticmethod
    def backward(ctx, grad):
        return None, _AllReduceSum.apply(ctx.group, grad)


class SyncBatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d whose training statistics cover the batch of every process in
    ``process_group`` (default: the whole world), on any device, CPU with gloo included, where
    nn.SyncBatchNorm (and DDP around it) takes CUDA modules only. Same parameters, buffers and
    state_dict as nn.BatchNorm2d; :func:`convert_sync_batchnorm` swaps it in.

    The sums go through differentiable all-reduces, so the backward sums their grads across
    processes as SyncBatchNorm's does. Two passes (the mean, then the centred squares) keep a
    large mean from cancelling the variance. Running statistics as nn.BatchNorm2d keeps them
    (over the global batch)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.process_group = process_group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = sync_group(self)
        if group is None:
            return super().forward(x)
        all_reduce = functools.partial(_AllReduceSum.apply, group)
        C, acc = x.shape[1], reference._acc_dtype(x.dtype)
        dims = [d for d in range(x.dim()) if d != 1]
        shape = [1, C] + [1] * (x.dim() - 2)
        # filled on the device and never read back: torch.tensor([n], device=...) copies from the
        # host (a stream sync on a GPU), count.item() waits for the all-reduce; either makes the
        # host wait for the GPU at every BatchNorm of every step
        count = torch.full((1,), x.numel() // max(C, 1), dtype=acc, device=x.device)
        dist.all_reduce(count, group=group)
        xa = x.to(acc)
        mean = all_reduce(xa.sum(dims)) / count
        centred = xa - mean.view(shape)
        var = all_reduce((centred * centred).sum(dims)) / count
        scale = torch.rsqrt(var + self.eps)
        if self.weight is not None:
            scale = scale * self.weight.to(acc)
        y = centred * scale.view(shape)
        if self.bias is not None:
            y = y + self.bias.to(acc).view(shape)
        track_batch_stats(self, mean.detach(), var.detach(), count)
        return y.to(x.dtype)


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """Every nn.BatchNorm2d in ``module`` (in place; a bare BatchNorm2d is returned converted)
    replaced by a :class:`SyncBatchNorm2d` holding the very same Parameters and buffers, as
    nn.SyncBatchNorm.convert_sync_batchnorm does for CUDA; the fused modules then normalise with
    the global batch statistics. For DDP on CPU (gloo), or on any device."""
    if type(module) is nn.BatchNorm2d:
        sync = SyncBatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
                               module.track_running_stats, process_group, device="meta")
        for name in ("weight", "bias"):
            sync._parameters[name] = module._parameters[name]
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            sync._buffers[name] = module._buffers[name]
        sync.training = module.training
        return sync
    for name, child in module.named_children():
        converted = convert_sync_batchnorm(child, process_group)
        if converted is not child:
            setattr(module, name, converted)
    return module


def bn_hswish(x: torch.Tensor, bn: nn.BatchNorm2d, hswish: bool) -> torch.Tensor:
    """BatchNorm then optional Hardswish. With batch statistics (training) one
    ``affine_hswish_batch`` op on the Triton kernels where x is a channels-last map (running
    statistics kept as nn.BatchNorm2d keeps them), else the module as is; in eval it is folded to
    a per-channel affine and runs as one ``affine_hswish`` op."""
    if bn.training or bn.running_mean is None:
        if bn.affine and batch_norm_in_kernels(x) and sync_group(bn) is None:
            if x.numel() == x.shape[1]:
                raise ValueError(f"{type(bn).__name__}: batch statistics need more than 1 value per channel, got "
                                 f"an input of shape {tuple(x.shape)}")
            if not bn.eps > 0:  # (as F.batch_norm refuses it with batch statistics)
                raise ValueError(f"{type(bn).__name__}: eps must be positive with batch statistics, got {bn.eps}")
            y, mean, var = batch_norm_hswish(x, bn.weight, bn.bias, bn.eps, hswish)
            track_batch_stats(bn, mean, var, x.numel() // x.shape[1])
            return y
        x = bn(x)
        return F.hardswish(x) if hswish else x
    scale, shift = folded_bn(bn)
    return ops.affine_hswish(x, scale, shift, hswish)


def depthwise_bn_hswish(x: torch.Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> torch.Tensor:
    """Depthwise ``conv`` -> BatchNorm -> Hardswish. In eval one ``depthwise`` op with the
    BatchNorm folded into its epilogue; in training the conv alone, then BatchNorm with batch
    statistics as usual."""
    if bn.training or bn.running_mean is None:
        return bn_hswish(ops.depthwise(x, conv.weight, conv.bias, conv.stride[0]), bn, True)
    scale, shift = folded_bn(bn)
    return ops.depthwise(x, conv.weight, conv.bias, conv.stride[0], scale, shift, hswish=True)


class Conv2dBN(nn.Module):
    """``Conv2d_BN``: bias-free conv -> BatchNorm2d -> optional Hardswish. A 1x1 stride-1 conv (the
    InvRes projections) runs as one GEMM with the BatchNorm and Hardswish in its epilogue
    (:func:`pointwise_bn_hswish`); a k x k conv (the stem) is cuDNN's, then ``affine_hswish`` in
    eval (on a CPU in fp32/fp64 one conv with the BatchNorm folded into its weight and bias)."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 1, stride: int = 1, hswish: bool = False):
        super().__init__()
        _check_sizes("Conv2dBN", in_ch=in_ch, out_ch=out_ch, kernel_size=kernel_size, stride=stride)
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size, stride, (kernel_size - 1) // 2, bias=False)
        self.bn = nn.BatchNorm2d(out_ch)
        self.hswish = hswish

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``act(bn(conv(x))) [+ residual]``: a residual block's identity (shaped as the output)
        goes into the 1x1 GEMM's epilogue in eval."""
        check_input("Conv2dBN", x, "(B, C, H, W)", 1, self.conv.in_channels, self.conv.weight)
        if self.conv.kernel_size == (1, 1) and self.conv.stride == (1, 1) and x.dim() == 4:
            return pointwise_bn_hswish([x], self.conv.weight, self.bn, self.hswish, residual=residual)
        conv, bn = self.conv, self.bn
        if not bn.training and bn.running_mean is not None and folds_into_conv("affine_hswish", x):
            scale, shift = folded_bn(bn)
            return conv_folded_bn(x, conv.weight, scale, shift, self.hswish, residual, conv.stride[0], conv.padding[0])
        y = bn_hswish(conv(x), bn, self.hswish)
        return y if residual is None else y + residual


def track_batch_stats(bn: nn.BatchNorm2d, mean: torch.Tensor, var: torch.Tensor, count: int | torch.Tensor) -> None:
    """Update ``bn``'s running statistics with a batch's (mean, biased var) over ``count`` values
    per channel, as a training nn.BatchNorm2d does: momentum, or the cumulative average when
    momentum is None; the unbiased variance goes into running_var. ``count`` an int, or a
    one-element tensor on the statistics' device (a synchronised batch's, all-reduced there),
    which is never read back to the host."""
    if not (bn.training and bn.track_running_stats):
        return
    with torch.no_grad():
        bn.num_batches_tracked.add_(1)
        # (the cumulative average's weight in fp64, as nn.BatchNorm2d's Python float, without reading the count back)
        factor = bn.momentum if bn.momentum is not None else 1.0 / bn.num_batches_tracked.double()
        if isinstance(count, torch.Tensor):
            # an empty batch keeps the statistics (its mean and var are NaN): chosen on the device
            count = count.reshape(())
            kept = count == 0
            mean = torch.where(kept, bn.running_mean, mean.to(bn.running_mean.dtype))
            var = torch.where(kept, bn.running_var, (var * (count / (count - 1).clamp_min(1))).to(bn.running_var.dtype))
            bn.running_mean.lerp_(mean, factor)
            bn.running_var.lerp_(var, factor)
            return
        if count == 0:  # an empty batch: counted, the statistics kept (as nn.BatchNorm2d does)
            return
        # (1 - f) * running + f * batch as one lerp_ a statistic (mul_, mul, add_ before; the
        # variance is scaled to unbiased first)
        bn.running_mean.lerp_(mean.to(bn.running_mean.dtype), factor)
        bn.running_var.lerp_((var * (count / max(count - 1, 1))).to(bn.running_var.dtype), factor)


class DWConv2dBN(nn.Module):
    """``DWConv2d_BN``: depthwise k x k (stride s) -> 1x1 conv -> BatchNorm2d -> Hardswish, through
    ``ops.dwconv_bn``: in eval one fused op with the BatchNorm folded in; in training
    ``ops.dwconv_bn_train`` (the fused conv writing batch statistics, then one normalise +
    Hardswish pass; running statistics as nn.BatchNorm2d keeps them). Output channels-last."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 3, stride: int = 1):
        super().__init__()
        _check_sizes("DWConv2dBN", (3, 5, 7), (1, 2), in_ch=in_ch, out_ch=out_ch, kernel_size=kernel_size,
                    stride=stride)
        self.dwconv = nn.Conv2d(in_ch, in_ch, kernel_size, stride, (kernel_size - 1) // 2, groups=in_ch, bias=False)
        self.pwconv = nn.Conv2d(in_ch, out_ch, 1, bias=False)
        self.bn = nn.BatchNorm2d(out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input("DWConv2dBN", x, "(B, C, H, W)", 1, self.dwconv.in_channels, self.dwconv.weight)
        dw, pw, stride, bn = self.dwconv.weight, self.pwconv.weight, self.dwconv.stride[0], self.bn
        if bn.training or bn.running_mean is None:
            if not bn.affine or sync_group(bn) is not None:  # the conv fused, the BatchNorm as is
                return bn_hswish(ops.dwconv_bn(x, dw, pw, stride), bn, True)
            y, mean, var = ops.dwconv_bn_train(x, dw, pw, stride, bn.weight, bn.bias, bn.eps, hswish=True)
            track_batch_stats(bn, mean, var, y.numel() // max(y.shape[1], 1))
            return y
        scale, shift = folded_bn(bn)
        return ops.dwconv_bn(x, dw, pw, stride, scale, shift, hswish=True)


class GLIProjection(nn.Module):
    """MPViT's global-to-local interaction (the stage's ``aggregate`` Conv2d_BN): channel concat of
    ``num_inputs`` maps of ``in_channels`` -> 1x1 conv -> BatchNorm2d -> Hardswish, through
    ``ops.gli_projection`` (eval: one fused GEMM with the BatchNorm folded in) and
    ``ops.gli_projection_train`` (training: the GEMM writing batch statistics, then one normalise +
    Hardswish pass; running statistics as nn.BatchNorm2d keeps them). The concat is never built.

    ``forward(inputs, size=None)``: a list of ``num_inputs`` maps (B, in_channels, H, W) in any
    memory format, or tokens (B, N, in_channels) with ``size=(H, W)``; returns
    (B, out_channels, H, W) channels-last. Submodules ``conv`` and ``bn`` as the public
    checkpoints name them."""

    def __init__(self, in_channels: int, out_channels: int, num_inputs: int):
        super().__init__()
        if not 1 <= num_inputs <= GLI_MAX_INPUTS:
            raise ValueError(f"num_inputs must be in 1..{GLI_MAX_INPUTS}, got {num_inputs}")
        _check_sizes("GLIProjection", in_channels=in_channels, out_channels=out_channels)
        self.num_inputs = num_inputs
        self.conv = nn.Conv2d(in_channels * num_inputs, out_channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, inputs: Sequence[torch.Tensor], size: tuple[int, int] | None = None) -> torch.Tensor:
        if not isinstance(inputs, (list, tuple)) or len(inputs) != self.num_inputs:
            raise ValueError(f"GLIProjection: expected a list of {self.num_inputs} inputs, got "
                             f"{len(inputs) if isinstance(inputs, (list, tuple)) else type(inputs).__name__}")
        C = self.conv.in_channels // self.num_inputs
        for i, t in enumerate(inputs):
            tokens = isinstance(t, torch.Tensor) and t.dim() == 3
            check_input("GLIProjection", t, "(B, N, C)" if tokens else "(B, C, H, W)", 2 if tokens else 1, C,
                        self.conv.weight, name=f"inputs[{i}]")
        return pointwise_bn_hswish(list(inputs), self.conv.weight, self.bn, True, size)


def pointwise_bn_hswish(inputs: list[torch.Tensor], weight: torch.Tensor, bn: nn.BatchNorm2d, hswish: bool,
                        size: tuple[int, int] | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
    """1x1 conv of the channel concat of ``inputs`` -> BatchNorm -> optional Hardswish [+ residual]
    through the ``gli_projection`` GEMM: in eval one op with the BatchNorm folded into its
    epilogue (and the residual added there), in training ``gli_projection_train`` (batch
    statistics in the epilogue, then one normalise pass; running statistics as nn.BatchNorm2d
    keeps them) and the residual added after; a synchronised or non-affine BatchNorm runs as is
    after the GEMM."""
    if bn.training or bn.running_mean is None:
        if not bn.affine or sync_group(bn) is not None:
            y = bn_hswish(ops.gli_projection(inputs, weight, size=size), bn, hswish)
        else:
            y, mean, var = ops.gli_projection_train(inputs, weight, bn.weight, bn.bias, bn.eps, hswish=hswish,
                                                    size=size)
            track_batch_stats(bn, mean, var, y.numel() // max(y.shape[1], 1))
        return y if residual is None else y + residual
    scale, shift = folded_bn(bn)
    return ops.gli_projection(inputs, weight, scale, shift, hswish=hswish, size=size, residual=residual)


class ConvPosEnc(nn.Module):
    """``cpe``: tokens + depthwise 3x3 conv (with bias) of the tokens seen as an image, one
    ``depthwise`` op with its residual epilogue. Tokens (B, N, C) are a channels-last image and
    the op returns one: both changes of view are free."""

    def __init__(self, dim: int, kernel_size: int = 3):
        super().__init__()
        _check_sizes("ConvPosEnc", (3, 5, 7), dim=dim, kernel_size=kernel_size)
        self.proj = nn.Conv2d(dim, dim, kernel_size, 1, kernel_size // 2, groups=dim)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        check_input("ConvPosEnc", x, "(B, N, C)", 2, self.proj.in_channels, self.proj.weight)
        B, N, C = x.shape
        H, W = check_size("ConvPosEnc", size, N)
        img = x.transpose(1, 2).reshape(B, C, H, W)  # a view when x is contiguous tokens
        return ops.depthwise(img, self.proj.weight, self.proj.bias, residual=True).flatten(2).transpose(1, 2)


class ConvRelPosEnc(nn.Module):
    """``crpe``: depthwise convs (with bias) over v, one window size per group of heads."""

    def __init__(self, head_dim: int, num_heads: int, window: Mapping[int, int] | None = None):
        super().__init__()
        window = dict(DEFAULT_CRPE_WINDOW if window is None else window)
        for k, h in window.items():
            if not (isinstance(k, int) and k > 0 and k % 2 == 1):
                raise ValueError(f"crpe_window keys must be odd kernel sizes, got {k!r}")
            if not (isinstance(h, int) and h > 0):
                raise ValueError(f"crpe_window values must be positive head counts, got {h!r} for kernel {k}")
        if sum(window.values()) != num_heads:
            raise ValueError(f"crpe_window {window} covers {sum(window.values())} heads, expected num_heads={num_heads}")
        self.head_dim = head_dim
        self.window = window
        self.conv_list = nn.ModuleList(
            nn.Conv2d(h * head_dim, h * head_dim, k, 1, k // 2, groups=h * head_dim) for k, h in window.items())


class FactorAttention(nn.Module):
    """Factorized attention with convolutional relative position encoding
    (``FactorAtt_ConvRelPosEnc``): ``proj(scale * q softmax_N(k)^T v + q * crpe(v))`` per head.

    The attention core between the two Linears is one fused op (``ops.factor_attention``): the
    Triton kernels on CUDA tensors; on CPU tensors the C++ twin in inference and the eager
    reference (its CRPE convs on the ``depthwise`` twin) where a backward follows; the eager
    reference with kernels off.

    ``forward(x: (B, N, C), size: (H, W), crpe_packed=None) -> (B, N, C)`` with N = H * W
    row-major; ``crpe_packed`` as ``ops.factor_attention`` takes it.
    ``crpe_window`` maps kernel size to head count (default ``{3: 2, 5: 3, 7: 3}``);
    ``shared_crpe`` reuses another module's CRPE, as MPViT's blocks do.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, qk_scale: float | None = None,
                 crpe_window: Mapping[int, int] | None = None, shared_crpe: ConvRelPosEnc | None = None):
        super().__init__()
        _check_sizes("FactorAttention", dim=dim, num_heads=num_heads)
        if dim % num_heads != 0:
            raise ValueError(f"FactorAttention: dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = qk_scale if qk_scale is not None else head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.crpe = shared_crpe if shared_crpe is not None else ConvRelPosEnc(head_dim, num_heads, crpe_window)

    def forward(self, x: torch.Tensor, size: tuple[int, int], crpe_packed: torch.Tensor | None = None) -> torch.Tensor:
        return self.proj(self.attend(x, size, crpe_packed))

    def attend(self, x: torch.Tensor, size: tuple[int, int], crpe_packed: torch.Tensor | None = None) -> torch.Tensor:
        """Everything but ``proj``: the attention output (B, N, C) that ``proj`` would take (MPViT's
        block folds proj's bias and its residual add into ``ops.residual_layernorm``)."""
        check_input("FactorAttention", x, "(B, N, C)", 2, self.qkv.in_features, self.qkv.weight)
        return self.core(self.qkv(x), size, crpe_packed)

    def core(self, qkv: torch.Tensor, size: tuple[int, int], crpe_packed: torch.Tensor | None = None) -> torch.Tensor:
        """The attention between the two Linears, from the qkv Linear's output (B, N, 3C) (MPViT's
        block computes it with norm1 fused in, ``ops.linear``); ``crpe_packed``: the CRPE's
        ``ops.crpe_packing``, made once by the encoder whose layers share it."""
        size = check_size("FactorAttention", size, qkv.shape[1])
        convs = self.crpe.conv_list
        return ops.factor_attention(qkv, size, self.num_heads, self.scale, [c.weight for c in convs],
                                    [c.bias for c in convs], crpe_packed)
