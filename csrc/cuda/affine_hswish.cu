// CUDA kernels of the affine + Hardswish op (eval BatchNorm folded to scale/shift).
// Memory-bound: the forward reads x once and writes y once; the backward reads grad and x
// once, writes grad_x and per-block partial sums of the two parameter grads, then a second
// tiny kernel sums the partials in a fixed order (deterministic, no float atomics).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "../activation.h"
#include "../affine_hswish.h"

namespace mpvit_kernels {
namespace {

constexpr int kThreads = 256;
constexpr int kChannelTile = 32;     // channels per block when channels are innermost
constexpr int kMaxRowChunks = 1024;  // fixed, so the reduction order is the same on any GPU

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

at::Tensor affine_hswish_cuda(const at::Tensor& x_in, const at::Tensor& scale, const at::Tensor& shift,
                              bool hswish) {
  check_affine_args(x_in, scale, shift);
  const c10::cuda::CUDAGuard guard(x_in.device());
  at::Tensor y = at::empty_like(x_in);
  if (y.numel() == 0) return y;
  const at::Tensor x = dense_as(x_in, y);
  const ChannelLayout L = channel_layout(x);
  const bool small = x.numel() < (int64_t{1} << 30);  // int32 indices, with room for the stride steps
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "affine_hswish_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
    const at::Tensor sc = scale.to(acc_type).contiguous();
    const at::Tensor sh = shift.to(acc_type).contiguous();
    const int grid = grid_for(x.numel(), kThreads * 4);
    if (small) {
      affine_hswish_fwd_kernel<scalar_t, acc_t, int32_t><<<grid, kThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), sc.const_data_ptr<acc_t>(), sh.const_data_ptr<acc_t>(),
          y.mutable_data_ptr<scalar_t>(), x.numel(), L.channels, L.inner, hswish);
    } else {
      affine_hswish_fwd_kernel<scalar_t, acc_t, int64_t><<<grid, kThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), sc.const_data_ptr<acc_t>(), sh.const_data_ptr<acc_t>(),
          y.mutable_data_ptr<scalar_t>(), x.numel(), L.channels, L.inner, hswish);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> affine_hswish_backward_cuda(
    const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& scale, const at::Tensor& shift,
    bool hswish) {
  check_affine_args(x_in, scale, shift);
  TORCH_CHECK_VALUE(grad_in.sizes() == x_in.sizes(), "affine_hswish_backward: grad must have x's shape ",
                    x_in.sizes(), ", got ", grad_in.sizes());
  const c10::cuda::CUDAGuard guard(x_in.device());
  at::Tensor grad_x = at::empty_like(x_in);
  at::Tensor grad_scale = at::empty_like(scale, at::MemoryFormat::Contiguous);
  at::Tensor grad_shift = at::empty_like(shift, at::MemoryFormat::Contiguous);
  const at::Tensor x = dense_as(x_in, grad_x);
  const at::Tensor grad = dense_as(grad_in.to(x_in.scalar_type()), grad_x);
  const ChannelLayout L = channel_layout(x);
  const bool small = x.numel() < (int64_t{1} << 30);  // int32 indices, with room for the stride steps
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int ct = L.inner == 1 ? kChannelTile : 1;
  const dim3 grid(static_cast<unsigned>((L.channels + ct - 1) / ct),
                  static_cast<unsigned>(std::clamp<int64_t>(
                      (L.outer * L.inner + kThreads / ct - 1) / (kThreads / ct), 1,
                      std::max<int64_t>(1, kMaxRowChunks / std::max<int64_t>(1, (L.channels + ct - 1) / ct)))));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "affine_hswish_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
    const at::Tensor sc = scale.to(acc_type).contiguous();
    const at::Tensor sh = shift.to(acc_type).contiguous();
    at::Tensor partial = at::empty({static_cast<int64_t>(grid.y), 2, L.channels}, x.options().dtype(acc_type));
    if (L.channels > 0) {
      if (small) {
        affine_hswish_bwd_kernel<scalar_t, acc_t, int32_t><<<grid, kThreads, 0, stream>>>(
            grad.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), sc.const_data_ptr<acc_t>(),
            sh.const_data_ptr<acc_t>(), grad_x.mutable_data_ptr<scalar_t>(), partial.mutable_data_ptr<acc_t>(),
            L.outer, L.channels, L.inner, ct, hswish);
      } else {
        affine_hswish_bwd_kernel<scalar_t, acc_t, int64_t><<<grid, kThreads, 0, stream>>>(
            grad.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), sc.const_data_ptr<acc_t>(),
            sh.const_data_ptr<acc_t>(), grad_x.mutable_data_ptr<scalar_t>(), partial.mutable_data_ptr<acc_t>(),
            L.outer, L.channels, L.inner, ct, hswish);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scale.scalar_type(), "affine_hswish_bwd_finish", [&] {
        using param_t = scalar_t;
        affine_hswish_bwd_finish_kernel<acc_t, param_t><<<grid_for(2 * L.channels, kThreads), kThreads, 0, stream>>>(
            partial.const_data_ptr<acc_t>(), static_cast<int>(grid.y), L.channels,
            grad_scale.mutable_data_ptr<param_t>(), grad_shift.mutable_data_ptr<param_t>());
      });
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {grad_x, grad_scale, grad_shift};
}

}  // namespace

TORCH_LIBRARY_IMPL(mpvit_kernels, CUDA, m) {
  m.impl("affine_hswish", &affine_hswish_cuda);
  m.impl("affine_hswish_backward", &affine_hswish_backward_cuda);
}

}  // namespace mpvit_kernels
