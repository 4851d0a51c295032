"""gli_projection: MPViT's global-to-local interaction, the ``aggregate`` of every stage,

    y = act(conv1x1(cat(inputs, channels), weight) * scale + shift)

with a folded eval BatchNorm (scale, shift) and Hardswish in the epilogue of one Triton GEMM
(mpvit_kernels/triton/gli_projection.py) whose K loop walks the inputs, so the concat is never
built. Inputs are maps (B, C, H, W) in any layout or tokens (B, N, C): a channels-last map or a
token tensor with unit channel stride is read in place, anything else is converted once. On
sm_90 the GEMM can read them through tensor descriptors instead of pointers (:func:`use_tma`,
opt-in with MPVIT_KERNELS_GLI_TMA=1 until a GPU measures it).

Training (:func:`gli_projection_train`, batch statistics) is two passes, as dwconv_bn's: the
GEMM writes the pre-BatchNorm output z and per-tile statistics, a small kernel combines them,
one ``affine_hswish`` pass normalises (ops/affine_hswish.py).

Registered as ``mpvit_kernels::gli_projection`` and ``mpvit_kernels::gli_projection_train``
(custom ops with fakes and autograd). Backward: the BatchNorm + Hardswish grads (eval: over the
1x1 output, recomputed with the fused GEMM; train: the two Triton passes over the saved one),
then the weight's grad as one GEMM per input (g^T x_i, a column block of it) and each input's
grad as its own GEMM, g @ W_i, written straight into that input's tensor: no concatenated grad
to split. Deterministic (cuBLAS GEMMs and fixed-order reductions).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from mpvit_kernels import backend
from mpvit_kernels.ops.affine_hswish import (_FLOATS, affine_hswish, affine_hswish_grad, batch_norm_backward,
                                             batch_norm_hswish, batch_stats, check_channel_params, check_eps,
                                             check_rows, check_strided, conv_folded_bn, conv_runs_1x1, folds_into_conv)

MAX_INPUTS = 5
# Tensor-descriptor (TMA) loads of the inputs, opt-in (see use_tma): MPVIT_KERNELS_GLI_TMA=1 at import.
TMA = os.environ.get("MPVIT_KERNELS_GLI_TMA", "0") not in ("", "0")


def _as_rows(inputs, size, where):
    """Check the inputs; return them as (B, N, C) tensors with unit channel stride (views when
    they are channels-last maps or such tokens), and (B, C, H, W)."""
    if not isinstance(inputs, (list, tuple)) or not inputs:
        raise TypeError(f"{where}: inputs must be a non-empty list of tensors, got {type(inputs).__name__}")
    inputs = [backend.autocast(x) for x in inputs]  # as autocast casts a conv's input (a no-op outside it)
    if len(inputs) > MAX_INPUTS:
        raise ValueError(f"{where}: at most {MAX_INPUTS} inputs, got {len(inputs)}")
    first = inputs[0]
    if not isinstance(first, torch.Tensor):
        raise TypeError(f"{where}: inputs[0] must be a Tensor, got {type(first).__name__}")
    if first.dim() == 4:
        B, C, H, W = first.shape
        if size is not None and tuple(size) != (H, W):
            raise ValueError(f"{where}: size={tuple(size)} but the maps are {H}x{W}")
    elif first.dim() == 3:
        if size is None:
            raise ValueError(f"{where}: token inputs (B, N, C) need size=(H, W)")
        B, N, C = first.shape
        H, W = size
        if H * W != N:
            raise ValueError(f"{where}: inputs have N={N} tokens but size={tuple(size)} gives {H * W}")
    else:
        raise ValueError(f"{where}: inputs must be maps (B, C, H, W) or tokens (B, N, C), got shape "
                         f"{tuple(first.shape)}")
    rows = []
    for i, x in enumerate(inputs):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{where}: inputs[{i}] must be a Tensor, got {type(x).__name__}")
        check_strided(where, "inputs", x, i)
        if x.dtype not in _FLOATS:
            raise TypeError(f"{where}: inputs[{i}] must be float16/bfloat16/float32/float64, got {x.dtype}")
        if x.dtype != first.dtype or x.device != first.device:
            raise ValueError(f"{where}: inputs[{i}] is {x.dtype} on {x.device}, inputs[0] {first.dtype} on {first.device}")
        want = (B, C, H, W) if first.dim() == 4 else (B, H * W, C)
        if tuple(x.shape) != want:
            raise ValueError(f"{where}: inputs[{i}] has shape {tuple(x.shape)}, expected {want} like inputs[0]")
        t = x.permute(0, 2, 3, 1).reshape(B, H * W, C) if x.dim() == 4 else x
        rows.append(t if t.stride(-1) == 1 or C == 1 else t.contiguous())
    check_rows(where, B * H * W)
    return rows, (B, C, H, W)


def _check_weight(weight, n, C, device, where):
    if not isinstance(weight, torch.Tensor) or weight.dtype not in _FLOATS:
        raise TypeError(f"{where}: weight must be a floating point Tensor")
    check_strided(where, "weight", weight)
    if weight.dim() not in (2, 4) or weight.shape[1] != n * C or (weight.dim() == 4 and weight.shape[2:] != (1, 1)):
        raise ValueError(f"{where}: weight must be (out_channels, {n * C}, 1, 1) or (out_channels, {n * C}) for "
                         f"{n} inputs of {C} channels, got {tuple(weight.shape)}")
    if weight.device != device:
        raise ValueError(f"{where}: weight is on {weight.device} but the inputs are on {device}")


def _image(y, B, H, W):
    """(B, N, Cout) rows as the (B, Cout, H, W) channels-last map they are."""
    return y.view(B, H, W, y.shape[-1]).permute(0, 3, 1, 2)


def _unfused_pre_bn(rows, weight, B, H, W):
    x = torch.cat(rows, dim=2) if len(rows) > 1 else rows[0]  # (B, N, n*C): the concat the kernel avoids
    w = weight.reshape(weight.shape[0], -1).to(x.dtype)
    if conv_runs_1x1(x, B * H * W):  # a training step's GLI at MPViT-T's stage 1: 22.2 -> 16.3 ms
        return F.conv2d(_image(x, B, H, W), w[:, :, None, None])
    return _image(x @ w.t(), B, H, W)


def gli_projection(inputs, weight: torch.Tensor, scale: torch.Tensor | None = None,
                   shift: torch.Tensor | None = None, hswish: bool = False, size=None,
                   residual: torch.Tensor | None = None) -> torch.Tensor:
    """``act(conv1x1(cat(inputs)) * scale + shift) [+ residual]``: ``inputs`` a list of 1 to 5 maps
    (B, C, H, W) in any layout, or tokens (B, N, C) with ``size=(H, W)``; weight
    (Cout, n*C, 1, 1) or (Cout, n*C); scale and shift (Cout,) a folded BatchNorm or both None;
    Hardswish if ``hswish``; ``residual`` (a residual block's identity) shaped as the output
    (B, Cout, H, W), or (B, N, Cout) for token inputs, any layout, added after the activation in
    the GEMM's epilogue (where its dtype is the inputs', else as a separate add, which keeps
    eager's type promotion). Returns (B, Cout, H, W) channels-last. fp16/bf16/fp32 accumulate in
    fp32, fp64 in fp64. The inputs share one dtype; under autocast they are cast to the autocast
    dtype (so they may differ in dtype there, as eager's concat allows). weight, scale and shift
    may have any floating dtype: weight is cast to the inputs' dtype (as autocast casts a conv's),
    scale and shift are read in the accumulation type."""
    rows, (B, C, H, W) = _as_rows(inputs, size, "gli_projection")
    _check_weight(weight, len(rows), C, rows[0].device, "gli_projection")
    if (scale is None) != (shift is None):
        raise ValueError("gli_projection: scale and shift must be given together (a folded BatchNorm)")
    if scale is not None:
        check_channel_params("gli_projection", weight.shape[0], rows[0].device, scale=scale, shift=shift)
    dtype = rows[0].dtype
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    Cout, maps = weight.shape[0], inputs[0].dim() == 4
    if residual is not None:
        _check_residual(residual, (B, Cout, H, W) if maps else (B, H * W, Cout))
        # as the output's map, for the adds outside the GEMM
        residual_map = residual if maps else residual.reshape(B, H, W, Cout).permute(0, 3, 1, 2)
    if backend.use_triton("gli_projection", rows[0].device):
        w = backend.weight_as(weight, dtype).reshape(Cout, -1)  # under autocast cast once per weight version
        if scale is not None:
            scale, shift = scale.to(acc).contiguous(), shift.to(acc).contiguous()
        fused = residual is not None and residual.dtype == dtype
        # the epilogue reads the residual as rows laid out as y's: a view of a channels-last map
        res = (residual.permute(0, 2, 3, 1).reshape(B, H * W, Cout) if maps else residual).contiguous() if fused \
            else None
        y = _image(backend.call_op(_gli_projection, rows, w, scale, shift, bool(hswish), res), B, H, W)
        return y if residual is None or fused else y + residual_map
    if scale is not None and folds_into_conv("gli_projection", rows[0]):
        return conv_folded_bn([_image(x, B, H, W) for x in rows], weight.reshape(Cout, -1, 1, 1), scale, shift,
                              hswish, None if residual is None else residual_map)
    z = _unfused_pre_bn(rows, weight, B, H, W)
    if scale is not None:
        y = affine_hswish(z, scale, shift, hswish)
    else:
        y = F.hardswish(z) if hswish else z
    return y if residual is None else y + residual_map


def _check_residual(residual, want):
    if not isinstance(residual, torch.Tensor) or residual.dtype not in _FLOATS:
        raise TypeError("gli_projection: residual must be a floating point Tensor")
    check_strided("gli_projection", "residual", residual)
    if tuple(residual.shape) != want:
        raise ValueError(f"gli_projection: residual must have the output's shape {want}, got {tuple(residual.shape)}")


def gli_projection_train(inputs, weight: torch.Tensor, bn_weight: torch.Tensor, bn_bias: torch.Tensor, eps: float,
                         hswish: bool = False, size=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same with a training BatchNorm (batch statistics; weight ``bn_weight``, bias
    ``bn_bias``, ``eps``). Returns (y channels-last, the batch mean, the biased batch variance),
    the statistics (Cout,) in the accumulation type and without grad, for the caller's running
    statistics (nn.GLIProjection updates them as nn.BatchNorm2d would)."""
    rows, (B, C, H, W) = _as_rows(inputs, size, "gli_projection_train")
    device = rows[0].device
    _check_weight(weight, len(rows), C, device, "gli_projection_train")
    check_channel_params("gli_projection_train", weight.shape[0], device, bn_weight=bn_weight, bn_bias=bn_bias)
    check_eps("gli_projection_train", eps)
    if B * H * W == 1:
        raise ValueError("gli_projection_train: batch statistics need more than 1 value per channel, the inputs "
                         "give 1")
    if backend.use_triton("gli_projection", device) and B * H * W > 0:
        w = weight.reshape(weight.shape[0], -1).to(rows[0].dtype)
        y, _, mean, var = backend.call_op(_gli_projection_train, rows, w, bn_weight, bn_bias, float(eps), bool(hswish))
        return _image(y, B, H, W), mean, var
    return batch_norm_hswish(_unfused_pre_bn(rows, weight, B, H, W), bn_weight, bn_bias, eps, hswish)


def tma_device(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether tensor-descriptor loads can run for inputs of this dtype on this device: NVIDIA
    sm_90 only (the GPUs the static compile checks; the interpreter runs them on a CPU), a Triton
    that has ``tl.make_tensor_descriptor`` (3.4+), not fp64 (which keeps the pointers)."""
    import triton.language as tl

    if dtype == torch.float64 or not hasattr(tl, "make_tensor_descriptor"):
        return False
    return device.type != "cuda" or (not torch.version.hip and torch.cuda.get_device_capability(device)[0] == 9)


def use_tma(xs) -> bool:
    """Whether the GEMM reads the inputs through tensor descriptors (the tensor-memory
    accelerator of sm_90) instead of pointer loads: opt-in (``TMA``, from
    MPVIT_KERNELS_GLI_TMA=1) until a GPU run of the speed report (its "ours (TMA)" rows)
    measures them against the pointers; where :func:`tma_device` allows them; and only where
    every input's rows have one stride across the batch (batch stride N rows), do not overlap,
    and start 16-byte aligned, as a descriptor needs."""
    if not TMA or not tma_device(xs[0].device, xs[0].dtype):
        return False
    elem = xs[0].element_size()
    return all(x.shape[0] == 1 or x.stride(0) == x.shape[1] * x.stride(1) for x in xs) and \
        all(x.stride(1) >= x.shape[2] and (x.stride(1) * elem) % 16 == 0 and x.data_ptr() % 16 == 0 for x in xs)


def _scratch(size: int, alignment: int, stream):
    """Triton's allocator for a launch's global scratch (a device-side tensor descriptor's), on
    the current device, which the launch sets (backend.triton_device)."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_allocator() -> None:
    """triton.set_allocator where this thread has none (Triton keeps it per context, and autograd
    runs a backward's GEMM on its own thread): a kernel with device-side descriptors fails to
    launch without one."""
    import triton
    from triton.runtime import _allocation

    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_scratch)


def _launch(xs, weight, scale, shift, hswish, stats, residual=None):
    """The fused GEMM: y (B, N, Cout) (plus ``residual``, (B, N, Cout) contiguous, if given), and
    with ``stats`` the row tiles' (mean, M2) of y and the rows per tile."""
    from mpvit_kernels.triton import gli_projection as kernels
    from mpvit_kernels.triton.launch import vector_width

    B, N, C = xs[0].shape
    if any(len({x.stride(d) >= 2**31 for x in xs}) > 1 for d in (0, 1)):
        # Triton types an int argument as i64 from 2^31 on, and the kernel picks each input's
        # strides out of one chain of branches, whose types must agree (a mix fails to compile):
        # dense copies agree (batch strides N*C, pixel strides C)
        xs = [x.contiguous() for x in xs]
    Cout = weight.shape[0]
    dtype = xs[0].dtype
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    w = weight.contiguous()
    y = torch.empty((B, N, Cout), dtype=dtype, device=w.device)
    M = B * N
    BN = kernels.block_n(Cout)
    BM = kernels.tile(BN, {torch.float64: "fp64", torch.float32: "fp32"}.get(dtype, "16-bit"))[0]
    if stats:
        tile_mean, tile_m2 = (torch.empty(-(-M // BM), Cout, dtype=acc, device=w.device) for _ in range(2))
    else:
        tile_mean = tile_m2 = y
    if M == 0 or Cout == 0:
        return y, tile_mean, tile_m2, BM
    padded = list(xs) + [xs[0]] * (kernels.MAX_INPUTS - len(xs))
    strides = [s for x in padded for s in (x.stride(0), x.stride(1))]
    precision = "ieee" if dtype in (torch.float32, torch.float64) else "tf32"
    # a stride of a size-1 dim is never multiplied by more than 0
    vec = vector_width(xs[0].element_size(), C, Cout, *(x.stride(d) for x in xs for d in (0, 1) if x.shape[d] > 1))
    tma = use_tma(xs)
    if tma and w.is_cuda:
        _ensure_allocator()
    # the tuner's tiles fit the registers at an aligned launch (vec is 1 for fp64); training's
    # statistics need the pinned BLOCK_M (the op sized them with it, and it fixes their order)
    tuned = not stats and not tma and vec == 8 and \
        all(t.data_ptr() % 16 == 0 for t in (*xs, w, y, scale, shift, residual) if t is not None)
    kernel = kernels.gli_gemm_tuned if tuned else kernels.gli_gemm_kernel
    with backend.triton_device(w):
        kernel[lambda meta: (-(-M // meta["BLOCK_M"]), -(-Cout // BN))](
            *padded, *strides, w, y if scale is None else scale, y if shift is None else shift,
            y if residual is None else residual, y, tile_mean, tile_m2,
            M, N, C, Cout, kernels.m_bucket(M), NUM_INPUTS=len(xs), AFFINE=scale is not None, HSWISH=hswish,
            RESIDUAL=residual is not None, STATS=stats,
            ACC=kernels.tl.float64 if acc == torch.float64 else kernels.tl.float32, DOT_PRECISION=precision,
            BLOCK_N=BN, TMA=tma, VEC=vec)
    return y, tile_mean, tile_m2, BM


@torch.library.custom_op("mpvit_kernels::gli_projection", mutates_args=())
def _gli_projection(xs: list[torch.Tensor], weight: torch.Tensor, scale: torch.Tensor | None,
                    shift: torch.Tensor | None, hswish: bool, residual: torch.Tensor | None) -> torch.Tensor:
    """y (B, N, Cout) = act((cat(xs, -1) @ weight^T) * scale + shift) [+ residual]; xs (B, N, C)
    each with unit channel stride, weight (Cout, n*C) in their dtype, scale and shift (Cout,) in
    the accumulation type, or both None; residual (B, N, Cout) in their dtype, or None."""
    return _launch(xs, weight, scale, shift, hswish, stats=False,
                   residual=None if residual is None else residual.contiguous())[0]


@_gli_projection.register_fake
def _(xs, weight, scale, shift, hswish, residual):
    B, N, _ = xs[0].shape
    return xs[0].new_empty((B, N, weight.shape[0]))


@torch.library.custom_op("mpvit_kernels::gli_projection_train", mutates_args=())
def _gli_projection_train(xs: list[torch.Tensor], weight: torch.Tensor, bn_weight: torch.Tensor,
                          bn_bias: torch.Tensor, eps: float,
                          hswish: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, z, mean, var): z = cat(xs, -1) @ weight^T the pre-BatchNorm output (the inputs' dtype,
    for the backward), (mean, var) its per-channel batch statistics (accumulation type), y =
    act(batch norm of z), both (B, N, Cout)."""
    z, tile_mean, tile_m2, rows = _launch(xs, weight, None, None, False, stats=True)
    Cout = weight.shape[0]
    mean, var, scale, shift = batch_stats(tile_mean, tile_m2, rows, z.numel() // max(Cout, 1), bn_weight, bn_bias,
                                          eps)
    y = affine_hswish(z.view(-1, Cout), scale, shift, hswish).view(z.shape)
    return y, z, mean, var


@_gli_projection_train.register_fake
def _(xs, weight, bn_weight, bn_bias, eps, hswish):
    B, N, _ = xs[0].shape
    acc = torch.float64 if xs[0].dtype == torch.float64 else torch.float32
    Cout = weight.shape[0]
    return (xs[0].new_empty((B, N, Cout)), xs[0].new_empty((B, N, Cout)), xs[0].new_empty(Cout, dtype=acc),
            xs[0].new_empty(Cout, dtype=acc))


def _gemm_backward(xs, weight, g):
    """Grads of each input (its own tensor, (B, N, C)) and of the weight from g (M, Cout) in the
    inputs' dtype, the grad of the 1x1 output."""
    B, N, C = xs[0].shape
    rows = [x.reshape(-1, C) for x in xs]
    grad_w = torch.cat([g.t() @ x for x in rows], dim=1)
    grad_xs = [(g @ weight[:, i * C:(i + 1) * C]).view(B, N, C) for i in range(len(xs))]
    return grad_xs, grad_w


def _setup_context(ctx, inputs, output):
    xs, weight, scale, shift, hswish, residual = inputs
    ctx.save_for_backward(*xs, weight, scale, shift)
    ctx.hswish = hswish
    ctx.residual = residual is not None


def _backward(ctx, grad):
    *xs, weight, scale, shift = ctx.saved_tensors
    Cout = weight.shape[0]
    g = grad.reshape(-1, Cout)
    grad_scale = grad_shift = None
    if scale is not None or ctx.hswish:
        z = backend.call_op(_gli_projection, xs, weight, None, None, False, None).reshape(-1, Cout)  # recomputed
        g, grad_scale, grad_shift = affine_hswish_grad(backend.cast(g, z.dtype), z, scale, shift, ctx.hswish)
    grad_xs, grad_w = _gemm_backward(xs, weight, backend.cast(g, xs[0].dtype))
    # the residual is added last: its grad is the output's
    return grad_xs, grad_w, grad_scale, grad_shift, None, grad if ctx.residual else None


backend.register_autograd(_gli_projection, _backward, setup_context=_setup_context)


def _train_setup_context(ctx, inputs, output):
    xs, weight, bn_weight, bn_bias, eps, hswish = inputs
    _, z, mean, var = output
    ctx.mark_non_differentiable(z, mean, var)
    ctx.set_materialize_grads(False)  # no zero-filled grads for z, mean and var (a launch each)
    ctx.save_for_backward(*xs, weight, bn_weight, bn_bias, z, mean, var)
    ctx.args = (eps, hswish, len(xs))


def _train_backward(ctx, grad, *_):
    if grad is None:  # an undefined grad (grads are not materialised): zero, so none for the inputs
        return [None] * ctx.args[2], None, None, None, None, None
    *xs, weight, bn_weight, bn_bias, z, mean, var = ctx.saved_tensors
    eps, hswish, _ = ctx.args
    Cout = weight.shape[0]
    g, grad_bn_weight, grad_bn_bias = batch_norm_backward(grad.reshape(-1, Cout), z.reshape(-1, Cout), bn_weight,
                                                          bn_bias, mean, var, eps, hswish)
    grad_xs, grad_w = _gemm_backward(xs, weight, g)
    cast = backend.cast
    return grad_xs, grad_w, cast(grad_bn_weight, bn_weight.dtype), cast(grad_bn_bias, bn_bias.dtype), None, None


backend.register_autograd(_gli_projection_train, _train_backward, setup_context=_train_setup_context)
