"""Triton kernel of MPViT's GLI projection (the ``aggregate`` of every stage): the channel concat
of up to 5 maps -> 1x1 conv, with a bias and Hardswish fused into the epilogue (and, for InvRes's last 1x1, its identity):

    y = act((cat(x_0, ..., x_{n-1}) @ W^T) * scale + shift) [+ res]   x_i (M, C) rows, y (M, Cout) NHWC rows

A GEMM with M = B*H*W pixels, N = Cout, K = n*C, whose K loop walks the list of inputs (each with
its own batch and pixel strides, channels unit-stride: a channels-last image or a token tensor,
read in place), so the concat never exists. In eval (scale, shift) is the folded BatchNorm; in
training (STATS) the epilogue also writes each row tile's per-channel mean and M2 of the
pre-BatchNorm output for the batch statistics (triton/affine_hswish.py). With TMA the inputs
are read through device-side tensor descriptors (sm_90's tensor-memory accelerator; the launch
needs triton.set_allocator for their scratch, which ops/gli_projection.py sets).
"""
import triton
import triton.language as tl

from mpvit_kernels.triton.affine_hswish import _gemm_epilogue, _known_multiple
from mpvit_kernels.triton.launch import AUTOTUNE, INTERPRET, next_pow2, pinned, tuned

MAX_INPUTS = 5


def block_n(cout: int) -> int:
    """Output channels per program: all of them up to 128, so the inputs are read once for
    MPViT's widths up to 128 and at most 4 times (MPViT-B's 480)."""
    return min(128, max(16, next_pow2(cout)))


def tile(block_n: int, dtype: str) -> tuple[int, int, int, int]:
    """The tile launched: the GPU's (gpu_tile), or under the interpreter the fewest programs. The
    op sizes the statistics buffers of training with BLOCK_M."""
    if INTERPRET:
        return 64, 16 if dtype == "fp64" else 32, 4, 1
    return gpu_tile(block_n, dtype)


def gpu_tile(block_n: int, dtype: str) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_K, num_warps, num_stages) for this BLOCK_N and input dtype ("fp64", "fp32",
    or "16-bit") on a GPU: the largest tiles that compile without spills for sm_80 and sm_90a
    with no alignment hints (the worst case a launch can specialise to; `make static-report`).
    fp32 and fp64 dots run on FMA units, whose operands live in registers: smaller tiles."""
    if dtype == "fp64":
        return 32, 16, 4, 2
    if dtype == "fp32":
        return (32 if block_n == 128 else 64), 16, 8 if block_n >= 64 else 4, 2
    if block_n == 128:
        return 64, 32, 8, 3
    return (128, 32, 8, 3) if block_n == 64 else (64, 32, 4, 3)


def dot_kind(meta) -> str:
    """"fp64", "fp32" or "16-bit": the GEMM's dtype class at a launch's constexprs (the ops pass
    ieee precision for fp32 and fp64 inputs only), which sizes the tiles."""
    return "fp64" if meta["ACC"] == tl.float64 else "fp32" if meta["DOT_PRECISION"] == "ieee" else "16-bit"


def _tile(meta):
    return tile(meta["BLOCK_N"], dot_kind(meta))


def m_bucket(M: int) -> int:
    """Autotune key of the pixel count: its next power of two, so inputs of varying size
    (multi-scale training, detection) share a handful of tunings."""
    return next_pow2(M)


# What the eval GEMM may be tuned over where the launch is aligned (VEC=8, 16-byte pointers):
# BLOCK_K stays the pinned tile's, so each output sums its K products in the same order
# whatever the pick; 16-bit tiles with 3 cp.async stages, fp32 (FMA dots) with 2. Of these, a
# tile fits when its accumulator is at most 64 values per thread: every one that does compiles
# without spills for sm_80 and sm_90a at MPViT's widths, every one past it spilled.
TUNED_CONFIGS = [triton.Config({"BLOCK_M": bm, "BLOCK_K": 32}, num_warps=w, num_stages=3, maxnreg=255)
                 for bm in (64, 128, 256) for w in (4, 8)] + \
                [triton.Config({"BLOCK_M": bm, "BLOCK_K": 16}, num_warps=w, num_stages=2, maxnreg=255)
                 for bm in (32, 64, 128) for w in (4, 8)]


def _fitting(configs, named_args, **meta):
    """The configs of this dtype's BLOCK_K whose accumulator fits (TUNED_CONFIGS)."""
    bk, bn = _tile(meta)[1], meta["BLOCK_N"]
    return [c for c in configs if c.kwargs["BLOCK_K"] == bk and c.kwargs["BLOCK_M"] * bn <= 64 * 32 * c.num_warps]


LAUNCH = pinned(("BLOCK_N", "ACC", "DOT_PRECISION"), {
    "BLOCK_M": lambda meta: _tile(meta)[0],
    "BLOCK_K": lambda meta: _tile(meta)[1],
    "num_warps": lambda meta: _tile(meta)[2],
    "num_stages": lambda meta: _tile(meta)[3],
    # ptxas would otherwise cap some fp32/fp64 tiles at 128 registers and spill a few bytes
    **({} if INTERPRET else {"maxnreg": lambda meta: 255}),
})


@triton.jit(do_not_specialize=["M", "N", "m_bucket"])
def gli_gemm_kernel(
    x0_ptr, x1_ptr, x2_ptr, x3_ptr, x4_ptr,  # inputs (B, N, C) with channel stride 1; unused ones any
    sb0, sn0, sb1, sn1, sb2, sn2, sb3, sn3, sb4, sn4,  # their batch and pixel strides
    w_ptr,  # (Cout, NUM_INPUTS * C) the 1x1 weight, in the inputs' dtype
    scale_ptr, shift_ptr,  # (Cout,) each, in the accumulation type: a folded BatchNorm (AFFINE)
    res_ptr,  # (M, Cout) rows like y, in its dtype: a residual block's identity, added last (RESIDUAL)
    y_ptr,  # (M, Cout) out: NHWC rows, M = B*N
    tile_mean_ptr, tile_m2_ptr,  # (cdiv(M, BLOCK_M), Cout) out if STATS, in the accumulation type
    M, N, C, Cout,
    m_bucket,  # m_bucket(M): the autotune key, unused in the body
    NUM_INPUTS: tl.constexpr, AFFINE: tl.constexpr, HSWISH: tl.constexpr, RESIDUAL: tl.constexpr, STATS: tl.constexpr,
    ACC: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, TMA: tl.constexpr = False, VEC: tl.constexpr = 1,
):
    C = _known_multiple(C, VEC)  # C, Cout and every row stride are multiples of VEC (vector_width)
    Cout = _known_multiple(Cout, VEC)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask = offs_m < M
    nmask = offs_n < Cout
    b = offs_m // N
    n = offs_m % N
    K_total = NUM_INPUTS * C
    acc = tl.zeros([BLOCK_M, BLOCK_N], ACC)
    # A runtime loop over the inputs, not an unrolled one: unrolled, the compiler hoists every
    # input's row pointers out of its K loop and keeps them all live (spills).
    for i in range(NUM_INPUTS):
        x_ptr, sb, sn = x0_ptr, sb0, sn0
        if i == 1:
            x_ptr, sb, sn = x1_ptr, sb1, sn1
        if i == 2:
            x_ptr, sb, sn = x2_ptr, sb2, sn2
        if i == 3:
            x_ptr, sb, sn = x3_ptr, sb3, sn3
        if i == 4:
            x_ptr, sb, sn = x4_ptr, sb4, sn4
        if TMA:
            # The input as an (M, C) matrix of row stride sn read by the tensor-memory accelerator
            # (the op takes this path only where each input's batch stride is N rows and its rows
            # start 16-byte aligned): rows past M and columns past C come back as zeros.
            desc = tl.make_tensor_descriptor(x_ptr, shape=[M, C], strides=[sn, 1], block_shape=[BLOCK_M, BLOCK_K])
        else:
            # restated here only: a descriptor takes the row stride as passed (the op leaves the
            # stride of a size-1 dim out of VEC, and a TMA launch with N = 1 steps rows by it)
            rows = x_ptr + b.to(tl.int64) * _known_multiple(sb, VEC) + n.to(tl.int64) * _known_multiple(sn, VEC)
        for k0 in range(0, C, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            kmask = offs_k < C
            if TMA:
                a = desc.load([tl.program_id(0) * BLOCK_M, k0])
            else:
                a = tl.load(rows[:, None] + offs_k[None, :], mask=mmask[:, None] & kmask[None, :], other=0.0)
            w = tl.load(w_ptr + offs_n[None, :] * K_total + (i * C + offs_k)[:, None],
                        mask=kmask[:, None] & nmask[None, :], other=0.0)
            acc += tl.dot(a, w, out_dtype=ACC, input_precision=DOT_PRECISION)
    _gemm_epilogue(acc, offs_m, offs_n, mmask, nmask, M, Cout, scale_ptr, shift_ptr, res_ptr, y_ptr, tile_mean_ptr,
                   tile_m2_ptr, AFFINE, HSWISH, RESIDUAL, STATS, ACC, BLOCK_M)


# The tuned launch (ops.gli_projection takes it for the eval GEMM where aligned, not through
# TMA, not fp64), tuned per (bucket of M, widths, inputs, epilogue, dtype); the pinned tile
# everywhere else: training (its statistics are per BLOCK_M rows, so the tile fixes their sum
# order), the worst-case launches the pinned tiles were sized for, MPVIT_KERNELS_AUTOTUNE=0 and
# the interpreter.
gli_gemm_tuned = tuned(
    TUNED_CONFIGS, key=["m_bucket", "C", "Cout", "NUM_INPUTS", "AFFINE", "HSWISH", "RESIDUAL"],
    prune_configs_by={"early_config_prune": _fitting})(gli_gemm_kernel) if AUTOTUNE else LAUNCH(gli_gemm_kernel)
gli_gemm_kernel = LAUNCH(gli_gemm_kernel)


def compile_specs():
    """What the op can launch, for the ahead-of-time compile check (static_compile.py): every
    BLOCK_N and dtype, with the eval epilogue and the training one; 4 inputs (MPViT-S/B's
    num_path + 1) and 5 (the most); and one input with the residual epilogue (InvRes's conv2);
    each with no alignment known, and for MPViT's widths and dtypes as it launches them (VEC=8,
    aligned pointers; the eval ones also with every tile the tuner may pick); the 16-bit and
    fp32 ones also with tensor-descriptor loads (TMA on sm_90a; sm_80 compiles them to plain
    loads)."""
    from mpvit_kernels.triton.static_compile import as_launched

    specs = []
    for dt in ("fp16", "bf16", "fp32", "fp64"):
        acc_ty = tl.float64 if dt == "fp64" else tl.float32
        acc = "*fp64" if dt == "fp64" else "*fp32"
        precision = "ieee" if dt in ("fp32", "fp64") else "tf32"
        for bn in (16, 32, 64, 128):
            for inputs, eval_epilogue, residual in ((4, True, False), (4, False, False), (5, True, False),
                                                    (1, True, True)):
                types = {f"x{i}_ptr": f"*{dt}" for i in range(MAX_INPUTS)}
                types.update({"w_ptr": f"*{dt}", "scale_ptr": acc, "shift_ptr": acc, "res_ptr": f"*{dt}",
                              "y_ptr": f"*{dt}", "tile_mean_ptr": acc, "tile_m2_ptr": acc})
                tag = f"{dt} BLOCK_N={bn} inputs={inputs}" + (" eval" if eval_epilogue else " train") + \
                    (" residual" if residual else "")
                constexprs = {"NUM_INPUTS": inputs, "AFFINE": eval_epilogue, "HSWISH": eval_epilogue and not residual,
                              "RESIDUAL": residual, "STATS": not eval_epilogue, "ACC": acc_ty,
                              "DOT_PRECISION": precision, "BLOCK_N": bn, "TMA": False}
                specs.append((gli_gemm_kernel, tag, types, constexprs))
                if bn >= 64 and dt != "fp64":  # MPViT's widths: 64 to 480, multiples of 8 (216 is
                    # not one of 16, so only VEC tells the compiler)
                    specs.append(as_launched(specs[-1]))
                    if eval_epilogue and inputs != 5:  # every tile the tuner may pick there
                        specs.append(as_launched(specs[-2], gli_gemm_tuned, " tuned"))
                if dt != "fp64":  # the tensor-descriptor loads (ops.gli_projection.use_tma)
                    specs.append((gli_gemm_kernel, tag + " TMA", types, {**constexprs, "TMA": True}))
    return specs
