"""Triton kernels of factorized attention with convolutional relative position encoding.

Per batch b and head h, with q, k, v the head's (N, Ch) slices of the qkv Linear output
(B, N, 3, heads, Ch) and A = softmax over the N tokens of k (column-wise):

    O = scale * q @ S + q * (crpe_bias + dwconv_w(v)),   S = A^T v   (Ch x Ch)

Forward (minimum traffic: k, v once, then q, v and O once):
  1. ``context_partial``: per (b*h, chunk of tokens) online column max m, sum l of exp(k - m)
     and exp(k - m)^T v over the chunk, so that B=1 still fills the GPU at large N.
  2. ``context_combine``: per b*h, a fixed-order merge of the chunks: S and lse = m + log(l).
     Where one chunk covers N (B*heads programs are enough: batch 32 and up with 8 heads), the
     context pass writes S and lse itself (FINAL) and there is no combine launch.
  3. ``output``: per (b*h, tile of tokens), O = scale * q S + q * crpe(v), v read with its halo.
Small maps (MPViT's last stages, N = 49..256) take one launch instead, ``whole_map``: per b*h,
one program runs pass 1 over all N tokens (the loop of context_partial, in one chunk), keeps S
in registers and runs pass 3 over all N; it writes O, and S and lse only when the backward
needs them (WRITE_STATS), so no per-head partials or S travel through memory.
Backward (dO given; dS = scale * q^T dO, c_d = sum_e S_de dS_de):
  1. ``grad_partial``: per (b*h, chunk) q^T dO and, per CRPE tap, sum (q*dO) * shifted v.
  2. ``grad_combine``: per b*h, dS and c from the chunk partials, in fixed order (with one
     chunk, grad_partial writes them itself: FINAL).
  3. ``grad_qkv``: per (b*h, tile), elementwise in the tokens:
     dq = scale dO S^T + dO * crpe(v), dv = A dS + crpe^T(q*dO), dk = A * (v dS^T - c),
     written into one d(qkv) in the Linear's layout.
Every reduction runs in a fixed order (chunks sized from B*heads and N alone, pinned tiles in
the reduction passes and in whole_map, see Tiles and WholeMapTiles), so the results are bitwise
reproducible for the same inputs on the same GPU model with the same Triton, across runs and
processes; another GPU architecture may pick other tensor-core instructions and round
differently. (The two forward paths may differ from each other in the last bits.)

Layouts: qkv rows are tokens (stride ``stride_n``, batch stride ``stride_b``, unit stride in
the 3C columns); q of head h is columns [h*Ch, (h+1)*Ch), k is +C, v is +2C. O is (B, N, C)
with the same convention. CRPE weights are packed to (C, KMAX*KMAX), each head's k x k window
centred in KMAX x KMAX; ``ksize`` (heads,) holds each head's k.
"""
import functools

import triton
import triton.language as tl

from mpvit_kernels.triton.launch import AUTOTUNE, INTERPRET, next_pow2, pinned, tuned


# Launch settings. The reduction passes (context_partial, grad_partial) sum over tiles of
# BLOCK_N tokens, and num_warps sets how each tile's tl.sum splits across threads: both fix the
# order of the float sums. So those two kernels run one pinned (BLOCK_N, num_warps) per (input
# dtype, BLOCK_D), never autotuned, and their bits do not depend on timing, process or run.
# The per-token passes (output, grad_qkv) sum nothing over tokens: they autotune their tile.
# whole_map runs a reduction pass itself, so it is pinned likewise (WholeMapTiles).
# MPVIT_KERNELS_AUTOTUNE=0 pins every kernel to its first fitting tile (no benchmarking), for
# compute-sanitizer and for runs that must not spend time tuning; the interpreter runs one
# tile, the largest (it runs programs one by one in Python: fewest programs is fastest).
_INTERPRETER_TILE = (128, 4)


def n_bucket(N: int) -> int:
    """Autotune key of the token count: its next power of two, so that inputs of varying size
    (multi-scale training, detection) share a handful of tunings instead of one per size."""
    return next_pow2(N)


class Tiles:
    """The (BLOCK_N, num_warps) token tiles a kernel may run with and the register budget they
    must fit: at most ``budget`` elements of a (BLOCK_N, BLOCK_D) tile per thread, one budget for
    16-bit inputs (tensor-core dots), one for fp32 (fp32 tiles and FMA dots), half the fp32 one
    for fp64. Budgets are per kernel, read off sm_80/sm_90a cubins (`make static-report`): one
    step past them it spills. ``maxnreg`` pins ptxas's register budget: without it, ptxas 13
    (with Triton's --regAllocOptLevel=2) spills a few bytes in some kernels; with it, the fp32
    FMA-dot context pass spills more. So it is set per kernel, as measured."""

    def __init__(self, block_ns, warps, budget_16bit, budget_fp32, maxnreg=None):
        self.candidates = [(n, w) for n in block_ns for w in warps]
        self.budget_16bit, self.budget_fp32, self.maxnreg = budget_16bit, budget_fp32, maxnreg

    def fitting(self, meta) -> list[tuple[int, int]]:
        """The candidates that fit at these constexprs (BLOCK_D, ACC, DOT_PRECISION), largest
        tile first, then fewest warps; the smallest per-thread tile if none fits."""
        if INTERPRET:
            return [_INTERPRETER_TILE]
        return self._fitting(meta["BLOCK_D"], meta["ACC"] == tl.float64, meta["DOT_PRECISION"])

    @functools.lru_cache(maxsize=None)  # asked at every launch; a handful of distinct answers
    def _fitting(self, bd, wide, precision):
        if wide:
            limit = self.budget_fp32 // 2
        else:
            limit = self.budget_fp32 if precision == "ieee" else self.budget_16bit
        fit = [(n, w) for n, w in self.candidates if n * bd <= limit * w * 32]
        fit = fit or [min(self.candidates, key=lambda t: t[0] / t[1])]
        return sorted(fit, key=lambda t: (-t[0], t[1]))

    def at_warps(self, meta, warps: int) -> int:
        """The largest BLOCK_N that fits at ``warps`` warps (the smallest candidate if none does)."""
        if INTERPRET:
            return _INTERPRETER_TILE[0]
        fit = [n for n, w in self._fitting(meta["BLOCK_D"], meta["ACC"] == tl.float64, meta["DOT_PRECISION"])
               if w == warps]
        return fit[0] if fit else min(n for n, _ in self.candidates)

    def pinned(self):
        """Decorator: one tile per (dtype, BLOCK_D), computed at its first launch (PinnedHeuristics)."""
        values = {"BLOCK_N": lambda meta: self.fitting(meta)[0][0],
                  "num_warps": lambda meta: self.fitting(meta)[0][1]}
        if self.maxnreg and not INTERPRET:
            values["maxnreg"] = lambda meta: self.maxnreg
        return pinned(("BLOCK_D", "ACC", "DOT_PRECISION"), values)

    def tuned(self):
        """Decorator: autotune over the fitting tiles, per (bucket of N, head-dim tile, dtypes)."""
        if not AUTOTUNE:
            return self.pinned()

        def prune(configs, named_args, **kwargs):
            fit = self.fitting({**named_args, **kwargs})
            return [c for c in configs if (c.kwargs["BLOCK_N"], c.num_warps) in fit]

        configs = [triton.Config({"BLOCK_N": n}, num_warps=w, maxnreg=self.maxnreg) for n, w in self.candidates]
        return tuned(configs, key=["n_bucket", "BLOCK_D"], prune_configs_by={"early_config_prune": prune})


# The reductions stream long chunks (bigger tiles, fewer loop trips); the per-token passes keep
# q, v (and in the backward k, dO) tiles plus the CRPE sum in registers.
CONTEXT_TILES = Tiles((16, 32, 64, 128), (4, 8), 32, 4)
GRAD_REDUCE_TILES = Tiles((16, 32, 64, 128), (4, 8), 16, 8, maxnreg=255)
OUTPUT_TILES = Tiles((16, 32, 64), (4, 8), 8, 8, maxnreg=255)
GRAD_QKV_TILES = Tiles((16, 32, 64), (4, 8), 4, 4, maxnreg=255)


class WholeMapTiles:
    """The pinned launch of a kernel that runs a reduction pass and then a per-token pass in one
    program at one warp count: each pass's token tile is the largest its own budget allows at
    that warp count (``reduce`` and ``output`` are those passes' Tiles), so the register use of
    each pass is one its own kernel is measured at. Never autotuned: the reduction's tile and
    the warps fix its summation order."""

    def __init__(self, reduce: Tiles, output: Tiles, warps: int, maxnreg=None):
        self.reduce, self.output, self.warps, self.maxnreg = reduce, output, warps, maxnreg

    def tiles(self, meta) -> tuple[int, int]:
        """(BLOCK_N of the reduction pass, BLOCK_OUT of the per-token pass) at these constexprs."""
        return self.reduce.at_warps(meta, self.warps), self.output.at_warps(meta, self.warps)

    def pinned(self):
        """Decorator: BLOCK_N, BLOCK_OUT and the warps, computed at their first launch (PinnedHeuristics)."""
        values = {"BLOCK_N": lambda meta: self.tiles(meta)[0], "BLOCK_OUT": lambda meta: self.tiles(meta)[1],
                  "num_warps": lambda meta: self.warps}
        if self.maxnreg and not INTERPRET:
            values["maxnreg"] = lambda meta: self.maxnreg
        return pinned(("BLOCK_D", "ACC", "DOT_PRECISION"), values)


# The whole forward of one (batch, head) in one program (small maps: B*heads programs): 8 warps
# so that one program per SM still keeps loads in flight.
WHOLE_MAP_TILES = WholeMapTiles(CONTEXT_TILES, OUTPUT_TILES, 8, maxnreg=255)
# The per-head combines are tiny: one config, the register budget pinned (see Tiles).
COMBINE_CONFIGS = [triton.Config({}, num_warps=8, maxnreg=128)]
# Integer arguments Triton would otherwise specialise on (== 1, % 16 == 0), compiling a variant
# of each kernel per case: sizes whose divisibility buys nothing (the vector loads run along the
# channels, whose strides and offsets stay specialised), so that image sizes reuse compiles.
SIZES = ["N", "H", "W", "heads"]


@triton.jit
def _load_tokens(base, offs_n, col, stride_n, mask, other):
    """(len(offs_n), len(col)) tile of a token-major matrix, in the dtype it is stored in."""
    return tl.load(base + offs_n[:, None] * stride_n + col[None, :], mask=mask, other=other)


@triton.jit
def _context_sums(base, k_col, v_col, dmask, start, stop, stride_n,
                  ACC: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Over tokens [start, stop) in tiles of BLOCK_N, in order: the online column max m of k,
    the column sum l of exp(k - m) and exp(k - m)^T v (BLOCK_D x BLOCK_D), all in ACC."""
    m = tl.full([BLOCK_D], float("-inf"), ACC)
    l = tl.zeros([BLOCK_D], ACC)
    acc = tl.zeros([BLOCK_D, BLOCK_D], ACC)
    for tile in range(start, stop, BLOCK_N):
        offs_n = tile + tl.arange(0, BLOCK_N)
        mask = (offs_n < stop)[:, None] & dmask[None, :]
        k = _load_tokens(base, offs_n, k_col, stride_n, mask, float("-inf")).to(ACC)
        v = _load_tokens(base, offs_n, v_col, stride_n, mask, 0.0)
        m_new = tl.maximum(m, tl.max(k, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # columns with nothing yet
        alpha = tl.exp(m - m_safe)
        p = tl.exp(k - m_safe[None, :])
        l = l * alpha + tl.sum(p, axis=0)
        acc = acc * alpha[:, None] + tl.dot(tl.trans(p.to(v.dtype)), v, out_dtype=ACC,
                                            input_precision=DOT_PRECISION)
        m = m_new
    return m, l, acc


@triton.jit
def _normalise(m, l, acc):
    """S = acc / l (row d divided by column d's sum) and lse = m + log(l) from the column max m,
    sum l of exp(k - m) and acc = exp(k - m)^T v over all tokens; padded head-dim columns
    (l = 0, m = -inf) give zeros."""
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    l_safe = tl.where(l > 0, l, 1.0)
    return acc / l_safe[:, None], m_safe + tl.log(l_safe)


@triton.jit
def _head_square(offs_d, Ch):
    """Offsets and mask of a (BLOCK_D, BLOCK_D) register tile in a row-major Ch x Ch matrix: the
    per-head buffers hold the Ch real head dims only, not the padding to BLOCK_D (MPViT's
    Ch = 8, 27, 36, 46 would move up to 4x more bytes padded)."""
    dmask = offs_d < Ch
    return offs_d[:, None] * Ch + offs_d[None, :], dmask[:, None] & dmask[None, :]


@CONTEXT_TILES.pinned()
@triton.jit(do_not_specialize=SIZES)
def context_partial_kernel(
    qkv_ptr,  # (B, N, 3C) qkv Linear output
    m_ptr,  # (B*heads, SPLITS, Ch) out: chunk column max of k (not FINAL)
    l_ptr,  # (B*heads, SPLITS, Ch) out: chunk column sum of exp(k - m) (not FINAL)
    s_ptr,  # (B*heads, SPLITS, Ch, Ch) out: chunk exp(k - m)^T v (not FINAL)
    ctx_ptr,  # (B*heads, Ch, Ch) out if FINAL: S = softmax_N(k)^T v
    lse_ptr,  # (B*heads, Ch) out if FINAL: column log-sum-exp of k
    N, C, Ch, heads, stride_b, stride_n, chunk,
    ACC: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    FINAL: tl.constexpr = False,  # one chunk covers N: S and lse here, no combine
):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    b = bh // heads
    h = bh % heads
    offs_d = tl.arange(0, BLOCK_D)
    base = qkv_ptr + b.to(tl.int64) * stride_b
    m, l, acc = _context_sums(base, C + h * Ch + offs_d, 2 * C + h * Ch + offs_d, offs_d < Ch, split * chunk,
                              tl.minimum(split * chunk + chunk, N), stride_n, ACC, DOT_PRECISION, BLOCK_N, BLOCK_D)
    row = bh.to(tl.int64) * splits + split
    square, smask = _head_square(offs_d, Ch)
    if FINAL:  # what the combine makes of one chunk, to the bit (its weight is exp(0) = 1)
        ctx, lse = _normalise(m, l, acc)
        tl.store(ctx_ptr + row * Ch * Ch + square, ctx, mask=smask)
        tl.store(lse_ptr + row * Ch + offs_d, lse, mask=offs_d < Ch)
    else:
        tl.store(m_ptr + row * Ch + offs_d, m, mask=offs_d < Ch)
        tl.store(l_ptr + row * Ch + offs_d, l, mask=offs_d < Ch)
        tl.store(s_ptr + row * Ch * Ch + square, acc, mask=smask)


@tuned(COMBINE_CONFIGS, key=[])
@triton.jit(do_not_specialize=["splits"])
def context_combine_kernel(
    m_ptr, l_ptr, s_ptr,  # chunk partials of context_partial_kernel
    ctx_ptr,  # (B*heads, Ch, Ch) out: S = softmax_N(k)^T v
    lse_ptr,  # (B*heads, Ch) out: column log-sum-exp of k
    splits, Ch,
    ACC: tl.constexpr, BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(0)
    bh64 = bh.to(tl.int64)  # per-head buffers pass 2^31 elements at large batches
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < Ch
    square, smask = _head_square(offs_d, Ch)
    m_max = tl.full([BLOCK_D], float("-inf"), ACC)
    for s in range(0, splits):
        m_max = tl.maximum(m_max, tl.load(m_ptr + (bh64 * splits + s) * Ch + offs_d, mask=dmask,
                                          other=float("-inf")))
    m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)
    l = tl.zeros([BLOCK_D], ACC)
    acc = tl.zeros([BLOCK_D, BLOCK_D], ACC)
    for s in range(0, splits):
        row = bh64 * splits + s
        w = tl.exp(tl.load(m_ptr + row * Ch + offs_d, mask=dmask, other=float("-inf")) - m_safe)
        l += w * tl.load(l_ptr + row * Ch + offs_d, mask=dmask, other=0.0)
        acc += w[:, None] * tl.load(s_ptr + row * Ch * Ch + square, mask=smask, other=0.0)
    ctx, lse = _normalise(m_max, l, acc)
    tl.store(ctx_ptr + bh64 * Ch * Ch + square, ctx, mask=smask)
    tl.store(lse_ptr + bh64 * Ch + offs_d, lse, mask=dmask)


@triton.jit
def _head_and_tile(N, BLOCK_N: tl.constexpr):
    """(batch * heads index, token tile) of a per-token program. One grid axis (B*heads*tiles
    programs): axis 1 stops at 65535 on a GPU, which 16-token tiles pass from a 1024 x 1024 map.
    Heads vary fastest, so neighbouring programs read neighbouring channels of the same tokens."""
    BH = tl.num_programs(0) // tl.cdiv(N, BLOCK_N)
    return tl.program_id(0) % BH, tl.program_id(0) // BH


@triton.jit
def _token_tile(start, N, W, Ch, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """The tile of BLOCK_N tokens from ``start``: token and head-dim offsets, their masks, and
    each token's (y, x) in the W-wide image."""
    offs_n = start + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    nmask = offs_n < N
    dmask = offs_d < Ch
    return offs_n, offs_d, nmask, dmask, nmask[:, None] & dmask[None, :], offs_n // W, offs_n % W


@triton.jit
def _in_image(ys, xs, dy, dx, H, W, nmask):
    """Which tokens still lie in the H x W image when shifted by (dy, dx)."""
    yy = ys + dy
    xx = xs + dx
    return nmask & (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W)


@triton.jit
def _output_tile(base, ctx, w_ptr, bias_ptr, h, r, offs_n, offs_d, nmask, dmask, mask, ys, xs, H, W, C, Ch,
                 stride_n, scale, ACC: tl.constexpr, DOT_PRECISION: tl.constexpr, KMAX: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """O = scale * q S + q * (bias + dwconv(v)) at one tile of tokens of head h (window radius r),
    in ACC: ``ctx`` is S (BLOCK_D x BLOCK_D, ACC) in registers, q and v (with its halo) are read
    from the batch's rows at ``base``."""
    chan = h * Ch + offs_d
    q = _load_tokens(base, offs_n, chan, stride_n, mask, 0.0).to(ACC)
    out = tl.full([], scale, ACC) * tl.dot(q, ctx, out_dtype=ACC, input_precision=DOT_PRECISION)
    conv = tl.zeros([BLOCK_N, BLOCK_D], ACC) + tl.load(bias_ptr + chan, mask=dmask, other=0.0).to(ACC)[None, :]
    v_ptrs = base + offs_n[:, None] * stride_n + (2 * C + chan)[None, :]
    w_ptrs = w_ptr + chan * (KMAX * KMAX) + (KMAX // 2 - r) * (KMAX + 1)  # the window's first tap
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            ok = _in_image(ys, xs, dy, dx, H, W, nmask)
            v = tl.load(v_ptrs + (dy * W + dx) * stride_n, mask=ok[:, None] & dmask[None, :], other=0.0)
            w = tl.load(w_ptrs + (dy + r) * KMAX + (dx + r), mask=dmask, other=0.0)
            conv += v.to(ACC) * w.to(ACC)[None, :]
    return out + q * conv


@OUTPUT_TILES.tuned()
@triton.jit(do_not_specialize=SIZES + ["n_bucket"])
def output_kernel(
    qkv_ptr,  # (B, N, 3C) qkv Linear output
    ctx_ptr,  # (B*heads, Ch, Ch) S of context_combine_kernel
    w_ptr,  # (C, KMAX*KMAX) packed CRPE weights
    bias_ptr,  # (C,) CRPE bias
    ksize_ptr,  # (heads,) int32 window of each head
    out_ptr,  # (B, N, C) out
    N, H, W, C, Ch, heads, stride_b, stride_n, out_stride_b, out_stride_n,
    scale: tl.float64,  # fp64 whatever ACC: a plain Python float would be passed as fp32
    n_bucket,  # n_bucket(N): the autotune key, unused in the body
    ACC: tl.constexpr, DOT_PRECISION: tl.constexpr, KMAX: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    bh, tile = _head_and_tile(N, BLOCK_N)
    b = bh // heads
    h = bh % heads
    offs_n, offs_d, nmask, dmask, mask, ys, xs = _token_tile(tile * BLOCK_N, N, W, Ch, BLOCK_N, BLOCK_D)
    square, smask = _head_square(offs_d, Ch)
    ctx = tl.load(ctx_ptr + bh.to(tl.int64) * Ch * Ch + square, mask=smask, other=0.0)
    out = _output_tile(qkv_ptr + b.to(tl.int64) * stride_b, ctx, w_ptr, bias_ptr, h, tl.load(ksize_ptr + h) // 2,
                       offs_n, offs_d, nmask, dmask, mask, ys, xs, H, W, C, Ch, stride_n, scale,
                       ACC, DOT_PRECISION, KMAX, BLOCK_N, BLOCK_D)
    out_base = out_ptr + b.to(tl.int64) * out_stride_b
    tl.store(out_base + offs_n[:, None] * out_stride_n + (h * Ch + offs_d)[None, :],
             out.to(out_ptr.dtype.element_ty), mask=mask)


@WHOLE_MAP_TILES.pinned()
@triton.jit(do_not_specialize=SIZES)
def whole_map_kernel(
    qkv_ptr,  # (B, N, 3C) qkv Linear output
    w_ptr,  # (C, KMAX*KMAX) packed CRPE weights
    bias_ptr,  # (C,) CRPE bias
    ksize_ptr,  # (heads,) int32 window of each head
    out_ptr,  # (B, N, C) out
    ctx_ptr,  # (B*heads, Ch, Ch) out if WRITE_STATS: S = softmax_N(k)^T v (else not touched)
    lse_ptr,  # (B*heads, Ch) out if WRITE_STATS: column log-sum-exp of k (else not touched)
    N, H, W, C, Ch, heads, stride_b, stride_n, out_stride_b, out_stride_n,
    scale: tl.float64,  # fp64 whatever ACC (see output_kernel)
    ACC: tl.constexpr, DOT_PRECISION: tl.constexpr, KMAX: tl.constexpr, WRITE_STATS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_OUT: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """The whole forward of one (batch, head) in one program, for maps small enough that B*heads
    programs are enough work: the context pass over all N tokens (tiles of BLOCK_N, in order),
    S normalised in registers, then the output pass over all N (tiles of BLOCK_OUT). Nothing
    but O reaches memory, and S and lse (what the backward needs) if WRITE_STATS."""
    bh = tl.program_id(0)
    bh64 = bh.to(tl.int64)  # per-head buffers pass 2^31 elements at large batches
    b = bh // heads
    h = bh % heads
    offs_d = tl.arange(0, BLOCK_D)
    base = qkv_ptr + b.to(tl.int64) * stride_b
    m, l, acc = _context_sums(base, C + h * Ch + offs_d, 2 * C + h * Ch + offs_d, offs_d < Ch, 0, N, stride_n,
                              ACC, DOT_PRECISION, BLOCK_N, BLOCK_D)
    ctx, lse = _normalise(m, l, acc)
    if WRITE_STATS:
        square, smask = _head_square(offs_d, Ch)
        tl.store(ctx_ptr + bh64 * Ch * Ch + square, ctx, mask=smask)
        tl.store(lse_ptr + bh64 * Ch + offs_d, lse, mask=offs_d < Ch)
    r = tl.load(ksize_ptr + h) // 2
    out_base = out_ptr + b.to(tl.int64) * out_stride_b
    for start in range(0, N, BLOCK_OUT):
        offs_n, _, nmask, dmask, mask, ys, xs = _token_tile(start, N, W, Ch, BLOCK_OUT, BLOCK_D)
        out = _output_tile(base, ctx, w_ptr, bias_ptr, h, r, offs_n, offs_d, nmask, dmask, mask, ys, xs, H, W, C, Ch,
                           stride_n, scale, ACC, DOT_PRECISION, KMAX, BLOCK_OUT, BLOCK_D)
        tl.store(out_base + offs_n[:, None] * out_stride_n + (h * Ch + offs_d)[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _store_ds_and_c(qt_do, ctx_ptr, ds_ptr, c_ptr, bh64, Ch, scale, ACC: tl.constexpr, BLOCK_D: tl.constexpr):
    """dS = scale * q^T dO and c_d = sum_e S_de dS_de of head bh64, from its q^T dO over all
    tokens (zero past Ch), padded to BLOCK_D, so that grad_qkv reads them without masks (its fp32
    BLOCK_D=64 tile spills with them)."""
    offs_d = tl.arange(0, BLOCK_D)
    square, smask = _head_square(offs_d, Ch)
    ds = tl.full([], scale, ACC) * qt_do
    ctx = tl.load(ctx_ptr + bh64 * Ch * Ch + square, mask=smask, other=0.0)
    tl.store(ds_ptr + bh64 * BLOCK_D * BLOCK_D + offs_d[:, None] * BLOCK_D + offs_d[None, :], ds)
    tl.store(c_ptr + bh64 * BLOCK_D + offs_d, tl.sum(ctx * ds, axis=1))


@GRAD_REDUCE_TILES.pinned()
@triton.jit(do_not_specialize=SIZES)
def grad_partial_kernel(
    qkv_ptr,  # (B, N, 3C) qkv Linear output
    dout_ptr,  # (B, N, C) gradient of the attention output
    ds_part_ptr,  # (B*heads, SPLITS, Ch, Ch) out: chunk q^T dO (not FINAL)
    dw_ptr,  # (B*heads, SPLITS, KK, BLOCK_D) out: chunk sum of (q*dO) * v shifted by each tap
    db_ptr,  # (B*heads, SPLITS, BLOCK_D) out: chunk sum of q*dO
    ksize_ptr,  # (heads,) int32 window of each head
    ctx_ptr,  # (B*heads, Ch, Ch) S (FINAL)
    ds_ptr,  # (B*heads, BLOCK_D, BLOCK_D) out if FINAL: dS = scale * q^T dO, zero-padded
    c_ptr,  # (B*heads, BLOCK_D) out if FINAL: c_d = sum_e S_de dS_de, zero-padded
    N, H, W, C, Ch, heads, stride_b, stride_n, dout_stride_b, dout_stride_n, chunk,
    scale: tl.float64,  # fp64 whatever ACC (see output_kernel)
    ACC: tl.constexpr, DOT_PRECISION: tl.constexpr, KMAX: tl.constexpr, KK: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    FINAL: tl.constexpr = False,  # one chunk covers N: dS and c here, no combine
):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    b = bh // heads
    h = bh % heads
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < Ch
    chan = h * Ch + offs_d
    base = qkv_ptr + b.to(tl.int64) * stride_b
    dbase = dout_ptr + b.to(tl.int64) * dout_stride_b
    k = tl.load(ksize_ptr + h)
    r = k // 2
    first_tap = (KMAX // 2 - r) * (KMAX + 1)
    taps = tl.arange(0, KK)  # row t of dw_acc is the tap (t // KMAX, t % KMAX) of the KMAX window
    ds_acc = tl.zeros([BLOCK_D, BLOCK_D], ACC)
    dw_acc = tl.zeros([KK, BLOCK_D], ACC)
    db_acc = tl.zeros([BLOCK_D], ACC)
    for start in range(split * chunk, tl.minimum(split * chunk + chunk, N), BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        nmask = offs_n < N
        mask = nmask[:, None] & dmask[None, :]
        ys = offs_n // W
        xs = offs_n % W
        q = _load_tokens(base, offs_n, chan, stride_n, mask, 0.0)
        do = _load_tokens(dbase, offs_n, chan, dout_stride_n, mask, 0.0)
        ds_acc += tl.dot(tl.trans(q), do, out_dtype=ACC, input_precision=DOT_PRECISION)
        g = q.to(ACC) * do.to(ACC)
        db_acc += tl.sum(g, axis=0)
        v_ptrs = base + offs_n[:, None] * stride_n + (2 * C + chan)[None, :]
        for dy in range(-r, r + 1):
            for dx in range(-r, r + 1):
                ok = _in_image(ys, xs, dy, dx, H, W, nmask)
                v = tl.load(v_ptrs + (dy * W + dx) * stride_n, mask=ok[:, None] & dmask[None, :], other=0.0)
                contrib = tl.sum(g * v.to(ACC), axis=0)
                tap = first_tap + (dy + r) * KMAX + (dx + r)
                dw_acc += tl.where(taps[:, None] == tap, contrib[None, :], 0.0)
    row = bh.to(tl.int64) * splits + split
    if FINAL:  # what the combine makes of one chunk, to the bit
        _store_ds_and_c(ds_acc, ctx_ptr, ds_ptr, c_ptr, row, Ch, scale, ACC, BLOCK_D)
    else:
        square, smask = _head_square(offs_d, Ch)
        tl.store(ds_part_ptr + row * Ch * Ch + square, ds_acc, mask=smask)
    tl.store(dw_ptr + row * KK * BLOCK_D + taps[:, None] * BLOCK_D + offs_d[None, :], dw_acc)
    tl.store(db_ptr + row * BLOCK_D + offs_d, db_acc)


@tuned(COMBINE_CONFIGS, key=[])
@triton.jit(do_not_specialize=["splits"])
def grad_combine_kernel(
    ds_part_ptr,  # (B*heads, SPLITS, Ch, Ch) chunk q^T dO
    ctx_ptr,  # (B*heads, Ch, Ch) S
    ds_ptr,  # (B*heads, BLOCK_D, BLOCK_D) out: dS = scale * q^T dO, zero-padded for grad_qkv
    c_ptr,  # (B*heads, BLOCK_D) out: c_d = sum_e S_de dS_de, zero-padded
    splits, Ch, scale: tl.float64,
    ACC: tl.constexpr, BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(0)
    bh64 = bh.to(tl.int64)  # per-head buffers pass 2^31 elements at large batches
    square, smask = _head_square(tl.arange(0, BLOCK_D), Ch)
    acc = tl.zeros([BLOCK_D, BLOCK_D], ACC)
    for s in range(0, splits):
        acc += tl.load(ds_part_ptr + (bh64 * splits + s) * Ch * Ch + square, mask=smask, other=0.0)
    _store_ds_and_c(acc, ctx_ptr, ds_ptr, c_ptr, bh64, Ch, scale, ACC, BLOCK_D)


@GRAD_QKV_TILES.tuned()
@triton.jit(do_not_specialize=SIZES + ["n_bucket"])
def grad_qkv_kernel(
    qkv_ptr,  # (B, N, 3C) qkv Linear output
    dout_ptr,  # (B, N, C) gradient of the attention output
    ctx_ptr,  # (B*heads, Ch, Ch) S
    lse_ptr,  # (B*heads, Ch) column log-sum-exp of k
    ds_ptr,  # (B*heads, BLOCK_D, BLOCK_D) dS, zero-padded
    c_ptr,  # (B*heads, BLOCK_D) c, zero-padded
    w_ptr,  # (C, KMAX*KMAX) packed CRPE weights
    bias_ptr,  # (C,) CRPE bias
    ksize_ptr,  # (heads,) int32 window of each head
    dqkv_ptr,  # (B, N, 3C) out, contiguous
    N, H, W, C, Ch, heads, stride_b, stride_n, dout_stride_b, dout_stride_n,
    scale: tl.float64,  # fp64 whatever ACC (see output_kernel)
    n_bucket,  # n_bucket(N): the autotune key, unused in the body
    ACC: tl.constexpr, DOT_PRECISION: tl.constexpr, KMAX: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    bh, tile = _head_and_tile(N, BLOCK_N)
    bh64 = bh.to(tl.int64)  # per-head buffers pass 2^31 elements at large batches
    b = bh // heads
    h = bh % heads
    offs_n, offs_d, nmask, dmask, mask, ys, xs = _token_tile(tile * BLOCK_N, N, W, Ch, BLOCK_N, BLOCK_D)
    chan = h * Ch + offs_d
    scale_acc = tl.full([], scale, ACC)
    base = qkv_ptr + b.to(tl.int64) * stride_b
    dbase = dout_ptr + b.to(tl.int64) * dout_stride_b
    out = dqkv_ptr + b.to(tl.int64) * N * 3 * C + offs_n[:, None] * (3 * C) + chan[None, :]
    ty = dqkv_ptr.dtype.element_ty
    # Ordered so that few (BLOCK_N, BLOCK_D) tiles are live at once: the CRPE taps first
    # (conv(v) for dq, conv^T(q*dO) for dv), then dq, dv and dk, each stored when done.
    conv = tl.zeros([BLOCK_N, BLOCK_D], ACC) + tl.load(bias_ptr + chan, mask=dmask, other=0.0).to(ACC)[None, :]
    dv = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    kw = tl.load(ksize_ptr + h)
    r = kw // 2
    q_ptrs = base + offs_n[:, None] * stride_n + chan[None, :]
    do_ptrs = dbase + offs_n[:, None] * dout_stride_n + chan[None, :]
    w_ptrs = w_ptr + chan * (KMAX * KMAX) + (KMAX // 2 - r) * (KMAX + 1)
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            w = tl.load(w_ptrs + (dy + r) * KMAX + (dx + r), mask=dmask, other=0.0).to(ACC)
            ok = _in_image(ys, xs, dy, dx, H, W, nmask)[:, None] & dmask[None, :]
            shift = dy * W + dx
            v_in = tl.load(q_ptrs + 2 * C + shift * stride_n, mask=ok, other=0.0)
            conv += v_in.to(ACC) * w[None, :]
            # transposed conv: the token at -(dy, dx) reaches this one through tap (dy, dx)
            ok_t = _in_image(ys, xs, -dy, -dx, H, W, nmask)[:, None] & dmask[None, :]
            q_t = tl.load(q_ptrs - shift * stride_n, mask=ok_t, other=0.0)
            do_t = tl.load(do_ptrs - shift * dout_stride_n, mask=ok_t, other=0.0)
            dv += q_t.to(ACC) * do_t.to(ACC) * w[None, :]
    # The three (BLOCK_N x BLOCK_D) @ (BLOCK_D x BLOCK_D) products run in K chunks of 16 read
    # straight from memory (L1/L2-hot): whole 64 x 64 right operands would not fit in registers
    # next to the token tiles for fp32 inputs (their dots are FMA, not tensor-core).
    head = bh64 * Ch * Ch  # S is (Ch, Ch) per head, dS (BLOCK_D, BLOCK_D)
    head_pad = bh64 * BLOCK_D * BLOCK_D
    do = _load_tokens(dbase, offs_n, chan, dout_stride_n, mask, 0.0).to(ACC)
    dq = do * conv
    for e0 in tl.static_range(0, BLOCK_D, 16):
        e = e0 + tl.arange(0, 16)
        emask = nmask[:, None] & (e < Ch)[None, :]
        do_e = _load_tokens(dbase, offs_n, h * Ch + e, dout_stride_n, emask, 0.0).to(ACC)
        emask_t = (e < Ch)[:, None] & dmask[None, :]
        # [e, d] = S[d, e]
        ctx_t = tl.load(ctx_ptr + head + offs_d[None, :] * Ch + e[:, None], mask=emask_t, other=0.0)
        dq += scale_acc * tl.dot(do_e, ctx_t, out_dtype=ACC, input_precision=DOT_PRECISION)
    tl.store(out, dq.to(ty), mask=mask)
    v_ds = tl.zeros([BLOCK_N, BLOCK_D], ACC)  # v dS^T
    for e0 in tl.static_range(0, BLOCK_D, 16):
        e = e0 + tl.arange(0, 16)
        emask = nmask[:, None] & (e < Ch)[None, :]
        v_e = _load_tokens(base, offs_n, 2 * C + h * Ch + e, stride_n, emask, 0.0).to(ACC)
        ds_t = tl.load(ds_ptr + head_pad + offs_d[None, :] * BLOCK_D + e[:, None])  # [e, d] = dS[d, e]
        v_ds += tl.dot(v_e, ds_t, out_dtype=ACC, input_precision=DOT_PRECISION)
        k_e = _load_tokens(base, offs_n, C + h * Ch + e, stride_n, emask, 0.0).to(ACC)
        a_e = tl.where(emask, tl.exp(k_e - tl.load(lse_ptr + bh64 * Ch + e, mask=e < Ch, other=0.0)[None, :]), 0.0)
        ds_e = tl.load(ds_ptr + head_pad + e[:, None] * BLOCK_D + offs_d[None, :])  # rows e of dS
        dv += tl.dot(a_e, ds_e, out_dtype=ACC, input_precision=DOT_PRECISION)
    tl.store(out + 2 * C, dv.to(ty), mask=mask)
    k = _load_tokens(base, offs_n, C + chan, stride_n, mask, 0.0).to(ACC)
    a = tl.where(mask, tl.exp(k - tl.load(lse_ptr + bh64 * Ch + offs_d, mask=dmask, other=0.0)[None, :]), 0.0)
    dk = a * (v_ds - tl.load(c_ptr + bh64 * BLOCK_D + offs_d)[None, :])
    tl.store(out + C, dk.to(ty), mask=mask)


def dot_precision(dtype_name: str) -> str:
    """input_precision of the kernels' dots for inputs of this dtype. Products of two fp32
    operands (q S, dO S^T, v dS^T, A dS) would run as tf32 for 16-bit inputs, which truncates S,
    dS and A to 10 mantissa bits (no rounding): tf32x3 keeps them to fp32 accuracy at three
    tensor-core products, a small cost in these memory-bound passes (the 16-bit x 16-bit dots
    ignore it). fp32 and fp64 inputs take exact FMA dots."""
    return "tf32x3" if dtype_name in ("fp16", "bf16") else "ieee"


def compile_specs():
    """What the ops can launch, for the ahead-of-time compile check
    (mpvit_kernels/triton/static_compile.py): per kernel, its pointer and float argument types
    and the constexpr combinations at the model's shapes (head dims 8..60 -> BLOCK_D 16..64,
    windows up to 7) for fp16/bf16/fp32/fp64 inputs; the tiles come from the kernel's own Tiles."""
    specs = []
    for dt in ("fp16", "bf16", "fp32", "fp64"):
        acc_ty = tl.float64 if dt == "fp64" else tl.float32
        acc = "*fp64" if dt == "fp64" else "*fp32"
        common = {"ACC": acc_ty, "DOT_PRECISION": dot_precision(dt)}
        for bd in (16, 32, 64):
            tag = f"{dt} BLOCK_D={bd}"
            specs += [
                *[(context_partial_kernel, tag + (" FINAL" if final else ""),
                   {"qkv_ptr": f"*{dt}", "m_ptr": acc, "l_ptr": acc, "s_ptr": acc, "ctx_ptr": acc, "lse_ptr": acc},
                   {**common, "BLOCK_D": bd, "FINAL": final}) for final in (False, True)],
                (context_combine_kernel, tag, {"m_ptr": acc, "l_ptr": acc, "s_ptr": acc, "ctx_ptr": acc,
                                               "lse_ptr": acc}, {"ACC": acc_ty, "BLOCK_D": bd}),
                (output_kernel, tag, {"qkv_ptr": f"*{dt}", "ctx_ptr": acc, "w_ptr": acc, "bias_ptr": acc,
                                      "ksize_ptr": "*i32", "out_ptr": f"*{dt}", "scale": "fp64"},
                 {**common, "BLOCK_D": bd, "KMAX": 7}),
                *[(whole_map_kernel, tag + (" WRITE_STATS" if stats else ""),
                   {"qkv_ptr": f"*{dt}", "w_ptr": acc, "bias_ptr": acc, "ksize_ptr": "*i32", "out_ptr": f"*{dt}",
                    "ctx_ptr": acc, "lse_ptr": acc, "scale": "fp64"},
                   {**common, "BLOCK_D": bd, "KMAX": 7, "WRITE_STATS": stats}) for stats in (False, True)],
                *[(grad_partial_kernel, tag + (" FINAL" if final else ""),
                   {"qkv_ptr": f"*{dt}", "dout_ptr": f"*{dt}", "ds_part_ptr": acc, "dw_ptr": acc, "db_ptr": acc,
                    "ksize_ptr": "*i32", "ctx_ptr": acc, "ds_ptr": acc, "c_ptr": acc, "scale": "fp64"},
                   {**common, "BLOCK_D": bd, "KMAX": 7, "KK": 64, "FINAL": final}) for final in (False, True)],
                (grad_combine_kernel, tag, {"ds_part_ptr": acc, "ctx_ptr": acc, "ds_ptr": acc, "c_ptr": acc,
                                            "scale": "fp64"}, {"ACC": acc_ty, "BLOCK_D": bd}),
                (grad_qkv_kernel, tag, {"qkv_ptr": f"*{dt}", "dout_ptr": f"*{dt}", "ctx_ptr": acc, "lse_ptr": acc,
                                        "ds_ptr": acc, "c_ptr": acc, "w_ptr": acc, "bias_ptr": acc,
                                        "ksize_ptr": "*i32", "dqkv_ptr": f"*{dt}", "scale": "fp64"},
                 {**common, "BLOCK_D": bd, "KMAX": 7}),
            ]
    return specs
