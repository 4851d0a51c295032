// CPU twin of residual_layernorm (the Triton kernel is mpvit_kernels/triton/residual_layernorm.py):
// per token, s = x + y + bias, r = s + next_bias, u = layer_norm(s), in one pass over x and y
// whose row stays in L1 between its three sweeps (sum, squared deviations, stores).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

#include "vectorize.h"

namespace mpvit_kernels {
namespace {

// Partial sums per row: a vector register's worth of floats, added in a fixed order, so the
// statistics do not depend on the thread count.
constexpr int64_t kLanes = 8;
constexpr int64_t kElemsPerTask = 1 << 14;

template <typename acc_t>
inline acc_t lanes_total(const acc_t* p) {
  return ((p[0] + p[1]) + (p[2] + p[3])) + ((p[4] + p[5]) + (p[6] + p[7]));
}

template <typename scalar_t, typename acc_t>
MPVIT_ALWAYS_INLINE void token(const scalar_t* __restrict__ x, const scalar_t* __restrict__ y,
                               const acc_t* __restrict__ bias, const acc_t* __restrict__ next_bias,
                               const acc_t* __restrict__ weight, const acc_t* __restrict__ ln_bias,
                               scalar_t* __restrict__ r, scalar_t* __restrict__ u, acc_t* __restrict__ s, int64_t C,
                               acc_t eps, acc_t* mean_out, acc_t* rstd_out) {
  const int64_t body = C - C % kLanes;
  acc_t part[kLanes] = {};
  for (int64_t c = 0; c < body; c += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) {
      const acc_t v = static_cast<acc_t>(x[c + l]) + static_cast<acc_t>(y[c + l]) + bias[c + l];
      s[c + l] = v;
      part[l] += v;
    }
  for (int64_t c = body; c < C; ++c) {
    s[c] = static_cast<acc_t>(x[c]) + static_cast<acc_t>(y[c]) + bias[c];
    part[c - body] += s[c];
  }
  const acc_t mean = lanes_total(part) / static_cast<acc_t>(C);
  std::fill(part, part + kLanes, acc_t(0));
  for (int64_t c = 0; c < body; c += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) {
      const acc_t d = s[c + l] - mean;
      part[l] += d * d;
    }
  for (int64_t c = body; c < C; ++c) part[c - body] += (s[c] - mean) * (s[c] - mean);
  const acc_t rstd = acc_t(1) / std::sqrt(lanes_total(part) / static_cast<acc_t>(C) + eps);
  for (int64_t c = 0; c < C; ++c) {
    u[c] = static_cast<scalar_t>((s[c] - mean) * rstd * weight[c] + ln_bias[c]);
    r[c] = static_cast<scalar_t>(s[c] + next_bias[c]);
  }
  *mean_out = mean;
  *rstd_out = rstd;
}

// Tokens [begin, end) of B x N (tokens n of item b at x + b * sxb + n * sxn, y likewise; r, u
// dense): one call per task, not per token (a clone's call goes through the loader's indirect
// jump, a fifth of the time of a 64-channel token).
template <typename scalar_t, typename acc_t>
MPVIT_VECTOR_CLONES void tokens(int64_t begin, int64_t end, int64_t N, const scalar_t* x, int64_t sxb, int64_t sxn,
                                const scalar_t* y, int64_t syb, int64_t syn, const acc_t* const* params, scalar_t* r,
                                scalar_t* u, acc_t* s, int64_t C, acc_t eps, acc_t* mean, acc_t* rstd) {
  for (int64_t m = begin; m < end; ++m) {
    const int64_t b = m / N, n = m % N;
    token<scalar_t, acc_t>(x + b * sxb + n * sxn, y + b * syb + n * syn, params[0], params[1], params[2], params[3],
                           r + m * C, u + m * C, s, C, eps, mean + m, rstd + m);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> residual_layernorm_cpu(
    const at::Tensor& x_in, const at::Tensor& y_in, const at::Tensor& bias, const at::Tensor& next_bias,
    const at::Tensor& weight, const at::Tensor& ln_bias, double eps) {
  TORCH_CHECK_VALUE((x_in.dim() == 3 || x_in.dim() == 2) && y_in.sizes() == x_in.sizes() &&
                        y_in.scalar_type() == x_in.scalar_type(),
                    "residual_layernorm: x and y must be tokens (B, N, C) or rows (M, C) of one shape and dtype");
  // Rows (M, C) are one batch of M tokens.
  const bool rows = x_in.dim() == 2;
  const int64_t B = rows ? 1 : x_in.size(0), N = x_in.size(-2), C = x_in.size(-1);
  for (const at::Tensor* p : {&bias, &next_bias, &weight, &ln_bias})
    TORCH_CHECK_VALUE(p->dim() == 1 && p->size(0) == C, "residual_layernorm: parameters must be (C,) with C = ", C);
  // The rows are read in place where the channels are unit-strided (tokens of a channels-last map).
  const at::Tensor x = x_in.stride(-1) == 1 || C == 1 ? x_in : x_in.contiguous();
  const at::Tensor y = y_in.stride(-1) == 1 || C == 1 ? y_in : y_in.contiguous();
  at::Tensor r = at::empty(x.sizes(), x.options());
  at::Tensor u = at::empty(x.sizes(), x.options());
  at::Tensor mean, rstd;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "residual_layernorm_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
    mean = at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(acc_type));
    rstd = at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(acc_type));
    if (B * N == 0 || C == 0) return;
    const at::Tensor params[4] = {bias.to(acc_type).contiguous(), next_bias.to(acc_type).contiguous(),
                                  weight.to(acc_type).contiguous(), ln_bias.to(acc_type).contiguous()};
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* yp = y.const_data_ptr<scalar_t>();
    const int64_t sxb = rows ? 0 : x.stride(0), sxn = x.stride(-2), syb = rows ? 0 : y.stride(0), syn = y.stride(-2);
    scalar_t* rp = r.mutable_data_ptr<scalar_t>();
    scalar_t* up = u.mutable_data_ptr<scalar_t>();
    acc_t* mp = mean.mutable_data_ptr<acc_t>();
    acc_t* sp = rstd.mutable_data_ptr<acc_t>();
    const acc_t* pp[4] = {params[0].const_data_ptr<acc_t>(), params[1].const_data_ptr<acc_t>(),
                          params[2].const_data_ptr<acc_t>(), params[3].const_data_ptr<acc_t>()};
    at::parallel_for(0, B * N, std::max<int64_t>(1, kElemsPerTask / C), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> s(C);
      tokens<scalar_t, acc_t>(begin, end, N, xp, sxb, sxn, yp, syb, syn, pp, rp, up, s.data(), C,
                              static_cast<acc_t>(eps), mp, sp);
    });
  });
  return {r, u, mean, rstd};
}

}  // namespace

TORCH_LIBRARY_IMPL(mpvit_kernels, CPU, m) { m.impl("residual_layernorm", &residual_layernorm_cpu); }

}  // namespace mpvit_kernels
