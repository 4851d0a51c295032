"""affine_hswish: y = x * scale[c] + shift[c], then Hardswish (optional).

An eval BatchNorm folded to (scale, shift) plus its activation, after the stem convs and the
ResBlock convs. The kernels are ``mpvit_kernels::affine_hswish`` (csrc/cpu, csrc/cuda); this
file gives them a fake for torch.compile and autograd (grads for x, scale and shift, so a
frozen-statistics BatchNorm still trains its affine parameters).

It also holds the training BatchNorm (batch statistics) + Hardswish that the fused GEMM ops
(``dwconv_bn``, ``gli_projection``) run after their GEMM, whose epilogue wrote per-tile
statistics: :func:`batch_stats` combines them (called inside those ops), ``affine_hswish``
normalises, and ``mpvit_kernels::affine_hswish_batch_backward`` (:func:`batch_norm_backward`, an
op because their backward graphs call it) is the backward (mpvit_kernels/triton/affine_hswish.py).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mpvit_kernels import backend, reference

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_strided(where: str, name: str, t: torch.Tensor, index: int | None = None) -> None:
    """A dense (strided) tensor, else a TypeError naming it (``name[index]`` for an item of a list,
    formatted on the error alone: this runs per tensor per call): sparse, mkldnn and nested tensors
    have no strides for the kernels to read (and failed deep inside ATen or the dispatcher)."""
    if t.layout != torch.strided or t.is_nested:
        raise TypeError(f"{where}: {name if index is None else f'{name}[{index}]'} must be a dense (strided) tensor, "
                        f"got {'a nested tensor' if t.is_nested else t.layout}")


def check_float_tensors(where: str, **named) -> None:
    """Each of ``named`` a dense Tensor of a floating dtype the kernels take, else a TypeError
    naming it."""
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{where}: {name} must be a Tensor, got {type(t).__name__}")
        check_strided(where, name, t)
        if t.dtype not in _FLOATS:
            raise TypeError(f"{where}: {name} must be float16/bfloat16/float32/float64, got {t.dtype}")


def _check(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> None:
    check_float_tensors("affine_hswish", x=x, scale=scale, shift=shift)
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
        return backend.call_op(torch.ops.mpvit_kernels.affine_hswish.default, x, scale, shift, bool(hswish))
    return reference.affine_hswish(x, scale, shift, hswish)


# The CPU's eval path of a conv (or 1x1 GEMM) followed by a folded BatchNorm: the scale goes into
# the conv's weight and the shift becomes its bias, so the conv writes the only fresh map and the
# activation (and a residual) run in place on it: one pass and one allocation fewer than conv then
# affine_hswish, which on a CPU also means one map's page faults fewer. fp32/fp64 only: folding
# into a bf16/fp16 weight would round the scale, which the fused kernels keep in fp32.
def folds_into_conv(op: str, x: torch.Tensor) -> bool:
    """Whether op family ``op`` folds an eval BatchNorm into the conv before it for ``x``: CPU
    tensors computed in fp32/fp64 (outside autocast), except under the ``reference`` backend."""
    return (x.device.type == "cpu" and backend.autocast_dtype(x) in (torch.float32, torch.float64)
            and backend.get_backend(op) != "reference")


# Rows from which oneDNN's 1x1 conv beats MKL's GEMM on the same NHWC data (2-core x86, MPViT-T's
# shapes: 10-25% faster at 6272 and 25088 rows, forward and backward; 5-25% slower at 392 and 1568).
_CONV_ROWS = 4096


def conv_runs_1x1(x: torch.Tensor, rows: int) -> bool:
    """Whether a 1x1 conv of x over ``rows`` pixels runs as oneDNN's conv rather than as a GEMM
    over its NHWC rows: fp32 CPU tensors from _CONV_ROWS rows (oneDNN has no fp64 path of its own)."""
    # a symbolic row count (a dynamic batch) takes the GEMM: no guard on its size
    return x.device.type == "cpu" and x.dtype == torch.float32 and not isinstance(rows, torch.SymInt) \
        and rows >= _CONV_ROWS


def conv_folded_bn(xs, weight: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, hswish: bool,
                   residual: torch.Tensor | None = None, stride: int = 1, padding: int = 0) -> torch.Tensor:
    """``act(conv2d(x, weight) * scale + shift) [+ residual]`` (:func:`folds_into_conv`) as one conv
    whose weight and bias hold the eval BatchNorm, then the activation in place. ``xs`` the map x
    (B, Cin, H, W) in fp32/fp64, or a list of channels-last maps whose channel concat is x for a
    1x1 stride-1 conv: each is then its own GEMM over its rows, accumulating onto the output, so
    the concat is never built (MPViT-T's stage-1 GLI on a CPU: 7.1 -> 6.1 ms). weight (Cout, Cin,
    k, k). A 1x1 stride-1 conv of one channels-last map runs as a GEMM over its rows too where
    :func:`conv_runs_1x1` says so. Returns a channels-last map whenever x is one. Autograd flows to
    every tensor argument, out of place where it needs to."""
    xs = [xs] if isinstance(xs, torch.Tensor) else list(xs)
    x = xs[0]
    acc = reference._acc_dtype(x.dtype)  # scale read in it, as affine_hswish reads it, whatever its dtype
    w = (weight.to(acc) * scale.to(acc).view(-1, *[1] * (weight.dim() - 1))).to(x.dtype)
    b = shift.to(x.dtype)
    B, C, H, W = x.shape
    if len(xs) > 1 or (weight.shape[2:] == (1, 1) and stride == 1 and padding == 0 and x.stride(1) == 1
                       and not conv_runs_1x1(x, B * H * W)):
        w = w.view(w.shape[0], -1)
        y = None
        for i, xi in enumerate(xs):
            rows = xi.permute(0, 2, 3, 1).reshape(B * H * W, C)  # a view of a channels-last map
            part = w[:, i * C:(i + 1) * C].t()
            y = torch.addmm(b, rows, part) if y is None else y.addmm_(rows, part)
        y = y.view(B, H, W, w.shape[0]).permute(0, 3, 1, 2)  # not -1: B may be 0
    else:
        y = F.conv2d(x, w, b, stride, padding)
    in_place = not (torch.is_grad_enabled() and y.requires_grad)
    if hswish:
        y = F.hardswish(y, inplace=in_place)
    if residual is not None:
        y = y.add_(residual) if in_place and residual.dtype == y.dtype else y + residual
    return y


def check_channel_params(where: str, C: int, device: torch.device, **named) -> None:
    """Per-output-channel parameters of the fused GEMM ops (scale/shift, BatchNorm weight/bias):
    floating point tensors of shape (C,) on the inputs' device."""
    for name, t in named.items():
        if not isinstance(t, torch.Tensor) or t.dtype not in _FLOATS:
            raise TypeError(f"{where}: {name} must be a floating point Tensor")
        check_strided(where, name, t)
        if tuple(t.shape) != (C,):
            raise ValueError(f"{where}: {name} must have shape ({C},), got {tuple(t.shape)}")
        if t.device != device:
            raise ValueError(f"{where}: {name} is on {t.device} but the input is on {device}")


INT32_MAX = 2 ** 31 - 1


def check_rows(where: str, rows: int) -> None:
    """The Triton GEMMs and BatchNorm kernels number their rows (pixels of the whole batch) with
    32-bit ints; the addresses they form from them are 64-bit."""
    if rows > INT32_MAX:
        raise ValueError(f"{where}: {rows} rows (batch x pixels) in one call; at most 2^31 - 1 are supported")


def check_item_span(where: str, name: str, t: torch.Tensor) -> None:
    """Kernels that address within one batch item of ``t`` (every dim but 0, by its strides) with
    32-bit ints, the batch offset with 64-bit ones: any batch size works, one item must span
    fewer than 2^31 elements."""
    span = 1 + sum((n - 1) * abs(s) for n, s in zip(t.shape[1:], t.stride()[1:]))
    if t.numel() > 0 and span > INT32_MAX:
        raise ValueError(f"{where}: one batch item of {name} spans {span} elements (shape {tuple(t.shape)}, "
                         f"strides {t.stride()}); at most 2^31 - 1 are supported")


def check_layernorm_eps(where: str, eps) -> None:
    """A LayerNorm's eps: a finite number > 0."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0 or eps == float("inf"):
        raise ValueError(f"{where}: eps must be a finite number > 0, got {eps!r}")


def check_eps(where: str, eps) -> None:
    """A training BatchNorm's eps: a finite number >= 0."""
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"{where}: eps must be a finite number >= 0, got {eps!r}")


def batch_norm_in_kernels(z: torch.Tensor) -> bool:
    """Whether :func:`batch_norm_hswish` of ``z`` runs its Triton statistics pass
    (``mpvit_kernels::affine_hswish_batch``): a non-empty channels-last (B, C, H, W) map on the
    Triton kernels (CUDA, or the interpreter), the family's backend not ``cuda`` (the extension's
    kernels alone). Elsewhere, and for an NCHW map (which the kernels would copy), ATen's
    BatchNorm."""
    return z.dim() == 4 and z.numel() > 0 and z.is_contiguous(memory_format=torch.channels_last) and \
        backend.get_backend("affine_hswish") != "cuda" and backend.use_triton("affine_hswish", z.device)


def batch_norm_hswish(z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, hswish: bool):
    """``act(batch_norm(z))`` with z's batch statistics over every dim but 1 (autograd as usual).
    Returns (y, mean, biased var), the statistics in the accumulation type, without grad.

    Where :func:`batch_norm_in_kernels`, one op, ``mpvit_kernels::affine_hswish_batch``: a
    statistics pass over z, then one ``affine_hswish`` pass, and in the backward the two passes of
    ``affine_hswish_batch_backward``; against ATen's BatchNorm and Hardswish, the Hardswish's own
    read and write of the map go, forward and backward, and autograd keeps z alone, not also the
    BatchNorm's output.

    Elsewhere aten's native_batch_norm, eager BatchNorm2d's own kernel: on a CPU its statistics
    pass and backward are 5x faster than ``var_mean`` + ``affine_hswish`` and their autograd
    (MPViT-T stage 1, channels-last). Its variance comes back as 1/sqrt(var + eps), inverted here
    (relative error ~1e-7 * (var + eps) / var, as good as its fp32 sums)."""
    if batch_norm_in_kernels(z):
        return backend.call_op(_batch, z, weight, bias, float(eps), bool(hswish))
    acc = reference._acc_dtype(z.dtype)
    weight, bias = weight.to(acc), bias.to(acc)
    if z.numel() == 0:  # an empty batch has no statistics: placeholders the caller does not keep
        mean, var = z.new_zeros(z.shape[1], dtype=acc), z.new_ones(z.shape[1], dtype=acc)
        scale = weight * torch.rsqrt(var + eps)
        return affine_hswish(z, scale, bias - mean * scale, hswish), mean, var
    y, mean, invstd = torch.ops.aten.native_batch_norm(z, weight, bias, None, None, True, 0.0, eps)
    var = (invstd.detach().to(acc).pow(-2) - eps).clamp_min(0)
    return (F.hardswish(y) if hswish else y), mean.detach().to(acc), var


def channel_rows(t: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) as (B*H*W, C) rows, what the BatchNorm kernels index: a view of a channels-last
    map (a copy of any other)."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


@torch.library.custom_op("mpvit_kernels::affine_hswish_batch", mutates_args=())
def _batch(z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
           hswish: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``act(batch_norm(z))`` with the batch's statistics: z (B, C, H, W), read channels-last
    (copied so where it is not); BatchNorm ``weight``, ``bias`` (C,). Returns (y channels-last in
    z's dtype, mean, biased var (C,) in the accumulation type). A statistics pass writes each
    program's (mean, M2) over its rows, the GEMMs' ``stats_kernel`` combines them, and
    ``affine_hswish`` normalises."""
    from mpvit_kernels.triton import affine_hswish as kernels
    from mpvit_kernels.triton.launch import vector_width

    check_float_tensors("affine_hswish_batch", z=z)
    if z.dim() != 4:
        raise ValueError(f"affine_hswish_batch: z must be (B, C, H, W), got shape {tuple(z.shape)}")
    C = z.shape[1]
    M = z.numel() // max(C, 1)
    check_channel_params("affine_hswish_batch", C, z.device, weight=weight, bias=bias)
    check_eps("affine_hswish_batch", eps)
    check_rows("affine_hswish_batch", M)
    acc = reference._acc_dtype(z.dtype)
    z = z.contiguous(memory_format=torch.channels_last)
    if M == 0 or C == 0:  # no statistics (as batch_norm_hswish's placeholders)
        mean, var = z.new_zeros(C, dtype=acc), z.new_ones(C, dtype=acc)
        return torch.empty_like(z), mean, var
    block_m, tiles = kernels.stats_tile()
    rows = block_m * tiles
    P, BC = -(-M // rows), kernels.block_c(C)
    tile_mean, tile_m2 = (torch.empty(P, C, dtype=acc, device=z.device) for _ in range(2))
    with backend.triton_device(z):
        kernels.tile_stats_kernel[(P, -(-C // BC))](
            z, tile_mean, tile_m2, M, C, ACC=kernels.tl.float64 if acc == torch.float64 else kernels.tl.float32,
            BLOCK_M=block_m, BLOCK_C=BC, TILES=tiles, VEC=vector_width(z.element_size(), C))
    mean, var, scale, shift = batch_stats(tile_mean, tile_m2, rows, M, weight, bias, eps)
    return affine_hswish(z, scale, shift, hswish), mean, var


@_batch.register_fake
def _(z, weight, bias, eps, hswish):
    acc = torch.float64 if z.dtype == torch.float64 else torch.float32
    return (torch.empty_like(z, memory_format=torch.channels_last), z.new_empty(z.shape[1], dtype=acc),
            z.new_empty(z.shape[1], dtype=acc))


def _batch_setup_context(ctx, inputs, output):
    z, weight, bias, eps, hswish = inputs
    _, mean, var = output
    ctx.mark_non_differentiable(mean, var)
    ctx.set_materialize_grads(False)  # no zero-filled grads for mean and var (a launch each)
    ctx.save_for_backward(z, weight, bias, mean, var)
    ctx.args = (eps, hswish)


def _batch_grad(ctx, grad, *_):
    if grad is None:  # an undefined grad (grads are not materialised): zero, so none for the inputs
        return (None,) * 5
    z, weight, bias, mean, var = ctx.saved_tensors
    eps, hswish = ctx.args
    B, C, H, W = z.shape
    g, grad_weight, grad_bias = batch_norm_backward(channel_rows(grad), channel_rows(z), weight, bias, mean, var,
                                                    eps, hswish)
    return (g.view(B, H, W, C).permute(0, 3, 1, 2), backend.cast(grad_weight, weight.dtype),
            backend.cast(grad_bias, bias.dtype), None, None)


backend.register_autograd(_batch, _batch_grad, setup_context=_batch_setup_context)


def affine_hswish_grad(grad: torch.Tensor, z: torch.Tensor, scale: torch.Tensor | None, shift: torch.Tensor | None,
                       hswish: bool):
    """Backward of ``act(z * scale + shift)`` (or of ``act(z)`` without scale/shift) for the fused
    GEMM ops' eval epilogue, inside their backward: (grad_z in z's dtype, grad_scale, grad_shift,
    None without scale). z (M, C) rows, grad likewise in z's dtype. With the extension: its one
    reduction pass (``affine_hswish_backward``)."""
    if scale is not None and backend.extension_runs_on(z.device):
        return backend.call_op(torch.ops.mpvit_kernels.affine_hswish_backward.default, grad, z, scale, shift, hswish)
    u = z.to(scale.dtype) * scale + shift if scale is not None else z
    g = torch.ops.aten.hardswish_backward(grad.to(u.dtype), u) if hswish else grad.to(u.dtype)
    if scale is None:
        return g.to(z.dtype), None, None
    return (g * scale).to(z.dtype), (g * z.to(scale.dtype)).sum(0), g.sum(0)


def batch_stats(tile_mean: torch.Tensor, tile_m2: torch.Tensor, rows_per_tile: int, M: int,
                gamma: torch.Tensor, beta: torch.Tensor, eps: float):
    """Batch (mean, biased var) per channel from the row tiles' (mean, M2), each (P, C) with tile
    p over rows p*rows_per_tile.. of M, and the normalise pass's (scale, shift) for BatchNorm
    weight ``gamma`` and bias ``beta``; all (C,) in tile_mean's dtype (the accumulation type).
    One launch (``stats_kernel``), with a first one per level over more than COMBINE_CHUNK tiles
    (``stats_chunks_kernel``: a program per COMBINE_CHUNK of them)."""
    from mpvit_kernels.triton import affine_hswish as kernels

    P, C = tile_mean.shape
    acc = tile_mean.dtype
    ACC = kernels.tl.float64 if acc == torch.float64 else kernels.tl.float32
    mean, var, scale, shift = (torch.empty(C, dtype=acc, device=tile_mean.device) for _ in range(4))
    BC = kernels.block_c(C)
    with backend.triton_device(tile_mean):
        while chunks := kernels.combine_chunks(P):  # many tiles: merged COMBINE_CHUNK at a time first
            chunk_mean, chunk_m2 = (torch.empty(chunks, C, dtype=acc, device=tile_mean.device) for _ in range(2))
            kernels.stats_chunks_kernel[(chunks, -(-C // BC))](
                tile_mean, tile_m2, chunk_mean, chunk_m2, P, M, C, rows_per_tile, kernels.COMBINE_CHUNK, ACC=ACC,
                BLOCK_P=kernels.COMBINE_ROWS, BLOCK_C=BC)
            tile_mean, tile_m2, P, rows_per_tile = chunk_mean, chunk_m2, chunks, rows_per_tile * kernels.COMBINE_CHUNK
        kernels.stats_kernel[(-(-C // BC),)](
            tile_mean, tile_m2, gamma.to(acc).contiguous(), beta.to(acc).contiguous(), mean, var, scale, shift,
            P, M, C, rows_per_tile, float(eps), ACC=ACC, BLOCK_P=kernels.COMBINE_ROWS, BLOCK_C=BC)
    return mean, var, scale, shift



def batch_norm_backward(grad: torch.Tensor, z: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
                        mean: torch.Tensor, var: torch.Tensor, eps: float, hswish: bool):
    """See ``mpvit_kernels::affine_hswish_batch_backward``."""
    return backend.call_op(_batch_backward, grad, z, gamma, beta, mean, var, float(eps), bool(hswish))


@torch.library.custom_op("mpvit_kernels::affine_hswish_batch_backward", mutates_args=())
def _batch_backward(grad: torch.Tensor, z: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, mean: torch.Tensor,
                    var: torch.Tensor, eps: float, hswish: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of ``y = act(batch_norm(z))`` with the batch's statistics (mean, biased var, in
    the accumulation type): grad and z (M, C) row-major in z's dtype. Returns (grad_z in z's
    dtype, grad_gamma, grad_beta in the accumulation type). Two passes over (grad, z): the
    per-channel sums (per row block, then added up in one small launch, a level more per
    COMBINE_CHUNK factor of row blocks), then the elementwise grad_z."""
    from mpvit_kernels.triton import affine_hswish as kernels
    from mpvit_kernels.triton.launch import vector_width

    M, C = z.shape
    acc = mean.dtype
    ACC = kernels.tl.float64 if acc == torch.float64 else kernels.tl.float32
    cast = backend.cast
    gamma, beta = cast(gamma, acc).contiguous(), cast(beta, acc).contiguous()
    mean, var = mean.contiguous(), cast(var, acc).contiguous()
    grad, z = cast(grad, z.dtype).contiguous(), z.contiguous()  # the kernels index (M, C) row-major
    rows, tiles = kernels.grad_tile()
    P = -(-M // (rows * tiles))
    BC = kernels.block_c(C)
    sums, sums_dev = (torch.empty(P, C, dtype=acc, device=z.device) for _ in range(2))
    grad_z = torch.empty((M, C), dtype=z.dtype, device=z.device)
    if M == 0 or C == 0:
        return grad_z, torch.zeros_like(mean), torch.zeros_like(mean)
    grad_beta, sum_dev, grad_gamma = (torch.empty(C, dtype=acc, device=z.device) for _ in range(3))
    vec = vector_width(z.element_size(), C)
    with backend.triton_device(z):
        kernels.grad_sums_kernel[(P, -(-C // BC))](
            grad, z, gamma, beta, mean, var, sums, sums_dev, M, C, float(eps), HSWISH=hswish, ACC=ACC,
            BLOCK_M=rows, BLOCK_C=BC, TILES=tiles, VEC=vec)
        while chunks := kernels.combine_chunks(P):  # many row blocks: added up COMBINE_CHUNK at a time first
            chunk_sums, chunk_sums_dev = (torch.empty(chunks, C, dtype=acc, device=z.device) for _ in range(2))
            kernels.sums_chunks_kernel[(chunks, -(-C // BC))](
                sums, sums_dev, chunk_sums, chunk_sums_dev, P, C, kernels.COMBINE_CHUNK, ACC=ACC,
                BLOCK_P=kernels.COMBINE_ROWS, BLOCK_C=BC)
            sums, sums_dev, P = chunk_sums, chunk_sums_dev, chunks
        kernels.grad_totals_kernel[(-(-C // BC),)](
            sums, sums_dev, var, grad_beta, sum_dev, grad_gamma, P, C, float(eps), ACC=ACC,
            BLOCK_P=kernels.COMBINE_ROWS, BLOCK_C=BC)
        kernels.grad_kernel[(-(-M // rows), -(-C // BC))](
            grad, z, gamma, beta, mean, var, grad_beta, sum_dev, grad_z, M, C, float(eps), HSWISH=hswish, ACC=ACC,
            BLOCK_M=rows, BLOCK_C=BC, VEC=vec)
    return grad_z, grad_gamma, grad_beta


@_batch_backward.register_fake
def _(grad, z, gamma, beta, mean, var, eps, hswish):
    return torch.empty_like(z, memory_format=torch.contiguous_format), torch.empty_like(mean), torch.empty_like(mean)


backend.refuse_double_backward("mpvit_kernels::affine_hswish_batch_backward")


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
        grad_x, grad_scale, grad_shift = backend.call_op(torch.ops.mpvit_kernels.affine_hswish_backward.default,
                                                         grad, x, scale, shift, ctx.hswish)
        return grad_x, grad_scale, grad_shift, None

    backend.register_autograd("mpvit_kernels::affine_hswish", backward, setup_context=setup_context)
    backend.refuse_double_backward("mpvit_kernels::affine_hswish_backward")


if backend.extension_available():
    _register()
