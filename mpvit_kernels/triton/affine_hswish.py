"""Triton kernels of a training BatchNorm + Hardswish that follows a fused GEMM (``dwconv_bn``,
``gli_projection``) or any channels-last map (``affine_hswish_batch``: the stem's convs, InvRes's
depthwise): the statistics and the backward. The normalise pass itself is the ``affine_hswish``
op with the batch's (scale, shift).

Rows are pixels (M = B*H*W, NHWC), columns channels. Deterministic: every reduction has a fixed
order and there are no atomics.

- The GEMM's epilogue (``_gemm_epilogue``, shared by both ops' kernels) writes, per row tile and channel, the tile's mean
  and M2 (sum of squared deviations from that mean), so a large mean cannot cancel the variance
  away as a plain sum of squares would.
- ``tile_stats_kernel`` writes the same for a map that no GEMM of ours wrote, in a pass of its own.
- ``stats_kernel`` combines them (Chan et al.) into the batch mean and biased variance, and gives
  the normalise pass its scale = gamma / sqrt(var + eps), shift = beta - mean * scale.
- Backward: ``grad_sums_kernel`` reduces sum(g_u) and sum(g_u * (z - mean)) per row block, with
  g_u = grad * hardswish'(u); ``grad_totals_kernel`` adds the blocks' up (and gives the
  BatchNorm weight's grad); ``grad_kernel`` is the elementwise
  grad_z = scale * (g_u - sum(g_u) / M - xhat * sum(g_u * xhat) / M).
"""
import triton
import triton.language as tl

from mpvit_kernels.triton.launch import INTERPRET, next_pow2, pinned


@triton.jit
def _known_multiple(x, VEC: tl.constexpr):
    """x, which the op has checked is a multiple of VEC, in a form the compiler's alignment
    analysis sees as one (the division is exact, so the value is unchanged); VEC = 1 leaves the
    code as it was."""
    if VEC > 1:
        x = x // VEC * VEC
    return x


@triton.jit
def _div(a, b, ACC: tl.constexpr):
    """a / b correctly rounded in ACC: Triton's fp32 ``/`` is div.full.f32 (up to 2 ulp off);
    its fp64 one is exact."""
    if ACC == tl.float64:
        return a / b
    else:
        return tl.math.div_rn(a, b)


@triton.jit
def _tile_stats(z, rows, n_rows, ACC: tl.constexpr):
    """Per-column mean and M2 of the rows of z (BLOCK_M, BLOCK_N) where ``rows`` holds; n_rows
    of them (at least one, in ACC)."""
    mean = _div(tl.sum(tl.where(rows[:, None], z, 0.0), 0), n_rows, ACC)
    dev = tl.where(rows[:, None], z - mean[None, :], 0.0)
    return mean, tl.sum(dev * dev, 0)


@triton.jit
def _gemm_epilogue(acc, offs_m, offs_n, mmask, nmask, M, Cout, scale_ptr, shift_ptr, res_ptr, y_ptr, tile_mean_ptr,
                   tile_m2_ptr, AFFINE: tl.constexpr, HSWISH: tl.constexpr, RESIDUAL: tl.constexpr,
                   STATS: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr):
    """The fused GEMMs' epilogue on their (BLOCK_M, BLOCK_N) tile of (M, Cout) NHWC rows: the
    folded BatchNorm (AFFINE), Hardswish, with RESIDUAL the identity of a residual block (rows
    laid out as y's) added after them, the one store of y, and with STATS the tile's per-channel
    mean and M2 of y as stored (what the normalise pass reads)."""
    if AFFINE:
        acc = acc * tl.load(scale_ptr + offs_n, mask=nmask, other=0.0)[None, :] + \
            tl.load(shift_ptr + offs_n, mask=nmask, other=0.0)[None, :]
    if HSWISH:  # times 1/6 in ACC (exact for fp64): an IEEE division would be a call with a stack frame
        acc = acc * tl.minimum(tl.maximum(acc + 3.0, 0.0), 6.0) * tl.full([], 1.0 / 6.0, ACC)
    out = offs_m.to(tl.int64)[:, None] * Cout + offs_n[None, :]
    omask = mmask[:, None] & nmask[None, :]
    if RESIDUAL:
        acc += tl.load(res_ptr + out, mask=omask, other=0.0).to(ACC)
    y = acc.to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + out, y, mask=omask)
    if STATS:
        mean, m2 = _tile_stats(y.to(ACC), mmask, tl.minimum(M - tl.program_id(0) * BLOCK_M, BLOCK_M).to(ACC), ACC)
        tl.store(tile_mean_ptr + tl.program_id(0) * Cout + offs_n, mean, mask=nmask)
        tl.store(tile_m2_ptr + tl.program_id(0) * Cout + offs_n, m2, mask=nmask)


@triton.jit
def _hswish_slope(u, ACC: tl.constexpr):
    """ATen's hardswish_backward branches, boundaries included, u / 3 as u * (1/3) in ACC as in
    csrc/activation.h."""
    return tl.where(u <= -3.0, 0.0, tl.where(u < 3.0, u * tl.full([], 1.0 / 3.0, ACC) + 0.5, 1.0))


@triton.jit
def _batch_affine(gamma_ptr, beta_ptr, mean, var, offs_c, cmask, eps, ACC: tl.constexpr):
    if ACC == tl.float64:
        root = tl.sqrt(var + tl.full([], eps, ACC))
    else:  # tl.sqrt is the approximate square root in fp32
        root = tl.sqrt_rn(var + tl.full([], eps, ACC))
    invstd = _div(tl.full([], 1.0, ACC), root, ACC)
    scale = tl.load(gamma_ptr + offs_c, mask=cmask, other=0.0) * invstd
    return invstd, scale, tl.load(beta_ptr + offs_c, mask=cmask, other=0.0) - mean * scale


@pinned((), {})  # nothing to pick: the launch alone, without Triton's binding (DirectLaunch)
@triton.jit(do_not_specialize=["M"])
def tile_stats_kernel(
    z_ptr,  # (M, C) rows NHWC: a map that no GEMM of ours wrote (a cuDNN conv's, a depthwise op's)
    tile_mean_ptr, tile_m2_ptr,  # (P, C) out: program p's mean and M2 over rows p*BLOCK_M*TILES..
    M, C, ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, TILES: tl.constexpr,
    VEC: tl.constexpr = 1,
):
    """What the GEMMs' epilogue writes for stats_kernel, as a pass of its own: TILES row tiles a
    program, each tile's (mean, M2) merged into the program's (Chan et al.), so z is read once.
    The tiles unrolled (static_range): their loads are independent, so all are in flight at once
    (a loop waited for each, and Triton pipelines no load that feeds no dot)."""
    C = _known_multiple(C, VEC)
    pid_m = tl.program_id(0)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = offs_c < C
    count = tl.zeros([], ACC)
    mean = tl.zeros([BLOCK_C], ACC)
    m2 = tl.zeros([BLOCK_C], ACC)
    for t in tl.static_range(TILES):
        # (64-bit: the last program's tiles reach M + 127, past 2^31 - 1 for M near it)
        start = (pid_m * TILES + t).to(tl.int64) * BLOCK_M
        offs_m = start + tl.arange(0, BLOCK_M)
        rows = offs_m < M
        z = tl.load(z_ptr + offs_m[:, None] * C + offs_c[None, :], mask=rows[:, None] & cmask[None, :],
                    other=0.0).to(ACC)
        # the first tile (n >= 1: every program starts within M) takes share 1; a tile past the
        # last row has n = 0 and changes nothing
        n = tl.minimum(tl.maximum(M - start, 0), BLOCK_M).to(ACC)
        t_mean, t_m2 = _tile_stats(z, rows, tl.maximum(n, 1.0), ACC)
        total = count + n
        delta = t_mean - mean
        share = _div(n, tl.maximum(total, 1.0), ACC)
        mean += delta * share
        # count * share first: 0 for the first tile and any past the last row, where delta * delta
        # would overflow fp32 for a mean past 1.8e19 (and inf * 0 be NaN)
        m2 += t_m2 + (count * share) * delta * delta
        count = total
    # (32-bit: P * C < 2^31 unless the map holds over 2^38 elements; 64-bit cost an 8-byte spill on
    # sm_90a, fp32 BLOCK_C=64 aligned, Triton 3.8)
    out = pid_m * C + offs_c
    tl.store(tile_mean_ptr + out, mean, mask=cmask)
    tl.store(tile_m2_ptr + out, m2, mask=cmask)


@triton.jit
def _tile_block(p0, p_hi, M, C, ROWS, offs_c, cmask, ACC: tl.constexpr, BLOCK_P: tl.constexpr):
    """Tiles p0..p0+BLOCK_P-1 (below p_hi) of a (P, C) statistics table over rows p*ROWS.. of M:
    their (BLOCK_P, BLOCK_C) mask, each tile's row count (in ACC) and element offsets."""
    # (the rows' counts in 64 bits: a masked tile past the last starts at row (p_hi + BLOCK_P) * ROWS,
    # past 2^31 - 1 for M near it)
    offs_p = p0 + tl.arange(0, BLOCK_P)
    mask = (offs_p < p_hi)[:, None] & cmask[None, :]
    n = tl.minimum(M - offs_p.to(tl.int64) * ROWS, ROWS).to(ACC)
    at = offs_p.to(tl.int64)[:, None] * C + offs_c[None, :]
    return mask, n, at


@triton.jit
def _merged_tiles(tile_mean_ptr, tile_m2_ptr, p_lo, p_hi, count, M, C, ROWS, offs_c, cmask, ACC: tl.constexpr,
                  BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """(mean, M2) over the ``count`` rows (in ACC) of tiles p_lo..p_hi-1 of (P, C) (mean, M2)
    tiles, tile p over rows p*ROWS.. of M: their mean first, then M2 about it (each tile's M2
    plus its n (mean_p - mean)^2), in a fixed order."""
    total = tl.zeros([BLOCK_C], ACC)
    for p0 in range(p_lo, p_hi, BLOCK_P):
        mask, n, at = _tile_block(p0, p_hi, M, C, ROWS, offs_c, cmask, ACC, BLOCK_P)
        total += tl.sum(tl.load(tile_mean_ptr + at, mask=mask, other=0.0) * n[:, None], 0)
    mean = _div(total, count, ACC)
    m2 = tl.zeros([BLOCK_C], ACC)
    for p0 in range(p_lo, p_hi, BLOCK_P):
        mask, n, at = _tile_block(p0, p_hi, M, C, ROWS, offs_c, cmask, ACC, BLOCK_P)
        d = tl.load(tile_mean_ptr + at, mask=mask, other=0.0) - mean[None, :]
        m2 += tl.sum(tl.where(mask, tl.load(tile_m2_ptr + at, mask=mask, other=0.0) + n[:, None] * d * d, 0.0), 0)
    return mean, m2


@pinned((), {})  # nothing to pick: the launch alone, without Triton's binding (DirectLaunch)
@triton.jit(do_not_specialize=["P", "M"])
def stats_kernel(
    tile_mean_ptr, tile_m2_ptr,  # (P, C) each: the row tiles' statistics, tile p has rows p*ROWS..
    gamma_ptr, beta_ptr,  # (C,) BatchNorm weight and bias, in the accumulation type
    mean_ptr, var_ptr, scale_ptr, shift_ptr,  # (C,) out
    P, M, C, ROWS,
    eps: tl.float64,  # fp64 whatever ACC: a plain Python float would be passed as fp32
    ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = offs_c < C
    count = M.to(ACC)
    mean, m2 = _merged_tiles(tile_mean_ptr, tile_m2_ptr, 0, P, count, M, C, ROWS, offs_c, cmask, ACC, BLOCK_P, BLOCK_C)
    var = _div(m2, count, ACC)
    invstd, scale, shift = _batch_affine(gamma_ptr, beta_ptr, mean, var, offs_c, cmask, eps, ACC)
    tl.store(mean_ptr + offs_c, mean, mask=cmask)
    tl.store(var_ptr + offs_c, var, mask=cmask)
    tl.store(scale_ptr + offs_c, scale, mask=cmask)
    tl.store(shift_ptr + offs_c, shift, mask=cmask)


@pinned((), {})  # nothing to pick: the launch alone, without Triton's binding (DirectLaunch)
@triton.jit(do_not_specialize=["P", "M", "CHUNK"])
def stats_chunks_kernel(
    tile_mean_ptr, tile_m2_ptr,  # (P, C) each, as stats_kernel's
    chunk_mean_ptr, chunk_m2_ptr,  # (cdiv(P, CHUNK), C) out: chunk s's over tiles s*CHUNK..
    P, M, C, ROWS, CHUNK, ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """stats_kernel's first level where P is long: program s merges CHUNK tiles into the (mean,
    M2) of their rows, which stats_kernel then takes as tiles of CHUNK*ROWS rows. One program
    walking every tile waits on each load in turn (about a microsecond a BLOCK_P step on an
    A100 or H100): 0.4 ms for the stem's 6272 tiles at batch 64, where the pass that wrote
    them takes tens of microseconds."""
    s = tl.program_id(0)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = offs_c < C
    p_lo = s * CHUNK  # (p_lo * ROWS < M; CHUNK * ROWS a few thousand)
    count = tl.minimum(M - p_lo * ROWS, CHUNK * ROWS).to(ACC)
    mean, m2 = _merged_tiles(tile_mean_ptr, tile_m2_ptr, p_lo, tl.minimum(p_lo + CHUNK, P), count, M, C, ROWS,
                             offs_c, cmask, ACC, BLOCK_P, BLOCK_C)
    out = s.to(tl.int64) * C + offs_c
    tl.store(chunk_mean_ptr + out, mean, mask=cmask)
    tl.store(chunk_m2_ptr + out, m2, mask=cmask)


@triton.jit
def _grad_u(g_ptr, z_ptr, offs_m, offs_c, mask, C, mean, scale, shift, HSWISH: tl.constexpr,
            ACC: tl.constexpr):
    """(grad into the BatchNorm output, z - mean) of a (rows, channels) tile."""
    at = offs_m.to(tl.int64)[:, None] * C + offs_c[None, :]
    z = tl.load(z_ptr + at, mask=mask, other=0.0).to(ACC)
    g = tl.load(g_ptr + at, mask=mask, other=0.0).to(ACC)
    if HSWISH:
        g = g * _hswish_slope(z * scale[None, :] + shift[None, :], ACC)
    return g, z - mean[None, :]


@pinned((), {})  # nothing to pick: the launch alone, without Triton's binding (DirectLaunch)
@triton.jit(do_not_specialize=["M"])
def grad_sums_kernel(
    g_ptr, z_ptr,  # (M, C) each: grad of the output, the pre-BatchNorm output (rows NHWC)
    gamma_ptr, beta_ptr, mean_ptr, var_ptr,  # (C,) in the accumulation type
    sum_ptr, sum_dev_ptr,  # (P, C) out: per row block, sum(g_u) and sum(g_u * (z - mean))
    M, C, eps: tl.float64, HSWISH: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, TILES: tl.constexpr, VEC: tl.constexpr = 1,
):
    C = _known_multiple(C, VEC)  # vector_width: 16-byte loads at widths such as 216
    pid_m = tl.program_id(0)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = offs_c < C
    mean = tl.load(mean_ptr + offs_c, mask=cmask, other=0.0)
    var = tl.load(var_ptr + offs_c, mask=cmask, other=0.0)
    _, scale, shift = _batch_affine(gamma_ptr, beta_ptr, mean, var, offs_c, cmask, eps, ACC)
    s = tl.zeros([BLOCK_C], ACC)
    s_dev = tl.zeros([BLOCK_C], ACC)
    for t in range(TILES):
        offs_m = (pid_m * TILES + t) * BLOCK_M + tl.arange(0, BLOCK_M)
        mask = (offs_m < M)[:, None] & cmask[None, :]
        g, dev = _grad_u(g_ptr, z_ptr, offs_m, offs_c, mask, C, mean, scale, shift, HSWISH, ACC)
        s += tl.sum(g, 0)
        s_dev += tl.sum(tl.where(mask, g * dev, 0.0), 0)
    tl.store(sum_ptr + pid_m * C + offs_c, s, mask=cmask)
    tl.store(sum_dev_ptr + pid_m * C + offs_c, s_dev, mask=cmask)


@triton.jit
def _summed_rows(a_ptr, b_ptr, p_lo, p_hi, C, offs_c, cmask, ACC: tl.constexpr, BLOCK_P: tl.constexpr,
                 BLOCK_C: tl.constexpr):
    """The sums of rows p_lo..p_hi-1 of two (P, C) arrays, BLOCK_P rows at a time (a fixed order)."""
    total_a = tl.zeros([BLOCK_C], ACC)
    total_b = tl.zeros([BLOCK_C], ACC)
    for p0 in range(p_lo, p_hi, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        at = offs_p.to(tl.int64)[:, None] * C + offs_c[None, :]
        mask = (offs_p < p_hi)[:, None] & cmask[None, :]
        total_a += tl.sum(tl.load(a_ptr + at, mask=mask, other=0.0), 0)
        total_b += tl.sum(tl.load(b_ptr + at, mask=mask, other=0.0), 0)
    return total_a, total_b


@pinned((), {})  # nothing to pick: the launch alone, without Triton's binding (DirectLaunch)
@triton.jit(do_not_specialize=["P", "CHUNK"])
def sums_chunks_kernel(
    sum_ptr, sum_dev_ptr,  # (P, C): grad_sums_kernel's per row block
    chunk_sum_ptr, chunk_sum_dev_ptr,  # (cdiv(P, CHUNK), C) out: the sums of rows s*CHUNK.. of each
    P, C, CHUNK, ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """grad_totals_kernel's first level where P is long (stats_chunks_kernel's reason)."""
    s = tl.program_id(0)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = offs_c < C
    p_lo = s * CHUNK
    total, total_dev = _summed_rows(sum_ptr, sum_dev_ptr, p_lo, tl.minimum(p_lo + CHUNK, P), C, offs_c, cmask, ACC,
                                    BLOCK_P, BLOCK_C)
    out = s.to(tl.int64) * C + offs_c
    tl.store(chunk_sum_ptr + out, total, mask=cmask)
    tl.store(chunk_sum_dev_ptr + out, total_dev, mask=cmask)


@pinned((), {})  # nothing to pick: the launch alone, without Triton's binding (DirectLaunch)
@triton.jit(do_not_specialize=["P"])
def grad_totals_kernel(
    sum_ptr, sum_dev_ptr,  # (P, C): grad_sums_kernel's per row block
    var_ptr,  # (C,) the batch's biased variance
    total_ptr, total_dev_ptr, grad_gamma_ptr,  # (C,) out: sum(g_u) (beta's grad), sum(g_u (z - mean)), gamma's grad
    P, C, eps: tl.float64, ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """The row blocks' sums added up in a fixed order (BLOCK_P rows at a time), and gamma's grad
    sum(g_u xhat) = sum(g_u (z - mean)) / sqrt(var + eps): one launch where torch's two sums and
    the ops of the scaling were five."""
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = offs_c < C
    total, total_dev = _summed_rows(sum_ptr, sum_dev_ptr, 0, P, C, offs_c, cmask, ACC, BLOCK_P, BLOCK_C)
    var = tl.load(var_ptr + offs_c, mask=cmask, other=0.0)
    if ACC == tl.float64:
        root = tl.sqrt(var + tl.full([], eps, ACC))
    else:  # tl.sqrt is the approximate square root in fp32
        root = tl.sqrt_rn(var + tl.full([], eps, ACC))
    tl.store(total_ptr + offs_c, total, mask=cmask)
    tl.store(total_dev_ptr + offs_c, total_dev, mask=cmask)
    tl.store(grad_gamma_ptr + offs_c, _div(total_dev, root, ACC), mask=cmask)


@pinned((), {})  # nothing to pick: the launch alone, without Triton's binding (DirectLaunch)
@triton.jit(do_not_specialize=["M"])
def grad_kernel(
    g_ptr, z_ptr,  # (M, C) each, as grad_sums_kernel's
    gamma_ptr, beta_ptr, mean_ptr, var_ptr, sum_ptr, sum_dev_ptr,  # (C,) in the accumulation type
    gz_ptr,  # (M, C) out: grad of the pre-BatchNorm output
    M, C, eps: tl.float64, HSWISH: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, VEC: tl.constexpr = 1,
):
    C = _known_multiple(C, VEC)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = offs_c < C
    mask = (offs_m < M)[:, None] & cmask[None, :]
    mean = tl.load(mean_ptr + offs_c, mask=cmask, other=0.0)
    var = tl.load(var_ptr + offs_c, mask=cmask, other=0.0)
    invstd, scale, shift = _batch_affine(gamma_ptr, beta_ptr, mean, var, offs_c, cmask, eps, ACC)
    mean_g = _div(tl.load(sum_ptr + offs_c, mask=cmask, other=0.0), M.to(ACC), ACC)
    # sum(g_u * xhat) / M * invstd, the slope of the mean-removed grad along xhat
    along = _div(tl.load(sum_dev_ptr + offs_c, mask=cmask, other=0.0) * invstd, M.to(ACC), ACC) * invstd
    g, dev = _grad_u(g_ptr, z_ptr, offs_m, offs_c, mask, C, mean, scale, shift, HSWISH, ACC)
    gz = scale[None, :] * (g - mean_g[None, :] - dev * along[None, :])
    tl.store(gz_ptr + offs_m.to(tl.int64)[:, None] * C + offs_c[None, :], gz.to(gz_ptr.dtype.element_ty), mask=mask)


# Rows per tile and tiles per program of the backward kernels: a 64-channel tile of 32 rows is what
# fits 4 warps' registers in fp64 without spills; a sums program covers 512 rows.
GRAD_ROWS, GRAD_TILES = 32, 16
# Tiles per program of tile_stats_kernel, all loaded at once: 128 rows, 16 KB of a 64-channel bf16
# map in flight a program; its (mean, M2) are 3% of the map's bytes (bf16; 1.6% fp32)
STATS_TILES = 4

# The combines of per-program partials (stats_kernel, grad_totals_kernel): one program per 64
# channels reads COMBINE_ROWS partial rows a step, each step waiting on its loads (about a
# microsecond on an A100 or H100). Past COMBINE_CHUNK rows a first launch (stats_chunks_kernel,
# sums_chunks_kernel) combines them COMBINE_CHUNK at a time, a program each: 16 steps cost
# about what the extra launch does.
COMBINE_ROWS, COMBINE_CHUNK = 32, 256


def grad_tile() -> tuple[int, int]:
    """(BLOCK_M, TILES) of the backward's launches: (GRAD_ROWS, GRAD_TILES) on a GPU; under the
    interpreter, whose cost goes with programs and loop steps, not their size, tiles 4 times as
    tall (a sums program still covers 512 rows, so its partial sums are the GPU's)."""
    return (GRAD_ROWS * 4, GRAD_TILES // 4) if INTERPRET else (GRAD_ROWS, GRAD_TILES)


def stats_tile() -> tuple[int, int]:
    """(BLOCK_M, TILES) of tile_stats_kernel: (GRAD_ROWS, STATS_TILES) on a GPU; under the
    interpreter tiles 4 times as tall, two a program (still merged as on a GPU)."""
    return (GRAD_ROWS * 4, 2) if INTERPRET else (GRAD_ROWS, STATS_TILES)


def combine_chunks(P: int) -> int:
    """The programs of a combine's first level over P partial rows (each COMBINE_CHUNK of them,
    at least 2, so that each level shortens P), 0 where one launch combines them."""
    if COMBINE_CHUNK < 2:
        raise ValueError(f"COMBINE_CHUNK must be at least 2, got {COMBINE_CHUNK}")
    return -(-P // COMBINE_CHUNK) if P > COMBINE_CHUNK else 0


def block_c(C: int) -> int:
    """Channels per program of the statistics and backward kernels."""
    return min(64, max(16, next_pow2(C)))


def compile_specs():
    """Every dtype with and without Hardswish; every BLOCK_C the op launches; with no alignment
    known, and the backward for MPViT's widths and dtypes as it launches it (VEC=8, aligned
    pointers)."""
    from mpvit_kernels.triton.static_compile import as_launched

    specs = []
    for dt in ("fp16", "bf16", "fp32", "fp64"):
        acc_ty = tl.float64 if dt == "fp64" else tl.float32
        acc = "*fp64" if dt == "fp64" else "*fp32"
        for bc in (16, 32, 64):
            specs.append((stats_kernel, f"{dt} BLOCK_C={bc}",
                          {n: acc for n in ("tile_mean_ptr", "tile_m2_ptr", "gamma_ptr", "beta_ptr", "mean_ptr",
                                            "var_ptr", "scale_ptr", "shift_ptr")} | {"eps": "fp64"},
                          {"ACC": acc_ty, "BLOCK_P": COMBINE_ROWS, "BLOCK_C": bc}))
            specs.append((stats_chunks_kernel, f"{dt} BLOCK_C={bc}",
                          {n: acc for n in ("tile_mean_ptr", "tile_m2_ptr", "chunk_mean_ptr", "chunk_m2_ptr")},
                          {"ACC": acc_ty, "BLOCK_P": COMBINE_ROWS, "BLOCK_C": bc}))
            specs.append((tile_stats_kernel, f"{dt} BLOCK_C={bc}",
                          {"z_ptr": f"*{dt}", "tile_mean_ptr": acc, "tile_m2_ptr": acc},
                          {"ACC": acc_ty, "BLOCK_M": GRAD_ROWS, "BLOCK_C": bc, "TILES": STATS_TILES}))
            if bc >= 32 and dt != "fp64":  # the stem's 32 channels and the InvRes widths, as launched
                specs.append(as_launched(specs[-1]))
            specs.append((grad_totals_kernel, f"{dt} BLOCK_C={bc}",
                          {n: acc for n in ("sum_ptr", "sum_dev_ptr", "var_ptr", "total_ptr", "total_dev_ptr",
                                            "grad_gamma_ptr")} | {"eps": "fp64"},
                          {"ACC": acc_ty, "BLOCK_P": COMBINE_ROWS, "BLOCK_C": bc}))
            specs.append((sums_chunks_kernel, f"{dt} BLOCK_C={bc}",
                          {n: acc for n in ("sum_ptr", "sum_dev_ptr", "chunk_sum_ptr", "chunk_sum_dev_ptr")},
                          {"ACC": acc_ty, "BLOCK_P": COMBINE_ROWS, "BLOCK_C": bc}))
            for hswish in (True, False):
                per_channel = {n: acc for n in ("gamma_ptr", "beta_ptr", "mean_ptr", "var_ptr", "sum_ptr",
                                                "sum_dev_ptr")}
                tag = f"{dt} BLOCK_C={bc}" + (" hswish" if hswish else "")
                specs.append((grad_sums_kernel, tag,
                              {"g_ptr": f"*{dt}", "z_ptr": f"*{dt}", **per_channel, "eps": "fp64"},
                              {"HSWISH": hswish, "ACC": acc_ty, "BLOCK_M": GRAD_ROWS, "BLOCK_C": bc, "TILES": GRAD_TILES}))
                specs.append((grad_kernel, tag,
                              {"g_ptr": f"*{dt}", "z_ptr": f"*{dt}", "gz_ptr": f"*{dt}", **per_channel, "eps": "fp64"},
                              {"HSWISH": hswish, "ACC": acc_ty, "BLOCK_M": GRAD_ROWS, "BLOCK_C": bc}))
                if bc == 64 and dt != "fp64":  # as MPViT (C 64 to 480, multiples of 8) launches them
                    specs += [as_launched(spec) for spec in specs[-2:]]
    return specs
