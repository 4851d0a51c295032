// CPU twin of the affine + Hardswish op: the oracle the CUDA kernel is tested against
// where no GPU is, and the fast path for CPU tensors.
#include <ATen/OpMathType.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "../affine_hswish.h"

namespace mpvit_kernels {
namespace {

// Fixed block of outer rows per partial sum, so the reduction order never depends on the
// number of threads: the backward is deterministic.
constexpr int64_t kElemsPerBlock = 1 << 14;

template <typename acc_t>
inline acc_t hswish_fwd(acc_t z) {
  return z * std::min(std::max(z + acc_t(3), acc_t(0)), acc_t(6)) / acc_t(6);
}

// Same branches as ATen's hardswish_backward, boundaries included (slope 0 at -3, 1 at 3).
template <typename acc_t>
inline acc_t hswish_slope(acc_t z) {
  if (z <= acc_t(-3)) return acc_t(0);
  if (z < acc_t(3)) return z / acc_t(3) + acc_t(0.5);
  return acc_t(1);
}

at::Tensor affine_hswish_cpu(const at::Tensor& x_in, const at::Tensor& scale, const at::Tensor& shift,
                             bool hswish) {
  check_affine_args(x_in, scale, shift);
  at::Tensor y = at::empty_like(x_in);
  if (y.numel() == 0) return y;
  const at::Tensor x = dense_as(x_in, y);
  const ChannelLayout L = channel_layout(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "affine_hswish_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor sc = scale.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    const at::Tensor sh = shift.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const acc_t* scp = sc.const_data_ptr<acc_t>();
    const acc_t* shp = sh.const_data_ptr<acc_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    const int64_t rows = L.outer * L.channels;  // one row = `inner` elements of one channel
    at::parallel_for(0, rows, std::max<int64_t>(1, kElemsPerBlock / L.inner), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t c = r % L.channels;
        const acc_t a = scp[c], b = shp[c];
        for (int64_t j = r * L.inner; j < (r + 1) * L.inner; ++j) {
          const acc_t z = static_cast<acc_t>(xp[j]) * a + b;
          yp[j] = static_cast<scalar_t>(hswish ? hswish_fwd(z) : z);
        }
      }
    });
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> affine_hswish_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& scale, const at::Tensor& shift,
    bool hswish) {
  check_affine_args(x_in, scale, shift);
  TORCH_CHECK_VALUE(grad_in.sizes() == x_in.sizes(), "affine_hswish_backward: grad must have x's shape ",
                    x_in.sizes(), ", got ", grad_in.sizes());
  at::Tensor grad_x = at::empty_like(x_in);
  const at::Tensor x = dense_as(x_in, grad_x);
  const at::Tensor grad = dense_as(grad_in.to(x_in.scalar_type()), grad_x);
  const ChannelLayout L = channel_layout(x);
  at::Tensor grad_scale, grad_shift;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "affine_hswish_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
    const at::Tensor sc = scale.to(acc_type).contiguous();
    const at::Tensor sh = shift.to(acc_type).contiguous();
    const int64_t rows_per_block = std::max<int64_t>(1, kElemsPerBlock / std::max<int64_t>(1, L.channels * L.inner));
    const int64_t blocks = (L.outer + rows_per_block - 1) / rows_per_block;
    // partial[block][0][c] sums grad*slope*x, partial[block][1][c] sums grad*slope.
    at::Tensor partial = at::empty({blocks, 2, L.channels}, x.options().dtype(acc_type));
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    const acc_t* scp = sc.const_data_ptr<acc_t>();
    const acc_t* shp = sh.const_data_ptr<acc_t>();
    scalar_t* gxp = grad_x.mutable_data_ptr<scalar_t>();
    acc_t* pp = partial.mutable_data_ptr<acc_t>();
    at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t blk = begin; blk < end; ++blk) {
        acc_t* gs = pp + blk * 2 * L.channels;
        acc_t* gb = gs + L.channels;
        std::fill(gs, gs + 2 * L.channels, acc_t(0));
        const int64_t o_end = std::min(L.outer, (blk + 1) * rows_per_block);
        for (int64_t o = blk * rows_per_block; o < o_end; ++o) {
          for (int64_t c = 0; c < L.channels; ++c) {
            const acc_t a = scp[c], b = shp[c];
            acc_t s_gx = 0, s_g = 0;
            const int64_t base = (o * L.channels + c) * L.inner;
            for (int64_t j = base; j < base + L.inner; ++j) {
              const acc_t xv = static_cast<acc_t>(xp[j]);
              const acc_t z = xv * a + b;
              const acc_t g = static_cast<acc_t>(gp[j]) * (hswish ? hswish_slope(z) : acc_t(1));
              gxp[j] = static_cast<scalar_t>(g * a);
              s_gx += g * xv;
              s_g += g;
            }
            gs[c] += s_gx;
            gb[c] += s_g;
          }
        }
      }
    });
    // Blocks are summed in index order: same bits for any thread count.
    at::Tensor sum_scale = at::zeros({L.channels}, partial.options());
    at::Tensor sum_shift = at::zeros({L.channels}, partial.options());
    for (int64_t blk = 0; blk < blocks; ++blk) {
      sum_scale.add_(partial[blk][0]);
      sum_shift.add_(partial[blk][1]);
    }
    grad_scale = sum_scale.to(scale.scalar_type());
    grad_shift = sum_shift.to(shift.scalar_type());
  });
  return {grad_x, grad_scale, grad_shift};
}

}  // namespace

TORCH_LIBRARY_IMPL(mpvit_kernels, CPU, m) {
  m.impl("affine_hswish", &affine_hswish_cpu);
  m.impl("affine_hswish_backward", &affine_hswish_backward_cpu);
}

}  // namespace mpvit_kernels
