"""Triton kernel of ``linear`` (the op ``mpvit_kernels::linear``): a token Linear with MPViT's
fusions around its GEMM,

    y = act(layer_norm(x) @ W^T + bias)      x (M, K) rows, W (N, K), y (M, N) rows

with the LayerNorm (NORM: norm1 before the qkv Linear) applied to each A tile as it is loaded
and GELU (the exact, erf one: fc1's) in the epilogue, so neither the normalised tokens nor the
pre-activation hidden ever reach memory. Its backward (GELU_GRAD) is the same GEMM with another
epilogue: the pre-activation h, recomputed as the forward computed it, is never stored either;
the program reads its tile of dy and writes dh = dy * gelu'(h), the grad the weight and input
grads of fc1 are computed from, and its column sums of dh, which the op adds up, in a fixed
order, into the bias grad (so that dh is not read again for it). Always the pinned tile: the
sums' order must not depend on a tuner's pick.

``linear_norm_grad_kernel`` (the op ``mpvit_kernels::linear_norm_grad``) is norm1 -> qkv's
backward: the input grad's GEMM dy W with the LayerNorm's backward in its epilogue (its row sums
need all K channels of a row: one program owns whole rows), writing dx, the recomputed LayerNorm
output u the weight grad's GEMM reads, and per-program column sums for the LayerNorm's and the
bias's grads (dy is read once for its GEMM and the bias grad); pinned tile too.

One program owns BLOCK_M whole rows and BLOCK_N outputs. With NORM it first walks its rows'
K channels twice (mean, then the centred variance, as eager's two-pass LayerNorm: no
cancellation for tokens far from zero mean); the GEMM's K loop then reads the same rows a third
time, all three from cache for the widths MPViT has (K <= 480). The normalised tile is rounded
to W's dtype before the dot, as eager rounds the LayerNorm's output before its Linear reads it.

``proj_mlp_kernel`` (the op ``mpvit_kernels::linear_proj_mlp``, inference) is the rest of an
encoder block after its attention, for C <= 128: s = x + a Wp^T + bp, then
s + b2 + gelu(norm2(s) W1^T + b1) W2^T; proj's, fc1's and fc2's GEMMs in one program, proj's
output, norm2's and the hidden in registers.
"""
import triton
import triton.language as tl

from mpvit_kernels.triton.affine_hswish import _div, _known_multiple
from mpvit_kernels.triton.launch import AUTOTUNE, INTERPRET, pinned, tuned
from mpvit_kernels.triton.residual_layernorm import _row_layernorm
# gli_projection's GEMM tiles, pinned and tuned: the same loop (rows of A with unit channel
# stride, W (N, K)), and they compile without spills with the LayerNorm prologue and GELU
# epilogue too (static report)
from mpvit_kernels.triton.gli_projection import LAUNCH, TUNED_CONFIGS, dot_kind
from mpvit_kernels.triton.gli_projection import _fitting as _gli_fitting
from mpvit_kernels.triton.gli_projection import gpu_tile as _gli_gpu_tile, tile as _gli_tile


@triton.jit
def _normal_cdf(h, ACC: tl.constexpr):
    """Phi(h), the standard normal CDF, in ACC."""
    return 0.5 * (1.0 + tl.math.erf(h * tl.full([], 0.7071067811865476, ACC)))


@triton.jit
def _gelu(h, ACC: tl.constexpr):
    """The exact (erf) GELU, h Phi(h), in ACC."""
    return h * _normal_cdf(h, ACC)


@triton.jit
def _row_stats(rows, mmask, K, eps, ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """(mean, rstd) of the LayerNorm over K channels of the rows at pointers ``rows`` (unit channel
    stride), BLOCK_K channels at a time: eager's two passes, the mean, then the centred variance
    (no cancellation for tokens far from zero mean); rstd = 1 / sqrt(var + eps) correctly rounded."""
    count = tl.full([], 0.0, ACC) + K
    total = tl.zeros([BLOCK_M], ACC)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(rows[:, None] + offs_k[None, :], mask=mmask[:, None] & (offs_k < K)[None, :], other=0.0)
        total += tl.sum(a.to(ACC), axis=1)
    mean = _div(total, count, ACC)
    total = tl.zeros([BLOCK_M], ACC)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        kmask = mmask[:, None] & (offs_k < K)[None, :]
        a = tl.load(rows[:, None] + offs_k[None, :], mask=kmask, other=0.0)
        d = tl.where(kmask, a.to(ACC) - mean[:, None], 0.0)
        total += tl.sum(d * d, axis=1)
    var = _div(total, count, ACC) + tl.full([], eps, ACC)
    if ACC == tl.float64:
        root = tl.sqrt(var)
    else:  # tl.sqrt is the approximate square root in fp32
        root = tl.sqrt_rn(var)
    return mean, _div(tl.full([BLOCK_M], 1.0, ACC), root, ACC)


@triton.jit(do_not_specialize=["M", "m_bucket"])
def linear_kernel(
    x_ptr,  # (M, K) rows with unit channel stride, row stride below; any float dtype
    w_ptr,  # (N, K) contiguous, in the GEMM's dtype (y's)
    bias_ptr,  # (N,) (BIAS), read in ACC
    ln_weight_ptr, ln_bias_ptr,  # (K,) each: the LayerNorm's affine (NORM), read in ACC
    y_ptr,  # (M, N) contiguous: y, or dh with GELU_GRAD
    dy_ptr,  # (M, N) contiguous, y's grad (GELU_GRAD; else not read)
    db_ptr,  # (cdiv(M, BLOCK_M), N) out, in ACC: each program's column sums of dh (GELU_GRAD and BIAS)
    M, K, N, stride_xm,
    m_bucket,  # gli_projection.m_bucket(M): the autotune key, unused in the body
    eps: tl.float64,  # fp64 whatever ACC: a plain Python float would be passed as fp32
    NORM: tl.constexpr, BIAS: tl.constexpr, GELU: tl.constexpr, ACC: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, VEC: tl.constexpr = 1,
    GELU_GRAD: tl.constexpr = False,
):
    # K, N and the row stride are multiples of VEC (launch.vector_width): vector loads
    K = _known_multiple(K, VEC)
    N = _known_multiple(N, VEC)
    stride_xm = _known_multiple(stride_xm, VEC)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask = offs_m < M
    nmask = offs_n < N
    rows = x_ptr + offs_m.to(tl.int64) * stride_xm
    if NORM:
        mean, rstd = _row_stats(rows, mmask, K, eps, ACC, BLOCK_M, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], ACC)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        kmask = offs_k < K
        a = tl.load(rows[:, None] + offs_k[None, :], mask=mmask[:, None] & kmask[None, :], other=0.0)
        if NORM:  # zero in the padding channels: their weight and bias load as 0
            gamma = tl.load(ln_weight_ptr + offs_k, mask=kmask, other=0.0).to(ACC)
            beta = tl.load(ln_bias_ptr + offs_k, mask=kmask, other=0.0).to(ACC)
            a = (a.to(ACC) - mean[:, None]) * rstd[:, None] * gamma[None, :] + beta[None, :]
        w = tl.load(w_ptr + offs_n[None, :].to(tl.int64) * K + offs_k[:, None], mask=kmask[:, None] & nmask[None, :],
                    other=0.0)
        acc += tl.dot(a.to(w_ptr.dtype.element_ty), w, out_dtype=ACC, input_precision=DOT_PRECISION)
    if BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=nmask, other=0.0).to(ACC)[None, :]
    out = offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    omask = mmask[:, None] & nmask[None, :]
    if GELU:
        acc = _gelu(acc, ACC)
    if GELU_GRAD:  # gelu'(h) = Phi(h) + h phi(h)
        cdf = _normal_cdf(acc, ACC)
        pdf = tl.exp(-0.5 * acc * acc) * tl.full([], 0.3989422804014327, ACC)
        dy = tl.load(dy_ptr + out, mask=omask, other=0.0).to(ACC)
        acc = dy * (cdf + acc * pdf)
        if BIAS:
            tl.store(db_ptr + tl.program_id(0).to(tl.int64) * N + offs_n,
                     tl.sum(tl.where(omask, acc, 0.0), axis=0), mask=nmask)
    tl.store(y_ptr + out, acc.to(y_ptr.dtype.element_ty), mask=omask)


@triton.jit(do_not_specialize=["M"])
def mlp_gelu_grad_kernel(
    x_ptr,  # (M, K) rows with unit channel stride, row stride below: fc1's input
    w_ptr,  # (N, K) contiguous: fc1's weight, in the GEMM's dtype
    bias_ptr,  # (N,) fc1's bias (BIAS), read in ACC
    g_ptr,  # (M, K) contiguous: the grad of the MLP's output (fc2's), in the GEMM's dtype
    w2_ptr,  # (K, N) contiguous: fc2's weight, in the GEMM's dtype
    dh_ptr,  # (M, N) contiguous out, in the GEMM's dtype
    db_ptr,  # (cdiv(M, BLOCK_M), N) out, in ACC: each program's column sums of dh (BIAS)
    M, K, N, stride_xm,
    BIAS: tl.constexpr, ACC: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, VEC: tl.constexpr = 1,
):
    """fc1's pre-activation grad in an MLP x -> fc1 -> GELU -> fc2: dh = (g W2) * gelu'(h), both
    GEMMs over the same K = fc1's inputs = fc2's outputs in one loop, h = x W1^T + b recomputed
    (linear_kernel's GELU_GRAD, with dy = g W2 computed here instead of read: the 4C-wide grad of
    the hidden never reaches memory), and each program's column sums of dh for fc1's bias grad."""
    K = _known_multiple(K, VEC)
    N = _known_multiple(N, VEC)
    stride_xm = _known_multiple(stride_xm, VEC)
    # one grid axis, a row block's column tiles next to each other: they run together and read
    # that block's x and g rows from L2 (row blocks first, each tile would stream all of x and g)
    tiles_n = tl.cdiv(N, BLOCK_N)
    pid_m = tl.program_id(0) // tiles_n
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = (tl.program_id(0) % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask = offs_m < M
    nmask = offs_n < N
    rows = x_ptr + offs_m.to(tl.int64) * stride_xm
    g_rows = g_ptr + offs_m.to(tl.int64) * K
    h = tl.zeros([BLOCK_M, BLOCK_N], ACC)
    dy = tl.zeros([BLOCK_M, BLOCK_N], ACC)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        kmask = offs_k < K
        amask = mmask[:, None] & kmask[None, :]
        wmask = kmask[:, None] & nmask[None, :]
        a = tl.load(rows[:, None] + offs_k[None, :], mask=amask, other=0.0)
        w = tl.load(w_ptr + offs_n[None, :].to(tl.int64) * K + offs_k[:, None], mask=wmask, other=0.0)
        h += tl.dot(a, w, out_dtype=ACC, input_precision=DOT_PRECISION)
        a = tl.load(g_rows[:, None] + offs_k[None, :], mask=amask, other=0.0)
        w = tl.load(w2_ptr + offs_k[:, None].to(tl.int64) * N + offs_n[None, :], mask=wmask, other=0.0)
        dy += tl.dot(a, w, out_dtype=ACC, input_precision=DOT_PRECISION)
    if BIAS:
        h += tl.load(bias_ptr + offs_n, mask=nmask, other=0.0).to(ACC)[None, :]
    omask = mmask[:, None] & nmask[None, :]
    # gelu'(h) = Phi(h) + h phi(h)
    dh = dy * (_normal_cdf(h, ACC) + h * tl.exp(-0.5 * h * h) * tl.full([], 0.3989422804014327, ACC))
    if BIAS:
        tl.store(db_ptr + pid_m.to(tl.int64) * N + offs_n, tl.sum(tl.where(omask, dh, 0.0), axis=0), mask=nmask)
    tl.store(dh_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :], dh.to(dh_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _grad_u_tile(dy_rows, w_ptr, offs_c, cmask, mmask, K, N, db_ptr, sums_wanted, BIAS_SUMS: tl.constexpr,
                 ACC: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
                 BLOCK_R: tl.constexpr):
    """The (BLOCK_M, BLOCK_C) tile dy W[:, offs_c] of the normalised tokens' grad, N columns of dy
    BLOCK_R at a time; with BIAS_SUMS, where ``sums_wanted``, also the column sums of the dy rows
    it reads (this program's part of the bias grad) stored at db_ptr."""
    acc = tl.zeros([BLOCK_M, BLOCK_C], ACC)
    for r0 in range(0, N, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        rmask = offs_r < N
        a = tl.load(dy_rows[:, None] + offs_r[None, :], mask=mmask[:, None] & rmask[None, :], other=0.0)
        if BIAS_SUMS:
            if sums_wanted:  # (a branch, not a store mask: the WIDE passes after the first skip the sum)
                tl.store(db_ptr + offs_r, tl.sum(a.to(ACC), axis=0), mask=rmask)
        w = tl.load(w_ptr + offs_r[:, None].to(tl.int64) * K + offs_c[None, :], mask=rmask[:, None] & cmask[None, :],
                    other=0.0)
        acc += tl.dot(a, w, out_dtype=ACC, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _xhat_tile(rows, offs_c, cmask, mmask, mean, rstd, ACC: tl.constexpr):
    """(x - mean) * rstd of the rows' channels offs_c, zero where masked."""
    mask = mmask[:, None] & cmask[None, :]
    x = tl.load(rows[:, None] + offs_c[None, :], mask=mask, other=0.0).to(ACC)
    return tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)


@triton.jit
def _norm_grad_sums(gu, rows, offs_c, cmask, mmask, offs_m, K, mean, rstd, ln_weight_ptr, ln_bias_ptr, u_ptr, part,
                    ACC: tl.constexpr):
    """For one tile gu of the normalised tokens' grad: stores u = layer_norm(x) (the weight grad's
    operand) and this program's column sums for the LayerNorm's weight and bias grads; returns
    each row's sums of g = gu * gamma and of g * xhat over these channels."""
    xhat = _xhat_tile(rows, offs_c, cmask, mmask, mean, rstd, ACC)
    gamma = tl.load(ln_weight_ptr + offs_c, mask=cmask, other=0.0).to(ACC)
    beta = tl.load(ln_bias_ptr + offs_c, mask=cmask, other=0.0).to(ACC)
    u = xhat * gamma[None, :] + beta[None, :]
    tl.store(u_ptr + offs_m.to(tl.int64)[:, None] * K + offs_c[None, :], u.to(u_ptr.dtype.element_ty),
             mask=mmask[:, None] & cmask[None, :])
    tl.store(part + offs_c, tl.sum(gu * xhat, axis=0), mask=cmask)
    tl.store(part + K + offs_c, tl.sum(gu, axis=0), mask=cmask)
    g = gu * gamma[None, :]
    return tl.sum(g, axis=1), tl.sum(g * xhat, axis=1)


@triton.jit
def _store_dx(gu, rows, offs_c, cmask, mmask, offs_m, K, mean, rstd, mean_g, mean_g_xhat, ln_weight_ptr, dx_ptr,
              ACC: tl.constexpr):
    """dx = rstd (g - mean_c(g) - xhat mean_c(g xhat)), g = gu * gamma, for one tile."""
    xhat = _xhat_tile(rows, offs_c, cmask, mmask, mean, rstd, ACC)
    g = gu * tl.load(ln_weight_ptr + offs_c, mask=cmask, other=0.0).to(ACC)[None, :]
    dx = rstd[:, None] * (g - mean_g[:, None] - xhat * mean_g_xhat[:, None])
    tl.store(dx_ptr + offs_m.to(tl.int64)[:, None] * K + offs_c[None, :], dx.to(dx_ptr.dtype.element_ty),
             mask=mmask[:, None] & cmask[None, :])


@triton.jit(do_not_specialize=["M"])
def linear_norm_grad_kernel(
    dy_ptr,  # (M, N) contiguous: the grad of y = layer_norm(x) @ W^T (+ bias), in the GEMM's dtype
    w_ptr,  # (N, K) contiguous, in the GEMM's dtype
    x_ptr,  # (M, K) rows with unit channel stride, row stride below; any float dtype
    ln_weight_ptr, ln_bias_ptr,  # (K,) each: the LayerNorm's affine, read in ACC
    dx_ptr,  # (M, K) contiguous out, in x's dtype
    u_ptr,  # (M, K) contiguous out, in the GEMM's dtype: layer_norm(x) recomputed, the weight grad's operand
    part_ptr,  # (cdiv(M, BLOCK_M), 2K (+ N with BIAS)) out, in ACC: each program's column sums (below)
    M, K, N, stride_xm,
    eps: tl.float64,  # fp64 whatever ACC: a plain Python float would be passed as fp32
    BIAS: tl.constexpr, WIDE: tl.constexpr, ACC: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, VEC: tl.constexpr = 1,
):
    """The backward of norm1 -> the qkv Linear from its output's grad dy, for BLOCK_M whole rows:
    gu = dy W (the normalised tokens' grad, BLOCK_C channels a tile, never stored), then the
    LayerNorm's backward on it, dx = rstd (g - mean_c(g) - xhat mean_c(g xhat)) with g = gu gamma,
    and u = layer_norm(x) for the weight grad's GEMM (dW = dy^T u, cuBLAS). Each program writes
    its column sums of gu xhat and gu (the LayerNorm weight's and bias's grads) and, with BIAS, of
    dy (the Linear bias's grad), which the op adds up in a fixed order: dy is read once for both
    the GEMM and the bias grad. The row sums need every channel: WIDE (K > BLOCK_C) computes the
    tiles twice (the second time from cache), else the one tile stays in registers."""
    K = _known_multiple(K, VEC)
    N = _known_multiple(N, VEC)
    stride_xm = _known_multiple(stride_xm, VEC)
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = offs_m < M
    rows = x_ptr + offs_m.to(tl.int64) * stride_xm
    dy_rows = dy_ptr + offs_m.to(tl.int64) * N
    mean, rstd = _row_stats(rows, mmask, K, eps, ACC, BLOCK_M, BLOCK_C)
    if BIAS:
        part = part_ptr + pid.to(tl.int64) * (2 * K + N)
    else:
        part = part_ptr + pid.to(tl.int64) * (2 * K)
    count = tl.full([], 0.0, ACC) + K
    if WIDE:
        # one loop, one GEMM in the code, over the tiles twice: the row sums, then dx (a loop per
        # phase unrolled three GEMMs' address arithmetic and spilled where rows are not aligned)
        tiles = tl.cdiv(K, BLOCK_C)
        sum_g = tl.zeros([BLOCK_M], ACC)
        sum_g_xhat = tl.zeros([BLOCK_M], ACC)
        for t in range(0, 2 * tiles):
            offs_c = (t % tiles) * BLOCK_C + tl.arange(0, BLOCK_C)
            cmask = offs_c < K
            gu = _grad_u_tile(dy_rows, w_ptr, offs_c, cmask, mmask, K, N, part + 2 * K, t == 0, BIAS, ACC,
                              DOT_PRECISION, BLOCK_M, BLOCK_C, BLOCK_R)
            if t < tiles:
                s, s_xhat = _norm_grad_sums(gu, rows, offs_c, cmask, mmask, offs_m, K, mean, rstd, ln_weight_ptr,
                                            ln_bias_ptr, u_ptr, part, ACC)
                sum_g += s
                sum_g_xhat += s_xhat
            else:
                _store_dx(gu, rows, offs_c, cmask, mmask, offs_m, K, mean, rstd, _div(sum_g, count, ACC),
                          _div(sum_g_xhat, count, ACC), ln_weight_ptr, dx_ptr, ACC)
    else:
        offs_c = tl.arange(0, BLOCK_C)
        cmask = offs_c < K
        gu = _grad_u_tile(dy_rows, w_ptr, offs_c, cmask, mmask, K, N, part + 2 * K, True, BIAS, ACC, DOT_PRECISION,
                          BLOCK_M, BLOCK_C, BLOCK_R)
        sum_g, sum_g_xhat = _norm_grad_sums(gu, rows, offs_c, cmask, mmask, offs_m, K, mean, rstd, ln_weight_ptr,
                                            ln_bias_ptr, u_ptr, part, ACC)
        _store_dx(gu, rows, offs_c, cmask, mmask, offs_m, K, mean, rstd, _div(sum_g, count, ACC),
                  _div(sum_g_xhat, count, ACC), ln_weight_ptr, dx_ptr, ACC)


@triton.jit
def _mlp_onto(acc, u, w1_ptr, b1_ptr, w2_ptr, C, HID, offs_c, cmask,
              ACC: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_H: tl.constexpr):
    """acc + gelu(u W1^T + b1) W2^T for a (BLOCK_M, BLOCK_C) tile of tokens u (in the GEMMs' dtype,
    zero past C): the hidden BLOCK_H columns at a time (fc1's GEMM, its bias and GELU, rounded to
    the GEMMs' dtype as eager's fc1 output is, then fc2's GEMM onto all C outputs), never stored."""
    ty = w1_ptr.dtype.element_ty
    for h0 in range(0, HID, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        hmask = offs_h < HID
        # W1^T's columns h0.. (C x BLOCK_H) and W2^T's rows h0.. (BLOCK_H x C); zero past C and HID,
        # so the padded hidden columns are gelu(0) = 0 and add nothing
        w1 = tl.load(w1_ptr + offs_h[None, :].to(tl.int64) * C + offs_c[:, None], mask=cmask[:, None] & hmask[None, :],
                     other=0.0)
        h = tl.dot(u, w1, out_dtype=ACC, input_precision=DOT_PRECISION)
        h = _gelu(h + tl.load(b1_ptr + offs_h, mask=hmask, other=0.0).to(ACC)[None, :], ACC)
        w2 = tl.load(w2_ptr + offs_c[None, :].to(tl.int64) * HID + offs_h[:, None], mask=hmask[:, None] & cmask[None, :],
                     other=0.0)
        acc += tl.dot(h.to(ty), w2, out_dtype=ACC, input_precision=DOT_PRECISION)
    return acc


@triton.jit(do_not_specialize=["M"])
def proj_mlp_kernel(
    a_ptr,  # (M, C) rows with unit channel stride: the attention's output, proj's input; any float dtype
    x_ptr,  # (M, C) rows with unit channel stride: the block's input (the residual stream)
    wp_ptr,  # (C, C) contiguous: proj's weight, in the GEMMs' dtype
    pb_ptr, b2_ptr, lnw_ptr, lnb_ptr,  # (C,) each: proj's bias, fc2's, norm2's weight and bias; read in ACC
    w1_ptr, b1_ptr, w2_ptr,  # fc1's weight (HID, C), its bias (HID,, read in ACC), fc2's weight (C, HID)
    out_ptr,  # (M, C) contiguous, in x's dtype: the block's output
    M, C, HID, stride_am, stride_xm,
    eps: tl.float64,  # fp64 whatever ACC: a plain Python float would be passed as fp32
    ACC: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, VEC: tl.constexpr = 1,
):
    """An encoder block after its attention, for BLOCK_M tokens: s = x + a Wp^T + bp, then
    out = s + b2 + MLP(norm2(s)) (_mlp_onto). proj's output, s, norm2's output and the hidden
    all stay in registers: a and x are read once, the output written once (unfused: proj's
    output written and read, residual_layernorm's r and u, fc1's 4C-wide hidden). One program
    holds whole rows (BLOCK_C >= C); the weights come from L2."""
    C = _known_multiple(C, VEC)
    HID = _known_multiple(HID, VEC)
    stride_am = _known_multiple(stride_am, VEC)
    stride_xm = _known_multiple(stride_xm, VEC)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # (past 2^31 in the last program)
    offs_c = tl.arange(0, BLOCK_C)
    cmask = offs_c < C
    mmask = rows < M
    tmask = mmask[:, None] & cmask[None, :]
    ty = w1_ptr.dtype.element_ty
    # proj's GEMM in K chunks of BLOCK_H (a whole C x C operand would not fit in registers where
    # the dots run on FMA units); Wp^T (C_in x C_out) zero past C: s is zero in the padding
    # columns, as the LayerNorm needs
    s = tl.zeros([BLOCK_M, BLOCK_C], ACC)
    for k0 in range(0, C, BLOCK_H):
        offs_k = k0 + tl.arange(0, BLOCK_H)
        kmask = offs_k < C
        a = tl.load(a_ptr + rows[:, None] * stride_am + offs_k[None, :], mask=mmask[:, None] & kmask[None, :], other=0.0)
        wp = tl.load(wp_ptr + offs_c[None, :].to(tl.int64) * C + offs_k[:, None], mask=kmask[:, None] & cmask[None, :],
                     other=0.0)
        s += tl.dot(a.to(ty), wp, out_dtype=ACC, input_precision=DOT_PRECISION)
    s += tl.load(x_ptr + rows[:, None] * stride_xm + offs_c[None, :], mask=tmask, other=0.0).to(ACC)
    s += tl.load(pb_ptr + offs_c, mask=cmask, other=0.0).to(ACC)[None, :]
    dev, _, rstd = _row_layernorm(s, tmask, C, eps, ACC)
    u = dev * rstd[:, None] * tl.load(lnw_ptr + offs_c, mask=cmask, other=0.0).to(ACC)[None, :] + \
        tl.load(lnb_ptr + offs_c, mask=cmask, other=0.0).to(ACC)[None, :]
    acc = s + tl.load(b2_ptr + offs_c, mask=cmask, other=0.0).to(ACC)[None, :]
    acc = _mlp_onto(acc, u.to(ty), w1_ptr, b1_ptr, w2_ptr, C, HID, offs_c, cmask, ACC, DOT_PRECISION, BLOCK_H)
    tl.store(out_ptr + rows[:, None] * C + offs_c[None, :], acc.to(out_ptr.dtype.element_ty), mask=tmask)


def proj_mlp_tile(block_c: int, kind: str) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_H, num_warps, num_stages) of proj_mlp_kernel for this BLOCK_C and GEMM dtype
    ("fp64", "fp32" or "16-bit"): the largest row blocks (each program reads all three weights
    whole, from L2) that compile without spills for sm_80 and sm_90a (static report), aligned or
    not; 128 x 128 16-bit tiles over an fp32 stream spilled. fp32 and fp64 dots run on FMA
    units, their operands in registers: smaller tiles."""
    if kind == "fp64":
        return 32, 16, 8, 1
    if kind == "fp32":
        return (32 if block_c <= 64 else 16), 16, 8, 1
    return (128 if block_c <= 64 else 64), 32, 8, 2


def _pinned_tile(keys, tile, names):
    """``pinned(keys, ...)`` whose values ``names`` (a block size, its reduction step, num_warps,
    num_stages) are the entries of ``tile(meta)``, with ptxas's register budget pinned at 255, as
    gli_projection's LAUNCH pins it."""
    values = {name: (lambda meta, i=i: tile(meta)[i]) for i, name in enumerate(names)}
    return pinned(keys, {**values, **({} if INTERPRET else {"maxnreg": lambda meta: 255})})


def _proj_mlp_tile(meta):
    return proj_mlp_tile(meta["BLOCK_C"], dot_kind(meta))


# (the register budget: Triton 3.6's ptxas capped the aligned 16-bit 64 x 128 tile at 128
# registers and spilled 8 bytes on sm_80)
proj_mlp_kernel = _pinned_tile(("BLOCK_C", "ACC", "DOT_PRECISION"), _proj_mlp_tile,
                               ("BLOCK_M", "BLOCK_H", "num_warps", "num_stages"))(proj_mlp_kernel)


def _fitting(configs, named_args, **meta):
    """gli_projection's tiles that fit, less, for fp32 dots (FMA, operands in registers), those
    with over 32 accumulator values per thread: here 64 spilled 8-24 bytes on sm_90a (the GELU
    and plain sites at 4 warps, static report)."""
    fit = _gli_fitting(configs, named_args, **meta)
    if meta["DOT_PRECISION"] != "ieee":
        return fit
    return [c for c in fit if c.kwargs["BLOCK_M"] * meta["BLOCK_N"] <= 32 * 32 * c.num_warps]


# The tuned launch (ops.linear takes it where aligned, not fp64), tuned per (bucket of M, widths,
# fusions, dtypes) over gli_projection's tiles (_fitting), whose BLOCK_K is the pinned tile's: the
# LayerNorm's sums and each output's K products keep their order whatever the pick. The pinned
# tile everywhere else: the worst-case launches, MPVIT_KERNELS_AUTOTUNE=0 and the interpreter.
linear_tuned = tuned(
    TUNED_CONFIGS, key=["m_bucket", "K", "N", "NORM", "BIAS", "GELU"],
    prune_configs_by={"early_config_prune": _fitting})(linear_kernel) if AUTOTUNE else LAUNCH(linear_kernel)
linear_kernel = LAUNCH(linear_kernel)


def mlp_grad_tile(block_n: int, kind: str, on_gpu: bool = False) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_K, num_warps, num_stages) of mlp_gelu_grad_kernel for this BLOCK_N and
    GEMM dtype: gli_projection's tile with half its rows (two accumulators, h and dy), fp32's
    always on 8 warps (its FMA dots' operands live in registers: at 4 warps an unaligned 32-wide
    tile spilled 8 bytes), which compiles without spills for sm_80 and sm_90a (static report);
    ``on_gpu``: a GPU's tile even under the interpreter. The op sizes the partial sums with
    BLOCK_M."""
    block_m, block_k, warps, stages = (_gli_gpu_tile if on_gpu else _gli_tile)(block_n, kind)
    return max(16, block_m // 2), block_k, 8 if kind == "fp32" else warps, stages


def _mlp_grad_tile(meta):
    return mlp_grad_tile(meta["BLOCK_N"], dot_kind(meta))


# always pinned: the bias grad's partial sums keep one order
mlp_gelu_grad_kernel = _pinned_tile(("BLOCK_N", "ACC", "DOT_PRECISION"), _mlp_grad_tile,
                                    ("BLOCK_M", "BLOCK_K", "num_warps", "num_stages"))(mlp_gelu_grad_kernel)


def norm_grad_tile(block_c: int, kind: str, wide: bool, vec: int, on_gpu: bool = False) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_R, num_warps, num_stages) of linear_norm_grad_kernel for this BLOCK_C, GEMM
    dtype ("fp64", "fp32" or "16-bit"), WIDE and VEC: gli_projection's tile with half its rows
    (the LayerNorm's epilogue holds several tiles' worth of values; the full tile spilled), and a
    quarter where WIDE rows are read element by element (VEC < 8: Triton 3.6 spilled 8-96 bytes
    at half), which compile without spills for sm_80 and sm_90a (static report, Triton 3.8 and
    3.6); ``on_gpu``: a GPU's tile even under the interpreter (the traffic model). The op sizes
    the partial sums with BLOCK_M. A 16-bit WIDE launch with 16-byte rows (VEC = 8, MPViT's
    stages 3 and 4) takes the whole tile: 64 rows compile without spills there in 220-252
    registers, the same 8 warps an SM as 32 rows' 155-178, and on sm_90a the dots become wgmma
    (at 32 rows, under its 64-row minimum, mma.sync); each row tile reads the weight's tiles
    once for twice the rows."""
    block_m, block_r, warps, stages = (_gli_gpu_tile if on_gpu else _gli_tile)(block_c, kind)
    if wide and vec == 8 and kind == "16-bit":
        return block_m, block_r, warps, stages
    return max(16, block_m // (4 if wide and vec < 8 else 2)), block_r, warps, stages


def _norm_grad_tile(meta):
    return norm_grad_tile(meta["BLOCK_C"], dot_kind(meta), meta["WIDE"], meta["VEC"])


# gli_projection's pinned tiles, BLOCK_C wide over x's channels, dy's columns BLOCK_R (its
# BLOCK_K) at a time; always pinned: the partial sums' order must not depend on a tuner's pick
linear_norm_grad_kernel = _pinned_tile(("BLOCK_C", "ACC", "DOT_PRECISION", "WIDE", "VEC"), _norm_grad_tile,
                                       ("BLOCK_M", "BLOCK_R", "num_warps", "num_stages"))(linear_norm_grad_kernel)


# (what the model launches) the qkv Linear after norm1, fc1 with GELU and its backward (pinned
# tile only); plus the plain Linear
SITES = {"norm": dict(NORM=True, BIAS=True, GELU=False), "gelu": dict(NORM=False, BIAS=True, GELU=True),
         "gelu_grad": dict(NORM=False, BIAS=True, GELU=False, GELU_GRAD=True),
         "plain": dict(NORM=False, BIAS=False, GELU=False)}


def compile_specs():
    """What the op can launch, for the ahead-of-time compile check (static_compile.py): every
    BLOCK_N, GEMM dtype and site; for a 16-bit GEMM, x and the parameters in it (a 16-bit
    model), or the parameters in fp32 with x in it or in fp32 (autocast: norm1's input is the
    fp32 residual stream of an fp32 model; GELU's grad reads x in the GEMM's dtype); each with
    no alignment known, and for MPViT's widths and dtypes as it launches them (VEC=8, aligned
    pointers; also with every tile the tuner may pick there, GELU's grad excepted: pinned)."""
    from mpvit_kernels.triton.static_compile import as_launched

    specs = []
    for dt in ("fp16", "bf16", "fp32", "fp64"):
        acc_ty = tl.float64 if dt == "fp64" else tl.float32
        precision = "ieee" if dt in ("fp32", "fp64") else "tf32"
        dtypes = [(dt, dt), (dt, "fp32"), ("fp32", "fp32")] if dt in ("fp16", "bf16") else [(dt, dt)]
        for x_dt, p_dt in dtypes:
            for bn in (16, 32, 64, 128):
                for site, flags in SITES.items():
                    grad = site == "gelu_grad"
                    if grad and x_dt != dt:  # GELU's grad reads x cast to the GEMM's dtype
                        continue
                    types = {"x_ptr": f"*{x_dt}", "w_ptr": f"*{dt}", "bias_ptr": f"*{p_dt}",
                             "ln_weight_ptr": f"*{p_dt}", "ln_bias_ptr": f"*{p_dt}", "y_ptr": f"*{dt}",
                             "dy_ptr": f"*{dt}", "db_ptr": "*fp64" if dt == "fp64" else "*fp32"}
                    spec = (linear_kernel, f"{dt} x={x_dt} params={p_dt} BLOCK_N={bn} {site}", types,
                            {**flags, "ACC": acc_ty, "DOT_PRECISION": precision, "BLOCK_N": bn})
                    # GELU's grad is at most 64 wide in fp64 and, unless aligned, for 16-bit GEMMs (ops.linear)
                    if not (grad and bn > 64 and dt != "fp32"):
                        specs.append(spec)
                    if bn >= 64 and dt != "fp64":  # MPViT's widths: 64 to 1920, multiples of 8
                        specs.append(as_launched(spec))
                        if not grad:
                            specs.append(as_launched(spec, linear_tuned, " tuned"))  # every tile it may pick
    # the MLP's fc1 grad through fc2 (training): every BLOCK_N and GEMM dtype, x, g and the
    # weights in it (ops.linear_mlp casts x under autocast), fc1's bias in it or, for a 16-bit
    # GEMM, in fp32 (autocast's fp32 parameters)
    for dt in ("fp16", "bf16", "fp32", "fp64"):
        acc_ty = tl.float64 if dt == "fp64" else tl.float32
        precision = "ieee" if dt in ("fp32", "fp64") else "tf32"
        for bias_dt in ([dt, "fp32"] if dt in ("fp16", "bf16") else [dt]):
            for bn in (16, 32, 64, 128):
                if dt == "fp64" and bn > 64:  # (ops.linear.mlp_grad_tiles: at most 64 wide in fp64)
                    continue
                types = {"x_ptr": f"*{dt}", "w_ptr": f"*{dt}", "bias_ptr": f"*{bias_dt}", "g_ptr": f"*{dt}",
                         "w2_ptr": f"*{dt}", "dh_ptr": f"*{dt}", "db_ptr": "*fp64" if dt == "fp64" else "*fp32"}
                spec = (mlp_gelu_grad_kernel, f"{dt} bias={bias_dt} BLOCK_N={bn}", types,
                        {"BIAS": True, "ACC": acc_ty, "DOT_PRECISION": precision, "BLOCK_N": bn})
                specs.append(spec)
                if bn >= 64 and dt != "fp64":
                    specs.append(as_launched(spec))
    # norm1 -> qkv's backward: every BLOCK_C, the channels in one tile or over several (WIDE), with
    # and without the bias's sums; x (dx) in the GEMM's dtype or, for a 16-bit GEMM, in fp32
    # (autocast's fp32 stream), the LayerNorm's parameters in it or in fp32
    for dt in ("fp16", "bf16", "fp32", "fp64"):
        acc_ty = tl.float64 if dt == "fp64" else tl.float32
        precision = "ieee" if dt in ("fp32", "fp64") else "tf32"
        dtypes = [(dt, dt), (dt, "fp32"), ("fp32", "fp32")] if dt in ("fp16", "bf16") else [(dt, dt)]
        for x_dt, p_dt in dtypes:
            for bc in (16, 32, 64, 128):
                for wide, bias in ((False, True), (True, True), (True, False)):
                    # a tile narrower than 64 covers its K channels whole; fp64 tiles are at most 64
                    # wide (ops.linear.norm_grad_tiles)
                    if (wide and bc < 64) or (dt == "fp64" and bc > 64):
                        continue
                    types = {"dy_ptr": f"*{dt}", "w_ptr": f"*{dt}", "x_ptr": f"*{x_dt}", "ln_weight_ptr": f"*{p_dt}",
                             "ln_bias_ptr": f"*{p_dt}", "dx_ptr": f"*{x_dt}", "u_ptr": f"*{dt}",
                             "part_ptr": "*fp64" if dt == "fp64" else "*fp32", "eps": "fp64"}
                    spec = (linear_norm_grad_kernel,
                            f"{dt} x={x_dt} params={p_dt} BLOCK_C={bc}" + (" wide" if wide else "")
                            + ("" if bias else " no bias"), types,
                            {"BIAS": bias, "WIDE": wide, "ACC": acc_ty, "DOT_PRECISION": precision, "BLOCK_C": bc,
                             "VEC": 1})  # (VEC keys the tile: stated)
                    specs.append(spec)
                    if bc >= 64 and dt != "fp64" and bias:  # MPViT's widths (64 to 480) as it launches them
                        specs.append(as_launched(spec))
    # the block after its attention: every BLOCK_C; x (and the output, the parameters) in the
    # GEMMs' dtype (a 16-bit or fp32 model) or, for a 16-bit GEMM, in fp32 (autocast: the fp32
    # residual stream and parameters; the attention's output a in the GEMMs' dtype either way)
    for dt in ("fp16", "bf16", "fp32", "fp64"):
        acc_ty = tl.float64 if dt == "fp64" else tl.float32
        precision = "ieee" if dt in ("fp32", "fp64") else "tf32"
        for io in ([dt, "fp32"] if dt in ("fp16", "bf16") else [dt]):
            for bc in (16, 32, 64, 128):
                types = {"a_ptr": f"*{dt}", "x_ptr": f"*{io}", "wp_ptr": f"*{dt}", "w1_ptr": f"*{dt}",
                         "w2_ptr": f"*{dt}", "out_ptr": f"*{io}", "eps": "fp64",
                         **{name: f"*{io}" for name in ("pb_ptr", "b2_ptr", "lnw_ptr", "lnb_ptr", "b1_ptr")}}
                spec = (proj_mlp_kernel, f"{dt} x={io} BLOCK_C={bc}", types,
                        {"ACC": acc_ty, "DOT_PRECISION": precision, "BLOCK_C": bc})
                specs.append(spec)
                if bc >= 64 and dt != "fp64":  # MPViT's widths (64, 96, 128) as it launches them
                    specs.append(as_launched(spec))
    return specs
