// CUDA kernels of the affine + Hardswish op (eval BatchNorm folded to scale/shift), behind the
// entry points of affine_hswish_launch.h; no ATen headers (see depthwise.cu).
// Memory-bound: the forward reads x once and writes y once; the backward reads grad and x
// once, writes grad_x and per-block partial sums of the two parameter grads, then a second
// tiny kernel sums the partials in a fixed order (deterministic, no float atomics).
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "../activation.h"
#include "affine_hswish_launch.h"

namespace mpvit_kernels {
namespace affine_hswish {
namespace {

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

// One thread per (which, channel): sums the chunk partials in chunk order.
template <typename acc_t, typename param_t>
__global__ void affine_hswish_bwd_finish_kernel(const acc_t* __restrict__ partial, int chunks, int64_t C,
                                                param_t* __restrict__ grad_scale, param_t* __restrict__ grad_shift) {
  const int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (t >= 2 * C) return;
  const int64_t which = t / C, c = t % C;
  acc_t s = 0;
  for (int k = 0; k < chunks; ++k) s += partial[(k * 2 + which) * C + c];
  (which == 0 ? grad_scale : grad_shift)[c] = static_cast<param_t>(s);
}

int grid_for(int64_t work, int64_t per_block) {
  return static_cast<int>(std::min<int64_t>((work + per_block - 1) / per_block, 1 << 16));
}

// int32 indices below 2^30 elements, with room for the grid-stride steps.
bool small(int64_t numel) { return numel < (int64_t{1} << 30); }

}  // namespace

template <typename T, typename acc_t>
cudaError_t launch_forward(cudaStream_t stream, const T* x, const acc_t* scale, const acc_t* shift, T* y,
                           int64_t numel, int64_t C, int64_t inner, bool hswish) {
  const int grid = grid_for(numel, kThreads * 4);
  if (small(numel)) {
    affine_hswish_fwd_kernel<T, acc_t, int32_t><<<grid, kThreads, 0, stream>>>(x, scale, shift, y, numel, C, inner,
                                                                             hswish);
  } else {
    affine_hswish_fwd_kernel<T, acc_t, int64_t><<<grid, kThreads, 0, stream>>>(x, scale, shift, y, numel, C, inner,
                                                                             hswish);
  }
  return cudaGetLastError();
}

template <typename T, typename acc_t, typename param_t>
cudaError_t launch_backward(cudaStream_t stream, const T* grad, const T* x, const acc_t* scale, const acc_t* shift,
                            T* grad_x, acc_t* partial, param_t* grad_scale, param_t* grad_shift, int64_t outer,
                            int64_t C, int64_t inner, bool hswish) {
  const int ct = backward_channel_tile(inner);
  const int64_t chunks = backward_chunks(outer, C, inner);
  const dim3 grid(static_cast<unsigned>((C + ct - 1) / ct), static_cast<unsigned>(chunks));
  if (small(outer * C * inner)) {
    affine_hswish_bwd_kernel<T, acc_t, int32_t><<<grid, kThreads, 0, stream>>>(grad, x, scale, shift, grad_x, partial,
                                                                             outer, C, inner, ct, hswish);
  } else {
    affine_hswish_bwd_kernel<T, acc_t, int64_t><<<grid, kThreads, 0, stream>>>(grad, x, scale, shift, grad_x, partial,
                                                                             outer, C, inner, ct, hswish);
  }
  if (const cudaError_t error = cudaGetLastError(); error != cudaSuccess) return error;
  affine_hswish_bwd_finish_kernel<acc_t, param_t><<<grid_for(2 * C, kThreads), kThreads, 0, stream>>>(
      partial, static_cast<int>(chunks), C, grad_scale, grad_shift);
  return cudaGetLastError();
}

// The dtypes of AT_DISPATCH_FLOATING_TYPES_AND2(Half, BFloat16) with their accumulation type; the
// parameters' dtype is dispatched on its own. A missing one is an undefined symbol at load.
#define MPVIT_AFFINE_HSWISH_INSTANTIATE_BACKWARD(T, ACC, PARAM)                                                      \
  template cudaError_t launch_backward<T, ACC, PARAM>(cudaStream_t, const T*, const T*, const ACC*, const ACC*, T*, \
                                                      ACC*, PARAM*, PARAM*, int64_t, int64_t, int64_t, bool);
#define MPVIT_AFFINE_HSWISH_INSTANTIATE(T, ACC)                                                                      \
  template cudaError_t launch_forward<T, ACC>(cudaStream_t, const T*, const ACC*, const ACC*, T*, int64_t, int64_t, \
                                              int64_t, bool);                                                       \
  MPVIT_AFFINE_HSWISH_INSTANTIATE_BACKWARD(T, ACC, float)                                                           \
  MPVIT_AFFINE_HSWISH_INSTANTIATE_BACKWARD(T, ACC, double)                                                          \
  MPVIT_AFFINE_HSWISH_INSTANTIATE_BACKWARD(T, ACC, c10::Half)                                                       \
  MPVIT_AFFINE_HSWISH_INSTANTIATE_BACKWARD(T, ACC, c10::BFloat16)

MPVIT_AFFINE_HSWISH_INSTANTIATE(float, float)
MPVIT_AFFINE_HSWISH_INSTANTIATE(double, double)
MPVIT_AFFINE_HSWISH_INSTANTIATE(c10::Half, float)
MPVIT_AFFINE_HSWISH_INSTANTIATE(c10::BFloat16, float)

}  // namespace affine_hswish
}  // namespace mpvit_kernels
