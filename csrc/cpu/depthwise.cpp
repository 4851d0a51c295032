// CPU twin of the depthwise op family (NHWC): what `auto` runs on CPU tensors, and the oracle
// the CUDA kernels are checked against. Work is split over rows of pixels; within a row, over
// blocks of 8 channels (one AVX2 vector of fp32) whose K*K weights stay in registers while the
// row's pixels stream by, four interior pixels at a time: each column of the input loaded once
// for the taps of the four that read it, four independent sums in flight.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../depthwise.h"
#include "vectorize.h"

// Products and sums contract to FMAs in the AVX2 + FMA copy; the epilogues' compares vectorize
// only where float compares may be assumed not to trap (no FP exception is ever enabled).
#pragma GCC optimize("no-trapping-math", "fp-contract=fast")
// After the pragma, so that Hardswish is compiled with the same options as the epilogues: GCC
// does not inline a function whose optimize options differ (Hardswish was a call per element,
// 3.5x the time of the BatchNorm-only epilogue).
#include "../activation.h"

namespace mpvit_kernels {
namespace {

// Output rows per partial sum of the backward's parameter grads: fixed, so that the reduction
// order never depends on the number of threads (the backward is deterministic).
constexpr int64_t kRowsPerBlock = 4;
constexpr int kBlock = 8;  // channels per register block (an AVX2 vector of fp32)

// The geometry every pass shares. Taps are (kh, kw) with kh, kw in [0, K); padding P = K / 2.
struct Dims {
  int64_t B, C, H, W, Ho, Wo, K, P, S;
};

Dims dims_of(const at::Tensor& x, const at::Tensor& weight, int64_t stride) {
  const int64_t H = x.size(2), W = x.size(3), K = weight.size(2);
  return {x.size(0), x.size(1), H, W, depthwise_out_size(H, stride), depthwise_out_size(W, stride), K, K / 2, stride};
}

// Interior pixels o .. o + kPixelBlock of one row, channels [c0, c0 + V), for conv_row_block:
// every tap inside the row. Each pixel adds its taps in conv_row_block's order (kh, then kw
// ascending): the same sums as one pixel at a time. Forward: window column q is o * S - P + q,
// read by pixel o + b at tap kw = q - b * S. Transposed: column q is (o + P - (K - 1)) / S + q
// (exact: o + P even at stride 2), read at kw = b + K - 1 - S * q where that is a tap, so q runs
// down for kw to run up.
constexpr int kPixelBlock = 4;

template <int K, int V, int S, bool TRANSPOSED, typename T, typename acc_t,
          typename vec = typename Lanes<acc_t, V>::type>
MPVIT_ALWAYS_INLINE void conv_pixel_block(const T* const* rows, int64_t C, int64_t c0, int64_t o, const vec* w,
                                          const vec& start, vec* acc) {
  constexpr int P = K / 2, N = TRANSPOSED ? (kPixelBlock + K - 2) / S + 1 : (kPixelBlock - 1) * S + K;
  for (int b = 0; b < kPixelBlock; ++b) acc[b] = start;
#pragma GCC unroll 7
  for (int kh = 0; kh < K; ++kh) {
    if (rows[kh] == nullptr) continue;
    const T* s = rows[kh] + (TRANSPOSED ? (o + P - (K - 1)) / S : o * S - P) * C + c0;
#pragma GCC unroll 16
    for (int i = 0; i < N; ++i) {
      const int q = TRANSPOSED ? N - 1 - i : i;
      const vec v = load<V, acc_t>(s + q * C);
#pragma GCC unroll 4
      for (int b = 0; b < kPixelBlock; ++b) {
        const int kw = TRANSPOSED ? b + K - 1 - S * q : q - b * S;
        if (kw >= 0 && kw < K) acc[b] += v * w[kh * K + kw];
      }
    }
  }
}

// For each of n_out output pixels o of one row, channels [c0, c0 + V):
//   out[o * C + c] = init + sum over taps (kh, kw) of rows[kh][col(o, kw) * C + c] * wt[(kh * K + kw) * C + c]
// rows[kh] is the source row tap row kh reads (null when outside the image). Forward:
// col = o * S - P + kw. TRANSPOSED (the grad of x from the grad of the conv output): the source
// column is (o + P - kw) / S where that divides exactly.
template <int K, int V, bool TRANSPOSED, typename T, typename acc_t>
MPVIT_ALWAYS_INLINE void conv_row_block(const T* const* rows, int64_t src_w, int64_t C, int64_t c0, int64_t n_out,
                                        int64_t S, const acc_t* __restrict__ wt, const acc_t* __restrict__ init,
                                        acc_t* __restrict__ out) {
  using vec = typename Lanes<acc_t, V>::type;
  constexpr int P = K / 2;
  vec w[K * K];
  for (int t = 0; t < K * K; ++t) w[t] = load<V, acc_t>(wt + t * C + c0);
  const vec start = init ? load<V, acc_t>(init + c0) : splat<V>(acc_t(0));
  // Interior pixels read every tap of a row inside the image: no checks there. Forward, col =
  // o * S - P + kw, and transposed at stride 1, col = o + P - kw: pixels [lo, hi). Transposed at
  // stride 2, blocks start where o + P is even, in [lo2, hi2), where their columns
  // (o + P - (K - 1)) / 2 .. + (kPixelBlock + K - 2) / 2 lie inside the row; its single pixels
  // take the checked path, which skips the taps whose column does not divide.
  const bool dense = !TRANSPOSED || S == 1;
  const int64_t lo = dense ? (TRANSPOSED ? K - 1 - P : (P + S - 1) / S) : n_out;
  const int64_t hi = dense ? (TRANSPOSED ? src_w - P : (src_w - K + P) / S + 1) : n_out;
  const int64_t lo2 = K - 1 - P, hi2 = 2 * src_w - (kPixelBlock + K - 2) / 2 * 2 - P + K - 1;
  for (int64_t o = 0; o < n_out; ++o) {
    const bool block2 = TRANSPOSED && S == 2 && ((o + P) & 1) == 0 && o >= lo2 && o < hi2 && o + kPixelBlock <= n_out;
    if (block2 || (o >= lo && o + kPixelBlock <= hi)) {
      vec acc[kPixelBlock];
      if (S == 1) {
        conv_pixel_block<K, V, 1, TRANSPOSED, T, acc_t>(rows, C, c0, o, w, start, acc);
      } else {
        conv_pixel_block<K, V, 2, TRANSPOSED, T, acc_t>(rows, C, c0, o, w, start, acc);
      }
      for (int b = 0; b < kPixelBlock; ++b) store<V, acc_t>(out + (o + b) * C + c0, acc[b]);
      o += kPixelBlock - 1;
      continue;
    }
    vec acc = start;
    if (o >= lo && o < hi) {
      const int64_t first = TRANSPOSED ? o + P : o * S - P;  // column of tap kw = 0
#pragma GCC unroll 7
      for (int kh = 0; kh < K; ++kh) {
        if (rows[kh] == nullptr) continue;
        const T* s = rows[kh] + first * C + c0;
#pragma GCC unroll 7
        for (int kw = 0; kw < K; ++kw) acc += load<V, acc_t>(TRANSPOSED ? s - kw * C : s + kw * C) * w[kh * K + kw];
      }
    } else {
      for (int kh = 0; kh < K; ++kh) {
        const T* row = rows[kh];
        if (row == nullptr) continue;
        for (int kw = 0; kw < K; ++kw) {
          int64_t col;
          if constexpr (TRANSPOSED) {
            const int64_t n = o + P - kw;  // = col * S; S is 1 or 2, so no division
            if (n < 0 || (n & (S - 1)) != 0 || (col = S == 1 ? n : n >> 1) >= src_w) continue;
          } else {
            col = o * S - P + kw;
            if (col < 0 || col >= src_w) continue;
          }
          acc += load<V, acc_t>(row + col * C + c0) * w[kh * K + kw];
        }
      }
    }
    store<V, acc_t>(out + o * C + c0, acc);
  }
}

// The epilogue over a row of n pixels x C channels of conv output z: y = act(z * scale + shift) + self.
template <bool SCALE, bool HSWISH, bool RESIDUAL, typename T, typename acc_t>
MPVIT_VECTOR_CLONES void epilogue_row(const acc_t* __restrict__ z, const acc_t* __restrict__ scale,
                                      const acc_t* __restrict__ shift, const T* __restrict__ self,
                                      T* __restrict__ y, int64_t n, int64_t C) {
  for (int64_t o = 0; o < n; ++o) {
    for (int64_t c = 0; c < C; ++c) {
      const int64_t i = o * C + c;
      acc_t v = SCALE ? z[i] * scale[c] + shift[c] : z[i];
      if (HSWISH) v = hswish_fwd(v);
      if (RESIDUAL) v += static_cast<acc_t>(self[i]);
      y[i] = static_cast<T>(v);
    }
  }
}

// The backward of epilogue_row over a row of conv output: gc = the grad of the conv output;
// sum_scale[c] += gz * z, sum_shift[c] += gz, gz being the grad after Hardswish.
template <bool SCALE, bool HSWISH, typename T, typename acc_t>
MPVIT_VECTOR_CLONES void epilogue_grad_row(const acc_t* __restrict__ z, const T* __restrict__ g,
                                           const acc_t* __restrict__ scale, const acc_t* __restrict__ shift,
                                           acc_t* __restrict__ gc, acc_t* __restrict__ sum_scale,
                                           acc_t* __restrict__ sum_shift, int64_t n, int64_t C) {
  for (int64_t o = 0; o < n; ++o) {
    for (int64_t c = 0; c < C; ++c) {
      const int64_t i = o * C + c;
      const acc_t v = SCALE ? z[i] * scale[c] + shift[c] : z[i];
      const acc_t gz = HSWISH ? static_cast<acc_t>(g[i]) * hswish_slope(v) : static_cast<acc_t>(g[i]);
      sum_scale[c] += gz * z[i];
      sum_shift[c] += gz;
      gc[i] = SCALE ? gz * scale[c] : gz;
    }
  }
}

// f(std::integral_constant<bool, a>, ...) for the runtime flags a, b, c.
template <typename F>
void with_flags(bool a, bool b, bool c, F&& f) {
  using T = std::true_type;
  using N = std::false_type;
  if (a) {
    if (b) return c ? f(T{}, T{}, T{}) : f(T{}, T{}, N{});
    return c ? f(T{}, N{}, T{}) : f(T{}, N{}, N{});
  }
  if (b) return c ? f(N{}, T{}, T{}) : f(N{}, T{}, N{});
  return c ? f(N{}, N{}, T{}) : f(N{}, N{}, N{});
}

// The parameter-grad sums of one output row, channels [c0, c0 + V): per tap, the sum over the
// row's pixels of gc * the input the tap reads, into part[tap * C + c]; the sum of gc into
// part[K * K * C + c]. gc: the row's grad of the conv output; x_rows as `rows` above.
template <int K, int V, typename G, typename T, typename acc_t>
MPVIT_ALWAYS_INLINE void param_row_block(const G* __restrict__ gc, const T* const* x_rows, int64_t W, int64_t C,
                                         int64_t c0, int64_t Wo, int64_t S, acc_t* __restrict__ part) {
  using vec = typename Lanes<acc_t, V>::type;
  constexpr int P = K / 2;
  vec s[K * K], sb = splat<V>(acc_t(0));
  for (int t = 0; t < K * K; ++t) s[t] = sb;
  const int64_t lo = (P + S - 1) / S, hi = (W - K + P) / S + 1;  // pixels whose taps all lie inside
  for (int64_t o = 0; o < Wo; ++o) {
    const vec g = load<V, acc_t>(gc + o * C + c0);
    sb += g;
    if (o >= lo && o < hi) {  // fully unrolled: the K*K sums stay in registers where they fit
#pragma GCC unroll 7
      for (int kh = 0; kh < K; ++kh) {
        if (x_rows[kh] == nullptr) continue;
        const T* x = x_rows[kh] + (o * S - P) * C + c0;
#pragma GCC unroll 7
        for (int kw = 0; kw < K; ++kw) s[kh * K + kw] += g * load<V, acc_t>(x + kw * C);
      }
      continue;
    }
    for (int kh = 0; kh < K; ++kh) {
      if (x_rows[kh] == nullptr) continue;
      for (int kw = 0; kw < K; ++kw) {
        const int64_t col = o * S - P + kw;
        if (col < 0 || col >= W) continue;
        s[kh * K + kw] += g * load<V, acc_t>(x_rows[kh] + col * C + c0);
      }
    }
  }
  for (int t = 0; t < K * K; ++t) store<V, acc_t>(part + t * C + c0, load<V, acc_t>(part + t * C + c0) + s[t]);
  store<V, acc_t>(part + K * K * C + c0, load<V, acc_t>(part + K * K * C + c0) + sb);
}

// f(k) with k a std::integral_constant of the window size.
template <typename F>
void with_k(int64_t K, F&& f) {
  if (K == 3) return f(std::integral_constant<int, 3>{});
  if (K == 5) return f(std::integral_constant<int, 5>{});
  return f(std::integral_constant<int, 7>{});
}

// f(c0, v) over the channels in blocks of kBlock, then one by one (v: an integral_constant).
// Inlined, with an always-inline f, into the with_best_isa copy that calls it. fp64 (checks
// only, see with_best_isa) goes one channel at a time: its 8-wide blocks were a fifth of this
// file's compile time.
template <typename acc_t, typename F>
MPVIT_ALWAYS_INLINE void channel_blocks(int64_t C, F&& f) {
  int64_t c0 = 0;
  if constexpr (!std::is_same_v<acc_t, double>)
    for (; c0 + kBlock <= C; c0 += kBlock) f(c0, std::integral_constant<int, kBlock>{});
  for (; c0 < C; ++c0) f(c0, std::integral_constant<int, 1>{});
}

// conv_row_block over a row's channel blocks, in the copy for the best ISA this CPU has.
template <int K, bool TRANSPOSED, typename T, typename acc_t>
void conv_row(const T* const* rows, int64_t src_w, int64_t C, int64_t n_out, int64_t S, const acc_t* wt,
              const acc_t* init, acc_t* out) {
  with_best_isa<acc_t>([&]() __attribute__((always_inline)) {
    channel_blocks<acc_t>(C, [&](int64_t c0, auto v) __attribute__((always_inline)) {
      conv_row_block<K, decltype(v)::value, TRANSPOSED>(rows, src_w, C, c0, n_out, S, wt, init, out);
    });
  });
}

// param_row_block over a row's channel blocks, likewise.
template <int K, typename G, typename T, typename acc_t>
void param_row(const G* gc, const T* const* x_rows, int64_t W, int64_t C, int64_t Wo, int64_t S, acc_t* part) {
  with_best_isa<acc_t>([&]() __attribute__((always_inline)) {
    channel_blocks<acc_t>(C, [&](int64_t c0, auto v) __attribute__((always_inline)) {
      param_row_block<K, decltype(v)::value>(gc, x_rows, W, C, c0, Wo, S, part);
    });
  });
}

// The rows of `src` (N, src_h, src_w, C) tap row kh reads for output row `o_row` of image b:
// forward, row o_row * S - P + kh; transposed, row (o_row + P - kh) / S where exact.
template <typename T>
void tap_rows(const T* src, int64_t b, int64_t src_h, int64_t src_w, int64_t C, const Dims& d, int64_t o_row,
              bool transposed, const T** rows) {
  for (int64_t kh = 0; kh < d.K; ++kh) {
    int64_t r;
    if (transposed) {
      const int64_t n = o_row + d.P - kh;
      r = n >= 0 && n % d.S == 0 ? n / d.S : -1;
    } else {
      r = o_row * d.S - d.P + kh;
    }
    rows[kh] = r >= 0 && r < src_h ? src + (b * src_h + r) * src_w * C : nullptr;
  }
}

// fp16 and bf16 maps run the fp32 kernels on an fp32 copy: the same sums (a 16-bit load widens
// exactly, fp32 accumulates either way, and the one rounding is the final store), while their
// own instantiations were three quarters of this file's compile time (69.6 -> 16.8 s of g++).
bool is_16bit(const at::Tensor& t) { return t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16; }

at::Tensor as_fp32_nhwc(const at::Tensor& t) {
  return t.to(at::kFloat, false, false, at::MemoryFormat::ChannelsLast);
}

at::Tensor depthwise_cpu(const at::Tensor& x_in, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                         int64_t stride, const std::optional<at::Tensor>& scale,
                         const std::optional<at::Tensor>& shift, bool hswish, bool residual) {
  check_depthwise_args(x_in, weight, bias, stride, scale, shift, residual);
  if (is_16bit(x_in)) {
    return depthwise_cpu(as_fp32_nhwc(x_in), weight, bias, stride, scale, shift, hswish, residual)
        .to(x_in.scalar_type());
  }
  const Dims d = dims_of(x_in, weight, stride);
  at::Tensor y = empty_nhwc(x_in, d.B, d.C, d.Ho, d.Wo);
  if (y.numel() == 0) return y;
  const at::Tensor x = x_in.contiguous(at::MemoryFormat::ChannelsLast);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "depthwise_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const DepthwiseParams p = depthwise_params(weight, bias, scale, shift, c10::CppTypeToScalarType<acc_t>::value);
    const at::Tensor wt = p.weight.t().contiguous();  // (K*K, C): each tap's weights unit-stride
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    const acc_t *wp = wt.const_data_ptr<acc_t>(), *bp = ptr_or_null<acc_t>(p.bias);
    const acc_t *sp = ptr_or_null<acc_t>(p.scale), *tp = ptr_or_null<acc_t>(p.shift);
    with_k(d.K, [&](auto k) {
      constexpr int K = decltype(k)::value;
      at::parallel_for(0, d.B * d.Ho, 1, [&](int64_t begin, int64_t end) {
        const scalar_t* rows[K];
        std::vector<acc_t> z(d.Wo * d.C);
        for (int64_t r = begin; r < end; ++r) {
          const int64_t b = r / d.Ho, oh = r % d.Ho;
          tap_rows(xp, b, d.H, d.W, d.C, d, oh, false, rows);
          if constexpr (std::is_same_v<scalar_t, acc_t>) {
            if (!sp && !hswish && !residual) {  // no epilogue: straight into y
              conv_row<K, false>(rows, d.W, d.C, d.Wo, d.S, wp, bp, yp + r * d.Wo * d.C);
              continue;
            }
          }
          conv_row<K, false>(rows, d.W, d.C, d.Wo, d.S, wp, bp, z.data());
          // residual: stride 1, so the same row of x
          with_flags(sp != nullptr, hswish, residual, [&](auto scale_on, auto hswish_on, auto residual_on) {
            epilogue_row<decltype(scale_on)::value, decltype(hswish_on)::value, decltype(residual_on)::value>(
                z.data(), sp, tp, xp + r * d.W * d.C, yp + r * d.Wo * d.C, d.Wo, d.C);
          });
        }
      });
    });
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> depthwise_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    int64_t stride, const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift, bool hswish,
    bool residual) {
  check_depthwise_args(x_in, weight, bias, stride, scale, shift, residual);
  check_depthwise_grad(grad_in, x_in, stride);
  if (is_16bit(x_in)) {  // the grad in x's dtype first, as the kernels below read it
    auto [gx, gw, gb, gs, gt] = depthwise_backward_cpu(as_fp32_nhwc(grad_in.to(x_in.scalar_type())),
                                                       as_fp32_nhwc(x_in), weight, bias, stride, scale, shift,
                                                       hswish, residual);
    return {gx.to(x_in.scalar_type()), gw, gb, gs, gt};
  }
  const Dims d = dims_of(x_in, weight, stride);
  at::Tensor grad_x = empty_nhwc(x_in, d.B, d.C, d.H, d.W);
  const auto acc_type = at::toOpMathType(x_in.scalar_type());
  const int64_t KK = d.K * d.K;
  at::Tensor sums = at::zeros({(KK + 3) * d.C}, x_in.options().dtype(acc_type));
  if (grad_x.numel() != 0) {
    const at::Tensor x = x_in.contiguous(at::MemoryFormat::ChannelsLast);
    const at::Tensor grad = grad_in.to(x.scalar_type()).contiguous(at::MemoryFormat::ChannelsLast);
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "depthwise_backward_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const DepthwiseParams p = depthwise_params(weight, bias, scale, shift, acc_type);
      const at::Tensor wt = p.weight.t().contiguous();
      const scalar_t *xp = x.const_data_ptr<scalar_t>(), *gp = grad.const_data_ptr<scalar_t>();
      const acc_t *wp = wt.const_data_ptr<acc_t>(), *bp = ptr_or_null<acc_t>(p.bias);
      const acc_t *sp = ptr_or_null<acc_t>(p.scale), *tp = ptr_or_null<acc_t>(p.shift);
      const bool epilogue = hswish || sp != nullptr;
      // With an epilogue, pass 1 computes the grad of the conv output (and keeps it for pass 2).
      at::Tensor gconv = at::empty({epilogue ? d.B * d.Ho * d.Wo * d.C : 0}, x.options().dtype(acc_type));
      acc_t* gcp = gconv.mutable_data_ptr<acc_t>();
      const int64_t rows_out = d.B * d.Ho, blocks = (rows_out + kRowsPerBlock - 1) / kRowsPerBlock;
      at::Tensor partial = at::zeros({blocks, KK + 3, d.C}, x.options().dtype(acc_type));
      acc_t* pp = partial.mutable_data_ptr<acc_t>();
      scalar_t* gxp = grad_x.mutable_data_ptr<scalar_t>();
      with_k(d.K, [&](auto k) {
        constexpr int K = decltype(k)::value;
        // Pass 1, over fixed blocks of output rows: the parameter-grad sums.
        at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
          const scalar_t* rows[K];
          std::vector<acc_t> conv(epilogue ? d.Wo * d.C : 0);
          for (int64_t blk = begin; blk < end; ++blk) {
            acc_t* part = pp + blk * (KK + 3) * d.C;
            for (int64_t r = blk * kRowsPerBlock; r < std::min(rows_out, (blk + 1) * kRowsPerBlock); ++r) {
              const int64_t b = r / d.Ho, oh = r % d.Ho;
              tap_rows(xp, b, d.H, d.W, d.C, d, oh, false, rows);
              const scalar_t* g = gp + r * d.Wo * d.C;
              acc_t* gc = gcp + r * d.Wo * d.C;
              if (epilogue) {
                conv_row<K, false>(rows, d.W, d.C, d.Wo, d.S, wp, bp, conv.data());
                with_flags(sp != nullptr, hswish, false, [&](auto scale_on, auto hswish_on, auto) {
                  epilogue_grad_row<decltype(scale_on)::value, decltype(hswish_on)::value>(
                      conv.data(), g, sp, tp, gc, part + (KK + 1) * d.C, part + (KK + 2) * d.C, d.Wo, d.C);
                });
              }
              if (epilogue) {
                param_row<K>(static_cast<const acc_t*>(gc), rows, d.W, d.C, d.Wo, d.S, part);
              } else {
                param_row<K>(g, rows, d.W, d.C, d.Wo, d.S, part);
              }
            }
          }
        });
        // Pass 2, over input rows: grad_x = the transposed conv of the conv-output grad (+ grad).
        auto input_grads = [&](const auto* src) {
          using G = std::remove_cv_t<std::remove_pointer_t<decltype(src)>>;
          at::parallel_for(0, d.B * d.H, 1, [&](int64_t begin, int64_t end) {
            const G* rows[K];
            std::vector<acc_t> acc(d.W * d.C);
            for (int64_t r = begin; r < end; ++r) {
              const int64_t b = r / d.H, ih = r % d.H;
              tap_rows(src, b, d.Ho, d.Wo, d.C, d, ih, true, rows);
              const auto no_scale = static_cast<const acc_t*>(nullptr);
              scalar_t* out = gxp + r * d.W * d.C;
              if constexpr (std::is_same_v<scalar_t, acc_t>) {
                if (!residual) {  // straight into grad_x
                  conv_row<K, true>(rows, d.Wo, d.C, d.W, d.S, wp, no_scale, out);
                  continue;
                }
              }
              conv_row<K, true>(rows, d.Wo, d.C, d.W, d.S, wp, no_scale, acc.data());
              // residual: stride 1, grad has x's shape
              if (residual) {
                epilogue_row<false, false, true>(acc.data(), no_scale, no_scale, gp + r * d.W * d.C, out, d.W, d.C);
              } else {
                epilogue_row<false, false, false>(acc.data(), no_scale, no_scale, gp, out, d.W, d.C);
              }
            }
          });
        };
        if (epilogue) {
          input_grads(static_cast<const acc_t*>(gcp));
        } else {
          input_grads(gp);
        }
      });
      // Blocks summed in index order: the same bits for any thread count.
      acc_t* out = sums.mutable_data_ptr<acc_t>();
      for (int64_t blk = 0; blk < blocks; ++blk) {
        const acc_t* part = pp + blk * (KK + 3) * d.C;
        for (int64_t c = 0; c < d.C; ++c) {
          for (int64_t tap = 0; tap < KK; ++tap) out[c * KK + tap] += part[tap * d.C + c];
          for (int64_t r = 0; r < 3; ++r) out[(KK + r) * d.C + c] += part[(KK + r) * d.C + c];
        }
      }
    });
  }
  auto [gw, gb, gs, gt] = depthwise_param_grads(sums, weight, bias, scale);
  return {grad_x, gw, gb, gs, gt};
}

}  // namespace

TORCH_LIBRARY_IMPL(mpvit_kernels, CPU, m) {
  m.impl("depthwise", &depthwise_cpu);
  m.impl("depthwise_backward", &depthwise_backward_cpu);
}

}  // namespace mpvit_kernels
