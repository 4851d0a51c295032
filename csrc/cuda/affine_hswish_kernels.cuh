// Device code of the affine + Hardswish op (eval BatchNorm folded to scale/shift) and its launch
// sequences, gridded as affine_hswish_grid.h says. No CUDA runtime or ATen types here:
// affine_hswish.cu instantiates it for a GPU, tests/cuda_host runs the same code on the CPU.
// Memory-bound: the forward reads x once and writes y once; the backward reads grad and x
// once, writes grad_x and per-block partial sums of the two parameter grads, then a second
// tiny kernel sums the partials in a fixed order (deterministic, no float atomics).
#pragma once
#include <cstdint>

#include "../activation.h"
#include "affine_hswish_grid.h"

namespace mpvit_kernels {
namespace affine_hswish {

// x, y: dense, numel elements, channel of element i is (i / inner) % C.
template <typename scalar_t, typename acc_t, typename index_t>
__global__ void affine_hswish_fwd_kernel(const scalar_t* __restrict__ x, const acc_t* __restrict__ scale,
                                         const acc_t* __restrict__ shift, scalar_t* __restrict__ y,
                                         index_t numel, index_t C, index_t inner, bool hswish) {
  for (index_t i = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; i < numel;
       i += static_cast<index_t>(gridDim.x) * blockDim.x) {
    const index_t c = (inner == 1 ? i : i / inner) % C;
    const acc_t z = static_cast<acc_t>(x[i]) * scale[c] + shift[c];
    y[i] = static_cast<scalar_t>(hswish ? hswish_fwd(z) : z);
  }
}

// The tensor is (outer, C, inner); a "row" r in [0, outer*inner) picks (r / inner, r % inner).
// Block (bx, by) owns channels [bx*ct, bx*ct + ct) and rows by, by + gridDim.y, ...
// Threads are ct channel lanes x (kThreads / ct) row lanes; ct = 32 when inner == 1 (coalesced
// along channels), else 1 (coalesced along inner).
// partial: (gridDim.y, 2, C) sums of grad*slope*x and grad*slope.
template <typename scalar_t, typename acc_t, typename index_t>
__global__ void affine_hswish_bwd_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ x,
                                         const acc_t* __restrict__ scale, const acc_t* __restrict__ shift,
                                         scalar_t* __restrict__ grad_x, acc_t* __restrict__ partial,
                                         index_t outer, index_t C, index_t inner, int ct, bool hswish) {
  __shared__ acc_t red_scale[kThreads];
  __shared__ acc_t red_shift[kThreads];
  const int lane_c = threadIdx.x % ct;
  const int lane_r = threadIdx.x / ct;
  const int row_lanes = kThreads / ct;
  const index_t c = static_cast<index_t>(blockIdx.x) * ct + lane_c;
  acc_t s_gx = 0, s_g = 0;
  if (c < C) {
    const acc_t a = scale[c], b = shift[c];
    const index_t rows = outer * inner;
    for (index_t r = static_cast<index_t>(blockIdx.y) * row_lanes + lane_r; r < rows;
         r += static_cast<index_t>(gridDim.y) * row_lanes) {
      const index_t i = (r / inner) * C * inner + c * inner + r % inner;
      const acc_t xv = static_cast<acc_t>(x[i]);
      const acc_t z = xv * a + b;
      const acc_t g = static_cast<acc_t>(grad[i]) * (hswish ? hswish_slope(z) : acc_t(1));
      grad_x[i] = static_cast<scalar_t>(g * a);
      s_gx += g * xv;
      s_g += g;
    }
  }
  red_scale[threadIdx.x] = s_gx;
  red_shift[threadIdx.x] = s_g;
  __syncthreads();
  // Tree over row lanes; thread t = lane_r * ct + lane_c, so partners are ct * step apart.
  for (int step = row_lanes / 2; step > 0; step /= 2) {
    if (lane_r < step) {
      red_scale[threadIdx.x] += red_scale[threadIdx.x + step * ct];
      red_shift[threadIdx.x] += red_shift[threadIdx.x + step * ct];
    }
    __syncthreads();
  }
  if (lane_r == 0 && c < C) {
    partial[(static_cast<index_t>(blockIdx.y) * 2) * C + c] = red_scale[lane_c];
    partial[(static_cast<index_t>(blockIdx.y) * 2 + 1) * C + c] = red_shift[lane_c];
  }
}

// One thread per (which, channel), grid-stride: sums the chunk partials in chunk order.
template <typename acc_t, typename param_t>
__global__ void affine_hswish_bwd_finish_kernel(const acc_t* __restrict__ partial, int chunks, int64_t C,
                                                param_t* __restrict__ grad_scale, param_t* __restrict__ grad_shift) {
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < 2 * C;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t which = t / C, c = t % C;
    acc_t s = 0;
    for (int k = 0; k < chunks; ++k) s += partial[(k * 2 + which) * C + c];
    (which == 0 ? grad_scale : grad_shift)[c] = static_cast<param_t>(s);
  }
}

// ---- the launch sequences, shared by affine_hswish.cu (GPU) and tests/cuda_host (CPU) --------
// `launch(kernel, grid, args...)` runs one kernel over `grid` blocks of kThreads threads.

// int32 indices below 2^30 elements, with room for the grid-stride steps.
inline bool int32_indices(int64_t numel) { return numel < (int64_t{1} << 30); }

// x, y: dense, numel elements, channel of element i is (i / inner) % C.
template <typename T, typename acc_t, typename Launch>
void run_forward(Launch&& launch, const T* x, const acc_t* scale, const acc_t* shift, T* y, int64_t numel, int64_t C,
                 int64_t inner, bool hswish) {
  if (int32_indices(numel)) {
    launch(affine_hswish_fwd_kernel<T, acc_t, int32_t>, forward_grid(numel), x, scale, shift, y,
           static_cast<int32_t>(numel), static_cast<int32_t>(C), static_cast<int32_t>(inner), hswish);
  } else {
    launch(affine_hswish_fwd_kernel<T, acc_t, int64_t>, forward_grid(numel), x, scale, shift, y, numel, C, inner,
           hswish);
  }
}

// x, grad, grad_x: dense (outer, C, inner), C > 0; partial: backward_grid(...).y * 2 * C scratch.
template <typename T, typename acc_t, typename param_t, typename Launch>
void run_backward(Launch&& launch, const T* grad, const T* x, const acc_t* scale, const acc_t* shift, T* grad_x,
                  acc_t* partial, param_t* grad_scale, param_t* grad_shift, int64_t outer, int64_t C, int64_t inner,
                  bool hswish) {
  const int ct = backward_channel_tile(inner);
  const Grid grid = backward_grid(outer, C, inner);
  if (int32_indices(outer * C * inner)) {
    launch(affine_hswish_bwd_kernel<T, acc_t, int32_t>, grid, grad, x, scale, shift, grad_x, partial,
           static_cast<int32_t>(outer), static_cast<int32_t>(C), static_cast<int32_t>(inner), ct, hswish);
  } else {
    launch(affine_hswish_bwd_kernel<T, acc_t, int64_t>, grid, grad, x, scale, shift, grad_x, partial, outer, C, inner,
           ct, hswish);
  }
  launch(affine_hswish_bwd_finish_kernel<acc_t, param_t>, finish_grid(C), static_cast<const acc_t*>(partial),
         static_cast<int>(grid.y), C, grad_scale, grad_shift);
}

}  // namespace affine_hswish
}  // namespace mpvit_kernels
