// Device code of the depthwise op family: k x k depthwise conv ("same" padding k/2, stride 1 or
// 2) on NHWC tensors with the epilogue y = act(conv * scale + shift) + x fused before the store,
// and its backward, tiled as depthwise_tiles.h says. No CUDA runtime or ATen types here:
// depthwise.cu instantiates these kernels for a GPU, and tests/cuda_host runs the very same code
// on the CPU (one std::thread per CUDA thread, a barrier for __syncthreads) where there is none.
#pragma once
#include <cstdint>

#include "../activation.h"
#include "depthwise_tiles.h"

namespace mpvit_kernels {
namespace depthwise {

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// *dst = v as 16-byte (or 8-byte) stores. nvcc compiled the Vec's own assignment here to one
// store per element (sm_80 and sm_90 PTX: st.global.f32 x4, st.global.u16 x6 + v2; a copy
// through uint4 too), where its loads are one ld.global.v4; the PTX store says it once. dst is
// aligned to the Vec, as the vector loads' pointers are (the launcher's check).
template <typename T, int N>
__device__ __forceinline__ void store_vec(T* dst, const Vec<T, N>& v) {
#ifdef __CUDACC__
  if constexpr (sizeof(v) % 8 == 0) {
    uint32_t w[sizeof(v) / 4];
    memcpy(w, &v, sizeof(v));
    if constexpr (sizeof(v) % 16 == 0) {
#pragma unroll
      for (int i = 0; i < static_cast<int>(sizeof(v) / 16); ++i)
        asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(reinterpret_cast<char*>(dst) + 16 * i),
                     "r"(w[4 * i]), "r"(w[4 * i + 1]), "r"(w[4 * i + 2]), "r"(w[4 * i + 3])
                     : "memory");
    } else {
      asm volatile("st.global.v2.b32 [%0], {%1, %2};" ::"l"(dst), "r"(w[0]), "r"(w[1]) : "memory");
    }
    return;
  }
#endif
  *reinterpret_cast<Vec<T, N>*>(dst) = v;
}

// Minimum resident blocks per SM, given to ptxas: without it ptxas aims at an occupancy that makes
// it spill a few registers in the 5x5/7x7 and parameter-grad kernels; with it, it uses what it
// needs up to 65536 / (kThreads * blocks) registers (read off the cubins: make static-report).
template <int K>
constexpr int kConvMinBlocks = K == 3 ? 5 : 3;
template <int K>
constexpr int kParamMinBlocks = K == 7 ? 1 : 2;

// Halo tile side for `tile` outputs at stride s of a K-wide window.
__host__ __device__ constexpr int halo(int tile, int K, int s) { return (tile - 1) * s + K; }

// floor(a / stride) for stride 1 or 2, negative a included (a shift: no 64-bit division, which
// is a call on the GPU).
__host__ __device__ inline int64_t floor_div_stride(int64_t a, int stride) { return stride == 1 ? a : a >> 1; }

// Stages rows x cols pixels of `src` (N, rows_total, cols_total, C), from (r0, c0) on, channels
// [ch0, ch0 + CB), into tile[(row * cols + col) * CG + lane]; zeros outside the image and past C.
template <int VEC, typename T>
__device__ __forceinline__ void stage(const T* __restrict__ src, Vec<T, VEC>* tile, int64_t n, int64_t rows_total,
                                      int64_t cols_total, int64_t C, int64_t r0, int64_t c0, int64_t ch0, int rows,
                                      int cols) {
  using V = Vec<T, VEC>;
  constexpr int CG = Tiling<VEC>::CG;
  for (int i = threadIdx.x; i < rows * cols * CG; i += kThreads) {
    const int lane = i % CG, pix = i / CG;
    const int64_t r = r0 + pix / cols, c = c0 + pix % cols, ch = ch0 + static_cast<int64_t>(lane) * VEC;
    V v;
    if (r >= 0 && r < rows_total && c >= 0 && c < cols_total && ch < C) {
      v = *reinterpret_cast<const V*>(src + ((n * rows_total + r) * cols_total + c) * C + ch);
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) v.v[j] = T(0);
    }
    tile[i] = v;
  }
}

// wsh[tap * CB + cc] = weight[(ch0 + cc) * K * K + tap], zero past C.
template <int VEC, int K, typename acc_t>
__device__ __forceinline__ void stage_weights(const acc_t* __restrict__ weight, acc_t* wsh, int64_t C, int64_t ch0) {
  constexpr int CB = Tiling<VEC>::CB;
  for (int i = threadIdx.x; i < K * K * CB; i += kThreads) {
    const int cc = i % CB, tap = i / CB;
    wsh[i] = ch0 + cc < C ? weight[(ch0 + cc) * K * K + tap] : acc_t(0);
  }
}

// acc[j] = bias + sum over taps of the staged input around tile pixel (ty, tx), lane `lane`;
// the weight of tap t, channel j of the lane is w[t * tap_step + j * channel_step].
template <int VEC, int K, int UNROLL_ROWS, typename T, typename acc_t>
__device__ __forceinline__ void conv_at(const Vec<T, VEC>* tile, const acc_t* w, int tap_step, int channel_step,
                                        int cols, int stride, int ty, int tx, int lane,
                                        const acc_t* __restrict__ bias, int64_t ch, acc_t* acc) {
  constexpr int CG = Tiling<VEC>::CG;
#pragma unroll
  for (int j = 0; j < VEC; ++j) acc[j] = bias ? bias[ch + j] : acc_t(0);
#pragma unroll UNROLL_ROWS
  for (int kh = 0; kh < K; ++kh) {
#pragma unroll
    for (int kw = 0; kw < K; ++kw) {
      const Vec<T, VEC> v = tile[((ty * stride + kh) * cols + tx * stride + kw) * CG + lane];
      const acc_t* wt = w + (kh * K + kw) * tap_step;
#pragma unroll
      for (int j = 0; j < VEC; ++j) acc[j] += static_cast<acc_t>(v.v[j]) * wt[j * channel_step];
    }
  }
}

// Forward. Grid: (output tiles per image, channel blocks, B).
// x (B, H, W, C), y (B, Ho, Wo, C); weight (C, K*K); bias, scale, shift (C,) or null.
template <typename T, typename acc_t, int VEC, int K>
__global__ void __launch_bounds__(kThreads, kConvMinBlocks<K>)
    depthwise_fwd_kernel(const T* __restrict__ x, const acc_t* __restrict__ weight, const acc_t* __restrict__ bias,
                         const acc_t* __restrict__ scale, const acc_t* __restrict__ shift, T* __restrict__ y,
                         Geometry g, bool hswish, bool residual) {
  using Tl = Tiling<VEC>;
  constexpr int P = K / 2;
  __shared__ Vec<T, VEC> tile[halo(Tl::TH, K, kMaxStride) * halo(Tl::TW, K, kMaxStride) * Tl::CG];
  __shared__ acc_t wsh[K * K * Tl::CB];
  const int64_t b = blockIdx.z, ch0 = static_cast<int64_t>(blockIdx.y) * Tl::CB;
  // tile indices fit in 32 bits (the launcher checks), and 32-bit division is an instruction
  const int block_tile = blockIdx.x, tiles_w = static_cast<int>(g.tiles_w);
  const int64_t oh0 = static_cast<int64_t>(block_tile / tiles_w) * Tl::TH;
  const int64_t ow0 = static_cast<int64_t>(block_tile % tiles_w) * Tl::TW;
  const int rows = halo(Tl::TH, K, g.stride), cols = halo(Tl::TW, K, g.stride);
  stage<VEC>(x, tile, b, g.H, g.W, g.C, oh0 * g.stride - P, ow0 * g.stride - P, ch0, rows, cols);
  stage_weights<VEC, K>(weight, wsh, g.C, ch0);
  __syncthreads();
  const int lane = threadIdx.x % Tl::CG, pix = threadIdx.x / Tl::CG;
  const int ty = pix / Tl::TW, tx = pix % Tl::TW;
  const int64_t oh = oh0 + ty, ow = ow0 + tx, ch = ch0 + static_cast<int64_t>(lane) * VEC;
  if (oh >= g.Ho || ow >= g.Wo || ch >= g.C) return;
  acc_t acc[VEC];
  conv_at<VEC, K, K>(tile, wsh + lane * VEC, Tl::CB, 1, cols, g.stride, ty, tx, lane, bias, ch, acc);
  // residual (stride 1): x at this very pixel, already staged
  const Vec<T, VEC> self = tile[((ty + P) * cols + tx + P) * Tl::CG + lane];
  Vec<T, VEC> out;
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    acc_t z = scale ? acc[j] * scale[ch + j] + shift[ch + j] : acc[j];
    if (hswish) z = hswish_fwd(z);
    if (residual) z += static_cast<acc_t>(self.v[j]);
    out.v[j] = static_cast<T>(z);
  }
  store_vec(y + ((b * g.Ho + oh) * g.Wo + ow) * g.C + ch, out);
}

// row[ch + j] = the sum of v[j] over the block's pixel lanes, as a fixed-order tree in `red`
// (PIX * CB values of shared memory).
template <int VEC, typename acc_t>
__device__ __forceinline__ void sum_pixel_lanes(const acc_t* v, acc_t* red, acc_t* __restrict__ row, int64_t C,
                                                int64_t ch) {
  using Tl = Tiling<VEC>;
  const int lane = threadIdx.x % Tl::CG, pix = threadIdx.x / Tl::CG;
  acc_t* mine = red + pix * Tl::CB + lane * VEC;
#pragma unroll
  for (int j = 0; j < VEC; ++j) mine[j] = v[j];
  __syncthreads();
  for (int step = Tl::PIX / 2; step > 0; step /= 2) {
    if (pix < step) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) mine[j] += mine[step * Tl::CB + j];
    }
    __syncthreads();
  }
  if (pix == 0) {
#pragma unroll
    for (int j = 0; j < VEC; ++j)
      if (ch + j < C) row[ch + j] = mine[j];
  }
  __syncthreads();
}

// Backward, pass 1: parameter-grad partials, and the grad of the conv output where an epilogue
// (scale or hswish) sits between it and y. Grid: (chunks, channel blocks); block `chunk` walks
// output tiles chunk, chunk + chunks, ... (tiles numbered image by image, row-major), so every
// sum runs in an order fixed by the shapes alone: bitwise reproducible, no atomics.
// grad (B, Ho, Wo, C); gconv (B, Ho, Wo, C) out, written only when `epilogue`;
// partial (chunks, K*K + 3, C) out: per tap sum of gconv * x, then sums of gconv (bias),
// gz * conv (scale) and gz (shift), gz being the grad after Hardswish.
template <typename T, typename acc_t, int VEC, int K>
__global__ void __launch_bounds__(kThreads, kParamMinBlocks<K>)
    depthwise_bwd_params_kernel(const T* __restrict__ grad, const T* __restrict__ x, const acc_t* __restrict__ weight,
                                const acc_t* __restrict__ bias, const acc_t* __restrict__ scale,
                                const acc_t* __restrict__ shift, acc_t* __restrict__ gconv, acc_t* __restrict__ partial,
                                Geometry g, bool hswish) {
  using Tl = Tiling<VEC>;
  constexpr int P = K / 2, KK = K * K;
  constexpr int PAIRS = (KK * Tl::CB + kThreads - 1) / kThreads;  // (tap, channel) sums per thread
  __shared__ Vec<T, VEC> tile[halo(Tl::TH, K, kMaxStride) * halo(Tl::TW, K, kMaxStride) * Tl::CG];
  __shared__ acc_t gsh[Tl::PIX * Tl::CB];  // this tile's gconv, pixel-major; also the final tree
  const bool epilogue = hswish || scale != nullptr;
  const int chunks = gridDim.x;
  const int64_t ch0 = static_cast<int64_t>(blockIdx.y) * Tl::CB;
  const int rows = halo(Tl::TH, K, g.stride), cols = halo(Tl::TW, K, g.stride);
  const int tiles_w = static_cast<int>(g.tiles_w), tiles_per_image = static_cast<int>(g.tiles_h * g.tiles_w);
  const int lane = threadIdx.x % Tl::CG, pix = threadIdx.x / Tl::CG;
  const int ty = pix / Tl::TW, tx = pix % Tl::TW;
  const int64_t ch = ch0 + static_cast<int64_t>(lane) * VEC;
  // The (tap, channel) pairs of the weight grad this thread sums: pair q = threadIdx.x + i * kThreads
  // is channel q % CB, tap q / CB; pair_at is that tap's offset in the staged tile; pair_cc is -1
  // past the last pair.
  acc_t pair_sum[PAIRS];
  int pair_cc[PAIRS], pair_at[PAIRS];
#pragma unroll
  for (int i = 0; i < PAIRS; ++i) {
    const int q = threadIdx.x + i * kThreads, tap = q / Tl::CB;
    pair_sum[i] = acc_t(0);
    pair_cc[i] = q < KK * Tl::CB ? q % Tl::CB : -1;
    pair_at[i] = ((tap / K) * cols + tap % K) * Tl::CB + q % Tl::CB;
  }
  acc_t s_bias[VEC], s_scale[VEC], s_shift[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) s_bias[j] = s_scale[j] = s_shift[j] = acc_t(0);
  for (int t = blockIdx.x; t < static_cast<int>(param_tiles(g)); t += chunks) {
    const int64_t b = t / tiles_per_image;
    const int in_image = t % tiles_per_image;
    const int64_t oh0 = static_cast<int64_t>(in_image / tiles_w) * Tl::TH, ow0 = static_cast<int64_t>(in_image % tiles_w) * Tl::TW;
    stage<VEC>(x, tile, b, g.H, g.W, g.C, oh0 * g.stride - P, ow0 * g.stride - P, ch0, rows, cols);
    __syncthreads();  // the tile staged
    const int64_t oh = oh0 + ty, ow = ow0 + tx;
    acc_t gc[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) gc[j] = acc_t(0);
    if (oh < g.Ho && ow < g.Wo && ch < g.C) {
      const int64_t at = ((b * g.Ho + oh) * g.Wo + ow) * g.C + ch;
      const Vec<T, VEC> gv = *reinterpret_cast<const Vec<T, VEC>*>(grad + at);
#pragma unroll
      for (int j = 0; j < VEC; ++j) gc[j] = static_cast<acc_t>(gv.v[j]);
      if (epilogue) {
        acc_t conv[VEC];
        // the weights straight from global memory (cached): this path is rare (a grad through an
        // eval BatchNorm) and their staging would not fit beside the tiles in 48 KB
        conv_at<VEC, K, 1>(tile, weight + ch * KK, 1, KK, cols, g.stride, ty, tx, lane, bias, ch, conv);
        Vec<acc_t, VEC> out;
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const acc_t z = scale ? conv[j] * scale[ch + j] + shift[ch + j] : conv[j];
          const acc_t gz = hswish ? gc[j] * hswish_slope(z) : gc[j];
          s_scale[j] += gz * conv[j];
          s_shift[j] += gz;
          gc[j] = out.v[j] = scale ? gz * scale[ch + j] : gz;
        }
        store_vec(gconv + at, out);
      }
#pragma unroll
      for (int j = 0; j < VEC; ++j) s_bias[j] += gc[j];
    }
#pragma unroll
    for (int j = 0; j < VEC; ++j) gsh[pix * Tl::CB + lane * VEC + j] = gc[j];
    __syncthreads();  // gsh complete
    // Each thread's (tap, channel) sums over the tile's pixels, pixel by pixel.
    const T* xs = reinterpret_cast<const T*>(tile);  // scalar view: pixel-major, CB channels each
#pragma unroll 1
    for (int p = 0; p < Tl::PIX; ++p) {
      // pixels past the image add nothing, and must not read x there (an inf would make a NaN)
      if (oh0 + p / Tl::TW >= g.Ho || ow0 + p % Tl::TW >= g.Wo) continue;
      const int at = ((p / Tl::TW) * cols + p % Tl::TW) * g.stride * Tl::CB;  // the pixel's first tap
#pragma unroll
      for (int i = 0; i < PAIRS; ++i) {
        if (pair_cc[i] >= 0) pair_sum[i] += gsh[p * Tl::CB + pair_cc[i]] * static_cast<acc_t>(xs[at + pair_at[i]]);
      }
    }
    __syncthreads();  // before the next tile overwrites tile and gsh
  }
  acc_t* out = partial + static_cast<int64_t>(blockIdx.x) * (KK + 3) * g.C;
#pragma unroll
  for (int i = 0; i < PAIRS; ++i) {
    const int q = threadIdx.x + i * kThreads;
    if (q < KK * Tl::CB && ch0 + q % Tl::CB < g.C) out[(q / Tl::CB) * g.C + ch0 + q % Tl::CB] = pair_sum[i];
  }
  sum_pixel_lanes<VEC>(s_bias, gsh, out + KK * g.C, g.C, ch);
  sum_pixel_lanes<VEC>(s_scale, gsh, out + (KK + 1) * g.C, g.C, ch);
  sum_pixel_lanes<VEC>(s_shift, gsh, out + (KK + 2) * g.C, g.C, ch);
}

// Backward, pass 2: grad of x, the transposed conv of gconv (grad itself when there is no
// epilogue), plus grad when `residual`. Grid: (input tiles per image, channel blocks, B).
// gconv (B, Ho, Wo, C) of type G; grad (B, Ho, Wo, C); grad_x (B, H, W, C) out.
template <typename T, typename G, typename acc_t, int VEC, int K>
__global__ void __launch_bounds__(kThreads, kConvMinBlocks<K>)
    depthwise_bwd_input_kernel(const G* __restrict__ gconv, const T* __restrict__ grad,
                               const acc_t* __restrict__ weight, T* __restrict__ grad_x, Geometry g, bool residual) {
  using Tl = Tiling<VEC>;
  constexpr int P = K / 2;
  // gconv rows reaching TH input rows: oh in [floor((ih0 + P - K + 1) / s), floor((ih0 + TH - 1 + P) / s)],
  // at most TH + K - 1 of them (stride 1); columns likewise.
  constexpr int ROWS = Tl::TH + K - 1, COLS = Tl::TW + K - 1;
  __shared__ Vec<G, VEC> tile[ROWS * COLS * Tl::CG];
  __shared__ acc_t wsh[K * K * Tl::CB];
  const int64_t b = blockIdx.z, ch0 = static_cast<int64_t>(blockIdx.y) * Tl::CB;
  const int block_tile = blockIdx.x, tiles_w = static_cast<int>(g.in_tiles_w);
  const int64_t ih0 = static_cast<int64_t>(block_tile / tiles_w) * Tl::TH;
  const int64_t iw0 = static_cast<int64_t>(block_tile % tiles_w) * Tl::TW;
  const int64_t oh_lo = floor_div_stride(ih0 + P - K + 1, g.stride);
  const int64_t ow_lo = floor_div_stride(iw0 + P - K + 1, g.stride);
  const int rows = static_cast<int>(floor_div_stride(ih0 + Tl::TH - 1 + P, g.stride) - oh_lo + 1);
  const int cols = static_cast<int>(floor_div_stride(iw0 + Tl::TW - 1 + P, g.stride) - ow_lo + 1);
  stage<VEC>(gconv, tile, b, g.Ho, g.Wo, g.C, oh_lo, ow_lo, ch0, rows, cols);
  stage_weights<VEC, K>(weight, wsh, g.C, ch0);
  __syncthreads();
  const int lane = threadIdx.x % Tl::CG, pix = threadIdx.x / Tl::CG;
  const int64_t ih = ih0 + pix / Tl::TW, iw = iw0 + pix % Tl::TW, ch = ch0 + static_cast<int64_t>(lane) * VEC;
  if (ih >= g.H || iw >= g.W || ch >= g.C) return;
  acc_t acc[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) acc[j] = acc_t(0);
#pragma unroll
  for (int kh = 0; kh < K; ++kh) {
    const int64_t nh = ih + P - kh;  // = oh * stride for the output this tap reaches
    if (nh & (g.stride - 1)) continue;
    const int r = static_cast<int>(floor_div_stride(nh, g.stride) - oh_lo);
#pragma unroll
    for (int kw = 0; kw < K; ++kw) {
      const int64_t nw = iw + P - kw;
      if (nw & (g.stride - 1)) continue;
      const int c = static_cast<int>(floor_div_stride(nw, g.stride) - ow_lo);
      const Vec<G, VEC> v = tile[(r * cols + c) * Tl::CG + lane];  // zero where that output is outside the image
      const acc_t* w = wsh + (kh * K + kw) * Tl::CB + lane * VEC;
#pragma unroll
      for (int j = 0; j < VEC; ++j) acc[j] += static_cast<acc_t>(v.v[j]) * w[j];
    }
  }
  const int64_t at = ((b * g.H + ih) * g.W + iw) * g.C + ch;
  Vec<T, VEC> out;
  Vec<T, VEC> r;
  if (residual) r = *reinterpret_cast<const Vec<T, VEC>*>(grad + at);  // stride 1: grad has x's shape
#pragma unroll
    for (int j = 0; j < VEC; ++j) out.v[j] = static_cast<T>(residual ? acc[j] + static_cast<acc_t>(r.v[j]) : acc[j]);
  store_vec(grad_x + at, out);
}

// Backward, pass 3: sums pass 1's partials over the chunks in chunk order. One thread per output
// value: grad_weight (C, K*K) then grad_bias, grad_scale, grad_shift (C,) each, in `out`.
template <typename acc_t>
__global__ void depthwise_bwd_finish_kernel(const acc_t* __restrict__ partial, int64_t chunks, int64_t C, int KK,
                                            acc_t* __restrict__ out) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (t >= (KK + 3) * C) return;
  // out is (C, KK) for the weight, then three rows of C; partial rows are (KK + 3, C)
  const int64_t row = t < KK * C ? t % KK : KK + (t - KK * C) / C;
  const int64_t c = t < KK * C ? t / KK : (t - KK * C) % C;
  acc_t s = acc_t(0);
  for (int64_t k = 0; k < chunks; ++k) s += partial[(k * (KK + 3) + row) * C + c];
  out[t] = s;
}

}  // namespace depthwise
}  // namespace mpvit_kernels

namespace mpvit_kernels {
namespace depthwise {

// ---- the launch sequences, shared by depthwise.cu (GPU) and tests/cuda_host (CPU) ------------
// `launch(kernel, grid, args...)` runs one kernel over `grid` blocks of kThreads threads.

template <typename T, typename acc_t, int VEC, int K, typename Launch>
void run_forward(Launch&& launch, const Geometry& g, const T* x, const acc_t* weight, const acc_t* bias,
                 const acc_t* scale, const acc_t* shift, T* y, bool hswish, bool residual) {
  launch(depthwise_fwd_kernel<T, acc_t, VEC, K>, forward_grid(g), x, weight, bias, scale, shift, y, g, hswish,
         residual);
}

// gconv: (B, Ho, Wo, C) scratch, needed only with an epilogue (scale or hswish), else null;
// partial: partial_numel(g, K) scratch; param_grads out: grad weight (C, K*K), then grad bias,
// grad scale, grad shift (C,) each.
template <typename T, typename acc_t, int VEC, int K, typename Launch>
void run_backward(Launch&& launch, const Geometry& g, const T* grad, const T* x, const acc_t* weight,
                  const acc_t* bias, const acc_t* scale, const acc_t* shift, bool hswish, bool residual,
                  acc_t* gconv, acc_t* partial, T* grad_x, acc_t* param_grads) {
  const Grid params = params_grid(g);
  launch(depthwise_bwd_params_kernel<T, acc_t, VEC, K>, params, grad, x, weight, bias, scale, shift, gconv, partial,
         g, hswish);
  if (hswish || scale != nullptr) {
    launch(depthwise_bwd_input_kernel<T, acc_t, acc_t, VEC, K>, input_grid(g), static_cast<const acc_t*>(gconv), grad,
           weight, grad_x, g, residual);
  } else {
    launch(depthwise_bwd_input_kernel<T, T, acc_t, VEC, K>, input_grid(g), grad, grad, weight, grad_x, g, residual);
  }
  const int64_t outputs = (K * K + 3) * g.C;
  launch(depthwise_bwd_finish_kernel<acc_t>, Grid{cdiv(outputs, kThreads), 1, 1},
         static_cast<const acc_t*>(partial), params.x, g.C, K * K, param_grads);
}

}  // namespace depthwise
}  // namespace mpvit_kernels
