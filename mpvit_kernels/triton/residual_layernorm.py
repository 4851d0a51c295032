"""Triton kernel of ``residual_layernorm`` (the op ``mpvit_kernels::residual_layernorm_fwd``; its
C++ CPU twin is csrc/cpu/residual_layernorm.cpp): the residual add after a block's attention and the
LayerNorm before its MLP, as one pass over the tokens.

Rows are tokens (M = B*N), columns channels; one program normalises BLOCK_M whole rows (a
row's C channels fit one tile: C <= MAX_CHANNELS). Per row, in ACC:

    s = x + y + bias                    (the block's residual stream after attention)
    u = (s - mean(s)) * rstd * weight + ln_bias,  rstd = 1 / sqrt(var(s) + eps)
    r = s + next_bias                   (the residual the MLP's second Linear accumulates onto)

and the row's (mean, rstd) for the backward. x and y are read once, r and u written once.
"""
import os

import triton
import triton.language as tl

from mpvit_kernels.ops.residual_layernorm import MAX_CHANNELS
from mpvit_kernels.triton.affine_hswish import _div

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def tile(block_c: int, wide: bool) -> tuple[int, int]:
    """(BLOCK_M, num_warps) for rows of BLOCK_C channels (``wide``: fp64): about 1024 values per
    program, 8 per thread and array (16 for the widest rows, whose 8 warps hold one row), which
    compile without spills for sm_80 and sm_90a (`make static-report`); the interpreter takes
    the fewest programs."""
    if INTERPRET:
        return max(1, 8192 // block_c), 4
    if block_c >= 2048:
        return 1, 16 if wide and block_c == 4096 else 8
    return max(1, 1024 // block_c), 4


# ptxas's register budget pinned: left to itself it spills 8 bytes in one bf16 tile on sm_80.
LAUNCH = triton.heuristics({
    "BLOCK_M": lambda meta: tile(meta["BLOCK_C"], meta["ACC"] == tl.float64)[0],
    "num_warps": lambda meta: tile(meta["BLOCK_C"], meta["ACC"] == tl.float64)[1],
    **({} if INTERPRET else {"maxnreg": lambda meta: 255}),
})


@LAUNCH
@triton.jit(do_not_specialize=["M", "N"])
def residual_layernorm_kernel(
    x_ptr, y_ptr,  # (B, N, C) each, unit channel stride, batch and token strides below
    bias_ptr, next_bias_ptr, weight_ptr, ln_bias_ptr,  # (C,) each, one dtype (the inputs' or ACC)
    r_ptr, u_ptr,  # (M, C) row-major, the inputs' dtype
    mean_ptr, rstd_ptr,  # (M,) in ACC
    M, N, C, stride_xb, stride_xn, stride_yb, stride_yn,
    eps: tl.float64,  # fp64 whatever ACC: a plain Python float would be passed as fp32
    ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_C)
    rmask = rows < M
    cmask = cols < C
    mask = rmask[:, None] & cmask[None, :]
    b = (rows // N).to(tl.int64)
    n = (rows % N).to(tl.int64)
    x = tl.load(x_ptr + (b * stride_xb + n * stride_xn)[:, None] + cols[None, :], mask=mask, other=0.0).to(ACC)
    y = tl.load(y_ptr + (b * stride_yb + n * stride_yn)[:, None] + cols[None, :], mask=mask, other=0.0).to(ACC)
    bias = tl.load(bias_ptr + cols, mask=cmask, other=0.0).to(ACC)
    s = x + y + bias[None, :]  # zero in the padding columns
    count = tl.full([], 0.0, ACC) + C
    mean = _div(tl.sum(s, 1), count, ACC)
    dev = tl.where(mask, s - mean[:, None], 0.0)
    var = _div(tl.sum(dev * dev, 1), count, ACC)
    if ACC == tl.float64:
        root = tl.sqrt(var + tl.full([], eps, ACC))
    else:  # tl.sqrt is the approximate square root in fp32
        root = tl.sqrt_rn(var + tl.full([], eps, ACC))
    rstd = _div(tl.full([], 1.0, ACC), root, ACC)
    weight = tl.load(weight_ptr + cols, mask=cmask, other=0.0).to(ACC)
    ln_bias = tl.load(ln_bias_ptr + cols, mask=cmask, other=0.0).to(ACC)
    u = dev * rstd[:, None] * weight[None, :] + ln_bias[None, :]
    r = s + tl.load(next_bias_ptr + cols, mask=cmask, other=0.0).to(ACC)[None, :]
    out = rows.to(tl.int64)[:, None] * C + cols[None, :]
    tl.store(r_ptr + out, r.to(r_ptr.dtype.element_ty), mask=mask)
    tl.store(u_ptr + out, u.to(u_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + rows, mean, mask=rmask)
    tl.store(rstd_ptr + rows, rstd, mask=rmask)


def block_c(C: int) -> int:
    """Channels per row tile: all of them."""
    return max(16, triton.next_power_of_2(C))


def compile_specs():
    """Every dtype, its parameters in it or in fp32 (under autocast), and every row tile the op
    launches (C from 1 to MAX_CHANNELS)."""
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
                bc *= 2
    return specs
