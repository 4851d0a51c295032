"""Triton kernel of the depthwise-separable conv (``DWConv2d_BN``): depthwise k x k (stride 1 or
2, padding k // 2) then a 1x1 conv, with a bias and Hardswish fused into the epilogue:

    y = act((dw(x) @ W^T) * scale + shift)        x (B, H, W, Cin) NHWC, y (B, Ho, Wo, Cout) NHWC

A GEMM with M = B*Ho*Wo output pixels, N = Cout, K = Cin, whose K loop computes its A operand,
the depthwise conv of a chunk of input channels for the program's pixels (taps read straight
from x, the halo from cache), so the depthwise output never goes to memory. In eval (scale,
shift) is the folded BatchNorm; in training (STATS) the epilogue also writes each row tile's
per-channel mean and M2 of the pre-BatchNorm output it stores, for the batch statistics
(triton/affine_hswish.py).
"""
import triton
import triton.language as tl

from mpvit_kernels.triton.affine_hswish import _gemm_epilogue, _known_multiple
from mpvit_kernels.triton.launch import INTERPRET, next_pow2, pinned


def block_n(cout: int) -> int:
    """Output channels per program: all of them up to 128 (the depthwise conv of a pixel tile is
    recomputed once per BLOCK_N columns)."""
    return min(128, max(16, next_pow2(cout)))


def tile(block_n: int, wide: bool) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_K, num_warps) for this BLOCK_N and accumulation type (``wide``: fp64): the
    largest tiles that compile without spills for sm_80 and sm_90a (read off the cubins, `make
    static-report`); the interpreter takes the fewest programs. The op sizes the statistics
    buffers of training with BLOCK_M."""
    if INTERPRET:
        return 64, 16 if wide else 32, 4
    return gpu_tile(block_n, wide)


def gpu_tile(block_n: int, wide: bool) -> tuple[int, int, int]:
    """tile's answer on a GPU, even under the interpreter (the traffic model)."""
    if block_n == 128:
        return 64, 16 if wide else 32, 8
    return 32, 16 if wide else 32, 4


def _tile(meta) -> tuple[int, int, int]:
    return tile(meta["BLOCK_N"], meta["ACC"] == tl.float64)


# The taps loop runs over loads whose software pipelining would stage every tap's tile in shared
# memory (num_stages buffers each): one stage. ptxas's register budget pinned, as measured.
LAUNCH = pinned(("BLOCK_N", "ACC"), {
    "BLOCK_M": lambda meta: _tile(meta)[0],
    "BLOCK_K": lambda meta: _tile(meta)[1],
    "num_warps": lambda meta: _tile(meta)[2],
    **({} if INTERPRET else {"num_stages": lambda meta: 1, "maxnreg": lambda meta: 255}),
})


@LAUNCH
@triton.jit(do_not_specialize=["M", "H", "W", "Ho", "Wo"])
def dwconv_pw_kernel(
    x_ptr,  # (B, H, W, Cin) NHWC: strides (stride_b, stride_h, stride_w, 1)
    dw_ptr,  # (Cin, K*K) depthwise weights, in the accumulation type
    pw_ptr,  # (Cout, Cin) 1x1 weights
    scale_ptr, shift_ptr,  # (Cout,) each, in the accumulation type: a folded BatchNorm (AFFINE)
    y_ptr,  # (M, Cout) out: NHWC rows, M = B*Ho*Wo
    tile_mean_ptr, tile_m2_ptr,  # (cdiv(M, BLOCK_M), Cout) out if STATS, in the accumulation type
    M, H, W, Ho, Wo, Cin, Cout, stride_b, stride_h, stride_w, stride,
    K: tl.constexpr, AFFINE: tl.constexpr, HSWISH: tl.constexpr, STATS: tl.constexpr, ACC: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    VEC: tl.constexpr = 1,
):
    # the widths and strides are multiples of VEC (launch.vector_width): 16-byte accesses
    Cin = _known_multiple(Cin, VEC)
    Cout = _known_multiple(Cout, VEC)
    stride_b = _known_multiple(stride_b, VEC)
    stride_h = _known_multiple(stride_h, VEC)
    stride_w = _known_multiple(stride_w, VEC)
    P: tl.constexpr = K // 2
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask = offs_m < M
    nmask = offs_n < Cout
    b = offs_m // (Ho * Wo)
    rem = offs_m % (Ho * Wo)
    oh = rem // Wo
    ow = rem % Wo
    pixel = x_ptr + b.to(tl.int64) * stride_b  # each row's image
    acc = tl.zeros([BLOCK_M, BLOCK_N], ACC)
    for k0 in range(0, Cin, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        kmask = offs_k < Cin
        a = tl.zeros([BLOCK_M, BLOCK_K], ACC)  # the depthwise conv of channels offs_k
        # A loop, not unrolled: unrolled, every tap's (BLOCK_M, BLOCK_K) pointers and values
        # would be live at once (hundreds of registers, spilled).
        for tap in range(K * K):
            ih = oh * stride - P + tap // K
            iw = ow * stride - P + tap % K
            ok = mmask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            xv = tl.load(pixel[:, None] + (ih * stride_h + iw * stride_w)[:, None] + offs_k[None, :],
                         mask=ok[:, None] & kmask[None, :], other=0.0)
            wv = tl.load(dw_ptr + offs_k * (K * K) + tap, mask=kmask, other=0.0)
            a += xv.to(ACC) * wv[None, :]
        # The depthwise output rounds to the input dtype before the 1x1, as eager's would.
        w = tl.load(pw_ptr + offs_n[None, :] * Cin + offs_k[:, None], mask=kmask[:, None] & nmask[None, :], other=0.0)
        acc += tl.dot(a.to(x_ptr.dtype.element_ty), w.to(x_ptr.dtype.element_ty), out_dtype=ACC,
                      input_precision=DOT_PRECISION)
    _gemm_epilogue(acc, offs_m, offs_n, mmask, nmask, M, Cout, scale_ptr, shift_ptr, y_ptr, y_ptr, tile_mean_ptr,
                   tile_m2_ptr, AFFINE, HSWISH, False, STATS, ACC, BLOCK_M)


def compile_specs():
    """What the op can launch, for the ahead-of-time compile check (static_compile.py): every
    BLOCK_N and dtype, with the eval epilogue and the training one (statistics); windows 3 and 7 (the taps
    are a loop, so the window changes its trip count, not the code); each with no alignment
    known, and for MPViT's widths (64 to 480) and dtypes as it launches them (VEC=8, aligned
    pointers)."""
    from mpvit_kernels.triton.static_compile import as_launched

    specs = []
    for dt in ("fp16", "bf16", "fp32", "fp64"):
        acc_ty = tl.float64 if dt == "fp64" else tl.float32
        acc = "*fp64" if dt == "fp64" else "*fp32"
        precision = "ieee" if dt in ("fp32", "fp64") else "tf32"
        for bn in (16, 32, 64, 128):
            for k, eval_epilogue in ((3, True), (3, False), (7, True)):
                specs.append((dwconv_pw_kernel, f"{dt} BLOCK_N={bn} k={k}" + (" eval" if eval_epilogue else " train"),
                              {"x_ptr": f"*{dt}", "dw_ptr": acc, "pw_ptr": f"*{dt}", "scale_ptr": acc,
                               "shift_ptr": acc, "y_ptr": f"*{dt}", "tile_mean_ptr": acc, "tile_m2_ptr": acc},
                              {"K": k, "AFFINE": eval_epilogue, "HSWISH": eval_epilogue,
                               "STATS": not eval_epilogue, "ACC": acc_ty,
                               "DOT_PRECISION": precision, "BLOCK_N": bn}))
                if bn >= 64 and dt != "fp64":
                    specs.append(as_launched(specs[-1]))
    return specs
