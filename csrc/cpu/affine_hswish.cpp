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

#include "../activation.h"
#include "../affine_hswish.h"
#include "vectorize.h"

namespace mpvit_kernels {
namespace {

// Fixed block of outer rows per partial sum, so the reduction order never depends on the
// number of threads: the backward is deterministic.
constexpr int64_t kElemsPerBlock = 1 << 14;

// y[j] = act(x[j] * a[j * A_STEP] + b[j * A_STEP]) over n elements; A_STEP is 1 for a run of
// channels (channels-last) and 0 for a run of one channel. Branch-free so it vectorizes.
template <bool HSWISH, int A_STEP, typename scalar_t, typename acc_t>
MPVIT_VECTOR_CLONES void affine_run(const scalar_t* __restrict__ x, scalar_t* __restrict__ y, const acc_t* __restrict__ a,
                       const acc_t* __restrict__ b, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    const acc_t z = static_cast<acc_t>(x[j]) * a[j * A_STEP] + b[j * A_STEP];
    y[j] = static_cast<scalar_t>(HSWISH ? hswish_fwd(z) : z);
  }
}

template <bool HSWISH, typename scalar_t, typename acc_t>
void affine_forward(const scalar_t* x, scalar_t* y, const acc_t* a, const acc_t* b, const ChannelLayout& L) {
  if (L.inner == 1) {
    // Channels-last: each outer row is one run over all channels.
    at::parallel_for(0, L.outer, std::max<int64_t>(1, kElemsPerBlock / L.channels), [&](int64_t begin, int64_t end) {
      for (int64_t o = begin; o < end; ++o)
        affine_run<HSWISH, 1>(x + o * L.channels, y + o * L.channels, a, b, L.channels);
    });
  } else {
    // Otherwise runs of `inner` elements of one channel.
    at::parallel_for(0, L.outer * L.channels, std::max<int64_t>(1, kElemsPerBlock / L.inner),
                     [&](int64_t begin, int64_t end) {
                       for (int64_t r = begin; r < end; ++r) {
                         const int64_t c = r % L.channels;
                         affine_run<HSWISH, 0>(x + r * L.inner, y + r * L.inner, a + c, b + c, L.inner);
                       }
                     });
  }
}

// Backward of affine_run over n elements: writes grad_x and adds into the per-channel sums
// (A_STEP as in affine_run).
template <bool HSWISH, int A_STEP, typename scalar_t, typename acc_t>
MPVIT_VECTOR_CLONES void affine_backward_run(const scalar_t* __restrict__ g, const scalar_t* __restrict__ x,
                                scalar_t* __restrict__ gx, const acc_t* __restrict__ a, const acc_t* __restrict__ b,
                                acc_t* __restrict__ sum_gx, acc_t* __restrict__ sum_g, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    const int64_t k = j * A_STEP;
    const acc_t xv = static_cast<acc_t>(x[j]);
    const acc_t z = xv * a[k] + b[k];
    const acc_t gz = static_cast<acc_t>(g[j]) * (HSWISH ? hswish_slope(z) : acc_t(1));
    gx[j] = static_cast<scalar_t>(gz * a[k]);
    sum_gx[k] += gz * xv;
    sum_g[k] += gz;
  }
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
    auto run = hswish ? affine_forward<true, scalar_t, acc_t> : affine_forward<false, scalar_t, acc_t>;
    run(x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), sc.const_data_ptr<acc_t>(),
        sh.const_data_ptr<acc_t>(), L);
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> affine_hswish_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& scale, const at::Tensor& shift,
    bool hswish) {
  check_affine_args(x_in, scale, shift);
  check_affine_grad(grad_in, x_in);
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
    auto run_channels = hswish ? affine_backward_run<true, 1, scalar_t, acc_t> : affine_backward_run<false, 1, scalar_t, acc_t>;
    auto run_inner = hswish ? affine_backward_run<true, 0, scalar_t, acc_t> : affine_backward_run<false, 0, scalar_t, acc_t>;
    at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t blk = begin; blk < end; ++blk) {
        acc_t* sum_gx = pp + blk * 2 * L.channels;
        acc_t* sum_g = sum_gx + L.channels;
        std::fill(sum_gx, sum_gx + 2 * L.channels, acc_t(0));
        const int64_t o_end = std::min(L.outer, (blk + 1) * rows_per_block);
        for (int64_t o = blk * rows_per_block; o < o_end; ++o) {
          if (L.inner == 1) {
            const int64_t base = o * L.channels;
            run_channels(gp + base, xp + base, gxp + base, scp, shp, sum_gx, sum_g, L.channels);
          } else {
            for (int64_t c = 0; c < L.channels; ++c) {
              const int64_t base = (o * L.channels + c) * L.inner;
              run_inner(gp + base, xp + base, gxp + base, scp + c, shp + c, sum_gx + c, sum_g + c, L.inner);
            }
          }
        }
      }
    });
    // Blocks are summed in index order: same bits for any thread count.
    at::Tensor sum_scale = at::zeros({L.channels}, partial.options());
    at::Tensor sum_shift = at::zeros({L.channels}, partial.options());
    acc_t* ss = sum_scale.mutable_data_ptr<acc_t>();
    acc_t* sb = sum_shift.mutable_data_ptr<acc_t>();
    for (int64_t blk = 0; blk < blocks; ++blk) {
      for (int64_t c = 0; c < L.channels; ++c) {
        ss[c] += pp[blk * 2 * L.channels + c];
        sb[c] += pp[(blk * 2 + 1) * L.channels + c];
      }
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
