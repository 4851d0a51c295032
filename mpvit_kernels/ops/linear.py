"""linear: an MPViT block's token Linears with what surrounds them fused into their GEMM,

    y = layer_norm(x) @ W^T + bias      norm1 -> the attention's qkv Linear
    y = gelu(x @ W^T + bias)            the MLP's fc1 -> GELU

so eager's separate LayerNorm and GELU passes (and the normalised tokens and the pre-activation
hidden they write and read back) are gone: each is one pass that reads x and writes y.

Registered as ``mpvit_kernels::linear`` (a custom op with a fake and autograd) over the Triton
kernel (mpvit_kernels/triton/linear.py) on CUDA tensors, or on CPU tensors under Triton's
interpreter; on other CPU tensors (and under ``reference``) the eager composition of
:func:`mpvit_kernels.reference.linear`, which on a CPU is what oneDNN's GEMMs run fastest (its
GELU in place where no autograd graph needs the pre-activation; from 4096 fp32 rows the GEMM as
oneDNN's 1x1 conv, :func:`_conv_gemm`).
In inference, the rest of the first two stages' blocks after their attention (C <= 128) is one
op, ``linear_proj_mlp``: proj, the residual add, norm2, fc1, GELU, fc2 and the second residual
add in one Triton kernel, whose proj output, normalised tokens and 4C-wide hidden never reach
memory.

Backward: with GELU, ``mpvit_kernels::linear_gelu_grad``, the same Triton GEMM recomputing the
pre-activation h with dh = dy * gelu'(h) in its epilogue (h never reaches memory: eager's
autograd keeps it, and the GELU's backward reads it back beside dy); then, in ATen ops as
eager's autograd runs them, the GEMMs' grads and the LayerNorm's (its output recomputed, as the
forward does not store it; ``native_layer_norm_backward``). norm1 -> qkv from NORM_GRAD_ROWS
rows: ``mpvit_kernels::linear_norm_grad``, the input grad's GEMM with the LayerNorm's backward in
its epilogue (the normalised tokens' grad never reaches memory; it also writes the recomputed
LayerNorm output for the weight grad's GEMM and the sums of the parameters' grads). In training
the blocks' MLP onto its residual is one op, ``linear_mlp``, whose backward takes fc1's
pre-activation grad from ``mpvit_kernels::linear_mlp_grad``: fc2's input grad g W2 as a second
GEMM in the same kernel, so the 4C-wide grad of the hidden never reaches memory either.
Deterministic.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mpvit_kernels import backend, reference
from mpvit_kernels.ops.affine_hswish import (check_channel_params, check_float_tensors, check_layernorm_eps, check_rows,
                                             conv_runs_1x1)


# a CUDA grid's second dimension (65535 programs) of 128-wide output tiles; with GELU half that:
# its grad's GEMM may take 64-wide ones (fp64, and 16-bit rows read element by element)
MAX_OUTPUTS = 65535 * 128
MAX_GELU_OUTPUTS = 65535 * 64
# linear_proj_mlp's widths: one program holds whole rows of C channels (the residual stream's and
# norm2's), so C is at most 128: MPViT's first two stages, where the block's GEMMs are
# memory-bound (the unfused ops write and read proj's output, r, u and a 4C-wide hidden per
# token); wider stages keep them apart.
MLP_MAX_C = 128
# From this many rows norm1 -> qkv's backward is one Triton GEMM with the LayerNorm's backward in
# its epilogue (linear_norm_grad): at least 128 programs (of 16 to 64 whole rows each, by tile),
# about one per SM of an A100 or H100 or more; fewer rows keep eager's ops (LayerNorm recomputed,
# column sum, cuBLAS GEMM, LayerNorm backward), whose GEMM spreads a few rows over more programs.
# Not timed on a GPU yet. MPViT at 224: stage 1 from batch 3, stage 2 from 11, stage 3 from 42.
NORM_GRAD_ROWS = 8192


def _check(x, weight, bias, ln_weight, ln_bias, eps, gelu):
    check_float_tensors("linear", x=x, weight=weight)
    if x.dim() < 2:
        raise ValueError(f"linear: x must be tokens (..., K) with at least 2 dims, got shape {tuple(x.shape)}")
    K = x.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != K or weight.shape[0] < 1 or K < 1:
        raise ValueError(f"linear: weight must be (N, {K}) for x with {K} channels, got {tuple(weight.shape)}")
    if weight.device != x.device:
        raise ValueError(f"linear: weight is on {weight.device}, x on {x.device}")
    limit = MAX_GELU_OUTPUTS if gelu is True else MAX_OUTPUTS
    if weight.shape[0] > limit:
        raise ValueError(f"linear: at most {limit} outputs (weight rows), got {weight.shape[0]}")
    if bias is not None:
        check_channel_params("linear", weight.shape[0], x.device, bias=bias)
    if (ln_weight is None) != (ln_bias is None):
        raise ValueError("linear: ln_weight and ln_bias must be given together (the LayerNorm's affine)")
    if ln_weight is not None:
        check_channel_params("linear", K, x.device, ln_weight=ln_weight, ln_bias=ln_bias)
        check_layernorm_eps("linear", eps)
    if not isinstance(gelu, bool):
        raise TypeError(f"linear: gelu must be a bool, got {type(gelu).__name__}")
    check_rows("linear", x.numel() // K)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           ln_weight: torch.Tensor | None = None, ln_bias: torch.Tensor | None = None, eps: float = 1e-5,
           gelu: bool = False) -> torch.Tensor:
    """``act(layer_norm(x) @ weight^T + bias)``: the LayerNorm over x's last dim where
    ``ln_weight`` and ``ln_bias`` (K,) are given (with ``eps``), GELU (exact, erf) where ``gelu``.

    x: tokens (..., K), any strides (a unit channel stride is read in place); weight (N, K);
    bias (N,) or None. Returns (..., N), contiguous, in the GEMM's dtype: the autocast dtype
    inside an autocast region (x's dtype float64 excepted, as autocast leaves it), else x's.
    weight is cast to it (once per weight version where no graph needs the cast), as autocast
    casts a Linear's. The LayerNorm computes in fp32 (fp64 for fp64) from x as it is (an fp32
    stream under autocast: eager's LayerNorm runs in fp32 there too) and is rounded to the GEMM's
    dtype before the GEMM reads it; the GEMM accumulates in fp32 (fp64), bias and GELU too.
    """
    _check(x, weight, bias, ln_weight, ln_bias, eps, gelu)
    dtype = backend.autocast_dtype(x)
    weight = backend.weight_as(weight, dtype)
    if not backend.use_triton("linear", x.device):
        # not in a compiled graph, where Inductor's conv costs more than its addmm: MPViT-T batch 8
        # under torch.compile, eval 0.93x and a training step 0.88x with the conv
        conv = dtype == torch.float32 and conv_runs_1x1(x, x.numel() // x.shape[-1]) \
            and backend.get_backend("linear") != "reference" and not torch.compiler.is_compiling()
        y = reference.linear(x, weight, bias, ln_weight, ln_bias, eps, gemm=_conv_gemm if conv else F.linear)
        if not gelu:
            return y
        # In place where no autograd graph keeps the pre-activation: on a CPU a fresh hidden costs
        # about what the GELU does (page faults, cold lines): MPViT-T eval batch 8, -10 ms of 260.
        return torch.ops.aten.gelu_(y) if not (torch.is_grad_enabled() and y.requires_grad) else F.gelu(y)
    K, N = x.shape[-1], weight.shape[0]
    params = [bias, ln_weight, ln_bias]
    if len({p.dtype for p in params if p is not None}) > 1:  # the kernel reads them in one dtype, whichever it is
        params = [None if p is None else p.to(reference._acc_dtype(dtype)) for p in params]
    y = backend.call_op(_linear, x.reshape(-1, K), weight, *params, float(eps), gelu)
    return y.view(x.shape[:-1] + (N,))


def linear_proj_mlp(a: torch.Tensor, x: torch.Tensor, proj_weight: torch.Tensor, proj_bias: torch.Tensor,
                    norm_weight: torch.Tensor, norm_bias: torch.Tensor, eps: float, fc1_weight: torch.Tensor,
                    fc1_bias: torch.Tensor, fc2_weight: torch.Tensor, fc2_bias: torch.Tensor) -> torch.Tensor:
    """An MPViT encoder block after its attention, for C <= 128 channels (``MLP_MAX_C``)::

        s = x + a @ proj_weight^T + proj_bias
        out = s + fc2_bias + gelu(layer_norm(s) @ fc1_weight^T + fc1_bias) @ fc2_weight^T

    the LayerNorm (norm2) over C with ``norm_weight``, ``norm_bias`` and ``eps``. a: the
    attention's output, x: the block's input, tokens (..., C) of one shape, any strides (a unit
    channel stride is read in place), any float dtypes; proj_weight (C, C), fc1_weight (hidden,
    C), fc2_weight (C, hidden), the biases and norm2's affine (C,) or (hidden,), any float dtype.
    Returns x's shape, contiguous, in the dtype of x + proj's output (the residual stream's
    dtype, as eager's type promotion gives it). The GEMMs run in the autocast dtype inside an
    autocast region (a's dtype float64 excepted), else in a's, the weights cast to it as
    :func:`linear` casts them, and accumulate in fp32 (fp64); the rest computes in fp32 (fp64).
    Eager rounds proj's output, norm2's, fc1's, GELU's (and under autocast fc2's) to their
    dtypes; here only norm2's output and the hidden are rounded to the GEMMs' dtype, as the
    GEMMs read them, and the sum once, at the end. On CUDA (and under Triton's interpreter) one
    kernel; elsewhere (and where ``linear`` or ``residual_layernorm`` runs ``reference``)
    :func:`mpvit_kernels.reference.linear_proj_mlp`. Its backward is that composition's, the
    forward recomputed in ATen ops: the model takes this op only where no autograd graph is
    recorded (training keeps its separate fused ops and their backward kernels).
    """
    _check_proj_mlp(a, x, proj_weight, proj_bias, norm_weight, norm_bias, eps, fc1_weight, fc1_bias, fc2_weight,
                    fc2_bias)
    dtype = backend.autocast_dtype(a)
    wp, w1, w2 = (backend.weight_as(w, dtype) for w in (proj_weight, fc1_weight, fc2_weight))
    if not (backend.use_triton("linear", a.device) and backend.use_triton("residual_layernorm", a.device)):
        return reference.linear_proj_mlp(a, x, wp, proj_bias, norm_weight, norm_bias, eps, w1, fc1_bias, w2, fc2_bias)
    vectors = [proj_bias, norm_weight, norm_bias, fc1_bias, fc2_bias]
    if len({v.dtype for v in vectors}) > 1:  # the kernel reads them in one dtype, whichever it is
        vectors = [v.to(reference._acc_dtype(dtype)) for v in vectors]
    pb, lnw, lnb, b1, b2 = vectors
    C = a.shape[-1]
    out = backend.call_op(_linear_proj_mlp, a.reshape(-1, C), x.reshape(-1, C), wp, pb, lnw, lnb, float(eps), w1, b1,
                          w2, b2)
    return out.view(x.shape)


def linear_mlp(x: torch.Tensor, r: torch.Tensor, fc1_weight: torch.Tensor, fc1_bias: torch.Tensor | None,
               fc2_weight: torch.Tensor) -> torch.Tensor:
    """An MLP onto a residual, ``r + gelu(x @ fc1_weight^T + fc1_bias) @ fc2_weight^T``: x tokens
    (..., C) with any strides, r (..., C_out) of x's leading shape, fc1_weight (hidden, C),
    fc2_weight (C_out, hidden), fc1_bias (hidden,) or None, any float dtypes. Returns r's shape,
    contiguous, in the dtype of r + fc2's output (the residual stream's, as eager's promotion
    gives it); the GEMMs run in the autocast dtype inside an autocast region (x's dtype float64
    excepted), else in x's, the weights cast to it, as :func:`linear` runs them. For training: on
    the Triton kernels with C_out = C (MPViT's), one op whose backward computes the grad of fc1's
    pre-activation, (g fc2_weight) * gelu'(h), in one kernel (``linear_mlp_grad``: both GEMMs over
    the same K, h recomputed), so the hidden's 4C-wide grad never reaches memory; elsewhere
    :func:`linear` with GELU, then fc2 added onto r, as the model's inference runs them."""
    check_float_tensors("linear_mlp", x=x, r=r, fc1_weight=fc1_weight, fc2_weight=fc2_weight)
    if x.dim() < 2 or r.shape[:-1] != x.shape[:-1]:
        raise ValueError(f"linear_mlp: x and r must be tokens (..., C) with one leading shape, got {tuple(x.shape)} "
                         f"and {tuple(r.shape)}")
    C, C_out = x.shape[-1], r.shape[-1]
    if C < 1 or C_out < 1:
        raise ValueError(f"linear_mlp: x and r need at least one channel, got {C} and {C_out}")
    if fc1_weight.dim() != 2 or fc1_weight.shape[1] != C or not 1 <= fc1_weight.shape[0] <= MAX_GELU_OUTPUTS:
        raise ValueError(f"linear_mlp: fc1_weight must be (hidden, {C}) with 1 <= hidden <= {MAX_GELU_OUTPUTS}, got "
                         f"{tuple(fc1_weight.shape)}")
    hidden = fc1_weight.shape[0]
    if tuple(fc2_weight.shape) != (C_out, hidden):
        raise ValueError(f"linear_mlp: fc2_weight must be ({C_out}, {hidden}), got {tuple(fc2_weight.shape)}")
    for name, t in (("r", r), ("fc1_weight", fc1_weight), ("fc2_weight", fc2_weight)):
        if t.device != x.device:
            raise ValueError(f"linear_mlp: {name} is on {t.device}, x on {x.device}")
    if fc1_bias is not None:
        check_channel_params("linear_mlp", hidden, x.device, fc1_bias=fc1_bias)
    if C_out != C or not backend.use_triton("linear", x.device):  # (the grad kernel's one K loop: C_out = C)
        h = linear(x, fc1_weight, fc1_bias, gelu=True)
        return r + F.linear(h, backend.weight_as(fc2_weight, h.dtype))
    check_rows("linear_mlp", x.numel() // C)
    dtype = backend.autocast_dtype(x)
    w1, w2 = backend.weight_as(fc1_weight, dtype), backend.weight_as(fc2_weight, dtype)
    out, _ = backend.call_op(_linear_mlp, x.reshape(-1, C), r.reshape(-1, C), w1, fc1_bias, w2)
    return out.view(r.shape)


def _check_proj_mlp(a, x, proj_weight, proj_bias, norm_weight, norm_bias, eps, fc1_weight, fc1_bias, fc2_weight,
                    fc2_bias):
    check_float_tensors("linear_proj_mlp", a=a, x=x, proj_weight=proj_weight, fc1_weight=fc1_weight,
                        fc2_weight=fc2_weight)
    if a.dim() < 2 or a.shape != x.shape:
        raise ValueError(f"linear_proj_mlp: a and x must be tokens (..., C) of one shape, got {tuple(a.shape)} and "
                         f"{tuple(x.shape)}")
    C = a.shape[-1]
    if not 1 <= C <= MLP_MAX_C:
        raise ValueError(f"linear_proj_mlp: at most {MLP_MAX_C} channels (C, a's last dim), got {C}")
    if tuple(proj_weight.shape) != (C, C):
        raise ValueError(f"linear_proj_mlp: proj_weight must be ({C}, {C}), got {tuple(proj_weight.shape)}")
    if fc1_weight.dim() != 2 or fc1_weight.shape[1] != C or fc1_weight.shape[0] < 1:
        raise ValueError(f"linear_proj_mlp: fc1_weight must be (hidden, {C}), got {tuple(fc1_weight.shape)}")
    hidden = fc1_weight.shape[0]
    if tuple(fc2_weight.shape) != (C, hidden):
        raise ValueError(f"linear_proj_mlp: fc2_weight must be ({C}, {hidden}), got {tuple(fc2_weight.shape)}")
    for name, t in (("x", x), ("proj_weight", proj_weight), ("fc1_weight", fc1_weight), ("fc2_weight", fc2_weight)):
        if t.device != a.device:
            raise ValueError(f"linear_proj_mlp: {name} is on {t.device}, a on {a.device}")
    check_channel_params("linear_proj_mlp", C, a.device, proj_bias=proj_bias, norm_weight=norm_weight,
                         norm_bias=norm_bias, fc2_bias=fc2_bias)
    check_channel_params("linear_proj_mlp", hidden, a.device, fc1_bias=fc1_bias)
    check_layernorm_eps("linear_proj_mlp", eps)
    check_rows("linear_proj_mlp", a.numel() // C)


def _conv_gemm(x, weight, bias):
    """F.linear as oneDNN's 1x1 conv over x's rows seen as a channels-last image (1, K, rows, 1),
    which adds the bias in its epilogue where addmm copies it into the output before the GEMM:
    MPViT-T eval batch 8 on 2 cores, 2.1-2.6% a forward (same logits to the bit there); a
    training step 0.8%."""
    K, N = x.shape[-1], weight.shape[0]
    image = x.reshape(-1, K)[None, :, None, :].permute(0, 3, 1, 2)
    return F.conv2d(image, weight.reshape(N, K, 1, 1), bias).permute(0, 2, 3, 1).reshape(*x.shape[:-1], N)


def _kernels():
    """The Triton module and its launch helpers, imported at the first launch (triton is not
    imported with the package) and then kept: function-level imports cost host time at every
    launch (1 us for these)."""
    global _KERNELS
    if _KERNELS is None:
        from mpvit_kernels.triton import linear
        from mpvit_kernels.triton.launch import next_pow2, vector_width
        from mpvit_kernels.triton.gli_projection import block_n, m_bucket

        _KERNELS = linear, vector_width, next_pow2, block_n, m_bucket
    return _KERNELS


_KERNELS = None


def _dot_precision(dtype: torch.dtype) -> str:
    """The GEMM's input_precision: FMA dots for fp32/fp64, tensor cores for 16-bit."""
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


def _gemm_kind(dtype: torch.dtype) -> str:
    """The GEMM's dtype class that sizes the Triton tiles: "fp64", "fp32" or "16-bit"."""
    return "fp64" if dtype == torch.float64 else "fp32" if dtype == torch.float32 else "16-bit"


def _grad_width(n: int, dtype: torch.dtype) -> int:
    """The output width of the backward GEMMs' pinned tiles over n channels: gli_projection's,
    at most 64 in fp64 (128 spilled; static report)."""
    from mpvit_kernels.triton import gli_projection  # (after the first call: a sys.modules lookup)

    width = gli_projection.block_n(n)
    return min(64, width) if dtype == torch.float64 else width


def gelu_grad_tiles(N: int, dtype: torch.dtype, aligned: bool, on_gpu: bool = False) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_M) of linear_gelu_grad's pinned launch for N outputs of a GEMM in ``dtype``:
    gli_projection's tile, but 64 wide where 128-wide tiles spilled (fp64, and 16-bit GEMMs whose
    rows are read element by element, i.e. not ``aligned``: Triton 3.6, sm_80; static report).
    ``on_gpu``: a GPU's tile even under the interpreter (the traffic model)."""
    from mpvit_kernels.triton import gli_projection  # (after the first call: a sys.modules lookup)

    bn = _grad_width(N, dtype)
    if _dot_precision(dtype) == "tf32" and not aligned:
        bn = min(64, bn)
    return bn, (gli_projection.gpu_tile if on_gpu else gli_projection.tile)(bn, _gemm_kind(dtype))[0]


@torch.library.custom_op("mpvit_kernels::linear", mutates_args=())
def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, ln_weight: torch.Tensor | None,
            ln_bias: torch.Tensor | None, eps: float, gelu: bool) -> torch.Tensor:
    """y (M, N) contiguous in weight's dtype = act(layer_norm(x) @ weight^T + bias): x (M, K) with
    any strides (any float dtype), weight (N, K) the GEMM's dtype, bias (N,) or None, ln_weight
    and ln_bias (K,) or both None (no LayerNorm); the kernel reads these three in their dtype,
    which they share (the wrapper's rule; another mix compiles too, unchecked by the static report)."""
    kernels, vector_width, _, block_n, m_bucket = _kernels()
    M, K = x.shape
    N = weight.shape[0]
    dtype = weight.dtype
    if x.stride(1) != 1 and K != 1:  # the kernel indexes channels with unit stride
        x = x.contiguous()
    y = torch.empty((M, N), dtype=dtype, device=x.device)
    if M == 0:
        return y
    wide = dtype == torch.float64
    norm = ln_weight is not None
    params = [None if t is None else t.contiguous() for t in (bias, ln_weight, ln_bias)]
    w = weight.contiguous()
    bn = block_n(N)
    vec = vector_width(y.element_size(), K, N, *((x.stride(0),) if M > 1 else ()))
    # the tuner's tiles fit the registers at an aligned launch (vec is 1 for fp64)
    tuned = vec == 8 and all(t.data_ptr() % 16 == 0 for t in (x, w, y, *params) if t is not None)
    kernel = kernels.linear_tuned if tuned else kernels.linear_kernel
    with backend.triton_device(x):
        kernel[lambda meta: (-(-M // meta["BLOCK_M"]), -(-N // bn))](
            x, w, *[y if t is None else t for t in params], y, y, y, M, K, N, x.stride(0), m_bucket(M), float(eps),
            NORM=norm, BIAS=bias is not None, GELU=gelu, ACC=kernels.tl.float64 if wide else kernels.tl.float32,
            DOT_PRECISION=_dot_precision(dtype), BLOCK_N=bn, VEC=vec, GELU_GRAD=False)
    return y


@torch.library.custom_op("mpvit_kernels::linear_gelu_grad", mutates_args=())
def _linear_gelu_grad(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(dh, d bias): dh = dy * gelu'(h), h = x @ weight^T + bias recomputed by the forward's GEMM
    (same K order: the h the forward's GELU saw), the grad of ``linear(x, weight, bias,
    gelu=True)``'s pre-activation, (M, N) contiguous in weight's dtype; and bias's grad, the
    column sums of dh before its rounding, in bias's dtype (empty without a bias). x (M, K)
    with unit channel stride and weight (N, K) in one dtype, dy (M, N) in it, bias (N,) or None.
    The GEMM runs its pinned tile, never a tuned one: each program sums its rows of dh, and those
    partial sums are added in a fixed order, so the bias grad's bits cannot depend on a tuner's
    pick (deterministic)."""
    kernels, vector_width, _, _, m_bucket = _kernels()
    if weight.dim() != 2 or x.dim() != 2:
        raise ValueError(f"linear_gelu_grad: x and weight must be 2-d, got {tuple(x.shape)} and {tuple(weight.shape)}")
    (N, K), M, dtype = weight.shape, x.shape[0], weight.dtype
    if bias is not None:
        check_channel_params("linear_gelu_grad", N, weight.device, bias=bias)
    for name, t, shape in (("x", x, (M, K)), ("dy", dy, (M, N))):
        if t.dtype != dtype or tuple(t.shape) != shape or t.device != weight.device:
            raise ValueError(f"linear_gelu_grad: {name} must be {dtype} {shape} on {weight.device} (weight "
                             f"{tuple(weight.shape)}), got {t.dtype} {tuple(t.shape)} on {t.device}")
    if x.stride(1) != 1 and K != 1:
        x = x.contiguous()
    dy, w = dy.contiguous(), weight.contiguous()
    dh = torch.empty((M, N), dtype=dtype, device=x.device)
    if M == 0:
        return dh, dh.new_empty(0) if bias is None else torch.zeros_like(bias)
    acc = reference._acc_dtype(dtype)
    vec = vector_width(dh.element_size(), K, N, *((x.stride(0),) if M > 1 else ()))
    aligned = vec == 8 and all(t.data_ptr() % 16 == 0 for t in (x, w, dh, dy, bias) if t is not None)
    bn, block_m = gelu_grad_tiles(N, dtype, aligned)  # BLOCK_M: the pinned tile's, which sizes the partial sums
    parts = torch.empty((-(-M // block_m), N) if bias is not None else (0,), dtype=acc, device=x.device)

    def grid(meta):
        if meta["BLOCK_M"] != block_m:  # the partial sums have a row per program
            raise RuntimeError(f"linear_gelu_grad: launched with BLOCK_M={meta['BLOCK_M']}, sized for {block_m}")
        return -(-M // block_m), -(-N // bn)

    with backend.triton_device(x):
        kernels.linear_kernel[grid](
            x, w, dh if bias is None else bias.contiguous(), dh, dh, dh, dy, parts, M, K, N, x.stride(0),
            m_bucket(M), 1e-5, NORM=False, BIAS=bias is not None, GELU=False,
            ACC=kernels.tl.float64 if acc == torch.float64 else kernels.tl.float32, DOT_PRECISION=_dot_precision(dtype),
            BLOCK_N=bn, VEC=vec, GELU_GRAD=True)
    return dh, dh.new_empty(0) if bias is None else backend.cast(parts.sum(0), bias.dtype)


def norm_grad_tiles(K: int, dtype: torch.dtype, vec: int, on_gpu: bool = False) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_M) of linear_norm_grad's launch for x with K channels, a GEMM in ``dtype``
    and VEC ``vec``: gli_projection's width (all K channels in one tile up to 128), at most 64 in
    fp64 (128 spilled; static report). ``on_gpu``: a GPU's tile even under the interpreter."""
    bc = _grad_width(K, dtype)
    return bc, _kernels()[0].norm_grad_tile(bc, _gemm_kind(dtype), K > bc, vec, on_gpu)[0]


@torch.library.custom_op("mpvit_kernels::linear_norm_grad", mutates_args=())
def _linear_norm_grad(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, ln_weight: torch.Tensor,
                      ln_bias: torch.Tensor, eps: float, bias_grad: bool) -> tuple[torch.Tensor, torch.Tensor,
                                                                                 torch.Tensor]:
    """(dx, u, sums): the backward of y = layer_norm(x) @ weight^T (+ bias) from dy, y's grad, in
    one Triton GEMM with the LayerNorm's backward in its epilogue. dx (M, K) contiguous in x's
    dtype, x's grad; u = layer_norm(x) (M, K) contiguous in weight's dtype, the operand of the
    weight grad dy^T u (left to cuBLAS); sums (2K,), or (2K + N,) with ``bias_grad``, in fp32
    (fp64 for an fp64 GEMM): the grads of ln_weight, ln_bias and the bias, as one vector. dy
    (M, N) and weight (N, K) in one dtype; x (M, K) in any float dtype; ln_weight and ln_bias
    (K,) in one dtype. The normalised tokens' grad dy weight is never stored, dy is read once for
    it and the bias grad, and the LayerNorm's output is written once (eager: recomputed by one
    pass, its grad written and read by another, dy read again for the bias grad). Always the
    pinned tile: the parameters' grads add per-program partial sums in a fixed order
    (deterministic)."""
    kernels, vector_width, _, _, _ = _kernels()
    if weight.dim() != 2 or x.dim() != 2 or dy.dim() != 2:
        raise ValueError(f"linear_norm_grad: dy, x and weight must be 2-d, got {tuple(dy.shape)}, {tuple(x.shape)} "
                         f"and {tuple(weight.shape)}")
    (N, K), M, dtype = weight.shape, x.shape[0], weight.dtype
    if tuple(x.shape) != (M, K) or x.device != weight.device or not x.dtype.is_floating_point:
        raise ValueError(f"linear_norm_grad: x must be a float ({M}, {K}) on {weight.device} (weight "
                         f"{tuple(weight.shape)}), got {x.dtype} {tuple(x.shape)} on {x.device}")
    if dy.dtype != dtype or tuple(dy.shape) != (M, N) or dy.device != weight.device:
        raise ValueError(f"linear_norm_grad: dy must be {dtype} {(M, N)} on {weight.device} (weight "
                         f"{tuple(weight.shape)}), got {dy.dtype} {tuple(dy.shape)} on {dy.device}")
    check_channel_params("linear_norm_grad", K, weight.device, ln_weight=ln_weight, ln_bias=ln_bias)
    if ln_weight.dtype != ln_bias.dtype:
        raise ValueError(f"linear_norm_grad: ln_weight and ln_bias must share a dtype, got {ln_weight.dtype} and "
                         f"{ln_bias.dtype}")
    check_layernorm_eps("linear_norm_grad", eps)
    if x.stride(1) != 1 and K != 1:  # the kernel indexes channels with unit stride
        x = x.contiguous()
    dy, w, lw, lb = dy.contiguous(), weight.contiguous(), ln_weight.contiguous(), ln_bias.contiguous()
    acc = reference._acc_dtype(dtype)
    dx = torch.empty((M, K), dtype=x.dtype, device=x.device)
    u = torch.empty((M, K), dtype=dtype, device=x.device)
    width = 2 * K + (N if bias_grad else 0)
    if M == 0:
        return dx, u, torch.zeros(width, dtype=acc, device=x.device)
    vec = vector_width(dy.element_size(), K, N, *((x.stride(0),) if M > 1 else ()))
    if any(t.data_ptr() % 16 for t in (dy, w, x, lw, lb)):  # rows then read element by element: VEC=1's tile
        vec = 1
    bc, block_m = norm_grad_tiles(K, dtype, vec)  # BLOCK_M: the pinned tile's, which sizes the partial sums
    parts = torch.empty((-(-M // block_m), width), dtype=acc, device=x.device)

    def grid(meta):
        if meta["BLOCK_M"] != block_m:  # the partial sums have a row per program
            raise RuntimeError(f"linear_norm_grad: launched with BLOCK_M={meta['BLOCK_M']}, sized for {block_m}")
        return (-(-M // block_m),)

    with backend.triton_device(x):
        kernels.linear_norm_grad_kernel[grid](
            dy, w, x, lw, lb, dx, u, parts, M, K, N, x.stride(0), float(eps), BIAS=bias_grad, WIDE=K > bc,
            ACC=kernels.tl.float64 if acc == torch.float64 else kernels.tl.float32,
            DOT_PRECISION=_dot_precision(dtype), BLOCK_C=bc, VEC=vec)
    return dx, u, parts.sum(0)


@_linear_norm_grad.register_fake
def _(dy, x, weight, ln_weight, ln_bias, eps, bias_grad):
    (N, K), M = weight.shape, x.shape[0]
    return (x.new_empty((M, K)), x.new_empty((M, K), dtype=weight.dtype),
            x.new_empty(2 * K + (N if bias_grad else 0), dtype=reference._acc_dtype(weight.dtype)))


backend.refuse_double_backward("mpvit_kernels::linear_norm_grad")  # (linear's backward takes ATen's ops then)


def mlp_grad_tiles(N: int, dtype: torch.dtype, on_gpu: bool = False) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_M) of linear_mlp_grad's pinned launch for N hidden channels and a GEMM in
    ``dtype``: gli_projection's width, at most 64 in fp64. ``on_gpu``: a GPU's tile even under the
    interpreter (the traffic model)."""
    bn = _grad_width(N, dtype)
    return bn, _kernels()[0].mlp_grad_tile(bn, _gemm_kind(dtype), on_gpu)[0]


@torch.library.custom_op("mpvit_kernels::linear_mlp_grad", mutates_args=())
def _linear_mlp_grad(g: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     weight2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dh, d bias) of an MLP x -> fc1 (weight (N, K), bias) -> GELU -> fc2 (weight2 (K, N)) from g,
    the grad of fc2's output (M, K): dh = (g weight2) * gelu'(h), h = x weight^T + bias
    recomputed, (M, N) contiguous in weight's dtype; the bias grad, dh's column sums before their
    rounding, in bias's dtype (empty without a bias). x (M, K) with unit channel stride, g,
    weight and weight2 in one dtype. One Triton GEMM pair over the same K: g weight2, the
    hidden's grad, stays in registers (linear_gelu_grad reads it). Pinned tile; the partial sums
    add in a fixed order (deterministic)."""
    kernels, vector_width, _, _, _ = _kernels()
    if weight.dim() != 2 or x.dim() != 2 or weight2.dim() != 2:
        raise ValueError(f"linear_mlp_grad: x, weight and weight2 must be 2-d, got {tuple(x.shape)}, "
                         f"{tuple(weight.shape)} and {tuple(weight2.shape)}")
    (N, K), M, dtype = weight.shape, x.shape[0], weight.dtype
    if bias is not None:
        check_channel_params("linear_mlp_grad", N, weight.device, bias=bias)
    for name, t, shape in (("x", x, (M, K)), ("g", g, (M, K)), ("weight2", weight2, (K, N))):
        if t.dtype != dtype or tuple(t.shape) != shape or t.device != weight.device:
            raise ValueError(f"linear_mlp_grad: {name} must be {dtype} {shape} on {weight.device} (weight "
                             f"{tuple(weight.shape)}), got {t.dtype} {tuple(t.shape)} on {t.device}")
    if x.stride(1) != 1 and K != 1:
        x = x.contiguous()
    g, w, w2 = g.contiguous(), weight.contiguous(), weight2.contiguous()
    dh = torch.empty((M, N), dtype=dtype, device=x.device)
    if M == 0:
        return dh, dh.new_empty(0) if bias is None else torch.zeros_like(bias)
    acc = reference._acc_dtype(dtype)
    bn, block_m = mlp_grad_tiles(N, dtype)  # BLOCK_M: the pinned tile's, which sizes the partial sums
    parts = torch.empty((-(-M // block_m), N) if bias is not None else (0,), dtype=acc, device=x.device)

    def grid(meta):
        if meta["BLOCK_M"] != block_m:  # the partial sums have a row per program
            raise RuntimeError(f"linear_mlp_grad: launched with BLOCK_M={meta['BLOCK_M']}, sized for {block_m}")
        return (-(-M // block_m) * -(-N // bn),)  # (a row block's column tiles next to each other)

    with backend.triton_device(x):
        kernels.mlp_gelu_grad_kernel[grid](
            x, w, dh if bias is None else bias.contiguous(), g, w2, dh, parts, M, K, N, x.stride(0),
            BIAS=bias is not None, ACC=kernels.tl.float64 if acc == torch.float64 else kernels.tl.float32,
            DOT_PRECISION=_dot_precision(dtype), BLOCK_N=bn,
            VEC=vector_width(dh.element_size(), K, N, *((x.stride(0),) if M > 1 else ())))
    return dh, dh.new_empty(0) if bias is None else backend.cast(parts.sum(0), bias.dtype)


@_linear_mlp_grad.register_fake
def _(g, x, weight, bias, weight2):
    n = 0 if bias is None else weight.shape[0]
    return (x.new_empty((x.shape[0], weight.shape[0]), dtype=weight.dtype),
            x.new_empty(n, dtype=weight.dtype if bias is None else bias.dtype))


backend.refuse_double_backward("mpvit_kernels::linear_mlp_grad")  # (linear_mlp's backward takes linear_gelu_grad then)


@torch.library.custom_op("mpvit_kernels::linear_mlp", mutates_args=())
def _linear_mlp(x: torch.Tensor, r: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                weight2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, h): h = gelu(x weight^T + bias) (M, N) contiguous in weight's dtype (the hidden fc2
    reads, kept for its weight grad; it takes no grad), out = r + h weight2^T (M, K) contiguous in
    the dtype of r + h (r's where it is the wider, as under autocast). x (M, K) any strides and
    float dtype, weight (N, K) and weight2 (K, N) in the GEMMs' dtype, bias (N,) or None, r (M, K)
    any float dtype."""
    h = backend.call_op(_linear, x, weight, bias, None, None, 1e-5, True)  # (its implementation: no graph here)
    if r.dtype == h.dtype:
        return torch.addmm(r, h, weight2.t()), h
    return r + h @ weight2.t(), h  # fc2 in the GEMMs' dtype, the add in the stream's (autocast's order)


@_linear_mlp.register_fake
def _(x, r, weight, bias, weight2):
    return (r.new_empty(r.shape, dtype=torch.promote_types(r.dtype, weight.dtype)),
            x.new_empty((x.shape[0], weight.shape[0]), dtype=weight.dtype))


def _mlp_setup_context(ctx, inputs, output):
    x, r, weight, bias, weight2 = inputs
    ctx.save_for_backward(x, weight, bias, weight2, output[1])
    ctx.r_dtype = r.dtype
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _mlp_backward(ctx, grad, _):
    """fc1's pre-activation grad from ``linear_mlp_grad`` (the hidden's grad never stored), then
    cuBLAS's GEMMs for the weights' and x's grads, each only where its input needs it; r's grad
    is out's. In the GEMMs' dtype, x and the grad cast to it as eager's autocast casts them.
    Where the backward is itself differentiated (``create_graph``): the hidden's grad as a GEMM,
    then ``linear_gelu_grad``, and the hidden recomputed in ATen ops, all of which autograd can
    differentiate again."""
    needs = ctx.needs_input_grad
    if grad is None:
        return None, None, None, None, None
    x, weight, bias, weight2, h = ctx.saved_tensors
    dtype, cast = weight.dtype, backend.cast
    grad_r = cast(grad, ctx.r_dtype) if needs[1] else None
    g = cast(grad, dtype)
    dh = grad_bias = None
    create_graph = torch.is_grad_enabled()
    fc1_grads = needs[0] or needs[2] or needs[3]
    xg = cast(x, dtype) if fc1_grads or create_graph else None
    if create_graph and needs[4]:  # recomputed: the saved h has no graph to x and the weight
        h = F.gelu(F.linear(xg, weight, None if bias is None else cast(bias, dtype)))
    if fc1_grads:
        if create_graph:
            dh, grad_bias = backend.call_op(_linear_gelu_grad, g @ weight2, xg, weight, bias)
        else:
            dh, grad_bias = backend.call_op(_linear_mlp_grad, g, xg, weight, bias, weight2)
    return (cast(dh @ weight, x.dtype) if needs[0] else None, grad_r, dh.t() @ xg if needs[2] else None,
            grad_bias if needs[3] and bias is not None else None, g.t() @ h if needs[4] else None)


backend.register_autograd(_linear_mlp, _mlp_backward, setup_context=_mlp_setup_context)


@_linear_gelu_grad.register_fake
def _(dy, x, weight, bias):
    n = 0 if bias is None else weight.shape[0]
    return (x.new_empty((x.shape[0], weight.shape[0]), dtype=weight.dtype),
            x.new_empty(n, dtype=weight.dtype if bias is None else bias.dtype))


def _gelu_grad_setup_context(ctx, inputs, output):
    dy, x, weight, bias = inputs
    ctx.save_for_backward(dy, x, weight, bias)


def _gelu_grad_backward(ctx, grad, grad_bias):
    """The second derivative (linear's backward stays differentiable, as eager's GELU backward
    is: gradient penalties through the MLP), in ATen ops: the bias grad is dh's column sums, so
    its grad joins dh's; then with h recomputed and gelu''(h) = phi(h) (2 - h^2),
    d dy = grad gelu'(h) and dh = grad dy gelu''(h), which flows back through the GEMM to x,
    weight and bias."""
    dy, x, weight, bias = ctx.saved_tensors
    acc = reference._acc_dtype(x.dtype)
    g = grad.to(acc)
    if bias is not None and grad_bias is not None:
        g = g + grad_bias.to(acc)
    h = (x @ weight.t()).to(acc)  # the bias added in acc, as the kernel adds it
    if bias is not None:
        h = h + bias.to(acc)
    pdf = torch.exp(-0.5 * h * h) * 0.3989422804014327
    cdf = 0.5 * (1.0 + torch.erf(h * 0.7071067811865476))
    d_dy = (g * (cdf + h * pdf)).to(dy.dtype)
    dh = g * dy * pdf * (2.0 - h * h)
    low = dh.to(x.dtype)
    return (d_dy, low @ weight, low.t() @ x, None if bias is None else dh.sum(0).to(bias.dtype))


backend.register_autograd(_linear_gelu_grad, _gelu_grad_backward, setup_context=_gelu_grad_setup_context)


@torch.library.custom_op("mpvit_kernels::linear_proj_mlp", mutates_args=())
def _linear_proj_mlp(a: torch.Tensor, x: torch.Tensor, proj_weight: torch.Tensor, proj_bias: torch.Tensor,
                     norm_weight: torch.Tensor, norm_bias: torch.Tensor, eps: float, fc1_weight: torch.Tensor,
                     fc1_bias: torch.Tensor, fc2_weight: torch.Tensor, fc2_bias: torch.Tensor) -> torch.Tensor:
    """out (M, C) contiguous in the dtype of x + proj's output: ``linear_proj_mlp``. a and x (M,
    C) with any strides and float dtypes, C <= 128; the three weights in the GEMMs' dtype, which
    they share; the five vectors in one float dtype."""
    kernels, vector_width, next_pow2, _, _ = _kernels()
    M, C = a.shape
    dtype, hidden = proj_weight.dtype, fc1_weight.shape[0]
    vectors = (proj_bias, norm_weight, norm_bias, fc1_bias, fc2_bias)
    # what the kernel's indexing relies on, for direct calls (the wrapper checked it all, with
    # clearer messages)
    if (x.shape != a.shape or not 1 <= C <= MLP_MAX_C or proj_weight.shape != (C, C)
            or fc1_weight.shape != (hidden, C) or fc2_weight.shape != (C, hidden)
            or any(v.shape != (C,) for v in (proj_bias, norm_weight, norm_bias, fc2_bias))
            or fc1_bias.shape != (hidden,)):
        raise ValueError(f"linear_proj_mlp: a, x (M, C <= {MLP_MAX_C}), proj_weight (C, C), fc1_weight (hidden, C), "
                         f"fc2_weight (C, hidden), biases and norm2's affine (C,) or (hidden,) expected, got "
                         f"{[tuple(t.shape) for t in (a, x, proj_weight, fc1_weight, fc2_weight, *vectors)]}")
    if fc1_weight.dtype != dtype or fc2_weight.dtype != dtype or len({v.dtype for v in vectors}) > 1:
        raise ValueError("linear_proj_mlp: the three weights must share a dtype, and the five vectors one")
    check_float_tensors("linear_proj_mlp", a=a, x=x, proj_weight=proj_weight, proj_bias=proj_bias)
    if any(t.device != a.device for t in (x, proj_weight, fc1_weight, fc2_weight, *vectors)):
        raise ValueError(f"linear_proj_mlp: every tensor must be on a's device ({a.device})")
    check_rows("linear_proj_mlp", M)
    if a.stride(1) != 1 and C != 1:  # the kernel indexes channels with unit stride
        a = a.contiguous()
    if x.stride(1) != 1 and C != 1:
        x = x.contiguous()
    out = torch.empty((M, C), dtype=torch.promote_types(x.dtype, dtype), device=x.device)
    if M == 0:
        return out
    weights = [w.contiguous() for w in (proj_weight, fc1_weight, fc2_weight)]
    vectors = [v.contiguous() for v in vectors]
    vec = vector_width(out.element_size(), C, hidden, *((a.stride(0), x.stride(0)) if M > 1 else ()))
    if any(t.data_ptr() % 16 for t in (a, x, out, *weights, *vectors)):
        vec = 1  # Triton vectorises only 16-byte-aligned pointers
    wp, w1, w2 = weights
    pb, lnw, lnb, b1, b2 = vectors
    with backend.triton_device(a):
        kernels.proj_mlp_kernel[lambda meta: (-(-M // meta["BLOCK_M"]),)](
            a, x, wp, pb, b2, lnw, lnb, w1, b1, w2, out, M, C, hidden, a.stride(0), x.stride(0), float(eps),
            ACC=kernels.tl.float64 if dtype == torch.float64 else kernels.tl.float32,
            DOT_PRECISION=_dot_precision(dtype), BLOCK_C=max(16, next_pow2(C)), VEC=vec)
    return out


@_linear_proj_mlp.register_fake
def _(a, x, proj_weight, proj_bias, norm_weight, norm_bias, eps, fc1_weight, fc1_bias, fc2_weight, fc2_bias):
    return x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, proj_weight.dtype))


def _proj_mlp_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:6], *inputs[7:])
    ctx.eps = inputs[6]


def _proj_mlp_backward(ctx, grad):
    """The grads of ``reference.linear_proj_mlp``'s composition, its forward recomputed in ATen
    ops (differentiable again: a second derivative works)."""
    needs = ctx.needs_input_grad[:6] + ctx.needs_input_grad[7:]
    create_graph = torch.is_grad_enabled()  # a second derivative follows: recompute on the inputs themselves,
    # each slot through a view of its own (one tensor in two slots would otherwise get both slots' grads twice)
    leaves = [t.view_as(t) if need else t for t, need in zip(ctx.saved_tensors, needs)] if create_graph else \
        [t.detach().requires_grad_(need) for t, need in zip(ctx.saved_tensors, needs)]
    wanted = [t for t, need in zip(leaves, needs) if need]
    with torch.enable_grad():
        out = reference.linear_proj_mlp(*leaves[:6], ctx.eps, *leaves[6:])
        grads = iter(torch.autograd.grad(out, wanted, grad, create_graph=create_graph) if wanted else ())
    got = [next(grads) if need else None for need in needs]
    return (*got[:6], None, *got[6:])


backend.register_autograd(_linear_proj_mlp, _proj_mlp_backward, setup_context=_proj_mlp_setup_context)


@_linear.register_fake
def _(x, weight, bias, ln_weight, ln_bias, eps, gelu):
    return x.new_empty((x.shape[0], weight.shape[0]), dtype=weight.dtype)


def _setup_context(ctx, inputs, output):
    x, weight, bias, ln_weight, ln_bias, eps, gelu = inputs
    ctx.save_for_backward(x, weight, bias, ln_weight, ln_bias)
    ctx.args = (eps, gelu)


def _backward(ctx, grad):
    """norm1 -> qkv from NORM_GRAD_ROWS rows: ``linear_norm_grad`` (the LayerNorm's backward in the
    input grad's GEMM), then the weight grad's GEMM. Otherwise (and where the backward itself is
    differentiated) in ATen ops, in the GEMM's dtype as eager's autograd runs them (no casts
    where x, weight and the grad share a dtype; on CPU tensors a 16-bit LayerNorm in fp32, as a
    GPU computes it), from u = layer_norm(x) recomputed; GELU's grad
    from the fused GEMM (h recomputed in registers)."""
    x, weight, bias, ln_weight, ln_bias = ctx.saved_tensors
    eps, gelu = ctx.args
    dtype, K = weight.dtype, x.shape[-1]
    cast = backend.cast
    if ln_weight is not None and not gelu and x.shape[0] >= NORM_GRAD_ROWS and not torch.is_grad_enabled() \
            and ln_weight.dtype == ln_bias.dtype:  # (ops.linear gives them one dtype; a direct call may not)
        g = cast(grad, dtype)
        grad_x, u, sums = backend.call_op(_linear_norm_grad, g, x, weight, ln_weight, ln_bias, eps, bias is not None)
        if bias is None or bias.dtype == ln_weight.dtype:  # (one cast for all three, where any is needed)
            sums = cast(sums, ln_weight.dtype)
        return (grad_x, g.t() @ u, None if bias is None else cast(sums[2 * K:], bias.dtype),
                cast(sums[:K], ln_weight.dtype), cast(sums[K:2 * K], ln_bias.dtype), None, None)
    if ln_weight is not None:
        # in x's dtype where the parameters share it (eager's LayerNorm), else the wider of the two
        # (fp32 parameters over a bf16 stream: eager under autocast)
        ln_dtype = torch.promote_types(x.dtype, ln_weight.dtype)
        if x.device.type == "cpu" and ln_dtype in (torch.float16, torch.bfloat16):
            # (Triton's interpreter) a CPU's 16-bit LayerNorm rounds its mean and rstd to 16 bits
            # where a GPU's keeps them in fp32; its backward from them then loses the cancellation
            # that makes each row's grad sum to zero (K = 2 in fp16: a normwise error of 300, eager's 0.035), so
            # compute it as a GPU does
            ln_dtype = torch.float32
        xn, wn, bn = cast(x, ln_dtype), cast(ln_weight, ln_dtype), cast(ln_bias, ln_dtype)
        u, mean, rstd = torch.ops.aten.native_layer_norm(xn, [K], wn, bn, eps)
        u = cast(u, dtype)
    else:
        u = cast(x, dtype)
    g = cast(grad, dtype)
    grad_bias = None
    if gelu:  # the bias grad from the same pass
        g, sums = backend.call_op(_linear_gelu_grad, g, u, weight, bias)
        grad_bias = None if bias is None else sums
    elif bias is not None:
        grad_bias = cast(g.sum(0), bias.dtype)
    grad_weight = g.t() @ u
    grad_u = g @ weight
    if ln_weight is None:
        return cast(grad_u, x.dtype), grad_weight, grad_bias, None, None, None, None
    grad_x, grad_ln_weight, grad_ln_bias = torch.ops.aten.native_layer_norm_backward(
        cast(grad_u, ln_dtype), xn, [K], mean, rstd, wn, bn, [True, True, True])
    return (cast(grad_x, x.dtype), grad_weight, grad_bias, cast(grad_ln_weight, ln_weight.dtype),
            cast(grad_ln_bias, ln_bias.dtype), None, None)


backend.register_autograd(_linear, _backward, setup_context=_setup_context)
