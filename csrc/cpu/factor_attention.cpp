// CPU twin of the factor_attention family (its GPU kernels are Triton's): what `auto` runs on CPU
// tensors. Per batch item b and head h, with q, k, v the head's (N, Ch) columns of qkv:
//   out = scale * q S + q * (bias + crpe(v)),   S = softmax_N(k)^T v   (Ch x Ch)
// 1. Context, one task per (b, h): the column max m of k, then one sweep over the tokens that
//    sums p = exp(k - m) into l and p^T v into S; S /= l.
// 2. Output, one task per (b, image row): per token, the CRPE convs of v (the heads that share a
//    window size are adjacent channels, so each window group is one vector loop over its
//    channels and taps), then scale * q S + q * conv.
// q, k, v are read in place from the qkv rows (any row and batch stride, unit channel stride).
// Every output element is one task's sum in a fixed order: bitwise the same for any number of
// threads. Its backward is eager ops (factor_attention_backward, mpvit_kernels/ops/factor_attention.py).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "vectorize.h"

// The clamps and NaN selects of exp_vec vectorize only when float compares may be assumed not to
// trap (they never do: no FP exception is ever enabled). Products and sums contract to FMAs (the
// AVX2 copy's target includes FMA): one rounding instead of two.
#pragma GCC optimize("no-trapping-math", "fp-contract=fast")

namespace mpvit_kernels {
namespace {

// exp in plain arithmetic, which GCC vectorizes (glibc's expf is a call per element, and the
// softmax takes one exp per key): x = n ln2 + r with |r| <= ln2/2 (ln2 split in two, Cody-Waite),
// exp(r) by Cephes' degree-6 polynomial (within about 1 ulp), 2^n written into the exponent
// bits. exp underflows below -87.3 (-inf included): 0 there. NaN stays NaN.
MPVIT_ALWAYS_INLINE float exp_vec(float x) {
  const float xc = x < -87.3f ? -87.3f : (x > 88.f ? 88.f : (x == x ? x : 0.f));
  const float n = (xc * 1.44269504088896341f + 12582912.f) - 12582912.f;  // round to nearest: + 1.5 * 2^23
  const float r = (xc - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float er = p * r * r + r + 1.f;
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  return x < -87.3f ? 0.f : (x == x ? er * two_n : x);
}

MPVIT_ALWAYS_INLINE double exp_vec(double x) { return std::exp(x); }

// Reads of strided rows (a head's columns are 16-64 bytes of each 3C-wide qkv row, q is read
// once per token) miss the hardware prefetcher: the lines of the n values at p are asked for
// ahead of their use (into every cache level for `soon`, else L2 and up).
template <bool soon = true, typename T>
MPVIT_ALWAYS_INLINE void prefetch(const T* p, int64_t n) {
  const char* c = reinterpret_cast<const char*>(p);
  const int64_t bytes = n * static_cast<int64_t>(sizeof(T));
  for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch(c + i, 0, soon ? 3 : 2);
  __builtin_prefetch(c + bytes - 1, 0, soon ? 3 : 2);  // a span that straddles a line
}

constexpr int64_t kPrefetchRows = 16;  // how far ahead the column sweeps ask for rows

// One window group: channels [c0, c1) convolved with k x k windows.
struct Window {
  int64_t c0, c1, k;
};

// exp of n values in place, one vector loop.
template <typename acc_t>
MPVIT_ALWAYS_INLINE void exp_array(acc_t* __restrict__ x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = exp_vec(x[i]);
}

constexpr int64_t kTokenTile = 16;  // tokens whose exps are taken in one vector loop

// S[d, e0..e0+V) += sum over the tile's tokens t of p[t, d] v[t, e0..e0+V), for rows d..d+R of S
// at once: R independent sums, each v vector loaded once for them.
template <int R, int V, typename T, typename acc_t>
MPVIT_ALWAYS_INLINE void context_block(const acc_t* __restrict__ p, const T* __restrict__ v, int64_t stride_n, int64_t tile,
                          int64_t Ch, int64_t d, int64_t e0, acc_t* __restrict__ S) {
  using vec = typename Lanes<acc_t, V>::type;
  vec acc[R];
  for (int i = 0; i < R; ++i) acc[i] = load<V, acc_t>(S + (d + i) * Ch + e0);
  for (int64_t t = 0; t < tile; ++t) {
    const vec vt = load<V, acc_t>(v + t * stride_n + e0);
    for (int i = 0; i < R; ++i) acc[i] += splat<V>(p[t * Ch + d + i]) * vt;
  }
  for (int i = 0; i < R; ++i) store<V, acc_t>(S + (d + i) * Ch + e0, acc[i]);
}

template <int V, typename T, typename acc_t>
MPVIT_ALWAYS_INLINE void context_rows(const acc_t* __restrict__ p, const T* __restrict__ v, int64_t stride_n, int64_t tile,
                         int64_t Ch, int64_t e0, acc_t* __restrict__ S) {
  int64_t d = 0;
  for (; d + 8 <= Ch; d += 8) context_block<8, V>(p, v, stride_n, tile, Ch, d, e0, S);
  for (; d + 4 <= Ch; d += 4) context_block<4, V>(p, v, stride_n, tile, Ch, d, e0, S);
  for (; d < Ch; ++d) context_block<1, V>(p, v, stride_n, tile, Ch, d, e0, S);
}

// m[d..d+V) = the maxima of k's columns over the N tokens, in registers, two rows at a time (a
// maximum kept in memory would make each row wait for the previous row's store). A NaN key
// makes its column NaN, as softmax does.
template <int V, typename T, typename acc_t>
MPVIT_ALWAYS_INLINE void column_max(const T* __restrict__ k, int64_t stride_n, int64_t N, int64_t d,
                                    acc_t* __restrict__ m) {
  using vec = typename Lanes<acc_t, V>::type;
  const auto take = [](const vec& x, const vec& a) __attribute__((always_inline)) {
    return (x > a) | (x != x) ? x : a;
  };
  vec a = splat<V>(-std::numeric_limits<acc_t>::infinity()), b = a;
  int64_t n = 0;
  for (; n + 2 <= N; n += 2) {
    if (n + kPrefetchRows + 1 < N) {
      prefetch(k + (n + kPrefetchRows) * stride_n + d, V);
      prefetch(k + (n + kPrefetchRows + 1) * stride_n + d, V);
    }
    a = take(load<V, acc_t>(k + n * stride_n + d), a);
    b = take(load<V, acc_t>(k + (n + 1) * stride_n + d), b);
  }
  if (n < N) a = take(load<V, acc_t>(k + n * stride_n + d), a);
  store<V, acc_t>(m + d, take(b, a));
}

// l[d..d+V) += the column sums of a tile of exps p (tile, Ch), in registers, rows in order.
template <int V, typename acc_t>
MPVIT_ALWAYS_INLINE void column_sums(const acc_t* __restrict__ p, int64_t tile, int64_t Ch, int64_t d,
                                     acc_t* __restrict__ l) {
  using vec = typename Lanes<acc_t, V>::type;
  vec a = load<V, acc_t>(l + d);
  for (int64_t t = 0; t < tile; ++t) a += load<V, acc_t>(p + t * Ch + d);
  store<V, acc_t>(l + d, a);
}

// S (Ch x Ch, row d, column e) = softmax over the N tokens of k's column d, times v.
// work: (2 + kTokenTile) * Ch.
template <typename T, typename acc_t>
MPVIT_ALWAYS_INLINE void head_context(const T* __restrict__ k, const T* __restrict__ v, int64_t stride_n, int64_t N,
                                      int64_t Ch, acc_t* __restrict__ S, acc_t* __restrict__ work) {
  acc_t* m = work;
  acc_t* l = work + Ch;
  acc_t* p = work + 2 * Ch;  // (kTokenTile, Ch): exp(k - m) of a tile of tokens
  int64_t d = 0;
  for (; d + 8 <= Ch; d += 8) column_max<8>(k, stride_n, N, d, m);
  for (; d + 4 <= Ch; d += 4) column_max<4>(k, stride_n, N, d, m);
  for (; d + 2 <= Ch; d += 2) column_max<2>(k, stride_n, N, d, m);
  for (; d < Ch; ++d) column_max<1>(k, stride_n, N, d, m);
  for (d = 0; d < Ch; ++d) l[d] = acc_t(0);
  for (int64_t i = 0; i < Ch * Ch; ++i) S[i] = acc_t(0);
  for (int64_t n0 = 0; n0 < N; n0 += kTokenTile) {
    const int64_t tile = std::min(kTokenTile, N - n0);
    for (int64_t t = n0 + kTokenTile; t < std::min(n0 + 2 * kTokenTile, N); ++t) {  // the next tile's rows
      prefetch(k + t * stride_n, Ch);
      prefetch(v + t * stride_n, Ch);
    }
    for (int64_t t = 0; t < tile; ++t) {
      const T* kr = k + (n0 + t) * stride_n;
      for (int64_t d = 0; d < Ch; ++d) p[t * Ch + d] = static_cast<acc_t>(kr[d]) - m[d];
    }
    exp_array(p, tile * Ch);
    for (d = 0; d + 8 <= Ch; d += 8) column_sums<8>(p, tile, Ch, d, l);
    for (; d + 4 <= Ch; d += 4) column_sums<4>(p, tile, Ch, d, l);
    for (; d + 2 <= Ch; d += 2) column_sums<2>(p, tile, Ch, d, l);
    for (; d < Ch; ++d) column_sums<1>(p, tile, Ch, d, l);
    const T* vt = v + n0 * stride_n;
    int64_t e0 = 0;
    for (; e0 + 8 <= Ch; e0 += 8) context_rows<8>(p, vt, stride_n, tile, Ch, e0, S);
    for (; e0 + 4 <= Ch; e0 += 4) context_rows<4>(p, vt, stride_n, tile, Ch, e0, S);
    for (; e0 + 2 <= Ch; e0 += 2) context_rows<2>(p, vt, stride_n, tile, Ch, e0, S);
    for (; e0 < Ch; ++e0) context_rows<1>(p, vt, stride_n, tile, Ch, e0, S);
  }
  for (int64_t d = 0; d < Ch; ++d) {
    const acc_t inv = acc_t(1) / l[d];
    for (int64_t e = 0; e < Ch; ++e) S[d * Ch + e] *= inv;
  }
}

// The CRPE sums of P adjacent tokens x..x+P of an image row, channels c0..c0+V: bias + the k x k
// taps of w * v, P independent sums (one pixel's taps alone would be one chain of dependent
// adds). CHECKED: some taps fall outside the row (the row's edges). vrows, wt as crpe_block's.
template <int P, bool CHECKED, int K, int V, typename T, typename acc_t>
MPVIT_ALWAYS_INLINE void crpe_pixels(const T* const* vrows, int64_t k_rt, int64_t x, int64_t W, int64_t stride_n, int64_t C,
                        int64_t c0, const acc_t* __restrict__ wt, int64_t kmax, const acc_t* __restrict__ bias,
                        acc_t* __restrict__ conv) {
  using vec = typename Lanes<acc_t, V>::type;
  const int64_t k = K ? K : k_rt;
  const int64_t r = k / 2, pad = kmax / 2 - r;
  vec acc[P];
  for (int i = 0; i < P; ++i) acc[i] = load<V, acc_t>(bias + c0);
  for (int64_t ky = 0; ky < k; ++ky) {
    const T* row = vrows[ky];
    if (row == nullptr) continue;
    const acc_t* wrow = wt + ((pad + ky) * kmax + pad) * C + c0;
    for (int64_t kx = 0; kx < k; ++kx) {
      const int64_t xx = x - r + kx;
      if (CHECKED && (xx < 0 || xx >= W)) continue;
      const vec w = load<V, acc_t>(wrow + kx * C);
      const T* v = row + xx * stride_n + c0;
      for (int i = 0; i < P; ++i) acc[i] += w * load<V, acc_t>(v + i * stride_n);
    }
  }
  for (int i = 0; i < P; ++i) store<V, acc_t>(conv + (x + i) * C + c0, acc[i]);
}

// The CRPE conv of channels [c0, c0 + V) of one window group over the W tokens of an image row:
// conv[x * C + c] = bias[c] + sum over the k x k taps of w * v. K: the window, or 0 for a k known
// at run time only (k_rt). vrows[ky]: v (at its channel 0) of the image row of tap row ky, null
// outside the image. wt: (KMAX*KMAX, C), each window centred.
template <int K, int V, typename T, typename acc_t>
MPVIT_ALWAYS_INLINE void crpe_block(const T* const* vrows, int64_t k_rt, int64_t W, int64_t stride_n, int64_t C,
                                    int64_t c0, const acc_t* __restrict__ wt, int64_t kmax,
                                    const acc_t* __restrict__ bias, acc_t* __restrict__ conv) {
  const int64_t r = (K ? K : k_rt) / 2;
  int64_t x = 0;
  for (; x < W && x < r; ++x) crpe_pixels<1, true, K, V>(vrows, k_rt, x, W, stride_n, C, c0, wt, kmax, bias, conv);
  for (; x + 4 + r <= W; x += 4) crpe_pixels<4, false, K, V>(vrows, k_rt, x, W, stride_n, C, c0, wt, kmax, bias, conv);
  for (; x < W; ++x) crpe_pixels<1, true, K, V>(vrows, k_rt, x, W, stride_n, C, c0, wt, kmax, bias, conv);
}

// out[e0..e0+V) = scale * sum_d q[d] Sh[d, e0..) + q[e0..) * conv[e0..) for one head of P adjacent
// tokens of a row at once: each S vector is loaded once for the P independent sums. Every sum runs
// over d in order, whatever P: the same bits for any blocking of the row.
template <int P, int V, typename T, typename acc_t>
MPVIT_ALWAYS_INLINE void head_outputs(const T* __restrict__ qh, int64_t stride_n, const acc_t* __restrict__ Sh,
                                      const acc_t* __restrict__ conv, int64_t C, int64_t Ch, int64_t e0, acc_t scale,
                                      T* __restrict__ out) {
  using vec = typename Lanes<acc_t, V>::type;
  vec acc[P];
  for (int i = 0; i < P; ++i) acc[i] = splat<V>(acc_t(0));
  for (int64_t d = 0; d < Ch; ++d) {
    const vec s = load<V, acc_t>(Sh + d * Ch + e0);
    for (int i = 0; i < P; ++i) acc[i] += splat<V>(static_cast<acc_t>(qh[i * stride_n + d])) * s;
  }
  for (int i = 0; i < P; ++i)
    store<V, acc_t>(out + i * C + e0, splat<V>(scale) * acc[i] +
                                          load<V, acc_t>(qh + i * stride_n + e0) * load<V, acc_t>(conv + i * C + e0));
}

// The CRPE conv of one window group over a row, its channels in blocks of 8, 4, 2, then 1, its window
// a compile-time constant where it is 3, 5 or 7.
template <int K, typename T, typename acc_t>
MPVIT_ALWAYS_INLINE void window_blocks(const T* const* vrows, const Window& g, int64_t W, int64_t stride_n, int64_t C,
                                       const acc_t* wt, int64_t kmax, const acc_t* bias, acc_t* conv) {
  int64_t c = g.c0;
  for (; c + 8 <= g.c1; c += 8) crpe_block<K, 8>(vrows, g.k, W, stride_n, C, c, wt, kmax, bias, conv);
  for (; c + 4 <= g.c1; c += 4) crpe_block<K, 4>(vrows, g.k, W, stride_n, C, c, wt, kmax, bias, conv);
  for (; c + 2 <= g.c1; c += 2) crpe_block<K, 2>(vrows, g.k, W, stride_n, C, c, wt, kmax, bias, conv);
  for (; c < g.c1; ++c) crpe_block<K, 1>(vrows, g.k, W, stride_n, C, c, wt, kmax, bias, conv);
}

template <typename T, typename acc_t>
MPVIT_ALWAYS_INLINE void window_rows(const T* const* vrows, const Window& g, int64_t W, int64_t stride_n, int64_t C,
                                     const acc_t* wt, int64_t kmax, const acc_t* bias, acc_t* conv) {
  if (g.k == 3) return window_blocks<3>(vrows, g, W, stride_n, C, wt, kmax, bias, conv);
  if (g.k == 5) return window_blocks<5>(vrows, g, W, stride_n, C, wt, kmax, bias, conv);
  if (g.k == 7) return window_blocks<7>(vrows, g, W, stride_n, C, wt, kmax, bias, conv);
  window_blocks<0>(vrows, g, W, stride_n, C, wt, kmax, bias, conv);
}

// out = scale * q S + q * conv for P tokens x..x+P of a row: q at `q` (token stride stride_n), S the
// item's (heads, Ch, Ch) contexts, conv (W, C).
template <int P, typename T, typename acc_t>
MPVIT_ALWAYS_INLINE void combine_tokens(const T* __restrict__ q, int64_t stride_n, int64_t x, int64_t C, int64_t Ch,
                                        int64_t heads, const acc_t* __restrict__ S, const acc_t* __restrict__ conv,
                                        acc_t scale, T* __restrict__ out) {
  for (int64_t h = 0; h < heads; ++h) {
    const T* qh = q + x * stride_n + h * Ch;
    const acc_t *Sh = S + h * Ch * Ch, *ch = conv + x * C + h * Ch;
    T* oh = out + x * C + h * Ch;
    int64_t e0 = 0;
    for (; e0 + 8 <= Ch; e0 += 8) head_outputs<P, 8>(qh, stride_n, Sh, ch, C, Ch, e0, scale, oh);
    for (; e0 + 4 <= Ch; e0 += 4) head_outputs<P, 4>(qh, stride_n, Sh, ch, C, Ch, e0, scale, oh);
    for (; e0 + 2 <= Ch; e0 += 2) head_outputs<P, 2>(qh, stride_n, Sh, ch, C, Ch, e0, scale, oh);
    for (; e0 < Ch; ++e0) head_outputs<P, 1>(qh, stride_n, Sh, ch, C, Ch, e0, scale, oh);
  }
}

// The same for the W tokens of a row, 8, then 4, then 1 at a time.
template <typename T, typename acc_t>
MPVIT_ALWAYS_INLINE void combine_row(const T* __restrict__ q, int64_t stride_n, int64_t W, int64_t C, int64_t Ch,
                                     int64_t heads, const acc_t* __restrict__ S, const acc_t* __restrict__ conv,
                                     acc_t scale, T* __restrict__ out) {
  int64_t x = 0;
  for (; x + 8 <= W; x += 8) combine_tokens<8>(q, stride_n, x, C, Ch, heads, S, conv, scale, out);
  for (; x + 4 <= W; x += 4) combine_tokens<4>(q, stride_n, x, C, Ch, heads, S, conv, scale, out);
  for (; x < W; ++x) combine_tokens<1>(q, stride_n, x, C, Ch, heads, S, conv, scale, out);
}

at::Tensor factor_attention_cpu(const at::Tensor& qkv_in, int64_t H, int64_t W, int64_t num_heads, double scale,
                                at::TensorList crpe_weights, at::TensorList crpe_biases) {
  TORCH_CHECK_VALUE(qkv_in.dim() == 3 && qkv_in.size(2) % 3 == 0, "factor_attention: qkv must be (B, N, 3*C), got ",
                    qkv_in.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(qkv_in.scalar_type()), "factor_attention: qkv must be floating point, got ",
                   qkv_in.scalar_type());
  const int64_t B = qkv_in.size(0), N = qkv_in.size(1), C = qkv_in.size(2) / 3;
  TORCH_CHECK_VALUE(num_heads > 0 && C % num_heads == 0, "factor_attention: num_heads must divide C=", C, ", got ",
                    num_heads);
  TORCH_CHECK_VALUE(H > 0 && W > 0 && H * W == N, "factor_attention: H*W must be N=", N, ", got ", H, "x", W);
  TORCH_CHECK_VALUE(!crpe_weights.empty() && crpe_weights.size() == crpe_biases.size(),
                    "factor_attention: crpe_weights and crpe_biases must be non-empty lists of one length");
  const int64_t Ch = C / num_heads;
  std::vector<Window> windows;
  int64_t kmax = 1, c0 = 0;
  for (size_t i = 0; i < crpe_weights.size(); ++i) {
    const at::Tensor& w = crpe_weights[i];
    const int64_t k = w.dim() == 4 ? w.size(3) : 0;
    TORCH_CHECK_VALUE(w.dim() == 4 && w.size(1) == 1 && w.size(2) == k && k % 2 == 1 && w.size(0) % Ch == 0 &&
                          w.size(0) > 0,
                      "factor_attention: crpe_weights[", i, "] must be (whole heads of ", Ch,
                      " channels, 1, k, k) with odd k, got ", w.sizes());
    TORCH_CHECK_VALUE(crpe_biases[i].dim() == 1 && crpe_biases[i].size(0) == w.size(0), "factor_attention: crpe_biases[",
                      i, "] must be (", w.size(0), ",), got ", crpe_biases[i].sizes());
    windows.push_back({c0, c0 + w.size(0), k});
    c0 += w.size(0);
    kmax = std::max(kmax, k);
  }
  TORCH_CHECK_VALUE(c0 == C, "factor_attention: the CRPE windows cover ", c0, " channels, expected C=", C);

  // fp16 and bf16 run the fp32 kernels on an fp32 copy: the same sums (a 16-bit load widens
  // exactly, fp32 accumulates either way, and the one rounding is the final store), while their
  // own instantiations were two fifths of this file's compile time (43 -> 25 s of g++).
  if (qkv_in.scalar_type() == at::kHalf || qkv_in.scalar_type() == at::kBFloat16) {
    return factor_attention_cpu(qkv_in.to(at::kFloat), H, W, num_heads, scale, crpe_weights, crpe_biases)
        .to(qkv_in.scalar_type());
  }
  at::Tensor out = at::empty({B, N, C}, qkv_in.options());
  if (out.numel() == 0) return out;
  const at::Tensor qkv = qkv_in.stride(2) == 1 ? qkv_in : qkv_in.contiguous();
  AT_DISPATCH_FLOATING_TYPES(qkv.scalar_type(), "factor_attention_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc = c10::CppTypeToScalarType<acc_t>::value;
    // CRPE weights as (KMAX*KMAX, C): each window centred (zeros around a smaller one, never read),
    // a tap's weights unit-stride over the channels.
    at::Tensor wt = at::zeros({kmax * kmax, C}, qkv.options().dtype(acc));
    const at::Tensor bias = at::cat(crpe_biases).to(acc).contiguous();
    acc_t* wtp = wt.mutable_data_ptr<acc_t>();
    for (size_t i = 0; i < windows.size(); ++i) {
      const Window& g = windows[i];
      const at::Tensor w = crpe_weights[i].to(acc).contiguous();  // (c, 1, k, k)
      const acc_t* wp = w.const_data_ptr<acc_t>();
      const int64_t pad = (kmax - g.k) / 2;
      for (int64_t c = g.c0; c < g.c1; ++c)
        for (int64_t ky = 0; ky < g.k; ++ky)
          for (int64_t kx = 0; kx < g.k; ++kx)
            wtp[((ky + pad) * kmax + kx + pad) * C + c] = wp[((c - g.c0) * g.k + ky) * g.k + kx];
    }
    at::Tensor S = at::empty({B * num_heads, Ch * Ch}, qkv.options().dtype(acc));
    const scalar_t* qp = qkv.const_data_ptr<scalar_t>();
    const int64_t sb = qkv.stride(0), sn = qkv.stride(1);
    acc_t* sp = S.mutable_data_ptr<acc_t>();
    at::parallel_for(0, B * num_heads, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> work((2 + kTokenTile) * Ch);
      with_best_isa<acc_t>([&]() __attribute__((always_inline)) {
        for (int64_t bh = begin; bh < end; ++bh) {
          const scalar_t* item = qp + (bh / num_heads) * sb + (bh % num_heads) * Ch;
          head_context(item + C, item + 2 * C, sn, N, Ch, sp + bh * Ch * Ch, work.data());
        }
      });
    });
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const acc_t* bp = bias.const_data_ptr<acc_t>();
    at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> conv(W * C);
      std::vector<const scalar_t*> vrows(kmax);
      with_best_isa<acc_t>([&]() __attribute__((always_inline)) {
        for (int64_t row = begin; row < end; ++row) {
          const int64_t b = row / H, y = row % H;
          const scalar_t* item = qp + b * sb;
          // q of the row's tokens, into L2 while the CRPE convs run
          for (int64_t x = 0; x < W; ++x) prefetch<false>(item + (y * W + x) * sn, C);
          for (const Window& g : windows) {
            const int64_t r = g.k / 2;
            for (int64_t ky = 0; ky < g.k; ++ky) {
              const int64_t yy = y - r + ky;
              vrows[ky] = yy >= 0 && yy < H ? item + yy * W * sn + 2 * C : nullptr;
            }
            window_rows(vrows.data(), g, W, sn, C, wtp, kmax, bp, conv.data());
          }
          combine_row(item + y * W * sn, sn, W, C, Ch, num_heads, sp + b * num_heads * Ch * Ch, conv.data(),
                      static_cast<acc_t>(scale), op + (b * N + y * W) * C);
        }
      });
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mpvit_kernels, CPU, m) { m.impl("factor_attention", &factor_attention_cpu); }

}  // namespace mpvit_kernels
