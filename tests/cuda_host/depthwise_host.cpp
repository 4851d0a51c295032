// The depthwise CUDA kernels (csrc/cuda/depthwise_kernels.cuh) and their launch sequences, run
// on the CPU through shim.h, behind a C interface for tests/test_depthwise.py (ctypes).
#include "shim.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "../../csrc/cuda/depthwise_kernels.cuh"

using namespace mpvit_kernels::depthwise;

namespace {

struct Call {
  int K, stride, hswish, residual;
  int64_t B, H, W, C;
  const void *x, *weight, *bias, *scale, *shift, *grad;
  void *y, *gconv, *partial, *grad_x, *param_grads;
};

template <typename T, typename A, int VEC, int K>
void run(const Call& c, bool backward) {
  const Geometry g = geometry<VEC>(c.B, c.H, c.W, c.C, c.stride);
  auto p = [](const void* v) { return static_cast<const A*>(v); };
  if (!backward) {
    run_forward<T, A, VEC, K>(ShimLaunch{kThreads}, g, static_cast<const T*>(c.x), p(c.weight), p(c.bias), p(c.scale),
                              p(c.shift), static_cast<T*>(c.y), c.hswish, c.residual);
  } else {
    run_backward<T, A, VEC, K>(ShimLaunch{kThreads}, g, static_cast<const T*>(c.grad), static_cast<const T*>(c.x),
                               p(c.weight), p(c.bias), p(c.scale), p(c.shift), c.hswish, c.residual,
                               static_cast<A*>(c.gconv), static_cast<A*>(c.partial), static_cast<T*>(c.grad_x),
                               static_cast<A*>(c.param_grads));
  }
}

template <typename T, typename A, int VEC>
int by_k(const Call& c, bool backward) {
  switch (c.K) {
    case 3: run<T, A, VEC, 3>(c, backward); return 0;
    case 5: run<T, A, VEC, 5>(c, backward); return 0;
    case 7: run<T, A, VEC, 7>(c, backward); return 0;
  }
  return 1;
}

template <typename T, typename A>
int by_vec(const Call& c, int vec, bool backward) {
  constexpr int V = 16 / sizeof(T);
  return vec == 1 ? by_k<T, A, 1>(c, backward) : vec == V ? by_k<T, A, V>(c, backward) : 1;
}

int dispatch(const Call& c, int dtype, int vec, bool backward) {
  switch (dtype) {
    case 0: return by_vec<float, float>(c, vec, backward);
    case 1: return by_vec<double, double>(c, vec, backward);
    case 2: return by_vec<c10::Half, float>(c, vec, backward);
    case 3: return by_vec<c10::BFloat16, float>(c, vec, backward);
  }
  return 1;
}

}  // namespace

extern "C" {

static Geometry geometry_for(int vec, int64_t B, int64_t H, int64_t W, int64_t C, int stride) {
  return vec == 1 ? geometry<1>(B, H, W, C, stride) : vec == 2 ? geometry<2>(B, H, W, C, stride)
       : vec == 4 ? geometry<4>(B, H, W, C, stride) : geometry<8>(B, H, W, C, stride);
}

// Scratch sizes (elements of the accumulation type) of the backward.
int64_t dw_partial_numel(int vec, int K, int64_t B, int64_t H, int64_t W, int64_t C, int stride) {
  return partial_numel(geometry_for(vec, B, H, W, C, stride), K);
}

// Whether depthwise.cu accepts these sizes (fits_grid): 1 or 0.
int dw_fits_grid(int vec, int64_t B, int64_t H, int64_t W, int64_t C, int stride) {
  return fits_grid(geometry_for(vec, B, H, W, C, stride));
}

// dtype: 0 float, 1 double, 2 half, 3 bfloat16; vec: 1 or 16 / sizeof(element). All tensors NHWC, dense;
// parameters in the accumulation type (float, double for double). Returns 0 when it ran.
int dw_forward(int dtype, int vec, int K, int64_t B, int64_t H, int64_t W, int64_t C, int stride, const void* x,
               const void* weight, const void* bias, const void* scale, const void* shift, int hswish, int residual,
               void* y) {
  Call c{K, stride, hswish, residual, B, H, W, C, x, weight, bias, scale, shift, nullptr, y, nullptr, nullptr,
         nullptr, nullptr};
  return dispatch(c, dtype, vec, false);
}

int dw_backward(int dtype, int vec, int K, int64_t B, int64_t H, int64_t W, int64_t C, int stride, const void* grad,
                const void* x, const void* weight, const void* bias, const void* scale, const void* shift, int hswish,
                int residual, void* gconv, void* partial, void* grad_x, void* param_grads) {
  Call c{K, stride, hswish, residual, B, H, W, C, x, weight, bias, scale, shift, grad, nullptr, gconv, partial,
         grad_x, param_grads};
  return dispatch(c, dtype, vec, true);
}
}
