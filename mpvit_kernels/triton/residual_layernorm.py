"""Triton kernel of ``residual_layernorm`` (the op ``mpvit_kernels::residual_layernorm_fwd``; its
C++ CPU twin is csrc/cpu/residual_layernorm.cpp): the residual add after a block's attention and the
LayerNorm before its MLP, as one pass over the tokens.

Rows are tokens (M = B*N), columns channels; one program normalises BLOCK_M whole rows (a
row's C channels fit one tile: C <= MAX_CHANNELS). Per row, in ACC:

    s = x + y + bias                    (the block's residual stream after attention)
    u = (s - mean(s)) * rstd * weight + ln_bias,  rstd = 1 / sqrt(var(s) + eps)
    r = s + next_bias                   (the residual the MLP's second Linear accumulates onto)

and the row's (mean, rstd) for the backward. x and y are read once, r and u written once.
The backward (``residual_layernorm_bwd_kernel``) reads x, y, grad_r and grad_u once and writes
grad_s once (the grad of x, of y and of the proj GEMM's output alike), with per-program column
sums for the four parameters' grads.
"""
import triton
import triton.language as tl

from mpvit_kernels.ops.residual_layernorm import MAX_CHANNELS
from mpvit_kernels.triton.affine_hswish import _div, _known_multiple
from mpvit_kernels.triton.launch import INTERPRET, next_pow2, pinned


def gpu_tile(block_c: int) -> tuple[int, int]:
    """(BLOCK_M, num_warps) for rows of BLOCK_C channels on a GPU: about 1024 values per program,
    8 per thread and array (the 2048-wide rows take 8 warps), which compile without spills for
    sm_80 and sm_90a, forward and backward (`make static-report`)."""
    return max(1, 1024 // block_c), 4 if block_c <= 1024 else 8


def tile(block_c: int) -> tuple[int, int]:
    """The tile launched: the GPU's, or under the interpreter the fewest programs."""
    return (max(1, 8192 // block_c), 4) if INTERPRET else gpu_tile(block_c)


# ptxas's register budget pinned: left to itself it spills 8 bytes in one bf16 tile on sm_80.
# (255 x 8 warps still fits an SM's 64K registers: the static report checks each block fits.)
LAUNCH = pinned(("BLOCK_C",), {
    "BLOCK_M": lambda meta: tile(meta["BLOCK_C"])[0],
    "num_warps": lambda meta: tile(meta["BLOCK_C"])[1],
    **({} if INTERPRET else {"maxnreg": lambda meta: 255}),
})


@triton.jit
def _tokens(ptr, rows, cols, mask, N, stride_b, stride_n, ACC: tl.constexpr):
    """The (BLOCK_M, BLOCK_C) tile of rows ``rows`` of a (B, N, C) tensor with unit channel
    stride, in ACC, zero where masked; batch and token offsets in 64 bits."""
    b = (rows // N).to(tl.int64)
    n = (rows % N).to(tl.int64)
    return tl.load(ptr + (b * stride_b + n * stride_n)[:, None] + cols[None, :], mask=mask, other=0.0).to(ACC)


@triton.jit
def _aligned(C, stride_xb, stride_xn, stride_yb, stride_yn, VEC: tl.constexpr):
    """C and the strides, which the op has checked are multiples of VEC (launch.vector_width),
    stated so: 16-byte loads and stores at widths such as 216."""
    return (_known_multiple(C, VEC), _known_multiple(stride_xb, VEC), _known_multiple(stride_xn, VEC),
            _known_multiple(stride_yb, VEC), _known_multiple(stride_yn, VEC))


@triton.jit
def _row_layernorm(s, mask, C, eps, ACC: tl.constexpr):
    """(s - mean, mean, rstd) of each row of the (BLOCK_M, BLOCK_C) tile s over its C channels (s
    zero in the padding columns; the deviations zero where ``mask`` is off): eager's two passes,
    the mean, then the centred variance, rstd = 1 / sqrt(var + eps) correctly rounded."""
    count = tl.full([], 0.0, ACC) + C
    mean = _div(tl.sum(s, 1), count, ACC)
    dev = tl.where(mask, s - mean[:, None], 0.0)
    var = _div(tl.sum(dev * dev, 1), count, ACC)
    if ACC == tl.float64:
        root = tl.sqrt(var + tl.full([], eps, ACC))
    else:  # tl.sqrt is the approximate square root in fp32
        root = tl.sqrt_rn(var + tl.full([], eps, ACC))
    return dev, mean, _div(tl.full([], 1.0, ACC), root, ACC)


@LAUNCH
@triton.jit(do_not_specialize=["M", "N"])
def residual_layernorm_kernel(
    x_ptr, y_ptr,  # (B, N, C) each, unit channel stride, batch and token strides below
    bias_ptr, next_bias_ptr, weight_ptr, ln_bias_ptr,  # (C,) each, one dtype (the inputs' or ACC)
    r_ptr, u_ptr,  # (M, C) row-major, the inputs' dtype
    mean_ptr, rstd_ptr,  # (M,) in ACC
    M, N, C, stride_xb, stride_xn, stride_yb, stride_yn,
    eps: tl.float64,  # fp64 whatever ACC: a plain Python float would be passed as fp32
    ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, VEC: tl.constexpr = 1,
):
    C, stride_xb, stride_xn, stride_yb, stride_yn = _aligned(C, stride_xb, stride_xn, stride_yb, stride_yn, VEC)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_C)
    rmask = rows < M
    cmask = cols < C
    mask = rmask[:, None] & cmask[None, :]
    bias = tl.load(bias_ptr + cols, mask=cmask, other=0.0).to(ACC)
    s = _tokens(x_ptr, rows, cols, mask, N, stride_xb, stride_xn, ACC) + \
        _tokens(y_ptr, rows, cols, mask, N, stride_yb, stride_yn, ACC) + bias[None, :]  # zero in the padding columns
    dev, mean, rstd = _row_layernorm(s, mask, C, eps, ACC)
    weight = tl.load(weight_ptr + cols, mask=cmask, other=0.0).to(ACC)
    ln_bias = tl.load(ln_bias_ptr + cols, mask=cmask, other=0.0).to(ACC)
    u = dev * rstd[:, None] * weight[None, :] + ln_bias[None, :]
    r = s + tl.load(next_bias_ptr + cols, mask=cmask, other=0.0).to(ACC)[None, :]
    out = rows.to(tl.int64)[:, None] * C + cols[None, :]
    tl.store(r_ptr + out, r.to(r_ptr.dtype.element_ty), mask=mask)
    tl.store(u_ptr + out, u.to(u_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + rows, mean, mask=rmask)
    tl.store(rstd_ptr + rows, rstd, mask=rmask)


@LAUNCH
@triton.jit(do_not_specialize=["M", "N"])
def residual_layernorm_bwd_kernel(
    x_ptr, y_ptr,  # (B, N, C) each, as the forward read them
    bias_ptr, weight_ptr,  # (C,) each, one dtype
    mean_ptr, rstd_ptr,  # (M,) in ACC, the forward's
    grad_r_ptr, grad_u_ptr, grad_s_ptr,  # (M, C) row-major, the inputs' dtype
    partial_ptr,  # (P, 4, C) in ACC: this program's sums of grad_s, grad_r, grad_u * xhat, grad_u
    M, N, C, stride_xb, stride_xn, stride_yb, stride_yn,
    ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, TILES: tl.constexpr, VEC: tl.constexpr = 1,
):
    """grad_s = rstd * (g - mean_c(g) - xhat * mean_c(g * xhat)) + grad_r with g = grad_u * weight,
    s recomputed from x and y; each program walks TILES row tiles and writes its column sums
    for the four parameters' grads (combined in a fixed order afterwards)."""
    C, stride_xb, stride_xn, stride_yb, stride_yn = _aligned(C, stride_xb, stride_xn, stride_yb, stride_yn, VEC)
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < C
    bias = tl.load(bias_ptr + cols, mask=cmask, other=0.0).to(ACC)
    weight = tl.load(weight_ptr + cols, mask=cmask, other=0.0).to(ACC)
    count = tl.full([], 0.0, ACC) + C
    sum_gu = tl.zeros([BLOCK_C], ACC)
    sum_gu_xhat = tl.zeros([BLOCK_C], ACC)
    sum_gs = tl.zeros([BLOCK_C], ACC)
    sum_gr = tl.zeros([BLOCK_C], ACC)
    for t in range(TILES):
        rows = (tl.program_id(0) * TILES + t) * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < M
        mask = rmask[:, None] & cmask[None, :]
        s = _tokens(x_ptr, rows, cols, mask, N, stride_xb, stride_xn, ACC) + \
            _tokens(y_ptr, rows, cols, mask, N, stride_yb, stride_yn, ACC) + bias[None, :]
        mean = tl.load(mean_ptr + rows, mask=rmask, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=rmask, other=0.0)
        xhat = tl.where(mask, (s - mean[:, None]) * rstd[:, None], 0.0)
        out = rows.to(tl.int64)[:, None] * C + cols[None, :]
        gu = tl.load(grad_u_ptr + out, mask=mask, other=0.0).to(ACC)
        gr = tl.load(grad_r_ptr + out, mask=mask, other=0.0).to(ACC)
        g = gu * weight[None, :]
        mean_g = _div(tl.sum(g, 1), count, ACC)
        mean_g_xhat = _div(tl.sum(g * xhat, 1), count, ACC)
        gs = tl.where(mask, rstd[:, None] * (g - mean_g[:, None] - xhat * mean_g_xhat[:, None]) + gr, 0.0)
        tl.store(grad_s_ptr + out, gs.to(grad_s_ptr.dtype.element_ty), mask=mask)
        sum_gu += tl.sum(gu, 0)
        sum_gu_xhat += tl.sum(gu * xhat, 0)
        sum_gs += tl.sum(gs, 0)
        sum_gr += tl.sum(gr, 0)
    base = partial_ptr + tl.program_id(0).to(tl.int64) * 4 * C + cols
    # the grads of bias, next_bias, weight and ln_bias, in the op's argument order
    tl.store(base, sum_gs, mask=cmask)
    tl.store(base + C, sum_gr, mask=cmask)
    tl.store(base + 2 * C, sum_gu_xhat, mask=cmask)
    tl.store(base + 3 * C, sum_gu, mask=cmask)


GRAD_TILES = 8  # row tiles per backward program: fewer partial sums to combine


def block_c(C: int) -> int:
    """Channels per row tile: all of them."""
    return max(16, next_pow2(C))


def compile_specs():
    """Every dtype, its parameters in it or in fp32 (under autocast), and every row tile the op
    launches (C from 1 to MAX_CHANNELS), with no alignment known; and MPViT's widths and dtypes
    as it launches them (VEC=8, aligned pointers)."""
    from mpvit_kernels.triton.static_compile import as_launched

    specs = []
    for dt in ("fp16", "bf16", "fp32", "fp64"):
        acc = "*fp64" if dt == "fp64" else "*fp32"
        for pt in sorted({dt, "fp32" if dt != "fp64" else dt}):
            bc = 16
            while bc <= MAX_CHANNELS:
                specs.append((residual_layernorm_kernel, f"{dt} params {pt} BLOCK_C={bc}",
                              {"x_ptr": f"*{dt}", "y_ptr": f"*{dt}", "r_ptr": f"*{dt}", "u_ptr": f"*{dt}",
                               **{n: f"*{pt}" for n in ("bias_ptr", "next_bias_ptr", "weight_ptr", "ln_bias_ptr")},
                               "mean_ptr": acc, "rstd_ptr": acc, "eps": "fp64"},
                              {"ACC": tl.float64 if dt == "fp64" else tl.float32, "BLOCK_C": bc}))
                specs.append((residual_layernorm_bwd_kernel, f"{dt} params {pt} BLOCK_C={bc}",
                              {"x_ptr": f"*{dt}", "y_ptr": f"*{dt}", "bias_ptr": f"*{pt}", "weight_ptr": f"*{pt}",
                               "mean_ptr": acc, "rstd_ptr": acc, "grad_r_ptr": f"*{dt}", "grad_u_ptr": f"*{dt}",
                               "grad_s_ptr": f"*{dt}", "partial_ptr": acc},
                              {"ACC": tl.float64 if dt == "fp64" else tl.float32, "BLOCK_C": bc,
                               "TILES": GRAD_TILES}))
                if 64 <= bc <= 512 and dt != "fp64":  # as MPViT (C 64 to 480) launches them
                    specs += [as_launched(spec) for spec in specs[-2:]]
                bc *= 2
    return specs
